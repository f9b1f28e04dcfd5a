//! Extractors: the arguments an async-fn handler may take.

use std::any::type_name;
use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;

use super::CommandRequest;
use crate::connection::Connection;
use crate::error::CommandError;
use crate::mesh::Mesh;

/// Something a handler argument can be built from. Implement it for your own types to
/// use them as handler arguments.
pub trait FromCommandRequest: Sized {
    /// Builds the argument; an error becomes the command's error reply and the handler
    /// does not run.
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError>;
}

/// The payload, deserialised with serde. A payload that does not fit `T` gets an
/// `EINVALID` error reply naming the problem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned> FromCommandRequest for Payload<T> {
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError> {
        serde_json::from_value(request.take_payload())
            .map(Payload)
            .map_err(|err| CommandError::invalid(format!("invalid payload: {err}")))
    }
}

/// A value from the request extensions: first this command's own (set by middleware),
/// then the WebSocket upgrade request's (set by HTTP layers such as an auth layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extension<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromCommandRequest for Extension<T> {
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError> {
        request
            .extensions()
            .get::<T>()
            .or_else(|| request.request_parts().extensions.get::<T>())
            .cloned()
            .map(Extension)
            .ok_or_else(|| {
                tracing::error!(extension = type_name::<T>(), "missing request extension");
                CommandError::internal()
            })
    }
}

/// Shared application state registered with [`MeshBuilder::state`](crate::MeshBuilder::state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromCommandRequest for State<T> {
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError> {
        request.mesh().state::<T>().map(State).ok_or_else(|| {
            tracing::error!(state = type_name::<T>(), "state type was never registered");
            CommandError::internal()
        })
    }
}

impl FromCommandRequest for Connection {
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError> {
        Ok(request.connection().clone())
    }
}

impl FromCommandRequest for Mesh {
    fn from_request(request: &mut CommandRequest) -> Result<Self, CommandError> {
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
