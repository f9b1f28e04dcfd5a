//! Handler extractors over real WebSockets: up to 16 arguments with the payload last,
//! `Option<T>` (absence is `None`, an invalid payload is still refused) and
//! `Result<T, T::Rejection>` (the handler gets the rejection), on every backend.

use std::convert::Infallible;

use serde::Deserialize;
use serde_json::{json, Value};
use tower_mesh::extract::rejection::{MissingExtension, MissingState, PayloadRejection};
use tower_mesh::extract::{Connection, Extension, FromCommandParts, Payload, State};
use tower_mesh::{from_fn, CommandError, CommandRequest, Mesh, MeshBuilder, Next};

use crate::common::*;

conformance!(
    sixteen_arguments_with_the_payload_last,
    optional_payload_is_none_when_null_and_refused_when_invalid,
    result_payload_hands_the_rejection_to_the_handler,
    optional_extension_is_none_when_missing,
);

#[derive(Debug, Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Clone)]
struct Greeting(&'static str);

#[derive(Clone)]
struct RequestTag(u32);

#[derive(Clone)]
struct User(String);

/// Neither registered as state nor inserted as an extension, ever.
#[derive(Clone)]
struct NeverThere;

/// A custom extractor that reads the command name.
struct CommandName(String);

impl FromCommandParts for CommandName {
    type Rejection = Infallible;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, Infallible> {
        Ok(CommandName(request.command().to_owned()))
    }
}

/// A custom extractor that reads the payload without taking it, before `Payload` does.
struct PayloadKeys(Vec<String>);

impl FromCommandParts for PayloadKeys {
    type Rejection = CommandError;

    fn from_command_parts(request: &CommandRequest) -> Result<Self, CommandError> {
        request
            .payload()
            .as_object()
            .map(|object| PayloadKeys(object.keys().cloned().collect()))
            .ok_or_else(|| CommandError::invalid("payload must be an object"))
    }
}

/// Puts `RequestTag(7)` in every command's extensions, and `User("ada")` in those whose
/// payload has `"login": true`.
fn with_extensions(builder: MeshBuilder) -> MeshBuilder {
    builder.layer(from_fn(
        |mut request: CommandRequest, next: Next| async move {
            request.extensions_mut().insert(RequestTag(7));
            if request.payload()["login"] == true {
                request.extensions_mut().insert(User("ada".to_owned()));
            }
            next.run(request).await
        },
    ))
}

/// The error frame a command gets for an `EINVALID` payload, byte for byte.
fn invalid_payload_frame(id: u64, command: &str, serde_message: &str) -> String {
    let error = Value::from(format!("invalid payload: {serde_message}"));
    format!(
        r#"{{"id":{id},"command":"{command}","payload":{{"error":{error},"code":"EINVALID","name":"CommandError"}}}}"#
    )
}

// Sixteen arguments is the point of this handler.
#[allow(clippy::too_many_arguments)]
async fn everything(
    connection: Connection,
    mesh: Mesh,
    State(greeting): State<Greeting>,
    Extension(tag): Extension<RequestTag>,
    CommandName(command): CommandName,
    PayloadKeys(keys): PayloadKeys,
    missing_extension: Option<Extension<NeverThere>>,
    missing_state: Option<State<NeverThere>>,
    missing_extension_rejection: Result<Extension<NeverThere>, MissingExtension>,
    missing_state_rejection: Result<State<NeverThere>, MissingState>,
    present_extension: Option<Extension<RequestTag>>,
    present_state: Result<State<Greeting>, MissingState>,
    present_extension_result: Result<Extension<RequestTag>, MissingExtension>,
    optional_state: Option<State<Greeting>>,
    infallible: Result<Connection, Infallible>,
    Payload(point): Payload<Point>,
) -> Value {
    json!({
        "connection": connection.id(),
        "sameConnection": infallible.map(|c| c.id() == connection.id()).unwrap_or(false),
        "connections": mesh.connections().len(),
        "greeting": greeting.0,
        "tag": tag.0,
        "command": command,
        "keys": keys,
        "missingExtension": missing_extension.is_none(),
        "missingState": missing_state.is_none(),
        "missingExtensionType": missing_extension_rejection.err().map(|r| r.type_name().ends_with("NeverThere")),
        "missingStateType": missing_state_rejection.err().map(|r| r.type_name().ends_with("NeverThere")),
        "presentExtension": present_extension.map(|Extension(tag)| tag.0),
        "presentState": present_state.ok().map(|State(greeting)| greeting.0),
        "presentExtensionResult": present_extension_result.ok().map(|Extension(tag)| tag.0),
        "optionalState": optional_state.map(|State(greeting)| greeting.0),
        "sum": point.x + point.y,
    })
}

async fn sixteen_arguments_with_the_payload_last(backend: Backend) {
    let builder = with_extensions(
        backend
            .builder()
            .state(Greeting("hello"))
            .command("everything", everything),
    );
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;

    let reply = client
        .command(1, "everything", json!({"x": 2, "y": 3}))
        .await;
    assert_eq!(
        reply["payload"],
        json!({
            "connection": client.id,
            "sameConnection": true,
            "connections": 1,
            "greeting": "hello",
            "tag": 7,
            "command": "everything",
            "keys": ["x", "y"],
            "missingExtension": true,
            "missingState": true,
            "missingExtensionType": true,
            "missingStateType": true,
            "presentExtension": 7,
            "presentState": "hello",
            "presentExtensionResult": 7,
            "optionalState": "hello",
            "sum": 5,
        })
    );

    // An extractor before the payload refuses first: its rejection is the reply.
    let refused = client.command(2, "everything", json!([1, 2])).await;
    assert_eq!(
        refused["payload"],
        json!({"error": "payload must be an object", "code": "EINVALID", "name": "CommandError"})
    );
    // The payload, extracted last, refuses as `Payload` always has.
    client
        .send_json(json!({"id": 3, "command": "everything", "payload": {"x": 2}}))
        .await;
    assert_eq!(
        client.next_text().await,
        invalid_payload_frame(3, "everything", "missing field `y`")
    );
}

async fn optional_payload_is_none_when_null_and_refused_when_invalid(backend: Backend) {
    let builder = backend
        .builder()
        .command("maybe", |point: Option<Payload<Point>>| async move {
            match point {
                Some(Payload(point)) => json!({"sum": point.x + point.y}),
                None => json!("no payload"),
            }
        })
        .command("strict", |Payload(point): Payload<Point>| async move {
            json!({"sum": point.x + point.y})
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;

    // `null` is the absent payload (a frame without a payload is refused before any handler).
    let none = client.command(1, "maybe", Value::Null).await;
    assert_eq!(none["payload"], "no payload");
    let some = client.command(2, "maybe", json!({"x": 1, "y": 2})).await;
    assert_eq!(some["payload"], json!({"sum": 3}));

    // A payload that is there but does not fit is still refused, exactly as without `Option`.
    for (id, command) in [(3, "maybe"), (4, "strict")] {
        client
            .send_json(json!({"id": id, "command": command, "payload": {"x": "one", "y": 2}}))
            .await;
        assert_eq!(
            client.next_text().await,
            invalid_payload_frame(id, command, r#"invalid type: string "one", expected i64"#)
        );
    }
    client
        .send_json(json!({"id": 5, "command": "strict", "payload": null}))
        .await;
    assert_eq!(
        client.next_text().await,
        invalid_payload_frame(5, "strict", "invalid type: null, expected struct Point")
    );
}

async fn result_payload_hands_the_rejection_to_the_handler(backend: Backend) {
    let builder = backend
        .builder()
        .command(
            "lenient",
            |point: Result<Payload<Point>, PayloadRejection>| async move {
                match point {
                    Ok(Payload(point)) => json!({"sum": point.x + point.y}),
                    Err(rejection) => json!({"rejected": rejection.to_string()}),
                }
            },
        )
        .command(
            "forwarding",
            |point: Result<Payload<Point>, PayloadRejection>| async move {
                let Payload(point) = point?;
                Ok::<_, CommandError>(json!({"sum": point.x + point.y}))
            },
        );
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;

    let fits = client.command(1, "lenient", json!({"x": 1, "y": 2})).await;
    assert_eq!(fits["payload"], json!({"sum": 3}));
    let rejected = client.command(2, "lenient", json!({"x": 1})).await;
    assert_eq!(
        rejected["payload"],
        json!({"rejected": "invalid payload: missing field `y`"})
    );

    // A handler that gives the rejection back with `?` answers as `Payload<T>` would.
    client
        .send_json(json!({"id": 3, "command": "forwarding", "payload": {"x": 1}}))
        .await;
    assert_eq!(
        client.next_text().await,
        invalid_payload_frame(3, "forwarding", "missing field `y`")
    );
}

async fn optional_extension_is_none_when_missing(backend: Backend) {
    let builder = with_extensions(
        backend
            .builder()
            .command(
                "who",
                |user: Option<Extension<User>>, Payload(_): Payload<Value>| async move {
                    json!(user.map(|Extension(user)| user.0))
                },
            )
            .command(
                "who-result",
                |user: Result<Extension<User>, MissingExtension>| async move {
                    match user {
                        Ok(Extension(user)) => json!({"user": user.0}),
                        Err(missing) => json!({"missing": missing.type_name().ends_with("User")}),
                    }
                },
            )
            .command(
                "who-strict",
                |Extension(user): Extension<User>| async move { json!(user.0) },
            ),
    );
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;

    let anonymous = client.command(1, "who", json!({})).await;
    assert_eq!(anonymous["payload"], Value::Null);
    let ada = client.command(2, "who", json!({"login": true})).await;
    assert_eq!(ada["payload"], "ada");

    let missing = client.command(3, "who-result", json!({})).await;
    assert_eq!(missing["payload"], json!({"missing": true}));
    let present = client
        .command(4, "who-result", json!({"login": true}))
        .await;
    assert_eq!(present["payload"], json!({"user": "ada"}));

    // Without `Option` or `Result`, a missing extension is a server error, as before.
    client
        .send_json(json!({"id": 5, "command": "who-strict", "payload": {}}))
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":5,"command":"who-strict","payload":{"error":"internal server error","code":"ESERVER","name":"Error"}}"#
    );
}
