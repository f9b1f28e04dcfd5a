//! The built-in `mesh/*` commands, registered on every mesh before user commands.

use std::collections::HashMap;

use crate::command::{Handler, Route};

fn register<H: Handler<T>, T: 'static>(
    commands: &mut HashMap<String, Route>,
    name: &str,
    handler: H,
) {
    commands.insert(name.to_owned(), Route::handler(handler));
}

/// Every built-in command by name.
pub(crate) fn commands() -> HashMap<String, Route> {
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
    register(&mut commands, "mesh/join-room", crate::rooms::join_room);
    register(&mut commands, "mesh/leave-room", crate::rooms::leave_room);
    register(
        &mut commands,
        "mesh/get-room-metadata",
        crate::rooms::get_room_metadata,
    );
    register(
        &mut commands,
        "mesh/subscribe-presence",
        crate::presence::subscribe_presence,
    );
    register(
        &mut commands,
        "mesh/unsubscribe-presence",
        crate::presence::unsubscribe_presence,
    );
    register(
        &mut commands,
        "mesh/publish-presence-state",
        crate::presence::publish_presence_state,
    );
    register(
        &mut commands,
        "mesh/clear-presence-state",
        crate::presence::clear_presence_state,
    );
    register(
        &mut commands,
        "mesh/get-presence-state",
        crate::presence::get_presence_state,
    );
    register(
        &mut commands,
        "mesh/subscribe-channel",
        crate::channels::subscribe_channel,
    );
    register(
        &mut commands,
        "mesh/unsubscribe-channel",
        crate::channels::unsubscribe_channel,
    );
    register(
        &mut commands,
        "mesh/get-channel-history",
        crate::channels::get_channel_history,
    );
    register(
        &mut commands,
        "mesh/subscribe-record",
        crate::records::subscribe_record,
    );
    register(
        &mut commands,
        "mesh/unsubscribe-record",
        crate::records::unsubscribe_record,
    );
    register(
        &mut commands,
        "mesh/publish-record-update",
        crate::records::publish_record_update,
    );
    register(
        &mut commands,
        "mesh/subscribe-collection",
        crate::collections::subscribe_collection,
    );
    register(
        &mut commands,
        "mesh/unsubscribe-collection",
        crate::collections::unsubscribe_collection,
    );
    commands
}

/// `mesh/noop`: clients probe a connection with it; the payload is ignored.
async fn noop() -> bool {
    true
}
