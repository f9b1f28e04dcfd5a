//! The example binaries run as processes, as a user runs them: on a free port, with their
//! log lines on a channel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::within;

/// An example binary running on a free port, with its log lines on a channel. Killed when
/// dropped.
pub(crate) struct ExampleProcess {
    pub(crate) process: tokio::process::Child,
    pub(crate) port: u16,
    log: mpsc::UnboundedReceiver<String>,
}

impl ExampleProcess {
    /// Starts the interop example with `env`, and with at most `fd_limit` open files when
    /// given; returns once it listens.
    pub(crate) async fn start_interop(
        env: &[(&str, &str)],
        fd_limit: Option<u32>,
    ) -> ExampleProcess {
        Self::start("interop", env, fd_limit, "interop server on port").await
    }

    /// Starts the axum chat example with `env`; returns once it listens.
    pub(crate) async fn start_axum(env: &[(&str, &str)]) -> ExampleProcess {
        Self::start("axum", env, None, "chat on http://").await
    }

    /// Starts the example `name` on a free port (`PORT`) with `env` and no Redis unless
    /// `env` names one, and with at most `fd_limit` open files when given; returns once it
    /// has logged `listening` (a line it writes once it listens).
    async fn start(
        name: &str,
        env: &[(&str, &str)],
        fd_limit: Option<u32>,
        listening: &str,
    ) -> ExampleProcess {
        use tokio::io::AsyncBufReadExt;

        let binary = example_binary(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let mut command = match fd_limit {
            // The shell sets the limit, then becomes the example (same pid).
            Some(limit) => {
                let mut command = tokio::process::Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\""))
                    .arg(&binary);
                command
            }
            None => tokio::process::Command::new(&binary),
        };
        command
            .env("PORT", port.to_string())
            .env("RUST_LOG", "info")
            // The examples prefer a Cluster to a single Redis: only what `env` names.
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut process = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        // Every log line is forwarded, so the example never blocks on a full pipe.
        let mut lines = tokio::io::BufReader::new(process.stdout.take().expect("stdout")).lines();
        let (log_tx, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log_tx.send(line);
            }
        });
        let mut example = ExampleProcess { process, port, log };
        example.logged(listening).await;
        example
    }

    /// Waits for a log line containing `text`.
    pub(crate) async fn logged(&mut self, text: &str) {
        within(&format!("the example to log {text:?}"), async {
            while let Some(line) = self.log.recv().await {
                if line.contains(text) {
                    return;
                }
            }
            panic!("the example exited without logging {text:?}");
        })
        .await;
    }

    /// Sends SIGTERM (what orchestrators send to stop a server).
    pub(crate) fn terminate(&self) {
        let pid = self
            .process
            .id()
            .expect("the example is running")
            .to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit (at most `limit`) and asserts it exited cleanly.
    pub(crate) async fn exits_cleanly_within(&mut self, limit: Duration) {
        let exited = tokio::time::timeout(limit, self.process.wait())
            .await
            .unwrap_or_else(|_| panic!("the example did not exit within {limit:?}"))
            .expect("exit status");
        assert!(exited.success(), "{exited}");
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The WebSocket URL of the example's mesh (the interop example serves it at `/`).
    pub(crate) fn url(&self) -> String {
        format!("ws://{}/", self.addr())
    }

    /// The example's HTTP URL for `path_and_query` (which starts with `/`).
    pub(crate) fn http_url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr())
    }
}

/// The path of an example binary that `cargo test` built beside this test's own.
pub(crate) fn example_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test's path");
    let profile_dir = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --examples`)",
        binary.display()
    );
    binary
}
