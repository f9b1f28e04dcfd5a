//! The instance's inbox: every delivery the backend hands this instance is dispatched
//! here, in one place, to what owns it. Pushes for connections go to the registry, topic
//! pushes and presence changes to the topic's local listeners, record changes to the
//! record listeners' streams, collection changes to the collections, and calls to the
//! connection they concern.

use crate::backend::{Delivery, Inbox, Topic};
use crate::connection::CloseReason;
use crate::mesh::{render, Mesh, MeshInner};

impl Inbox for MeshInner {
    fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::Topic {
                topic,
                push,
                exclude,
            } => self
                .topics
                .fan_out(&topic, &render(&push), &exclude, &self.registry),
            Delivery::ChannelMessage {
                channel,
                message,
                position,
            } => {
                if let Some(mesh) = Mesh::from_weak(&self.this) {
                    mesh.deliver_channel_message(channel, &message, position.as_ref());
                }
            }
            Delivery::Presence {
                room,
                connection_id,
                change,
                timestamp,
            } => {
                let frame =
                    crate::presence::update_frame(&room, &connection_id, &change, timestamp);
                self.topics
                    .fan_out(&Topic::Presence(room), &frame, &[], &self.registry);
            }
            Delivery::Record {
                record_id,
                version,
                value,
                patch,
            } => crate::records::deliver_update(
                &self.topics,
                &record_id,
                version,
                &value,
                patch.as_deref(),
            ),
            Delivery::RecordDeleted { record_id, version } => {
                let unheard = crate::records::deliver_deletion(&self.topics, &record_id, version);
                if let Some(topic) = unheard {
                    self.backend.unsubscribe(&self.instance_id, &topic);
                }
            }
            Delivery::RecordsChanged {
                exposure,
                record_id,
            } => {
                if let Some(mesh) = Mesh::from_weak(&self.this) {
                    mesh.collections_changed(&exposure, &record_id);
                }
            }
            Delivery::Call {
                connection_id,
                from,
                call_id,
                op,
            } => {
                if let Some(mesh) = Mesh::from_weak(&self.this) {
                    mesh.run_call(connection_id, from, call_id, op);
                }
            }
            Delivery::Answer {
                call_id, outcome, ..
            } => self.calls.answered(call_id, outcome),
            Delivery::ToConnection { .. } | Delivery::Broadcast { .. } | Delivery::Close { .. } => {
                self.registry.deliver(delivery)
            }
        }
    }

    fn resubscribed(&self) {
        // Pub/sub delivers at most once: what was published while the subscription was
        // down is lost. Records and collections can be caught up, from what is stored.
        let Some(mesh) = Mesh::from_weak(&self.this) else {
            return;
        };
        tokio::spawn(async move {
            mesh.catch_up_records().await;
            mesh.re_resolve_all_collections();
        });
    }

    fn registration_lost(&self) {
        let connections = self.registry.all();
        if !connections.is_empty() {
            tracing::warn!(
                connections = connections.len(),
                "the backend lost this instance's connections; closing them so their clients reconnect"
            );
        }
        for connection in connections {
            connection.close_with(CloseReason::StateLost);
        }
    }

    fn has_listeners(&self, topic: &Topic) -> bool {
        self.topics.has_listeners(topic)
    }

    fn topics(&self) -> Vec<Topic> {
        self.topics.all_topics()
    }
}
