//! Errors: what a command fails with on the wire, and what the server-side API fails with.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// The error type every command service may fail with: tower's boxed error, so that any
/// `Layer` (a timeout, a load shedder, your own) composes without adapters.
pub type BoxError = tower::BoxError;

/// A command's failure as the client sees it: the reply payload `{error, code, name}`.
///
/// Codes the engine uses (handlers may choose their own):
///
/// | code | name | when |
/// |---|---|---|
/// | `ENOTFOUND` | `CommandError` | unknown command |
/// | `ESERVER` | `Error` | a handler failed without a code, or panicked; internal failures say only "internal server error" |
/// | `EINVALID` | `CommandError` | the frame or payload is malformed |
/// | `ETIMEOUT` | `CommandError` | a timeout layer fired |
/// | `EUNAVAILABLE` | `CommandError` | the backend is unreachable |
/// | `EFORBIDDEN` | `CommandError` | a guard or auth layer refused |
/// | `EOVERLOADED` | `CommandError` | a limit refused the command |
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandError {
    #[serde(rename = "error")]
    message: Cow<'static, str>,
    code: Cow<'static, str>,
    name: Cow<'static, str>,
}

impl CommandError {
    /// An error with a code of your choosing (name `Error`).
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        CommandError {
            message: message.into(),
            code: code.into(),
            name: Cow::Borrowed("Error"),
        }
    }

    fn engine(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        CommandError::new(code, message).with_name("CommandError")
    }

    /// Replaces the error's `name` field.
    pub fn with_name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// `ENOTFOUND`: no command of that name.
    pub fn not_found(command: &str) -> Self {
        Self::engine("ENOTFOUND", format!("Command \"{command}\" not found"))
    }

    /// `EINVALID`: the frame or payload is malformed.
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::engine("EINVALID", message)
    }

    /// `EFORBIDDEN`: a guard or an auth layer refused.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::engine("EFORBIDDEN", message)
    }

    /// `ETIMEOUT`: the command did not finish in time.
    pub fn timeout() -> Self {
        Self::engine("ETIMEOUT", "Command timed out")
    }

    /// `EOVERLOADED`: a limit refused the command.
    pub fn overloaded() -> Self {
        Self::engine("EOVERLOADED", "Server overloaded, try again later")
    }

    /// `EOVERLOADED` with a message naming the per-connection limit that refused.
    pub fn limit(message: impl Into<Cow<'static, str>>) -> Self {
        Self::engine("EOVERLOADED", message)
    }

    /// `EUNAVAILABLE`: the backend is unreachable.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::engine("EUNAVAILABLE", message)
    }

    /// `ESERVER` with a message: a handler failed on purpose.
    pub fn server(message: impl Into<Cow<'static, str>>) -> Self {
        CommandError::new("ESERVER", message)
    }

    /// `ESERVER` without detail: an internal failure whose detail belongs in the log.
    pub fn internal() -> Self {
        CommandError::server("internal server error")
    }

    /// The machine-readable code, for example `ENOTFOUND`.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error's kind, for example `CommandError`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Turns whatever a command service failed with into the error the client sees.
    ///
    /// A `CommandError` passes through; tower's timeout and load-shed errors get their
    /// codes; a [`MeshError`] hides its detail; any other error keeps its message under
    /// `ESERVER`, as mesh does for a thrown `Error`.
    pub fn from_box(err: BoxError) -> Self {
        let err = match err.downcast::<CommandError>() {
            Ok(err) => return *err,
            Err(err) => err,
        };
        let err = match err.downcast::<MeshError>() {
            Ok(err) => return (*err).into(),
            Err(err) => err,
        };
        if err.is::<tower::timeout::error::Elapsed>() {
            return CommandError::timeout();
        }
        if err.is::<tower::load_shed::error::Overloaded>() {
            return CommandError::overloaded();
        }
        CommandError::server(err.to_string())
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CommandError {}

/// Lets extractors that cannot fail use `Infallible` as their rejection.
impl From<std::convert::Infallible> for CommandError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// A failure of the server-side API ([`Mesh`](crate::Mesh) methods).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The backend could not be reached; the operation did not happen.
    #[error("backend unavailable: {0}")]
    Unavailable(#[source] BackendError),
    /// The backend answered something unexpected (for example a corrupt value).
    #[error("backend returned corrupt data: {0}")]
    Corrupt(#[source] BackendError),
    /// The mesh is shutting down.
    #[error("the mesh is shutting down")]
    ShuttingDown,
    /// A value given to the mesh could not be serialised to JSON.
    #[error("value does not serialise: {0}")]
    Encode(#[source] Arc<serde_json::Error>),
    /// A value over one of the mesh's byte limits; nothing was stored or sent.
    #[error("{what} would be {size} bytes, over the limit of {limit} bytes ({setting})")]
    TooLarge {
        /// What was refused (for example `record "doc"`).
        what: String,
        /// The builder setting that sets the limit (for example `max_record_bytes`).
        setting: &'static str,
        /// The limit, in bytes.
        limit: usize,
        /// The refused value's size, in bytes.
        size: usize,
    },
}

/// What went wrong inside a backend: what it was doing, and the error that stopped it
/// (for example the Redis client's), kept as the [`source`](std::error::Error::source).
#[derive(Debug, Clone)]
pub struct BackendError {
    context: Cow<'static, str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// An error described by `context` alone.
    pub fn new(context: impl Into<Cow<'static, str>>) -> Self {
        BackendError {
            context: context.into(),
            source: None,
        }
    }

    /// An error: `context` (what the backend was doing) failed because of `source`.
    pub fn caused_by(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError {
            context: context.into(),
            source: Some(Arc::from(source.into())),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is part of the message too: most logs print only the top error.
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl From<&'static str> for BackendError {
    fn from(context: &'static str) -> Self {
        BackendError::new(context)
    }
}

impl From<String> for BackendError {
    fn from(context: String) -> Self {
        BackendError::new(context)
    }
}

impl From<MeshError> for CommandError {
    fn from(err: MeshError) -> Self {
        match err {
            MeshError::Unavailable(detail) => {
                tracing::warn!(%detail, "backend unavailable");
                CommandError::unavailable("Service temporarily unavailable, try again later")
            }
            MeshError::ShuttingDown => CommandError::unavailable("Server is shutting down"),
            MeshError::Corrupt(detail) => {
                tracing::error!(%detail, "backend returned corrupt data");
                CommandError::internal()
            }
            MeshError::Encode(detail) => {
                tracing::error!(%detail, "a value did not serialise");
                CommandError::internal()
            }
            too_large @ MeshError::TooLarge { .. } => CommandError::invalid(too_large.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_tower_errors() {
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(CommandError::from_box(elapsed).code(), "ETIMEOUT");
        let overloaded: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(CommandError::from_box(overloaded).code(), "EOVERLOADED");
        let plain: BoxError = "This is a test error".into();
        let err = CommandError::from_box(plain);
        assert_eq!(
            (err.code(), err.message(), err.name()),
            ("ESERVER", "This is a test error", "Error")
        );
        let corrupt: BoxError = Box::new(MeshError::Corrupt("secret".into()));
        assert!(std::error::Error::source(&MeshError::Corrupt("secret".into())).is_some());
        assert_eq!(
            CommandError::from_box(corrupt).message(),
            "internal server error"
        );
    }
}
