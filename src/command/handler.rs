//! Async functions over extractors, turned into tower services.

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tower::Service;

use super::extract::{FromCommandParts, FromCommandRequest};
use super::CommandRequest;
use crate::error::{BoxError, CommandError};

/// What a handler may return: a JSON value, `()`, or a `Result` of something
/// serialisable and an error.
pub trait IntoCommandResponse {
    /// Converts into the reply payload or the error.
    fn into_command_response(self) -> Result<Value, BoxError>;
}

impl IntoCommandResponse for Value {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Ok(self)
    }
}

impl IntoCommandResponse for () {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Ok(Value::Null)
    }
}

impl IntoCommandResponse for bool {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Ok(Value::Bool(self))
    }
}

impl IntoCommandResponse for String {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Ok(Value::String(self))
    }
}

/// A reply of any serialisable type: `async fn stats() -> Json<Stats>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoCommandResponse for Json<T> {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Ok::<T, BoxError>(self.0).into_command_response()
    }
}

macro_rules! number_responses {
    ($($number:ty),*) => {$(
        impl IntoCommandResponse for $number {
            fn into_command_response(self) -> Result<Value, BoxError> {
                Ok(Value::from(self))
            }
        }
    )*};
}
number_responses!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize, f32, f64);

impl IntoCommandResponse for CommandError {
    fn into_command_response(self) -> Result<Value, BoxError> {
        Err(Box::new(self))
    }
}

impl<T: Serialize, E: Into<BoxError>> IntoCommandResponse for Result<T, E> {
    fn into_command_response(self) -> Result<Value, BoxError> {
        let value = self.map_err(Into::into)?;
        serde_json::to_value(value).map_err(|err| {
            tracing::error!(%err, "a handler's reply failed to serialise");
            Box::new(CommandError::internal()) as BoxError
        })
    }
}

/// An async function usable as a command handler: its arguments are extractors and its
/// output is an [`IntoCommandResponse`].
///
/// A handler takes up to 16 arguments. Every argument but the last implements
/// [`FromCommandParts`] (it only reads the request); the last implements
/// [`FromCommandRequest`], which every `FromCommandParts` extractor does too. So an
/// extractor that consumes the payload, such as [`Payload<T>`](super::Payload), can only be
/// the last argument, and a function that puts it anywhere else is not a `Handler` (a
/// compile error where it is registered).
///
/// Extractors run in argument order when the command arrives; the first that fails
/// answers the command with its rejection as the error reply, and the handler does not
/// run. An argument of type `Result<T, T::Rejection>` receives the rejection instead, and
/// an `Option<T>` is `None` where `T` defines absence (see
/// [`OptionalFromCommandParts`](super::OptionalFromCommandParts)).
///
/// `T` stands for the argument types (with a marker telling how the last one is
/// extracted); it only lets the impls for each arity coexist, and is always inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid command handler",
    label = "not a command handler",
    note = "a command handler is an async fn, or a closure returning a `Send` future, with at most 16 arguments",
    note = "every argument but the last must implement `FromCommandParts`; the last may implement `FromCommandRequest` instead, so `Payload<T>` must be the last argument",
    note = "its output must implement `IntoCommandResponse`: a `serde_json::Value`, `()`, `Json<T>`, or a `Result` of something serialisable and an error"
)]
pub trait Handler<T>: Clone + Send + Sync + 'static {
    /// Runs the handler on one request.
    fn call(self, request: CommandRequest) -> BoxFuture<'static, Result<Value, BoxError>>;
}

/// The reply future of a command whose extractor refused it.
fn rejected(rejection: impl Into<CommandError>) -> BoxFuture<'static, Result<Value, BoxError>> {
    Box::pin(std::future::ready(Err(
        Box::new(rejection.into()) as BoxError
    )))
}

impl<F, Fut, R> Handler<()> for F
where
    F: FnOnce() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoCommandResponse,
{
    fn call(self, _request: CommandRequest) -> BoxFuture<'static, Result<Value, BoxError>> {
        let fut = self();
        Box::pin(async move { fut.await.into_command_response() })
    }
}

/// Implements [`Handler`] for functions whose leading arguments `$parts` are
/// [`FromCommandParts`] extractors and whose last argument `$last` is a
/// [`FromCommandRequest`] extractor of either kind (`M` tells which), as axum's
/// `impl_handler` does.
macro_rules! impl_handler {
    ([$($parts:ident),*], $last:ident) => {
        #[allow(non_snake_case)]
        impl<F, Fut, R, M, $($parts,)* $last> Handler<(M, $($parts,)* $last,)> for F
        where
            F: FnOnce($($parts,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoCommandResponse,
            $($parts: FromCommandParts,)*
            $last: FromCommandRequest<M>,
        {
            fn call(self, request: CommandRequest) -> BoxFuture<'static, Result<Value, BoxError>> {
                $(
                    let $parts = match <$parts as FromCommandParts>::from_command_parts(&request) {
                        Ok(value) => value,
                        Err(rejection) => return rejected(rejection),
                    };
                )*
                let $last = match <$last as FromCommandRequest<M>>::from_command_request(request) {
                    Ok(value) => value,
                    Err(rejection) => return rejected(rejection),
                };
                let fut = self($($parts,)* $last);
                Box::pin(async move { fut.await.into_command_response() })
            }
        }
    };
}

/// Calls `$name!([leading arguments], last argument)` for every handler arity from 1 to 16.
macro_rules! all_the_tuples {
    ($name:ident) => {
        $name!([], A1);
        $name!([A1], A2);
        $name!([A1, A2], A3);
        $name!([A1, A2, A3], A4);
        $name!([A1, A2, A3, A4], A5);
        $name!([A1, A2, A3, A4, A5], A6);
        $name!([A1, A2, A3, A4, A5, A6], A7);
        $name!([A1, A2, A3, A4, A5, A6, A7], A8);
        $name!([A1, A2, A3, A4, A5, A6, A7, A8], A9);
        $name!([A1, A2, A3, A4, A5, A6, A7, A8, A9], A10);
        $name!([A1, A2, A3, A4, A5, A6, A7, A8, A9, A10], A11);
        $name!([A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11], A12);
        $name!([A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12], A13);
        $name!(
            [A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13],
            A14
        );
        $name!(
            [A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14],
            A15
        );
        $name!(
            [A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14, A15],
            A16
        );
    };
}

all_the_tuples!(impl_handler);

/// A [`Handler`] as a tower `Service`, so that tower layers can wrap it.
pub struct HandlerService<H, T> {
    handler: H,
    _args: PhantomData<fn() -> T>,
}

impl<H, T> std::fmt::Debug for HandlerService<H, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerService").finish_non_exhaustive()
    }
}

/// Turns an async-fn handler into a tower `Service<CommandRequest>`, for wrapping it in
/// layers yourself (`ServiceBuilder::new().layer(..).service(handler_service(f))`).
pub fn handler_service<H: Handler<T>, T>(handler: H) -> HandlerService<H, T> {
    HandlerService {
        handler,
        _args: PhantomData,
    }
}

impl<H, T> HandlerService<H, T> {
    pub(crate) fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: Clone, T> Clone for HandlerService<H, T> {
    fn clone(&self) -> Self {
        HandlerService {
            handler: self.handler.clone(),
            _args: PhantomData,
        }
    }
}

impl<H: Handler<T>, T> Service<CommandRequest> for HandlerService<H, T> {
    type Response = Value;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Value, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CommandRequest) -> Self::Future {
        self.handler.clone().call(request)
    }
}
