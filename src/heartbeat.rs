//! Liveness and latency: one task per mesh pings every local connection.
//!
//! One ticker for all connections keeps idle connections free of timers of their own,
//! and the ping frame is the same shared bytes for everyone.

use std::sync::Weak;

use tokio::time::{interval, MissedTickBehavior};

use crate::connection::CloseReason;
use crate::mesh::{Mesh, MeshInner};
use crate::protocol::{self, Frame};

pub(crate) fn start(inner: Weak<MeshInner>) {
    let Some(mesh) = Mesh::from_weak(&inner) else {
        return;
    };
    let (ping_every, latency_every) = (mesh.config().ping_interval, mesh.config().latency_interval);
    drop(mesh);
    tokio::spawn(async move {
        let mut ping = interval(ping_every);
        let mut latency = interval(latency_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        latency.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick of a tokio interval is immediate; a fresh connection needs no probe.
        ping.tick().await;
        latency.tick().await;
        let ping_frame = Frame::from(protocol::push(protocol::PING, &serde_json::json!({})));
        let latency_request = Frame::from(protocol::push(
            protocol::LATENCY_REQUEST,
            &serde_json::json!({}),
        ));
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    let Some(mesh) = Mesh::from_weak(&inner) else { return };
                    ping_all(&mesh, &ping_frame);
                }
                _ = latency.tick() => {
                    let Some(mesh) = Mesh::from_weak(&inner) else { return };
                    probe_latency(&mesh, &latency_request);
                }
            }
        }
    });
}

fn ping_all(mesh: &Mesh, ping_frame: &Frame) {
    let max_missed = mesh.config().max_missed_pongs;
    let mut alive = Vec::new();
    mesh.registry().for_each(|connection| {
        if connection.answered_last_ping() {
            alive.push(connection.clone());
        }
        if connection.ping_sent() > max_missed + 1 {
            if connection.close_with(CloseReason::PingTimeout) {
                mesh.stats_record_ping_timeout();
                tracing::info!(connection = connection.id(), "closing: missed pongs");
            }
            return;
        }
        let _ = mesh.registry().send_frame(connection, ping_frame.clone());
    });
    mesh.refresh_presence(&alive);
}

fn probe_latency(mesh: &Mesh, request: &Frame) {
    mesh.registry().for_each(|connection| {
        if let Some(latency) = connection.latency() {
            let report = Frame::from(protocol::push(protocol::LATENCY, &latency.as_millis()));
            let _ = mesh.registry().send_frame(connection, report);
        }
        connection.latency_probe_sent();
        let _ = mesh.registry().send_frame(connection, request.clone());
    });
}
