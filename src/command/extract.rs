//! Extractors: the arguments an async-fn handler may take.
//!
//! As in axum, there are two kinds. An extractor that only reads the request
//! ([`FromCommandParts`]) may be any argument. One that consumes it, the payload
//! ([`FromCommandRequest`], such as [`Payload<T>`]), may only be the last: the payload is
//! moved into it rather than cloned, so nothing after it could see the payload.
//! [`Handler`](super::Handler) is implemented only for functions whose arguments follow
//! that rule, so breaking it is a compile error rather than a silent `null`.

use std::any::type_name;
use std::convert::Infallible;
use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::rejection::{MissingExtension, MissingState, PayloadRejection};
use super::CommandRequest;
use crate::connection::Connection;
use crate::error::CommandError;
use crate::mesh::Mesh;

mod private {
    /// Marks the [`FromCommandRequest`](super::FromCommandRequest) impl every
    /// [`FromCommandParts`](super::FromCommandParts) extractor gets for free.
    #[derive(Debug, Clone, Copy)]
    pub enum ViaParts {}

    /// Marks [`FromCommandRequest`](super::FromCommandRequest) impls of extractors that
    /// consume the request: the default, and what your own consuming extractors implement.
    #[derive(Debug, Clone, Copy)]
    pub enum ViaRequest {}
}

/// An extractor that only reads the command request, so a handler may take it as any of
/// its arguments, in any order. [`Connection`], [`Mesh`], [`Extension<T>`] and
/// [`State<T>`] are such extractors, and so are `Option` and `Result` of them.
///
/// Implement it for your own types to use them as handler arguments. An extractor that
/// needs to own the request (to move the payload out of it) implements
/// [`FromCommandRequest`] instead and must be the handler's last argument.
///
/// Every `FromCommandParts` extractor is a [`FromCommandRequest`] extractor too, so it may
/// also be the last argument.
///
/// ```
/// use tower_mesh::extract::{Connection, FromCommandParts};
/// use tower_mesh::{CommandError, CommandRequest, Mesh};
///
/// /// The caller's bearer token, from the WebSocket upgrade request.
/// struct Token(String);
///
/// impl FromCommandParts for Token {
///     type Rejection = CommandError;
///
///     fn from_command_parts(request: &CommandRequest) -> Result<Self, CommandError> {
///         request
///             .request_parts()
///             .headers
///             .get("authorization")
///             .and_then(|value| value.to_str().ok())
///             .and_then(|value| value.strip_prefix("Bearer "))
///             .map(|token| Token(token.to_owned()))
///             .ok_or_else(|| CommandError::forbidden("no bearer token"))
///     }
/// }
///
/// async fn whoami(Token(token): Token, connection: Connection) -> String {
///     format!("{} on {}", token, connection.id())
/// }
///
/// let (_layer, _mesh) = Mesh::builder().command("whoami", whoami).build();
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a command handler argument other than the last",
    label = "not an extractor that only reads the request",
    note = "every handler argument but the last must implement `FromCommandParts`: `Connection`, `Mesh`, `Extension<T>`, `State<T>`, `Option` or `Result` of those, or your own",
    note = "an extractor that consumes the payload (`Payload<T>`, or any other `FromCommandRequest` extractor) must be the handler's last argument"
)]
pub trait FromCommandParts: Sized {
    /// What a failed extraction becomes: unless the handler takes
    /// `Result<Self, Self::Rejection>`, the command's error reply, and the handler does
    /// not run.
    type Rejection: Into<CommandError>;

    /// Builds the argument from a shared borrow of the request.
    fn from_command_parts(request: &CommandRequest) -> Result<Self, Self::Rejection>;
}

