//! Scenarios that measure what the limits bound, against the interop example:
//! `collection` (server CPU per write beside a large collection with many subscribers, and
//! exactly which pushes each write causes) and `attack` (server memory under the history
//! and record attacks, and whether a prompt client is still served meanwhile).

use std::collections::HashMap;

use super::*;

/// The room every client of these scenarios joins, so that a `broadcast-room` marker tells
/// each one that everything published before it has arrived.
const MARKER_ROOM: &str = "bench-marker";

/// One client connection used command by command.
pub(super) struct Client {
    ws: Ws,
    ids: ControlIds,
    next_id: u64,
    /// Pushes received outside a reply wait or a marker wait, by command.
    pushes: HashMap<String, u64>,
}

impl Client {
    pub(super) async fn open(url: &str) -> Result<Client, String> {
        Ok(Client {
            ws: connect(url, false).await?,
            ids: ControlIds::new(),
            next_id: 1,
            pushes: HashMap::new(),
        })
    }

    async fn send(&mut self, command: &str, payload: &Value) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = json!({"id": id, "command": command, "payload": payload}).to_string();
        self.ws
            .send(Message::text(frame))
            .await
            .map_err(|err| format!("send: {err}"))?;
        Ok(id)
    }

    /// Reads one frame: `Some((id, frame))` for a reply, `None` for anything else
    /// (pushes are counted, liveness frames answered).
    async fn read(&mut self) -> Result<Option<(u64, Value)>, String> {
        let msg = match classify(self.ws.next().await) {
            Read::Frame(msg) => msg,
            Read::Closed => return Err("connection closed".to_string()),
        };
        let Some(text) = text_of(&msg) else {
            return Ok(None);
        };
        let frame: Value = serde_json::from_str(text).map_err(|err| err.to_string())?;
        let command = frame["command"].as_str().unwrap_or_default().to_owned();
        if let Some(answer) = self.ids.answer(&command) {
            self.ws
                .send(answer)
                .await
                .map_err(|err| format!("send: {err}"))?;
            return Ok(None);
        }
        match frame["id"].as_u64() {
            Some(id) => Ok(Some((id, frame))),
            None => {
                *self.pushes.entry(command).or_default() += 1;
                Ok(None)
            }
        }
    }

    /// Sends a command and waits for its reply's payload.
    pub(super) async fn call(&mut self, command: &str, payload: Value) -> Result<Value, String> {
        let id = self.send(command, &payload).await?;
        loop {
            if let Some((got, frame)) = self.read().await? {
                if got == id {
                    return Ok(frame["payload"].clone());
                }
            }
        }
    }

    /// Sends every command at once, then waits for every reply; returns the payloads in
    /// order.
    async fn pipeline(&mut self, commands: &[(&str, Value)]) -> Result<Vec<Value>, String> {
        let mut pending = HashMap::new();
        for (index, (command, payload)) in commands.iter().enumerate() {
            pending.insert(self.send(command, payload).await?, index);
        }
        let mut replies = vec![Value::Null; commands.len()];
        while !pending.is_empty() {
            if let Some((id, frame)) = self.read().await? {
                if let Some(index) = pending.remove(&id) {
                    replies[index] = frame["payload"].clone();
                }
            }
        }
        Ok(replies)
    }

    /// Reads until the marker `n` broadcast to [`MARKER_ROOM`]; returns the pushes, by
    /// command, that came since the last call.
    async fn until_marker(&mut self, n: u64) -> Result<HashMap<String, u64>, String> {
        loop {
            let msg = match classify(self.ws.next().await) {
                Read::Frame(msg) => msg,
                Read::Closed => return Err("connection closed".to_string()),
            };
            let Some(text) = text_of(&msg) else { continue };
            let frame: Value = serde_json::from_str(text).map_err(|err| err.to_string())?;
            let command = frame["command"].as_str().unwrap_or_default().to_owned();
            if let Some(answer) = self.ids.answer(&command) {
                self.ws
                    .send(answer)
                    .await
                    .map_err(|err| format!("send: {err}"))?;
                continue;
            }
            if command == "room-message" && frame["payload"]["marker"] == n {
                return Ok(std::mem::take(&mut self.pushes));
            }
            if frame.get("id").is_none() {
                *self.pushes.entry(command).or_default() += 1;
            }
        }
    }
}

async fn marker(writer: &mut Client, n: u64) -> Result<(), String> {
    writer
        .call(
            "broadcast-room",
            json!({"room": MARKER_ROOM, "message": {"marker": n}}),
        )
        .await
        .map(drop)
}

/// Reads every subscriber up to marker `n`; the pushes each got before it.
async fn all_until_marker(
    subscribers: &mut [Client],
    n: u64,
) -> Result<Vec<HashMap<String, u64>>, String> {
    let mut all = Vec::with_capacity(subscribers.len());
    for subscriber in subscribers.iter_mut() {
        all.push(subscriber.until_marker(n).await?);
    }
    Ok(all)
}

