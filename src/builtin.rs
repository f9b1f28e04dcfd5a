//! The built-in `mesh/*` commands, registered on every mesh before user commands.

use std::collections::HashMap;

use tower::util::BoxCloneSyncService;

use crate::command::{handler_service, CommandService, Handler};

fn register<H: Handler<T>, T: 'static>(
    commands: &mut HashMap<String, CommandService>,
    name: &str,
    handler: H,
) {
    commands.insert(
        name.to_owned(),
        BoxCloneSyncService::new(handler_service(handler)),
    );
}

/// Every built-in command by name.
pub(crate) fn commands() -> HashMap<String, CommandService> {
    let mut commands = HashMap::new();
    register(&mut commands, "mesh/noop", noop);
    register(
        &mut commands,
        "mesh/get-connection-metadata",
        crate::metadata::get_connection_metadata,
    );
    register(
        &mut commands,
        "mesh/get-my-connection-metadata",
        crate::metadata::get_my_connection_metadata,
    );
    register(
        &mut commands,
        "mesh/set-my-connection-metadata",
        crate::metadata::set_my_connection_metadata,
    );
    commands
}

/// `mesh/noop`: clients probe a connection with it; the payload is ignored.
async fn noop() -> bool {
    true
}