/// An extractor that consumes the command request: it may only be the handler's **last**
/// argument. [`Payload<T>`] is one: it moves the payload out of the request instead of
/// cloning it.
///
/// Every [`FromCommandParts`] extractor implements this trait too (through a blanket
/// impl, told apart by the marker `M`, which you never name), so the last argument may
/// be either kind. Implement this trait, with the default `M`, for your own extractors
/// that need the request by value.
///
/// The rule is checked when the handler is registered. Here `Payload` comes first, so
/// [`MeshBuilder::command`](crate::MeshBuilder::command) does not accept the function:
///
/// ```compile_fail,E0277
/// use tower_mesh::extract::{Connection, Payload};
/// use tower_mesh::Mesh;
///
/// async fn greet(Payload(name): Payload<String>, connection: Connection) -> String {
///     format!("hello {name} from {}", connection.id())
/// }
///
/// let (_layer, _mesh) = Mesh::builder().command("greet", greet).build();
/// ```
///
/// With `Payload` last, it does:
///
/// ```
/// use tower_mesh::extract::{Connection, Payload};
/// use tower_mesh::Mesh;
///
/// async fn greet(connection: Connection, Payload(name): Payload<String>) -> String {
///     format!("hello {name} from {}", connection.id())
/// }
///
/// let (_layer, _mesh) = Mesh::builder().command("greet", greet).build();
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a command handler argument",
    label = "not an extractor",
    note = "a handler argument implements `FromCommandParts` (any position) or `FromCommandRequest` (the last argument only, as `Payload<T>` does)"
)]
pub trait FromCommandRequest<M = private::ViaRequest>: Sized {
    /// What a failed extraction becomes: unless the handler takes
    /// `Result<Self, Self::Rejection>`, the command's error reply, and the handler does
    /// not run.
    type Rejection: Into<CommandError>;

    /// Builds the argument, taking the request.
    fn from_command_request(request: CommandRequest) -> Result<Self, Self::Rejection>;
}

impl<T: FromCommandParts> FromCommandRequest<private::ViaParts> for T {
    type Rejection = <T as FromCommandParts>::Rejection;

    fn from_command_request(request: CommandRequest) -> Result<Self, Self::Rejection> {
        <T as FromCommandParts>::from_command_parts(&request)
    }
}

/// What `Option<Self>` extracts, for a [`FromCommandParts`] extractor: implementing it
/// makes `Option<Self>` an extractor that may be any argument.
///
/// As in axum 0.8, `Option<T>` is not "`None` on any failure": each extractor decides
/// which failures mean "absent" (`Ok(None)`) and which are still errors. For
/// [`Extension<T>`] and [`State<T>`] a missing value is `None`, and nothing else can fail.
pub trait OptionalFromCommandParts: Sized {
    /// What a failed extraction becomes (the command's error reply, unless the handler
    /// takes a `Result`).
    type Rejection: Into<CommandError>;

    /// Builds the argument, or `None` when what it reads is absent.
    fn from_command_parts(request: &CommandRequest) -> Result<Option<Self>, Self::Rejection>;
}

/// What `Option<Self>` extracts, for a [`FromCommandRequest`] extractor: implementing it
/// makes `Option<Self>` an extractor that must be the last argument.
///
/// For [`Payload<T>`], a `null` payload is `None` (every command frame has a payload: one
/// without is refused before any handler runs), and any other payload must fit `T`: one
/// that does not is still an `EINVALID` error reply, as axum 0.8's `Option<Json<T>>` is
/// `None` without a body but rejects an invalid one.
pub trait OptionalFromCommandRequest: Sized {
    /// What a failed extraction becomes (the command's error reply, unless the handler
    /// takes a `Result`).
    type Rejection: Into<CommandError>;

    /// Builds the argument, or `None` when what it reads is absent.
    fn from_command_request(request: CommandRequest) -> Result<Option<Self>, Self::Rejection>;
}

#[diagnostic::do_not_recommend]
impl<T: OptionalFromCommandParts> FromCommandParts for Option<T> {
    type Rejection = <T as OptionalFromCommandParts>::Rejection;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, Self::Rejection> {
        <T as OptionalFromCommandParts>::from_command_parts(request)
    }
}

#[diagnostic::do_not_recommend]
impl<T: OptionalFromCommandRequest> FromCommandRequest for Option<T> {
    type Rejection = <T as OptionalFromCommandRequest>::Rejection;

    fn from_command_request(request: CommandRequest) -> Result<Self, Self::Rejection> {
        <T as OptionalFromCommandRequest>::from_command_request(request)
    }
}

/// `Result<T, T::Rejection>`: the handler runs whether `T` could be extracted or not, and
/// handles the rejection itself.
impl<T: FromCommandParts> FromCommandParts for Result<T, <T as FromCommandParts>::Rejection> {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, Infallible> {
        Ok(<T as FromCommandParts>::from_command_parts(request))
    }
}

