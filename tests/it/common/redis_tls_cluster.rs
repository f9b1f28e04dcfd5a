//! Private TLS-only Redis Clusters of three masters on free ports, for the TLS-to-Redis
//! tests: each node serves clients on its TLS port alone (`--port 0`) and speaks TLS to
//! the other nodes on the cluster bus (`tls-cluster yes`). Formed as [`RedisCluster`]
//! forms a plain one, with `redis-cli --tls --cluster create` (`REDIS_CLI` overrides the
//! binary, `REDIS_SERVER` the server's).
//!
//! The nodes present their own certificate to each other on the bus, where a node always
//! verifies its peer, and `redis-cli` and the health checks present it too (so that they
//! pass `tls-auth-clients yes`): the certificate of the given [`TlsFiles`] must allow
//! client authentication as well as server authentication.
//!
//! The methods block the calling thread (child processes, sync Redis connections): call
//! them from the body of a multi-thread runtime test, so that the instances' tasks keep
//! running on the workers meanwhile.
//!
//! [`RedisCluster`]: super::RedisCluster

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::FromRedisValue;

use super::redis_cluster::{free_ports, info_field, redis_cli};
use super::{TlsFiles, WAIT};

/// How long the cluster gets to form: `redis-cli` takes a second or two, and the machine
/// is shared.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// A node's cluster bus listens on its port plus this.
const BUS_PORT_OFFSET: u16 = 10000;

/// How often the waits ask the nodes again.
const POLL: Duration = Duration::from_millis(50);

/// A private TLS-only Redis Cluster of three masters, each node in its own temporary
/// directory. Dropping it kills every node and removes the directories.
pub(crate) struct RedisTlsCluster {
    dir: PathBuf,
    files: TlsFiles,
    /// What the health checks trust and present, read from `files` once.
    certificates: redis::TlsCertificates,
    masters: Vec<u16>,
    running: Vec<Child>,
}