fn counts(pushes: &[HashMap<String, u64>], command: &str) -> Vec<u64> {
    pushes
        .iter()
        .map(|of_one| of_one.get(command).copied().unwrap_or(0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// collection

/// Settings of the `collection` scenario.
#[derive(clap::Args, Clone)]
pub(crate) struct CollectionOpts {
    /// Records in the collection `big` (ids `big:0`, `big:1`, ...).
    #[arg(long, default_value_t = 12_000)]
    records: usize,
    /// Connections subscribed to `big`.
    #[arg(long, default_value_t = 30)]
    subscribers: usize,
    /// Writes to unrelated records (`other:N`), one at a time, measured.
    #[arg(long, default_value_t = 2000)]
    writes: usize,
    /// Writes to one member of `big`.
    #[arg(long, default_value_t = 20)]
    member_writes: usize,
    /// Pid of the server process (its CPU time is read from /proc/P/stat).
    #[arg(long)]
    server_pid: u32,
}

pub(crate) async fn collection(url: &str, opts: &CollectionOpts) -> Result<Value, String> {
    let mut writer = Client::open(url).await?;
    writer
        .call("mesh/join-room", json!({"roomName": MARKER_ROOM}))
        .await?;
    eprintln!("collection: writing {} records", opts.records);
    for batch in (0..opts.records).collect::<Vec<_>>().chunks(500) {
        let writes: Vec<(&str, Value)> = batch
            .iter()
            .map(|n| {
                (
                    "write-record",
                    json!({"recordId": format!("big:{n}"), "value": {"n": n}}),
                )
            })
            .collect();
        writer.pipeline(&writes).await?;
    }
    eprintln!("collection: {} subscribers", opts.subscribers);
    let mut subscribers = Vec::with_capacity(opts.subscribers);
    let mut snapshot_ids = Vec::new();
    for _ in 0..opts.subscribers {
        let mut subscriber = Client::open(url).await?;
        subscriber
            .call("mesh/join-room", json!({"roomName": MARKER_ROOM}))
            .await?;
        let reply = subscriber
            .call("mesh/subscribe-collection", json!({"collectionId": "big"}))
            .await?;
        snapshot_ids.push(reply["ids"].as_array().map_or(0, Vec::len));
        subscribers.push(subscriber);
    }

    eprintln!("collection: {} writes to unrelated records", opts.writes);
    let before = cpu_ticks(opts.server_pid).ok_or("cannot read the server's CPU time")?;
    let started = Instant::now();
    for n in 0..opts.writes {
        writer
            .call(
                "write-record",
                json!({"recordId": format!("other:{n}"), "value": {"n": n}}),
            )
            .await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = cpu_ticks(opts.server_pid).ok_or("cannot read the server's CPU time")?;
    let cpu_ms = after.saturating_sub(before) as f64 * 10.0;
    marker(&mut writer, 1).await?;
    let unrelated = all_until_marker(&mut subscribers, 1).await?;

    eprintln!("collection: {} writes to a member", opts.member_writes);
    for n in 0..opts.member_writes {
        writer
            .call(
                "write-record",
                json!({"recordId": "big:0", "value": {"n": 0, "write": n}}),
            )
            .await?;
    }
    marker(&mut writer, 2).await?;
    let member = all_until_marker(&mut subscribers, 2).await?;

    Ok(json!({
        "records": opts.records,
        "subscribers": opts.subscribers,
        "snapshot_ids_min": snapshot_ids.iter().min(),
        "unrelated_writes": opts.writes,
        "unrelated_server_cpu_ms": round1(cpu_ms),
        "unrelated_server_cpu_us_per_write": round1(cpu_ms * 1000.0 / opts.writes.max(1) as f64),
        "unrelated_writes_per_sec": round1(opts.writes as f64 / elapsed),
        "unrelated_pushes_to_subscribers": unrelated.iter().map(|of_one| of_one.values().sum::<u64>()).sum::<u64>(),
        "member_writes": opts.member_writes,
        "member_updates_per_subscriber": counts(&member, "mesh/record-update").iter().min(),
        "member_updates_per_subscriber_max": counts(&member, "mesh/record-update").iter().max(),
        "member_diffs": counts(&member, "mesh/collection-diff").iter().sum::<u64>(),
    }))
}

// ---------------------------------------------------------------------------------------------
// attack

/// Which attack the `attack` scenario runs.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Attack {
    /// Fill a channel's history, then many readers ask for all of it at once.
    History,
    /// Grow a record with merges, then many subscribers read it.
    Record,
}

/// Settings of the `attack` scenario.
#[derive(clap::Args, Clone)]
pub(crate) struct AttackOpts {
    /// Which attack.
    #[arg(long, value_enum, default_value_t = Attack::History)]
    kind: Attack,
    /// History: messages written. Record: merge writes.
    #[arg(long, default_value_t = 120)]
    writes: usize,
    /// Bytes per message (history) or per merged field (record).
    #[arg(long, default_value_t = 500_000)]
    bytes: usize,
    /// History: readers asking for the whole history. Record: subscribers.
    #[arg(long, default_value_t = 8)]
    readers: usize,
    /// Pid of the server process (its VmRSS is sampled from /proc/P/status).
    #[arg(long)]
    server_pid: u32,
}

pub(crate) async fn attack(url: &str, opts: &AttackOpts) -> Result<Value, String> {
    let pid = opts.server_pid;
    let rss_before = rss_kib(pid).ok_or("cannot read the server's memory")?;
    // A prompt client that keeps asking for an echo meanwhile.
    let (stop_tx, stop_rx) = watch::channel(false);
    let canary = {
        let mut canary = Client::open(url).await?;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut answered = 0u64;
            while !*stop.borrow() {
                let sent = Instant::now();
                let echo = canary.call("echo", json!("canary"));
                match tokio::time::timeout(Duration::from_secs(5), echo).await {
                    Ok(Ok(_)) => answered += 1,
                    Ok(Err(err)) => return (answered, worst, Some(err)),
                    Err(_) => return (answered, worst, Some("echo timed out".to_string())),
                }
                worst = worst.max(sent.elapsed());
                let _ = tokio::time::timeout(Duration::from_millis(20), stop.changed()).await;
            }
            (answered, worst, None)
        })
    };
    // The server's memory, sampled every 10 ms.
    let sampler = {
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            while !*stop.borrow() {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };

    let mut writer = Client::open(url).await?;
    let chunk = "a".repeat(opts.bytes);
    let mut refused = 0u64;
    let mut readers_closed = 0u64;
    let mut reply_bytes = Vec::new();
    // The server's memory once the data is stored, before anyone reads it.
    let rss_stored;
    match opts.kind {
        Attack::History => {
            for _ in 0..opts.writes {
                let reply = writer
                    .call(
                        "write-channel",
                        json!({"channel": "attack", "message": chunk, "history": 1_000_000}),
                    )
                    .await?;
                refused += u64::from(reply.get("code").is_some());
            }
            rss_stored = rss_kib(pid).unwrap_or(0);
            let mut readers = Vec::with_capacity(opts.readers);
            for _ in 0..opts.readers {
                readers.push(Client::open(url).await?);
            }
            let reads = readers.iter_mut().map(|reader| async move {
                reader
                    .call(
                        "mesh/get-channel-history",
                        json!({"channel": "attack", "limit": 10_000}),
                    )
                    .await
            });
            for read in futures_util::future::join_all(reads).await {
                match read {
                    Ok(reply) => reply_bytes.push(reply.to_string().len()),
                    Err(_) => readers_closed += 1,
                }
            }
        }
        Attack::Record => {
            for n in 0..opts.writes {
                let reply = writer
                    .call(
                        "write-record",
                        json!({"recordId": "attack", "value": {format!("k{n}"): chunk}, "strategy": "merge"}),
                    )
                    .await?;
                refused += u64::from(reply.get("code").is_some());
            }
            rss_stored = rss_kib(pid).unwrap_or(0);
            let mut readers = Vec::with_capacity(opts.readers);
            for _ in 0..opts.readers {
                readers.push(Client::open(url).await?);
            }
            let reads = readers.iter_mut().map(|reader| async move {
                reader
                    .call("mesh/subscribe-record", json!({"recordId": "attack"}))
                    .await
            });
            for read in futures_util::future::join_all(reads).await {
                match read {
                    Ok(reply) => reply_bytes.push(reply.to_string().len()),
                    Err(_) => readers_closed += 1,
                }
            }
        }
    }
    // What the server still holds once the attack is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);
    let _ = stop_tx.send(true);
    let peak = sampler.await.unwrap_or(0);
    let (answered, worst, canary_error) =
        canary
            .await
            .unwrap_or((0, Duration::ZERO, Some("canary task failed".to_string())));
    Ok(json!({
        "kind": match opts.kind { Attack::History => "history", Attack::Record => "record" },
        "writes": opts.writes,
        "bytes": opts.bytes,
        "refused_writes": refused,
        "readers": opts.readers,
        "readers_closed": readers_closed,
        "largest_reply_bytes": reply_bytes.iter().max(),
        "rss_before_kib": rss_before,
        "rss_stored_kib": rss_stored,
        "rss_peak_kib": peak.max(rss_after),
        "rss_after_kib": rss_after,
        "rss_peak_above_start_mib": round1(peak.max(rss_after).saturating_sub(rss_before) as f64 / 1024.0),
        "canary_echoes": answered,
        "canary_worst_ms": round1(worst.as_secs_f64() * 1000.0),
        "canary_error": canary_error,
    }))
}
