//! Private `redis-server` processes on free ports, for tests that stop, restart or
//! configure Redis (TLS) and so cannot share the suite's Redis.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

/// A private `redis-server` on a free port, stopped when dropped.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

/// The PEM files a TLS-only server is started with.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) certificate: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca_certificate: PathBuf,
    /// Whether the server refuses clients without a certificate the CA signed.
    pub(crate) verify_clients: bool,
}

impl RedisServer {
    /// A plain-TCP server.
    pub(crate) fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// A server that speaks TLS only (its plain port is off), with `files`.
    #[cfg(feature = "redis-tls-rustls")]
    pub(crate) fn start_tls(files: TlsFiles) -> RedisServer {
        Self::start_with(Some(files))
    }

    fn start_with(tls: Option<TlsFiles>) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let mut server = RedisServer {
            port,
            tls,
            child: None,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:port`, or `rediss://` for a TLS server.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub(crate) fn restart(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let mut args: Vec<&OsStr> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(OsStr::new)
            .into();
        match &self.tls {
            None => args.extend([OsStr::new("--port"), port.as_ref()]),
            Some(files) => args.extend([
                OsStr::new("--port"),
                "0".as_ref(),
                "--tls-port".as_ref(),
                port.as_ref(),
                "--tls-cert-file".as_ref(),
                files.certificate.as_os_str(),
                "--tls-key-file".as_ref(),
                files.key.as_os_str(),
                "--tls-ca-cert-file".as_ref(),
                files.ca_certificate.as_os_str(),
                "--tls-auth-clients".as_ref(),
                if files.verify_clients { "yes" } else { "no" }.as_ref(),
            ]),
        }
        let child = Command::new(&binary)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {binary} (install redis-server or set REDIS_SERVER): {err}")
            });
        self.child = Some(child);
        // A TLS port accepts TCP connections too: either way, accepting means started.
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{binary} exited at start ({status}): is it built with TLS?");
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGSTOP): it keeps its sockets but answers nothing, as a stalled
    /// host or a long fork would.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT): it then executes what queued meanwhile.
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