impl RedisTlsCluster {
    /// Starts three masters on free ports with `files` (`verify_clients` decides
    /// `tls-auth-clients`), creates the cluster and waits until every node sees
    /// `cluster_state:ok`.
    pub(crate) fn start(files: TlsFiles) -> RedisTlsCluster {
        // The health checks connect with rustls, which needs a process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |path: &Path| {
            std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
        };
        let certificates = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&files.certificate),
                client_key: read(&files.key),
            }),
            root_cert: Some(read(&files.ca_certificate)),
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-mesh-tls-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Between the pick and the node's bind another process can take a port, and the
        // node then exits: pick again, a few times.
        let mut failures = Vec::new();
        for _ in 0..5 {
            let mut cluster = RedisTlsCluster {
                dir: dir.clone(),
                files: files.clone(),
                certificates: certificates.clone(),
                masters: free_ports(3),
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
        panic!("could not start a TLS Redis Cluster's nodes: {failures:?}");
    }

    /// The masters' URLs, `rediss://127.0.0.1:PORT`, the seeds a cluster client is given.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.masters
            .iter()
            .map(|port| format!("rediss://127.0.0.1:{port}"))
            .collect()
    }

    /// How many keys the master on each port holds, in the order of
    /// [`RedisTlsCluster::urls`].
    pub(crate) fn key_counts(&self) -> Vec<i64> {
        self.masters
            .iter()
            .map(|&port| {
                self.query(port, &redis::cmd("DBSIZE"))
                    .unwrap_or_else(|err| panic!("DBSIZE on {port}: {err}"))
            })
            .collect()
    }

    /// Starts every node in a fresh directory and waits until each answers over TLS;
    /// `Err` (the nodes killed again) when one exits at start, as a taken port makes it.
    fn spawn_nodes(&mut self) -> Result<(), String> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        for &port in &self.masters {
            let dir = self.dir.join(port.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a node's temp dir");
            let child = Command::new(&binary)
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&dir)
                .args(["--port", "0", "--tls-port", &port.to_string()])
                // Explicit, so that the bus port is the one free_ports checked.
                .args(["--cluster-port", &(port + BUS_PORT_OFFSET).to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-node-timeout", "2000", "--tls-cluster", "yes"])
                .arg("--tls-cert-file")
                .arg(&self.files.certificate)
                .arg("--tls-key-file")
                .arg(&self.files.key)
                .arg("--tls-ca-cert-file")
                .arg(&self.files.ca_certificate)
                .args([
                    "--tls-auth-clients",
                    if self.files.verify_clients {
                        "yes"
                    } else {
                        "no"
                    },
                ])
                // Shown when the cluster does not form.
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
            self.running.push(child);
        }
        // A reply, not a TCP connect: the kernel accepts before the node has bound its bus
        // port, which is what fails when that port is taken. And the reply must come from
        // our process: a node of another test may have taken the port first.
        let deadline = Instant::now() + WAIT;
        for index in 0..self.masters.len() {
            let port = self.masters[index];
            let pid = self.running[index].id().to_string();
            loop {
                match self.query::<String>(port, redis::cmd("INFO").arg("server")) {
                    Ok(info) if info_field(&info, "process_id") == Some(pid.as_str()) => break,
                    Ok(_) => {
                        self.kill_all();
                        return Err(format!("another redis-server took port {port}"));
                    }
                    Err(_) => {}
                }
                if let Ok(Some(status)) = self.running[index].try_wait() {
                    self.kill_all();
                    return Err(format!(
                        "{binary} on {port} exited at start ({status}): is it built with TLS?\n{}",
                        self.log_tails()
                    ));
                }
                assert!(
                    Instant::now() < deadline,
                    "{binary} on {port} did not answer over TLS\n{}",
                    self.log_tails()
                );
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// Creates the cluster on the running nodes and waits until every node sees
    /// `cluster_state:ok` (redis-cli returns before they all do).
    fn create(&self) {
        let files = &self.files;
        let mut args: Vec<OsString> = vec!["--tls".into(), "--cacert".into()];
        args.push(files.ca_certificate.clone().into());
        args.extend(["--cert".into(), files.certificate.clone().into()]);
        args.extend(["--key".into(), files.key.clone().into()]);
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(
            self.masters
                .iter()
                .map(|port| format!("127.0.0.1:{port}").into()),
        );
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(OsString::from));
        redis_cli(&self.dir, &args);
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            match self.unhealthy() {
                None => return,
                Some(why) if Instant::now() >= deadline => panic!(
                    "timed out after {CLUSTER_WAIT:?} waiting for the TLS Redis Cluster to \
                     form: {why}\n{}",
                    self.log_tails()
                ),
                Some(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Why the cluster is not ready yet, if it is not.
    fn unhealthy(&self) -> Option<String> {
        self.masters.iter().find_map(|&port| {
            match self.query::<String>(port, redis::cmd("CLUSTER").arg("INFO")) {
                Ok(info) => match info_field(&info, "cluster_state") {
                    Some("ok") => None,
                    state => Some(format!("{port} sees cluster_state {state:?}")),
                },
                Err(err) => Some(format!("CLUSTER INFO on {port}: {err}")),
            }
        })
    }

    /// Asks `cmd` of the node on `port` over TLS, on a fresh connection with short
    /// timeouts: a dead or stalled node makes an error, not a hang.
    fn query<T: FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::build_with_tls(
            format!("rediss://127.0.0.1:{port}"),
            self.certificates.clone(),
        )?;
        // Generous: a TLS handshake on a loaded 2-core machine (the whole suite runs
        // beside it) can take over a second.
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        cmd.query(&mut connection)
    }

    /// The last lines of every node's log.
    fn log_tails(&self) -> String {
        let mut tails = String::new();
        for port in &self.masters {
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
        for mut child in self.running.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisTlsCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
