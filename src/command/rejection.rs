//! Why an extractor failed: each converts into the command's error reply, or reaches the
//! handler as the `Err` of a `Result<T, T::Rejection>` argument.

use std::fmt;

use crate::error::CommandError;

/// The payload did not fit the type of a [`Payload<T>`](crate::extract::Payload).
///
/// As a reply it is `EINVALID` with the message `invalid payload: ` followed by serde's
/// description (its [`Display`](fmt::Display)); serde's error is its
/// [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct PayloadRejection {
    error: serde_json::Error,
}

impl PayloadRejection {
    pub(crate) fn new(error: serde_json::Error) -> Self {
        PayloadRejection { error }
    }
}

impl fmt::Display for PayloadRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid payload: {}", self.error)
    }
}

impl std::error::Error for PayloadRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<PayloadRejection> for CommandError {
    fn from(rejection: PayloadRejection) -> Self {
        CommandError::invalid(rejection.to_string())
    }
}

/// No value of the type an [`Extension<T>`](crate::extract::Extension) asked for was in
/// the command's or the upgrade request's extensions.
///
/// A server bug rather than a client error: as a reply it is `ESERVER` "internal server
/// error", and the type is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingExtension {
    type_name: &'static str,
}

impl MissingExtension {
    pub(crate) fn new(type_name: &'static str) -> Self {
        MissingExtension { type_name }
    }

    /// The name of the type that was missing.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

impl fmt::Display for MissingExtension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing request extension {}", self.type_name)
    }
}

impl std::error::Error for MissingExtension {}

impl From<MissingExtension> for CommandError {
    fn from(rejection: MissingExtension) -> Self {
        tracing::error!(extension = rejection.type_name, "missing request extension");
        CommandError::internal()
    }
}

/// The type a [`State<T>`](crate::extract::State) asked for was never registered with
/// [`MeshBuilder::state`](crate::MeshBuilder::state).
///
/// A server bug rather than a client error: as a reply it is `ESERVER` "internal server
/// error", and the type is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingState {
    type_name: &'static str,
}

impl MissingState {
    pub(crate) fn new(type_name: &'static str) -> Self {
        MissingState { type_name }
    }

    /// The name of the type that was never registered.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

impl fmt::Display for MissingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state type {} was never registered", self.type_name)
    }
}

impl std::error::Error for MissingState {}

impl From<MissingState> for CommandError {
    fn from(rejection: MissingState) -> Self {
        tracing::error!(
            state = rejection.type_name,
            "state type was never registered"
        );
        CommandError::internal()
    }
}
