//! Liveness and latency: one task per mesh pings every local connection.
//!
//! One ticker for all connections keeps idle connections free of timers of their own,
//! and the ping frame is the same shared bytes for everyone. Each interval is cut into
//! [`SLICES`] ticks, and each tick probes the connections of one slice (a stable hash of
//! the connection id): every connection is still pinged once per `ping_interval` and
//! probed once per `latency_interval`, but 10,000 connections no longer get 20,000
//! frames at the same instant (and answer with 10,000), a burst that delayed the
//! broadcasts in flight beside it by tens of milliseconds.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::{interval_at, Instant, MissedTickBehavior};

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
        // The first slice one whole interval after the start, as an uncut interval's first
        // tick would be: a mesh that just started has no connection to probe yet.
        let now = Instant::now();
        let mut ping = interval_at(now + ping_every, slice_of_interval(ping_every));
        let mut latency = interval_at(now + latency_every, slice_of_interval(latency_every));
        let (mut next_ping, mut next_probe) = (0, 0);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        latency.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let ping_frame = Frame::from(protocol::push(protocol::PING, &serde_json::json!({})));
        let latency_request = Frame::from(protocol::push(
            protocol::LATENCY_REQUEST,
            &serde_json::json!({}),
        ));
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    let Some(mesh) = Mesh::from_weak(&inner) else { return };
                    ping_slice(&mesh, &ping_frame, next_ping);
                    next_ping = (next_ping + 1) % SLICES;
                }
                _ = latency.tick() => {
                    let Some(mesh) = Mesh::from_weak(&inner) else { return };
                    probe_latency(&mesh, &latency_request, next_probe);
                    next_probe = (next_probe + 1) % SLICES;
                }
            }
        }
    });
}

/// How many ticks each interval is cut into.
const SLICES: u32 = 10;

/// The time between two ticks of an interval cut into [`SLICES`] (at least 1 ms: a tokio
/// interval cannot be zero).
fn slice_of_interval(every: Duration) -> Duration {
    (every / SLICES).max(Duration::from_millis(1))
}

/// The slice a connection is probed in: an FNV-1a hash of its id, so it stays the same
/// for the connection's whole life however others come and go.
fn slice_of(connection_id: &str) -> u32 {
    let hash = connection_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    hash % SLICES
}

fn ping_slice(mesh: &Mesh, ping_frame: &Frame, slice: u32) {
    let max_missed = mesh.config().max_missed_pongs;
    let mut alive = Vec::new();
    mesh.registry().for_each(|connection| {
        if slice_of(connection.id()) != slice {
            return;
        }
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

fn probe_latency(mesh: &Mesh, request: &Frame, slice: u32) {
    mesh.registry().for_each(|connection| {
        if slice_of(connection.id()) != slice {
            return;
        }
        if let Some(latency) = connection.latency() {
            let report = Frame::from(protocol::push(protocol::LATENCY, &latency.as_millis()));
            let _ = mesh.registry().send_frame(connection, report);
        }
        connection.latency_probe_sent();
        let _ = mesh.registry().send_frame(connection, request.clone());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_over_every_slice() {
        let mut counts = [0; SLICES as usize];
        for n in 0..10_000 {
            counts[slice_of(&format!("0123456789abcdef0123456789abcdef-{n:x}")) as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn an_interval_is_cut_into_slices_of_at_least_a_millisecond() {
        assert_eq!(
            slice_of_interval(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
        assert_eq!(
            slice_of_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }
}
