//! Load tool for any server speaking the mesh wire protocol (see `docs/protocol.md` §1-3).
//!
//! It uses only the wire protocol plus the interop commands `echo` (replies with its payload),
//! `broadcast-room {room, message}` (pushes `room-message` with `message` to every member of
//! `room`, replies `{success: true}`) and the built-in `mesh/join-room {roomName}`. Every
//! connection waits for `mesh/assign-id` before use and answers `ping` (with `pong`) and
//! `latency:request` (with `latency:response`), so the server never drops it as dead.
//!
//! Each run prints ONE JSON object on stdout (progress goes to stderr):
//!
//! ```text
//! # C connections each keep K `echo` commands of B bytes in flight for S seconds (after a warm-up)
//! cargo run --release -p tower-mesh-bench --bin bench -- rpc --url ws://127.0.0.1:8787/ \
//!     --connections 64 --inflight 16 --duration 10 --payload-bytes 64 [--warmup 1] [--raw]
//! # M members in room `bench-room`; one publisher broadcasts R times a second for S seconds
//! cargo run --release -p tower-mesh-bench --bin bench -- broadcast --url ws://127.0.0.1:8787/ \
//!     --members 1000 --rate 10 --duration 10 [--label raw_fanout]
//! # server memory per idle connection (VmRSS of /proc/P/status before and after)
//! cargo run --release -p tower-mesh-bench --bin bench -- idle --url ws://127.0.0.1:8787/ \
//!     --connections 10000 --server-pid P
//! # two instances (e.g. on one Redis): members / connections alternate between the URLs
//! cargo run --release -p tower-mesh-bench --bin bench -- cross --url ws://127.0.0.1:18789/ \
//!     --url2 ws://127.0.0.1:18790/ --kind broadcast|rpc [options of that scenario]
//! # the interop example's collection `big` of N records with S subscribers: server CPU per
//! # write to an unrelated record, and the pushes a write to a member causes
//! cargo run --release -p tower-mesh-bench --bin bench -- collection --url ws://127.0.0.1:8787/ \
//!     --records 12000 --subscribers 30 --writes 2000 --server-pid P
//! # server memory (VmRSS sampled) under the history or record attack, and a canary's echoes
//! cargo run --release -p tower-mesh-bench --bin bench -- attack --url ws://127.0.0.1:8787/ \
//!     --kind history|record --writes 120 --bytes 500000 --readers 8 --server-pid P
//! # Redis-backed operations by kind: ops/s, Redis commands and round trips per operation
//! cargo run --release -p tower-mesh-bench --bin bench -- redis-ops --url ws://127.0.0.1:8787/ \
//!     --connections 64 --duration 8 --redis 127.0.0.1:6379
//! ```
//!
//! `--raw` (rpc only) drives a plain echo server (the `raw_echo` binary of this package): no
//! `mesh/assign-id` is awaited and the echoed request frame itself counts as the reply
//! (matched by its `id`).
//! The broadcast scenario drives the `raw_fanout` binary of this package as it is (that
//! server speaks the frames above); `--label` only names the server in the JSON line.
//!
//! Latencies are in microseconds: rpc measures send -> reply per command; broadcast measures
//! `now_us - t` per delivery, `t` being the publisher's clock (microseconds since this process
//! started) taken right before sending. Only replies received inside the measured window count.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod limits;
mod redis_ops;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connections set up at once (connect + assign-id + join).
const SETUP_CONCURRENCY: usize = 200;
/// Ids of `echo` commands stay below this; control frames (pong, latency:response) use the rest.
const ECHO_ID_LIMIT: u64 = 90_000_000;
const CONTROL_ID_BASE: u64 = 95_000_000;
/// The room the broadcast scenario uses.
const ROOM: &str = "bench-room";
/// Read buffer of each socket (see [`ws_config`]).
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// How long a connection may take to open and be assigned an id.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

static START: OnceLock<Instant> = OnceLock::new();

