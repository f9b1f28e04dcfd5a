//! `redis-ops`: the Redis-backed operations a busy server repeats, each kind for its own
//! window, from many connections with one command in flight each: record writes (the
//! interop example's `write-record`), connection metadata sets
//! (`mesh/set-my-connection-metadata`), presence-state publishes
//! (`mesh/publish-presence-state` in a room the connection is in; interop tracks every
//! room) and join/leave pairs (`mesh/join-room` then `mesh/leave-room`; one pair counts as
//! one operation).
//!
//! Around each window it asks Redis (`--redis HOST:PORT`, a raw RESP `INFO` request) for
//! `total_commands_processed` (every command run, those scripts call included),
//! `total_reads_processed` (socket reads, reported as `round_trips_per_op`: while every
//! request waits on a connection of its own this is the round trips; requests that share
//! a connection and arrive together are read once, so it then falls below them) and
//! `commandstats` (the same commands by name), and reports each per operation. Point the server and
//! the tool at a Redis nothing else uses, or the figures include the other traffic.

use std::collections::BTreeMap;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::limits::Client;
use super::*;

#[derive(clap::Args, Clone)]
pub(super) struct RedisOpsOpts {
    /// Connections, each with one command in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured window per kind, seconds.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// The Redis the server uses, as HOST:PORT, for the INFO deltas.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
}

#[derive(Clone, Copy)]
enum OpKind {
    Record,
    Metadata,
    Presence,
    JoinLeave,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Record => "record_write",
            OpKind::Metadata => "metadata_set",
            OpKind::Presence => "presence_state",
            OpKind::JoinLeave => "join_leave",
        }
    }

    /// One operation of this kind by connection `index`, the `n`th it makes.
    async fn run(self, client: &mut Client, index: usize, n: u64) -> Result<(), String> {
        let reply = match self {
            OpKind::Record => {
                client
                    .call(
                        "write-record",
                        json!({"recordId": format!("redis-ops:{index}"), "value": {"n": n}}),
                    )
                    .await?
            }
            OpKind::Metadata => {
                client
                    .call(
                        "mesh/set-my-connection-metadata",
                        json!({"metadata": {"n": n}}),
                    )
                    .await?
            }
            OpKind::Presence => {
                client
                    .call(
                        "mesh/publish-presence-state",
                        json!({"roomName": presence_room(index), "state": {"n": n}}),
                    )
                    .await?
            }
            OpKind::JoinLeave => {
                let room = format!("redis-ops-join-{index}");
                let joined = client
                    .call("mesh/join-room", json!({"roomName": room}))
                    .await?;
                if joined["success"] != true {
                    return Err(format!("join refused: {joined}"));
                }
                client
                    .call("mesh/leave-room", json!({"roomName": room}))
                    .await?
            }
        };
        if reply.get("error").is_some() || reply == false {
            return Err(format!("{} refused: {reply}", self.name()));
        }
        Ok(())
    }
}

fn presence_room(index: usize) -> String {
    format!("redis-ops-presence-{index}")
}

/// Runs every kind in turn; one JSON object with a field per kind.
pub(super) async fn redis_ops(url: &str, opts: &RedisOpsOpts) -> Result<Value, String> {
    eprintln!("redis-ops: opening {} connections", opts.connections);
    let mut clients = Vec::with_capacity(opts.connections);
    for index in 0..opts.connections {
        let mut client = Client::open(url).await?;
        let joined = client
            .call("mesh/join-room", json!({"roomName": presence_room(index)}))
            .await?;
        if joined["success"] != true {
            return Err(format!("join refused: {joined}"));
        }
        clients.push(client);
    }
    let mut out = json!({"connections": opts.connections, "duration_s": opts.duration});
    for kind in [
        OpKind::Record,
        OpKind::Metadata,
        OpKind::Presence,
        OpKind::JoinLeave,
    ] {
        eprintln!("redis-ops: {} for {} s", kind.name(), opts.duration);
        let before = redis_info(&opts.redis).await?;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(opts.duration);
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| {
                tokio::spawn(async move {
                    let mut done = 0u64;
                    while Instant::now() < end {
                        kind.run(&mut client, index, done).await?;
                        done += 1;
                    }
                    Ok::<_, String>((client, done))
                })
            })
            .collect();
        let mut operations = 0;
        clients = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (client, done) = task.await.map_err(|err| err.to_string())??;
            operations += done;
            clients.push(client);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = redis_info(&opts.redis).await?;
        out[kind.name()] = per_operation(operations, elapsed, &before, &after);
    }
    Ok(out)
}

/// Operations per second, and the INFO counters' growth per operation.
fn per_operation(
    operations: u64,
    elapsed: f64,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Value {
    let per_op = |name: &str| {
        let grown = after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
        (grown as f64 / operations.max(1) as f64 * 100.0).round() / 100.0
    };
    let mut by_command = serde_json::Map::new();
    for name in after.keys() {
        if let Some(command) = name.strip_prefix("cmdstat_") {
            // The INFO requests themselves are the tool's, not the server's.
            if command != "info" && per_op(name) > 0.0 {
                by_command.insert(command.to_owned(), json!(per_op(name)));
            }
        }
    }
    json!({
        "operations": operations,
        "ops_per_s": round1(operations as f64 / elapsed),
        "commands_per_op": per_op("total_commands_processed"),
        "round_trips_per_op": per_op("total_reads_processed"),
        "by_command_per_op": by_command,
    })
}

/// `INFO stats commandstats` over a raw RESP request: the stats counters by name, and
/// each command's `calls` as `cmdstat_<command>`.
async fn redis_info(address: &str) -> Result<BTreeMap<String, u64>, String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|err| format!("redis {address}: {err}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"*3\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n")
        .await
        .map_err(|err| format!("redis INFO: {err}"))?;
    let mut header = String::new();
    stream
        .read_line(&mut header)
        .await
        .map_err(|err| format!("redis INFO: {err}"))?;
    let length: usize = header
        .trim_end()
        .strip_prefix('$')
        .and_then(|length| length.parse().ok())
        .ok_or_else(|| format!("redis INFO answered {header:?}"))?;
    let mut body = vec![0; length];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|err| format!("redis INFO: {err}"))?;
    let mut counters = BTreeMap::new();
    for line in String::from_utf8_lossy(&body).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.starts_with("cmdstat_") {
            // cmdstat_get:calls=2,usec=...
            let calls = value
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.parse().ok());
            if let Some(calls) = calls {
                counters.insert(name.to_owned(), calls);
            }
        } else if let Ok(value) = value.trim().parse() {
            counters.insert(name.to_owned(), value);
        }
    }
    Ok(counters)
}
