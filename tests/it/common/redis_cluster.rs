//! Private Redis Clusters on free ports (three masters, optionally one replica), for tests
//! that kill, fail over or wipe a cluster and so cannot share the one scripts/test starts
//! (`REDIS_CLUSTER_URLS`). Formed the way scripts/test forms its cluster, with
//! `redis-cli --cluster` (`REDIS_CLI` overrides the binary, `REDIS_SERVER` the server's).
//!
//! The methods block the calling thread (child processes, sync Redis connections): call
//! them from the body of a multi-thread runtime test, as the fault tests are, so that the
//! instances' tasks keep running on the workers meanwhile.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{FromRedisValue, Value};

use super::WAIT;

/// How long a cluster gets to form or to fail over. Forming takes `redis-cli` a second or
/// two, a failover the node timeout plus an election (about 4 s), and the machine is
/// shared: [`WAIT`] would be tight.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// A node's cluster bus listens on its port plus this.
const BUS_PORT_OFFSET: u16 = 10000;

/// How often the waits ask the nodes again.
const POLL: Duration = Duration::from_millis(50);

/// A private Redis Cluster: three masters and optionally one replica of the first master,
/// each node in its own temporary directory. Dropping it kills every node and removes the
/// directories.
pub(crate) struct RedisCluster {
    dir: PathBuf,
    masters: Vec<u16>,
    replica: Option<u16>,
    /// The nodes that run, by port. A killed node leaves this list.
    running: Vec<(u16, Child)>,
}

impl RedisCluster {
    /// Starts three masters (and a replica of the first, `with_replica`) on free ports,
    /// creates the cluster and waits until every node sees `cluster_state:ok` (and the
    /// replica is known to every master and synced).
    pub(crate) fn start(with_replica: bool) -> RedisCluster {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-mesh-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Between the pick and the node's bind another process can take a port, and the
        // node then exits: pick again, a few times.
        let mut failures = Vec::new();
        for _ in 0..5 {
            let mut ports = free_ports(if with_replica { 4 } else { 3 });
            let replica = with_replica.then(|| ports.remove(3));
            let mut cluster = RedisCluster {
                dir: dir.clone(),
                masters: ports,
                replica,
                running: Vec::new(),
            };
            match cluster.spawn_nodes() {
                Ok(()) => {
                    cluster.create();
                    return cluster;
                }
                Err(failure) => failures.push(failure),
            }
        }
        panic!("could not start a Redis Cluster's nodes: {failures:?}");
    }