/// Microseconds since this process started (the clock broadcast timestamps use).
fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Parser)]
#[command(about = "Load tool for servers speaking the mesh wire protocol")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Connections keep `echo` commands in flight; throughput and send->reply latency.
    Rpc {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        /// Measured window, seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        opts: RpcOpts,
    },
    /// Members in one room; one publisher broadcasts at a fixed rate; delivery latency.
    Broadcast {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        /// Publishing time, seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Names the server in the JSON line (`"label"`), e.g. `raw_fanout` for the baseline.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        opts: BroadcastOpts,
    },
    /// Server memory per idle connection (VmRSS before and after opening them).
    Idle {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        /// Idle connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Pid of the server process (its /proc/P/status is read).
        #[arg(long)]
        server_pid: u32,
    },
    /// rpc or broadcast across two servers (members / connections alternate between them).
    Cross {
        /// First server (the broadcast publisher's).
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        /// Second server.
        #[arg(long)]
        url2: String,
        /// Which scenario to run across the two.
        #[arg(long, value_enum, default_value_t = Kind::Broadcast)]
        kind: Kind,
        /// Measured window (rpc) or publishing time (broadcast), seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        rpc: RpcOpts,
        #[command(flatten)]
        broadcast: BroadcastOpts,
    },
    /// A large collection with many subscribers: server CPU per unrelated write, pushes
    /// per member write (needs the interop example's `write-record` and `broadcast-room`).
    Collection {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        #[command(flatten)]
        opts: limits::CollectionOpts,
    },
    /// The history or record attack: server memory, and whether a prompt client is still
    /// served (needs the interop example's `write-channel` / `write-record`).
    Attack {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        #[command(flatten)]
        opts: limits::AttackOpts,
    },
    /// Redis-backed operations (record writes, metadata sets, presence states, join/leave)
    /// from many connections: operations per second, Redis commands and round trips per
    /// operation (needs the interop example on Redis).
    RedisOps {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        #[command(flatten)]
        opts: redis_ops::RedisOpsOpts,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Broadcast,
    Rpc,
}

#[derive(clap::Args, Clone)]
struct RpcOpts {
    /// Connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// `echo` commands in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Size of each `echo` payload (a JSON string of this many bytes).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Warm-up before the measured window, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Plain echo server: no assign-id wait; the echoed frame is the reply.
    #[arg(long)]
    raw: bool,
    /// Pid of the server process: its CPU time (user + system, from /proc/P/stat) over the
    /// measured window is reported, a figure that noisy neighbours on the machine disturb
    /// far less than throughput.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(clap::Args, Clone)]
struct BroadcastOpts {
    /// Room members.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
}

fn main() {
    START.get_or_init(Instant::now);
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-file limit: {err}");
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let out = runtime.block_on(async move {
        match cli.scenario {
            Scenario::Rpc {
                url,
                duration,
                opts,
            } => {
                let out = rpc(std::slice::from_ref(&url), duration, &opts).await;
                prefixed(json!({"scenario": "rpc", "url": url}), out)
            }
            Scenario::Broadcast {
                url,
                duration,
                label,
                opts,
            } => {
                let out = broadcast(std::slice::from_ref(&url), duration, &opts).await;
                let mut head = json!({"scenario": "broadcast", "url": url});
                if let Some(label) = label {
                    head["label"] = json!(label);
                }
                prefixed(head, out)
            }
            Scenario::Idle {
                url,
                connections,
                server_pid,
            } => idle(url, connections, server_pid).await,
            Scenario::Cross {
                url,
                url2,
                kind,
                duration,
                rpc: rpc_opts,
                broadcast: broadcast_opts,
            } => {
                let urls = [url.clone(), url2.clone()];
                let (out, kind) = match kind {
                    Kind::Rpc => (rpc(&urls, duration, &rpc_opts).await, "rpc"),
                    Kind::Broadcast => (
                        broadcast(&urls, duration, &broadcast_opts).await,
                        "broadcast",
                    ),
                };
                prefixed(
                    json!({"scenario": "cross", "kind": kind, "url": url, "url2": url2}),
                    out,
                )
            }
            Scenario::Collection { url, opts } => prefixed(
                json!({"scenario": "collection", "url": url}),
                limits::collection(&url, &opts)
                    .await
                    .unwrap_or_else(|err| json!({ "error": err })),
            ),
            Scenario::Attack { url, opts } => prefixed(
                json!({"scenario": "attack", "url": url}),
                limits::attack(&url, &opts)
                    .await
                    .unwrap_or_else(|err| json!({ "error": err })),
            ),
            Scenario::RedisOps { url, opts } => prefixed(
                json!({"scenario": "redis-ops", "url": url}),
                redis_ops::redis_ops(&url, &opts)
                    .await
                    .unwrap_or_else(|err| json!({ "error": err })),
            ),
        }
    });
    // Connections still closing must not delay the report.
    runtime.shutdown_timeout(Duration::from_millis(200));
    println!("{out}");
}

/// `head`'s fields first (scenario, urls), then `body`'s.
fn prefixed(mut head: Value, body: Value) -> Value {
    if let (Some(head), Value::Object(body)) = (head.as_object_mut(), body) {
        head.extend(body);
    }
    head
}

// ---------------------------------------------------------------------------------------------
// Wire helpers

/// The part of a frame every connection looks at: the payload is skipped, not built.
#[derive(Deserialize)]
struct Head<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    command: Cow<'a, str>,
}

