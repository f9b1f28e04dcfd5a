//! Async functions over extractors, turned into tower services.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::Serialize;
use serde_json::Value;
use tower::Service;

use super::extract::FromCommandRequest;
use super::CommandRequest;
use crate::error::{BoxError, CommandError};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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

/// An async function usable as a command handler: its arguments are extractors
/// ([`FromCommandRequest`]) and its output is an [`IntoCommandResponse`].
///
/// `T` is the tuple of argument types; it only lets several impls coexist.
pub trait Handler<T>: Clone + Send + Sync + 'static {
    /// Runs the handler on one request.
    fn call(self, request: CommandRequest) -> BoxFuture<Result<Value, BoxError>>;
}

macro_rules! impl_handler {
    ($($arg:ident),*) => {
        #[allow(non_snake_case, unused_mut, unused_variables)]
        impl<F, Fut, R, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: FnOnce($($arg),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoCommandResponse,
            $($arg: FromCommandRequest + Send + 'static,)*
        {
            fn call(self, mut request: CommandRequest) -> BoxFuture<Result<Value, BoxError>> {
                $(
                    let $arg = match $arg::from_request(&mut request) {
                        Ok(value) => value,
                        Err(err) => return Box::pin(std::future::ready(Err(Box::new(err) as BoxError))),
                    };
                )*
                let fut = self($($arg),*);
                Box::pin(async move { fut.await.into_command_response() })
            }
        }
    };
}

impl_handler!();
impl_handler!(A1);
impl_handler!(A1, A2);
impl_handler!(A1, A2, A3);
impl_handler!(A1, A2, A3, A4);
impl_handler!(A1, A2, A3, A4, A5);
impl_handler!(A1, A2, A3, A4, A5, A6);

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
    type Future = BoxFuture<Result<Value, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CommandRequest) -> Self::Future {
        self.handler.clone().call(request)
    }
}