    /// The masters' URLs, `redis://127.0.0.1:PORT`, the seeds a cluster client is given.
    /// The same after [`RedisCluster::restart_all_empty`].
    pub(crate) fn urls(&self) -> Vec<String> {
        self.masters
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The masters' ports, in the order of [`RedisCluster::urls`]. The first is the one
    /// the replica follows.
    pub(crate) fn master_ports(&self) -> &[u16] {
        &self.masters
    }

    /// The replica's port, when started with one.
    pub(crate) fn replica_port(&self) -> Option<u16> {
        self.replica
    }

    /// The port of the node that serves `key`'s slot now, as the cluster says.
    pub(crate) fn master_of_key(&self, key: &str) -> u16 {
        let port = self.any_running_port();
        let slot: i64 = query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .unwrap_or_else(|err| panic!("CLUSTER KEYSLOT on {port}: {err}"));
        let slots: Value = query(port, redis::cmd("CLUSTER").arg("SLOTS"))
            .unwrap_or_else(|err| panic!("CLUSTER SLOTS on {port}: {err}"));
        slot_masters(&slots)
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, master)| master)
            .unwrap_or_else(|| panic!("node {port} knows no master for slot {slot} of {key:?}"))
    }

    /// A key whose slot the node on `port` serves now.
    pub(crate) fn key_served_by(&self, port: u16) -> String {
        // A key lands on a given one of three masters one time in three or so.
        (0..1000)
            .map(|n| format!("key-{n}"))
            .find(|key| self.master_of_key(key) == port)
            .unwrap_or_else(|| panic!("no key of 1000 is served by {port}"))
    }

    /// Kills the node on `port` (SIGKILL) and waits for it to exit.
    pub(crate) fn kill(&mut self, port: u16) {
        let index = self
            .running
            .iter()
            .position(|(running, _)| *running == port)
            .unwrap_or_else(|| panic!("no node of this cluster runs on {port}"));
        let (_, mut child) = self.running.remove(index);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until the replica has taken over from the master `killed` (which
    /// [`RedisCluster::kill`] stopped): it is a master, and every running node sees
    /// `cluster_state:ok` with none of `killed`'s slots left on `killed`.
    pub(crate) fn wait_failover(&self, killed: u16) {
        let replica = self
            .replica
            .expect("wait_failover needs a cluster started with a replica");
        assert!(
            self.running.iter().all(|(port, _)| *port != killed),
            "node {killed} still runs: kill it first"
        );
        // A replica of another master would never take over: fail now, not in 30 s.
        if let Ok(info) = query::<String>(replica, redis::cmd("INFO").arg("replication")) {
            if info_field(&info, "role") == Some("slave") {
                let followed = info_field(&info, "master_port");
                assert_eq!(
                    followed,
                    Some(killed.to_string().as_str()),
                    "the replica on {replica} follows {followed:?}, not the killed {killed}: \
                     no failover will happen"
                );
            }
        }
        self.wait_until(
            &format!("the replica on {replica} to take over from {killed}"),
            || {
                let info: String = query(replica, redis::cmd("INFO").arg("replication"))
                    .map_err(|err| format!("INFO on {replica}: {err}"))?;
                if info_field(&info, "role") != Some("master") {
                    return Err(format!("{replica} is not a master yet"));
                }
                for &(port, _) in &self.running {
                    cluster_state_ok(port)?;
                    let slots: Value = query(port, redis::cmd("CLUSTER").arg("SLOTS"))
                        .map_err(|err| format!("CLUSTER SLOTS on {port}: {err}"))?;
                    if slot_masters(&slots)
                        .iter()
                        .any(|(_, _, master)| *master == killed)
                    {
                        return Err(format!("{port} still has slots on {killed}"));
                    }
                }
                Ok(())
            },
        );
    }

    /// Kills every node, then starts them again on the same ports with no data and no
    /// cluster configuration and creates the cluster again (the replica, if any, follows
    /// the first master again), as [`RedisCluster::start`] does: clients that kept the
    /// seed URLs find an empty, healthy cluster.
    pub(crate) fn restart_all_empty(&mut self) {
        self.kill_all();
        if let Err(failure) = self.spawn_nodes() {
            panic!("could not restart the Redis Cluster on the same ports: {failure}");
        }
        self.create();
    }

    fn all_ports(&self) -> Vec<u16> {
        self.masters.iter().copied().chain(self.replica).collect()
    }

    fn any_running_port(&self) -> u16 {
        self.running
            .first()
            .map(|(port, _)| *port)
            .expect("no node of the cluster runs")
    }

    /// Starts every node in a fresh directory and waits until each answers PING; `Err`
    /// (the nodes killed again) when one exits at start, as a taken port makes it.
    fn spawn_nodes(&mut self) -> Result<(), String> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        for port in self.all_ports() {
            let dir = self.dir.join(port.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a node's temp dir");
            let config = dir.join(format!("nodes-{port}.conf"));
            let child = Command::new(&binary)
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&config)
                // A replica's initial sync writes an RDB file, which would otherwise land
                // in the working directory.
                .arg("--dir")
                .arg(&dir)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-node-timeout", "2000"])
                // The first sync would wait 5 s, and a master killed before it leaves a
                // replica that refuses to take over.
                .args(["--repl-diskless-sync-delay", "0"])
                // Shown when the cluster does not form or fail over.
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|err| {
                    panic!(
                        "cannot start {binary} (install redis-server or set REDIS_SERVER): {err}"
                    )
                });
            self.running.push((port, child));
        }
        // A reply, not a TCP connect: the kernel accepts before the node has bound its bus
        // port, which is what fails when that port is taken. And the reply must come from
        // our process: a node of another test may have taken the port first.
        let deadline = Instant::now() + WAIT;
        for index in 0..self.running.len() {
            let (port, ref mut child) = self.running[index];
            let pid = child.id().to_string();
            loop {
                match query::<String>(port, redis::cmd("INFO").arg("server")) {
                    Ok(info) if info_field(&info, "process_id") == Some(pid.as_str()) => break,
                    Ok(_) => {
                        self.kill_all();
                        return Err(format!("another redis-server took port {port}"));
                    }
                    Err(_) => {}
                }
                if let Ok(Some(status)) = child.try_wait() {
                    self.kill_all();
                    return Err(format!("{binary} on {port} exited at start ({status})"));
                }
                assert!(
                    Instant::now() < deadline,
                    "{binary} on {port} did not start"
                );
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// Creates the cluster on the running nodes and waits until it is healthy.
    fn create(&self) {
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(self.masters.iter().map(|port| format!("127.0.0.1:{port}")));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        redis_cli(&self.dir, &create);
        if let Some(replica) = self.replica {
            let first = self.masters[0];
            // Always the first master, so that a test knows which one to kill.
            let master_id: String = query(first, redis::cmd("CLUSTER").arg("MYID"))
                .unwrap_or_else(|err| panic!("CLUSTER MYID on {first}: {err}"));
            redis_cli(
                &self.dir,
                &[
                    "--cluster".to_owned(),
                    "add-node".to_owned(),
                    format!("127.0.0.1:{replica}"),
                    format!("127.0.0.1:{first}"),
                    "--cluster-slave".to_owned(),
                    "--cluster-master-id".to_owned(),
                    master_id,
                ],
            );
        }
        self.wait_until("the Redis Cluster to form", || self.healthy());
    }

    /// `Ok` once every node sees `cluster_state:ok` and, with a replica, every master
    /// knows it as a replica (redis-cli returns before they all do) and it has synced (it
    /// can take over only then).
    fn healthy(&self) -> Result<(), String> {
        for port in self.all_ports() {
            cluster_state_ok(port)?;
        }
        let Some(replica) = self.replica else {
            return Ok(());
        };
        let replica_address = format!("127.0.0.1:{replica}@");
        for &port in &self.masters {
            let nodes: String = query(port, redis::cmd("CLUSTER").arg("NODES"))
                .map_err(|err| format!("CLUSTER NODES on {port}: {err}"))?;
            let known = nodes.lines().any(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                fields.len() > 2
                    && fields[1].starts_with(&replica_address)
                    && fields[2].split(',').any(|flag| flag == "slave")
            });
            if !known {
                return Err(format!("{port} does not know {replica} as a replica yet"));
            }
        }
        let info: String = query(replica, redis::cmd("INFO").arg("replication"))
            .map_err(|err| format!("INFO on {replica}: {err}"))?;
        if info_field(&info, "master_link_status") != Some("up") {
            return Err(format!("the replica on {replica} has not synced yet"));
        }
        Ok(())
    }

    /// Calls `check` until it is `Ok`, for at most [`CLUSTER_WAIT`]; the panic says what
    /// was awaited, why the last check failed and what the nodes logged last (their
    /// directories go when the cluster drops).
    fn wait_until(&self, what: &str, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            match check() {
                Ok(()) => return,
                Err(why) if Instant::now() >= deadline => panic!(
                    "timed out after {CLUSTER_WAIT:?} waiting for {what}: {why}\n{}",
                    self.log_tails()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// The last lines of every node's log.
    fn log_tails(&self) -> String {
        let mut tails = String::new();
        for port in self.all_ports() {
            let log = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.log"))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            tails.push_str(&format!("--- node {port} logged last:\n"));
            for line in &lines[lines.len().saturating_sub(10)..] {
                tails.push_str(line);
                tails.push('\n');
            }
        }
        tails
    }

    fn kill_all(&mut self) {
        for (_, mut child) in self.running.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `count` ports on 127.0.0.1 that are free, and whose bus port (+10000) is free too.
/// Every socket stays bound until all are picked, so that no two picks overlap.
pub(super) fn free_ports(count: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == count {
            return ports;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("a bound address").port();
        held.push(listener);
        let Some(bus) = port.checked_add(BUS_PORT_OFFSET) else {
            continue;
        };
        if let Ok(bus_listener) = TcpListener::bind(("127.0.0.1", bus)) {
            held.push(bus_listener);
            ports.push(port);
        }
    }
    panic!("found no {count} free ports whose bus ports are free too");
}

/// Runs `redis-cli args` within [`CLUSTER_WAIT`] (it waits for the nodes to agree with no
/// deadline of its own); its output goes to a log in `dir`, shown when it fails.
pub(super) fn redis_cli<A: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[A]) {
    let binary = std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
    let log_path = dir.join("redis-cli.log");
    let log = File::create(&log_path).expect("redis-cli's log");
    let mut child = Command::new(&binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("redis-cli's log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot start {binary} (install redis-tools or set REDIS_CLI): {err}")
        });
    let deadline = Instant::now() + CLUSTER_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("redis-cli's status") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL);
    };
    if status.is_some_and(|status| status.success()) {
        return;
    }
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let outcome = status.map_or_else(|| "timed out".to_owned(), |status| status.to_string());
    panic!("{binary} {args:?} failed ({outcome}):\n{output}");
}

/// Asks `cmd` of the node on `port`, on a fresh connection with short timeouts: a dead or
/// stalled node makes an error, not a hang.
fn query<T: FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
    connection.set_read_timeout(Some(Duration::from_secs(2)))?;
    cmd.query(&mut connection)
}

fn cluster_state_ok(port: u16) -> Result<(), String> {
    let info: String = query(port, redis::cmd("CLUSTER").arg("INFO"))
        .map_err(|err| format!("CLUSTER INFO on {port}: {err}"))?;
    match info_field(&info, "cluster_state") {
        Some("ok") => Ok(()),
        state => Err(format!("{port} sees cluster_state {state:?}")),
    }
}

/// The value of `field` in an INFO-style reply (`field:value` lines).
pub(super) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// `(first slot, last slot, master's port)` for each range of a `CLUSTER SLOTS` reply.
fn slot_masters(reply: &Value) -> Vec<(i64, i64, u16)> {
    let Value::Array(ranges) = reply else {
        panic!("CLUSTER SLOTS replied {reply:?}");
    };
    ranges
        .iter()
        .map(|range| match range {
            Value::Array(range) => match range.as_slice() {
                [Value::Int(start), Value::Int(end), Value::Array(master), ..] => {
                    match master.get(1) {
                        Some(Value::Int(port)) => {
                            (*start, *end, u16::try_from(*port).expect("a port number"))
                        }
                        _ => panic!("CLUSTER SLOTS range without a port: {range:?}"),
                    }
                }
                _ => panic!("CLUSTER SLOTS range: {range:?}"),
            },
            _ => panic!("CLUSTER SLOTS range: {range:?}"),
        })
        .collect()
}