/// A `room-message` push carrying the publisher's timestamp.
#[derive(Deserialize)]
struct Stamped {
    payload: Stamp,
}

#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

/// Per-connection source of ids for pongs and latency responses.
struct ControlIds(u64);

impl ControlIds {
    fn new() -> Self {
        Self(CONTROL_ID_BASE)
    }

    /// The answer to a liveness frame (`ping`, `latency:request`), if `command` is one.
    fn answer(&mut self, command: &str) -> Option<Message> {
        let name = match command {
            "ping" => "pong",
            "latency:request" => "latency:response",
            _ => return None,
        };
        self.0 = if self.0 >= 99_999_999 {
            CONTROL_ID_BASE
        } else {
            self.0 + 1
        };
        Some(Message::text(format!(
            r#"{{"id":{},"command":"{name}","payload":{{}}}}"#,
            self.0
        )))
    }
}

/// The text of a data frame; `None` for control frames. Binary frames are read as UTF-8.
fn text_of(msg: &Message) -> Option<&str> {
    match msg {
        Message::Text(text) => Some(text.as_str()),
        Message::Binary(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// What became of a connection's read.
enum Read {
    Frame(Message),
    Closed,
}

fn classify(next: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Read {
    match next {
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Read::Closed,
        Some(Ok(msg)) => Read::Frame(msg),
    }
}

/// Opens a connection (Nagle off) and, unless `raw`, waits for `mesh/assign-id`.
/// The load tool's socket settings. tungstenite's default read buffer (128 KiB) is zeroed
/// before every read, which with thousands of sockets would make the tool, not the
/// server, the bottleneck (and cost 128 KiB of memory per socket).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES)
}

async fn connect(url: &str, raw: bool) -> Result<Ws, String> {
    let setup = async {
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
                .await
                .map_err(|err| format!("connect: {err}"))?;
        if raw {
            return Ok(ws);
        }
        let mut ids = ControlIds::new();
        loop {
            let msg = match classify(ws.next().await) {
                Read::Frame(msg) => msg,
                Read::Closed => return Err("closed before mesh/assign-id".to_string()),
            };
            let Some(text) = text_of(&msg) else { continue };
            let Ok(head) = serde_json::from_str::<Head>(text) else {
                continue;
            };
            if head.command == "mesh/assign-id" {
                return Ok(ws);
            }
            if let Some(answer) = ids.answer(&head.command) {
                ws.send(answer).await.map_err(|err| err.to_string())?;
            }
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or_else(|_| Err("timed out waiting for the connection".to_string()))
}

/// Keeps answering liveness frames until `until` completes; `None` if the connection ended.
/// Frames other than liveness ones are handed to `other`.
async fn serve_until<F: Future>(
    ws: &mut Ws,
    ids: &mut ControlIds,
    until: F,
    mut other: impl FnMut(&Head<'_>, &str),
) -> Option<F::Output> {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            biased;
            out = &mut until => return Some(out),
            next = ws.next() => {
                let msg = match classify(next) {
                    Read::Frame(msg) => msg,
                    Read::Closed => return None,
                };
                let Some(text) = text_of(&msg) else { continue };
                let Ok(head) = serde_json::from_str::<Head>(text) else { continue };
                if let Some(answer) = ids.answer(&head.command) {
                    if ws.send(answer).await.is_err() {
                        return None;
                    }
                } else {
                    other(&head, text);
                }
            }
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

fn percentiles(out: &mut Value, hist: &Histogram<u64>) {
    out["p50_us"] = json!(hist.value_at_quantile(0.50));
    out["p99_us"] = json!(hist.value_at_quantile(0.99));
    out["p999_us"] = json!(hist.value_at_quantile(0.999));
    out["max_us"] = json!(hist.max());
    out["mean_us"] = json!((hist.mean() * 10.0).round() / 10.0);
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// ---------------------------------------------------------------------------------------------
// rpc

/// The measured window every rpc connection shares.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct RpcResult {
    hist: Option<Histogram<u64>>,
    commands: u64,
    errors: u64,
}

async fn rpc(urls: &[String], duration: f64, opts: &RpcOpts) -> Value {
    let c = opts.connections;
    let k = opts.inflight.max(1);
    let payload: Arc<str> = "x".repeat(opts.payload_bytes).into();
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(c.max(1));
    let (go_tx, go_rx) = watch::channel::<Option<Window>>(None);
    eprintln!("rpc: opening {c} connections");
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(rpc_connection(
                url,
                opts.raw,
                k,
                payload.clone(),
                setup.clone(),
                ready_tx.clone(),
                go_rx.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let mut connected = 0usize;
    while let Some(ok) = ready_rx.recv().await {
        connected += ok as usize;
    }
    let warmup = Duration::from_secs_f64(opts.warmup.max(0.0));
    let start = Instant::now() + warmup;
    let window = Window {
        start,
        end: start + Duration::from_secs_f64(duration),
    };
    eprintln!(
        "rpc: {connected}/{c} connected; warm-up {:.1} s, measuring {duration} s",
        warmup.as_secs_f64()
    );
    let _ = go_tx.send(Some(window));
    let server_cpu = opts
        .server_pid
        .map(|pid| tokio::spawn(cpu_seconds_over(pid, window)));
    let mut hist = new_histogram();
    let (mut commands, mut errors) = (0u64, 0u64);
    for task in tasks {
        match task.await {
            Ok(result) => {
                commands += result.commands;
                errors += result.errors;
                if let Some(h) = result.hist {
                    let _ = hist.add(&h);
                }
            }
            Err(_) => errors += 1,
        }
    }
    let mut out = json!({
        "connections": c,
        "connected": connected,
        "inflight": k,
        "payload_bytes": opts.payload_bytes,
        "duration_s": duration,
        "warmup_s": warmup.as_secs_f64(),
        "commands": commands,
        "per_sec": round1(commands as f64 / duration),
        "errors": errors,
    });
    percentiles(&mut out, &hist);
    if let Some(server_cpu) = server_cpu {
        if let Ok(Some(cpu_s)) = server_cpu.await {
            out["server_cpu_s"] = json!(round1(cpu_s));
            if commands > 0 {
                let ns = (cpu_s * 1e9 / commands as f64).round() as u64;
                out["server_cpu_ns_per_command"] = json!(ns);
            }
        }
    }
    if opts.raw {
        out["raw"] = json!(true);
    }
    out
}

/// The CPU time (user + system) a process spends inside `window`, in seconds.
async fn cpu_seconds_over(pid: u32, window: Window) -> Option<f64> {
    tokio::time::sleep_until(window.start.into()).await;
    let before = cpu_ticks(pid)?;
    tokio::time::sleep_until(window.end.into()).await;
    let after = cpu_ticks(pid)?;
    // /proc reports CPU time in USER_HZ ticks, which Linux fixes at 100 for user space.
    Some(after.saturating_sub(before) as f64 / 100.0)
}

/// utime + stime of a process from /proc/P/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

async fn rpc_connection(
    url: String,
    raw: bool,
    k: usize,
    payload: Arc<str>,
    setup: Arc<Semaphore>,
    ready: mpsc::Sender<bool>,
    mut go: watch::Receiver<Option<Window>>,
) -> RpcResult {
    let permit = setup.acquire_owned().await;
    let mut ws = match connect(&url, raw).await {
        Ok(ws) => ws,
        Err(err) => {
            eprintln!("rpc: {url}: {err}");
            let _ = ready.send(false).await;
            return RpcResult {
                errors: 1,
                ..Default::default()
            };
        }
    };
    drop(permit);
    let _ = ready.send(true).await;
    drop(ready);
    let mut ids = ControlIds::new();
    let window = serve_until(
        &mut ws,
        &mut ids,
        async {
            loop {
                if let Some(window) = *go.borrow_and_update() {
                    return Some(window);
                }
                if go.changed().await.is_err() {
                    return None;
                }
            }
        },
        |_, _| {},
    )
    .await
    .flatten();
    let Some(window) = window else {
        return RpcResult {
            errors: 1,
            ..Default::default()
        };
    };

    let mut result = RpcResult {
        hist: Some(new_histogram()),
        ..Default::default()
    };
    let hist = result.hist.as_mut().expect("histogram");
    let k64 = k as u64;
    let seq_limit = (ECHO_ID_LIMIT / k64).max(1);
    let mut seq = vec![0u64; k];
    let mut sent = vec![Instant::now(); k];
    let frame = |id: u64| {
        Message::text(format!(
            r#"{{"id":{id},"command":"echo","payload":"{payload}"}}"#
        ))
    };
    for (slot, at) in sent.iter_mut().enumerate() {
        *at = Instant::now();
        if ws.feed(frame(slot as u64)).await.is_err() {
            result.errors += 1;
            return result;
        }
    }
    if ws.flush().await.is_err() {
        result.errors += 1;
        return result;
    }
    let deadline = tokio::time::sleep_until(window.end.into());
    tokio::pin!(deadline);
    let mut next = None;
    'run: loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => tokio::select! {
                biased;
                _ = &mut deadline => break 'run,
                got = ws.next() => match classify(got) {
                    Read::Frame(msg) => msg,
                    Read::Closed => { result.errors += 1; break 'run; }
                },
            },
        };
        let now = Instant::now();
        if now >= window.end {
            break;
        }
        if let Some(text) = text_of(&msg) {
            if let Ok(head) = serde_json::from_str::<Head>(text) {
                match head.id {
                    Some(id) if id < ECHO_ID_LIMIT && head.command == "echo" => {
                        let slot = (id % k64) as usize;
                        if now >= window.start {
                            if text.contains(r#""code":"E"#) {
                                result.errors += 1;
                            } else {
                                result.commands += 1;
                                hist.saturating_record(
                                    now.duration_since(sent[slot]).as_micros() as u64
                                );
                            }
                        }
                        seq[slot] = (seq[slot] + 1) % seq_limit;
                        sent[slot] = now;
                        if ws.feed(frame(seq[slot] * k64 + slot as u64)).await.is_err() {
                            result.errors += 1;
                            break;
                        }
                    }
                    None => {
                        if let Some(answer) = ids.answer(&head.command) {
                            if ws.feed(answer).await.is_err() {
                                result.errors += 1;
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // Another frame already here? Handle it before flushing, so replies go out in batches.
        match ws.next().now_or_never() {
            Some(got) => match classify(got) {
                Read::Frame(msg) => next = Some(msg),
                Read::Closed => {
                    result.errors += 1;
                    break;
                }
            },
            None => {
                if ws.flush().await.is_err() {
                    result.errors += 1;
                    break;
                }
            }
        }
    }
    drop(ws);
    result
}

// ---------------------------------------------------------------------------------------------
// broadcast

struct MemberResult {
    hist: Histogram<u64>,
    errors: u64,
}

async fn broadcast(urls: &[String], duration: f64, opts: &BroadcastOpts) -> Value {
    let m = opts.members;
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let deliveries = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(m.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("broadcast: opening {m} members");
    let setup_started = Instant::now();
    let tasks: Vec<_> = (0..m)
        .map(|i| {
            tokio::spawn(member(
                urls[i % urls.len()].clone(),
                setup.clone(),
                ready_tx.clone(),
                stop_rx.clone(),
                deliveries.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let mut joined = 0usize;
    while let Some(ok) = ready_rx.recv().await {
        joined += ok as usize;
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    eprintln!("broadcast: {joined}/{m} members joined in {setup_s:.1} s");

    let mut errors = (m - joined) as u64;
    let (mut sent, mut acked, mut rejected) = (0u64, 0u64, 0u64);
    let publisher_url = &urls[0];
    match connect(publisher_url, false).await {
        Err(err) => {
            eprintln!("broadcast: publisher: {err}");
            errors += 1;
        }
        Ok(mut ws) => {
            let mut ids = ControlIds::new();
            let total = (opts.rate * duration).round() as u64;
            let period = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut on_reply = |head: &Head<'_>, text: &str| {
                if head.command == "broadcast-room" && head.id.is_some() {
                    if text.contains(r#""success":true"#) {
                        acked += 1;
                    } else {
                        rejected += 1;
                    }
                }
            };
            'publish: while sent < total {
                if serve_until(&mut ws, &mut ids, ticks.tick(), &mut on_reply)
                    .await
                    .is_none()
                {
                    errors += 1;
                    break 'publish;
                }
                sent += 1;
                let frame = format!(
                    r#"{{"id":{sent},"command":"broadcast-room","payload":{{"room":"{ROOM}","message":{{"t":{},"seq":{sent}}}}}}}"#,
                    now_us()
                );
                if ws.send(Message::text(frame)).await.is_err() {
                    errors += 1;
                    break 'publish;
                }
            }
            // Stragglers: up to 2 s for every member to have every message.
            let expected = sent * joined as u64;
            let wait = async {
                let give_up = Instant::now() + Duration::from_secs(2);
                while deliveries.load(Ordering::Relaxed) < expected && Instant::now() < give_up {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let _ = serve_until(&mut ws, &mut ids, wait, &mut on_reply).await;
        }
    }
    errors += rejected;
    let _ = stop_tx.send(true);
    let mut hist = new_histogram();
    for task in tasks {
        match task.await {
            Ok(result) => {
                errors += result.errors;
                let _ = hist.add(&result.hist);
            }
            Err(_) => errors += 1,
        }
    }
    let delivered = deliveries.load(Ordering::Relaxed);
    let mut out = json!({
        "members": m,
        "joined": joined,
        "rate": opts.rate,
        "duration_s": duration,
        "setup_s": round1(setup_s),
        "sent": sent,
        "acked": acked,
        "deliveries": delivered,
        "per_sec": round1(delivered as f64 / duration),
        "missing": (sent * m as u64).saturating_sub(delivered),
        "errors": errors,
    });
    percentiles(&mut out, &hist);
    out
}

/// One room member: connect, join `bench-room`, then record every `room-message` until stopped.
async fn member(
    url: String,
    setup: Arc<Semaphore>,
    ready: mpsc::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    deliveries: Arc<AtomicU64>,
) -> MemberResult {
    let mut result = MemberResult {
        hist: new_histogram(),
        errors: 0,
    };
    let permit = setup.acquire_owned().await;
    let joined = async {
        let mut ws = connect(&url, false).await?;
        let join =
            format!(r#"{{"id":1,"command":"mesh/join-room","payload":{{"roomName":"{ROOM}"}}}}"#);
        ws.send(Message::text(join))
            .await
            .map_err(|err| err.to_string())?;
        let mut ids = ControlIds::new();
        let mut reply = None;
        let (tx, mut rx) = mpsc::unbounded_channel::<bool>();
        let got = serve_until(&mut ws, &mut ids, rx.recv(), |head, text| {
            if head.id == Some(1) && reply.is_none() {
                reply = Some(());
                let _ = tx.send(text.contains(r#""success":true"#));
            }
        })
        .await;
        match got {
            Some(Some(true)) => Ok(ws),
            Some(_) => Err("join-room refused".to_string()),
            None => Err("closed while joining".to_string()),
        }
    };
    let joined = tokio::time::timeout(SETUP_TIMEOUT, joined)
        .await
        .unwrap_or_else(|_| Err("timed out joining".to_string()));
    drop(permit);
    let mut ws = match joined {
        Ok(ws) => {
            let _ = ready.send(true).await;
            ws
        }
        Err(err) => {
            eprintln!("broadcast: member {url}: {err}");
            let _ = ready.send(false).await;
            return result;
        }
    };
    drop(ready);
    let mut ids = ControlIds::new();
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => tokio::select! {
                biased;
                got = ws.next() => match classify(got) {
                    Read::Frame(msg) => msg,
                    Read::Closed => {
                        if !*stop.borrow() { result.errors += 1; }
                        break;
                    }
                },
                _ = stop.changed() => break,
            },
        };
        if let Some(text) = text_of(&msg) {
            if let Ok(head) = serde_json::from_str::<Head>(text) {
                if head.id.is_none() {
                    if head.command == "room-message" {
                        if let Ok(stamped) = serde_json::from_str::<Stamped>(text) {
                            let now = now_us();
                            result
                                .hist
                                .saturating_record(now.saturating_sub(stamped.payload.t));
                            deliveries.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if let Some(answer) = ids.answer(&head.command) {
                        if ws.feed(answer).await.is_err() {
                            result.errors += 1;
                            break;
                        }
                    }
                }
            }
        }
        match ws.next().now_or_never() {
            Some(got) => match classify(got) {
                Read::Frame(msg) => next = Some(msg),
                Read::Closed => {
                    if !*stop.borrow() {
                        result.errors += 1;
                    }
                    break;
                }
            },
            None => {
                if ws.flush().await.is_err() {
                    result.errors += 1;
                    break;
                }
            }
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// idle

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn idle(url: String, n: usize, pid: u32) -> Value {
    let Some(before) = rss_kib(pid) else {
        return json!({"scenario": "idle", "url": url, "error": format!("cannot read /proc/{pid}/status")});
    };
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(n.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("idle: server rss {before} KiB; opening {n} connections");
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            let setup = setup.clone();
            let ready = ready_tx.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let permit = setup.acquire_owned().await;
                let mut ws = match connect(&url, false).await {
                    Ok(ws) => ws,
                    Err(err) => {
                        eprintln!("idle: {err}");
                        let _ = ready.send(false).await;
                        return 0u64; // counted as not connected
                    }
                };
                drop(permit);
                let _ = ready.send(true).await;
                drop(ready);
                let mut ids = ControlIds::new();
                let stopped = serve_until(
                    &mut ws,
                    &mut ids,
                    async { stop.wait_for(|s| *s).await.is_ok() },
                    |_, _| {},
                )
                .await
                .is_some();
                let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
                u64::from(!stopped)
            })
        })
        .collect();
    drop(ready_tx);
    let mut connected = 0usize;
    while let Some(ok) = ready_rx.recv().await {
        connected += ok as usize;
    }
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!("idle: {connected}/{n} assigned in {setup_s:.1} s; settling 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let _ = stop_tx.send(true);
    let mut errors = (n - connected) as u64;
    for task in tasks {
        errors += task.await.unwrap_or(1);
    }
    json!({
        "scenario": "idle",
        "url": url,
        "connections": n,
        "connected": connected,
        "setup_s": round1(setup_s),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": if connected > 0 {
            round1((after as f64 - before as f64) / connected as f64)
        } else { 0.0 },
        "errors": errors,
    })
}
