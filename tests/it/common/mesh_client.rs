//! The crate's own Rust client ([`MeshClient`]) against a test server.

use std::time::Duration;

use tokio::sync::broadcast;
use tower_mesh::client::{ClientEvent, MeshClient};

use super::within;

/// A client of `url` that reconnects after `backoff` (and at most twice that apart).
pub(crate) async fn client_with_backoff(url: &str, backoff: Duration) -> MeshClient {
    MeshClient::builder(url)
        .backoff(backoff, backoff * 2)
        .connect()
        .await
        .expect("connect")
}

/// A client of `url` that reconnects quickly.
pub(crate) async fn client(url: &str) -> MeshClient {
    client_with_backoff(url, Duration::from_millis(20)).await
}

/// Drops the client's connection and waits until it is connected again; returns the new
/// connection id.
pub(crate) async fn reconnect(client: &MeshClient) -> String {
    let mut events = client.events();
    client.force_reconnect().await;
    wait_reconnected(&mut events).await
}

/// Waits for [`ClientEvent::Reconnected`]; returns the new connection id.
pub(crate) async fn wait_reconnected(events: &mut broadcast::Receiver<ClientEvent>) -> String {
    loop {
        let event = within("the reconnect", events.recv())
            .await
            .expect("events");
        if let ClientEvent::Reconnected { connection_id } = event {
            return connection_id;
        }
    }
}