/// `Result<T, T::Rejection>` for a consuming extractor such as `Payload<T>`: the handler
/// gets the rejection (for `Payload`, a [`PayloadRejection`]) instead of an error reply.
impl<T: FromCommandRequest> FromCommandRequest for Result<T, <T as FromCommandRequest>::Rejection> {
    type Rejection = Infallible;

    fn from_command_request(request: CommandRequest) -> Result<Self, Infallible> {
        Ok(<T as FromCommandRequest>::from_command_request(request))
    }
}

/// The payload, deserialised with serde. A payload that does not fit `T` gets an
/// `EINVALID` error reply naming the problem ([`PayloadRejection`]).
///
/// It takes the payload out of the request, so it must be the handler's **last**
/// argument (see [`FromCommandRequest`]). `Option<Payload<T>>` is `None` for a `null`
/// payload and still refuses one that does not fit `T`;
/// `Result<Payload<T>, PayloadRejection>` hands the failure to the handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned> FromCommandRequest for Payload<T> {
    type Rejection = PayloadRejection;

    fn from_command_request(request: CommandRequest) -> Result<Self, PayloadRejection> {
        serde_json::from_value(request.into_payload())
            .map(Payload)
            .map_err(PayloadRejection::new)
    }
}

impl<T: DeserializeOwned> OptionalFromCommandRequest for Payload<T> {
    type Rejection = PayloadRejection;

    fn from_command_request(request: CommandRequest) -> Result<Option<Self>, PayloadRejection> {
        match request.into_payload() {
            Value::Null => Ok(None),
            payload => serde_json::from_value(payload)
                .map(|value| Some(Payload(value)))
                .map_err(PayloadRejection::new),
        }
    }
}

/// A value from the request extensions: first this command's own (set by middleware),
/// then the WebSocket upgrade request's (set by HTTP layers such as an auth layer).
///
/// A missing value is a server error (`ESERVER` "internal server error", the type logged:
/// [`MissingExtension`]); take `Option<Extension<T>>` when it may be absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extension<T>(pub T);

impl<T: Clone + Send + Sync + 'static> Extension<T> {
    fn find(request: &CommandRequest) -> Option<Self> {
        request
            .extensions()
            .get::<T>()
            .or_else(|| request.request_parts().extensions.get::<T>())
            .cloned()
            .map(Extension)
    }
}

impl<T: Clone + Send + Sync + 'static> FromCommandParts for Extension<T> {
    type Rejection = MissingExtension;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, MissingExtension> {
        Self::find(request).ok_or_else(|| MissingExtension::new(type_name::<T>()))
    }
}

impl<T: Clone + Send + Sync + 'static> OptionalFromCommandParts for Extension<T> {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Option<Self>, Infallible> {
        Ok(Self::find(request))
    }
}

/// Shared application state registered with [`MeshBuilder::state`](crate::MeshBuilder::state).
///
/// A type that was never registered is a server error (`ESERVER` "internal server error",
/// the type logged: [`MissingState`]); `Option<State<T>>` is `None` instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromCommandParts for State<T> {
    type Rejection = MissingState;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, MissingState> {
        request
            .mesh()
            .state::<T>()
            .map(State)
            .ok_or_else(|| MissingState::new(type_name::<T>()))
    }
}

impl<T: Clone + Send + Sync + 'static> OptionalFromCommandParts for State<T> {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Option<Self>, Infallible> {
        Ok(request.mesh().state::<T>().map(State))
    }
}

impl FromCommandParts for Connection {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, Infallible> {
        Ok(request.connection().clone())
    }
}

impl FromCommandParts for Mesh {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, Infallible> {
        Ok(request.mesh().clone())
    }
}

macro_rules! deref_wrapper {
    ($($name:ident),*) => {$(
        impl<T> Deref for $name<T> {
            type Target = T;
            fn deref(&self) -> &T {
                &self.0
            }
        }
        impl<T> DerefMut for $name<T> {
            fn deref_mut(&mut self) -> &mut T {
                &mut self.0
            }
        }
    )*};
}
deref_wrapper!(Payload, Extension, State);
