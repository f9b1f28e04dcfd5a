//! The axum chat example in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver) by `fantoccini`, opens the chat page as alice and as bob and
//! checks what a person would see: each sees the other come online, a message typed by
//! one appears for the other, a closed tab becomes a leave with the user's name, a bad
//! token is told apart from an unavailable server, and a server shutdown (SIGTERM) shows
//! the 1001 notice and then that the server is unavailable. It runs on the memory backend
//! (one example process) and on Redis (two example processes on a private redis-server,
//! one user on each; there a page opened while Redis is down says the server is
//! unavailable too).
//!
//! Waits poll the page (there is no event to await across WebDriver) with a deadline.
//! Screenshots of the pages go to `<target>/browser-screenshots/<backend>-<page>.png`.
//!
//! `scripts/test` installs `chromium` and `chromium-driver` when they are missing
//! (`scripts/lib/install-browser.sh`); `CHROMIUM` and `CHROMEDRIVER` override their paths.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::common::*;

/// How long the page has for what a person would see promptly. Generous: the whole suite
/// shares two cores with two browsers.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// How often a wait reads the page.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// alice and bob on one example process, memory backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_on_memory() {
    let server = ExampleProcess::start_axum(&[]).await;
    chat_page("memory", server, None, None).await;
}

/// alice on one example process and bob on another, both on one Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_on_two_instances_on_redis() {
    // A private Redis: nothing shared with other tests, and nothing left behind.
    let redis = RedisServer::start();
    let url = redis.url();
    let alices = ExampleProcess::start_axum(&[("REDIS_URL", url.as_str())]).await;
    let bobs = ExampleProcess::start_axum(&[("REDIS_URL", url.as_str())]).await;
    chat_page("redis", alices, Some(bobs), Some(redis)).await;
}

/// The whole story, with alice on `alices` and bob on `bobs` (or on `alices` too), and,
/// when the backend is Redis, its server `redis`.
async fn chat_page(
    backend: &str,
    mut alices: ExampleProcess,
    bobs: Option<ExampleProcess>,
    redis: Option<RedisServer>,
) {
    let screenshots = Screenshots::new(backend);
    let driver = ChromeDriver::start().await;
    let bobs_root = bobs.as_ref().unwrap_or(&alices).http_url("");
    let bob_url = |path: &str| format!("{bobs_root}{path}");

    let alice = driver.open(&alices.http_url("/?token=alice-token")).await;
    let alice = Page::new(alice, "alice", &screenshots);
    alice
        .wait_until("alice is connected", |page| page.state == "connected")
        .await;
    alice
        .wait_until("alice sees herself online", |page| {
            page.online == ["alice (you)"]
        })
        .await;

    let bob = driver.open(&bob_url("/?token=bob-token")).await;
    let bob = Page::new(bob, "bob", &screenshots);
    bob.wait_until("bob is connected", |page| page.state == "connected")
        .await;

    // Each sees the other come online, by name; alice is told bob joined, bob who was there.
    alice
        .wait_until("alice sees bob online", |page| {
            page.online == ["alice (you)", "bob"] && page.logged("bob joined")
        })
        .await;
    bob.wait_until("bob sees alice online", |page| {
        page.online == ["bob (you)", "alice"] && page.logged("online: alice")
    })
    .await;

    // A message typed by one appears for the other (and for the sender).
    alice.say("hello from alice").await;
    bob.wait_until("bob sees alice's message", |page| {
        page.logged("alice: hello from alice")
    })
    .await;
    bob.say("hi alice").await;
    alice
        .wait_until("alice sees bob's message", |page| {
            page.logged("bob: hi alice")
        })
        .await;

    // The page has an icon: no 404 on load.
    let favicon = alice
        .client
        .execute(
            "return fetch('/favicon.ico').then(r => r.status + ' ' + r.headers.get('content-type'))",
            vec![],
        )
        .await
        .expect("fetch /favicon.ico");
    assert_eq!(favicon, json!("200 image/svg+xml"));

    alice.screenshot("alice").await;
    bob.screenshot("bob").await;

    // In bob's browser, a second tab with a token the server does not know: the page says
    // the token is wrong (not that the server is down), and does not retry.
    let chat_tab = bob.client.window().await.expect("bob's tab");
    let bad_tab = bob.client.new_window(true).await.expect("a new tab").handle;
    bob.client
        .switch_to_window(bad_tab.clone())
        .await
        .expect("switch tabs");
    bob.client
        .goto(&bob_url("/?token=not-a-token"))
        .await
        .expect("open the page with a bad token");
    bob.wait_until("the bad token is reported", |page| {
        page.state == "token-rejected" && page.status.contains("Token rejected")
    })
    .await;
    bob.screenshot("bad-token").await;

    // Bob closes his chat tab: alice sees him leave, by name, and the online list follows.
    bob.client
        .switch_to_window(chat_tab)
        .await
        .expect("switch tabs");
    bob.client.close_window().await.expect("close bob's tab");
    bob.client
        .switch_to_window(bad_tab)
        .await
        .expect("switch tabs");
    alice
        .wait_until("alice sees bob leave", |page| {
            page.logged("bob left") && page.online == ["alice (you)"]
        })
        .await;

    // alice's server shuts down: her page shows the going-away notice, then that the
    // server is unavailable (it is gone) and that it keeps retrying.
    alices.terminate();
    alice
        .wait_until("alice sees the 1001 notice", |page| {
            page.log
                .iter()
                .any(|line| line.contains("going away (1001: server shutting down)"))
        })
        .await;
    alices.exits_cleanly_within(Duration::from_secs(15)).await;
    alice
        .wait_until("alice's page says the server is unavailable", |page| {
            page.state == "unavailable" && page.status.contains("retrying")
        })
        .await;
    alice.screenshot("alice-after-shutdown").await;

    // With Redis gone, bob's server is up but cannot serve: a page opened now says the
    // server is unavailable (not that the token is wrong), and keeps retrying.
    if let Some(mut redis) = redis {
        redis.kill();
        bob.client
            .goto(&bob_url("/?token=bob-token"))
            .await
            .expect("open the page again");
        bob.wait_until("bob's page says the server is unavailable", |page| {
            page.state == "unavailable" && page.status.contains("retrying")
        })
        .await;
        bob.screenshot("bob-without-redis").await;
    }

    alice.close().await;
    bob.close().await;
    println!("screenshots in {}", screenshots.dir.display());
}

/// What the test reads off the chat page.
#[derive(Debug, Deserialize)]
struct PageView {
    /// `#status`'s `data-state`: connecting, connected, token-rejected, unavailable, ...
    state: String,
    status: String,
    /// The "Online" list, in its order.
    online: Vec<String>,
    /// The chat log's lines.
    log: Vec<String>,
}

impl PageView {
    fn logged(&self, line: &str) -> bool {
        self.log.iter().any(|logged| logged == line)
    }
}

const READ_PAGE: &str = r##"
const status = document.getElementById("status");
const texts = (selector) => [...document.querySelectorAll(selector)].map((e) => e.textContent);
return {
  state: status.dataset.state || "",
  status: status.textContent,
  online: texts("#online li"),
  log: texts("#log div"),
};
"##;

/// One user's browser session on the chat page.
struct Page<'a> {
    client: Client,
    user: &'static str,
    screenshots: &'a Screenshots,
}

impl<'a> Page<'a> {
    fn new(client: Client, user: &'static str, screenshots: &'a Screenshots) -> Page<'a> {
        Page {
            client,
            user,
            screenshots,
        }
    }

    async fn view(&self) -> PageView {
        let value = self
            .client
            .execute(READ_PAGE, vec![])
            .await
            .expect("read the page");
        serde_json::from_value(value).expect("the page's state")
    }

    /// Reads the page until `condition` holds; fails after [`PAGE_WAIT`] with what the page
    /// showed last (and a screenshot of it).
    async fn wait_until(&self, what: &str, condition: impl Fn(&PageView) -> bool) {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let view = self.view().await;
            if condition(&view) {
                return;
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot(&format!("{}-failed", self.user)).await;
                panic!(
                    "timed out waiting until {what}; {}'s page shows {view:#?} (screenshot {})",
                    self.user,
                    shot.display()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Types `text` into the message box and presses Send.
    async fn say(&self, text: &str) {
        let input = self
            .client
            .find(Locator::Id("text"))
            .await
            .expect("the text box");
        input.send_keys(text).await.expect("type");
        self.client
            .find(Locator::Id("send"))
            .await
            .expect("the Send button")
            .click()
            .await
            .expect("click Send");
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        self.screenshots.save(name, &png)
    }

    async fn close(self) {
        self.client.close().await.expect("end the session");
    }
}

/// Where a backend's screenshots go.
struct Screenshots {
    dir: PathBuf,
    backend: String,
}

impl Screenshots {
    fn new(backend: &str) -> Screenshots {
        // `CARGO_TARGET_TMPDIR` is `<target>/tmp`: the screenshots go beside it.
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target directory");
        let dir = target.join("browser-screenshots");
        std::fs::create_dir_all(&dir).expect("create the screenshot folder");
        // An earlier run's pictures of this backend (a failure's included) would mislead.
        let earlier = format!("{backend}-");
        for entry in std::fs::read_dir(&dir).expect("read the screenshot folder") {
            let path = entry.expect("a folder entry").path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            if name.starts_with(&earlier) && name.ends_with(".png") {
                std::fs::remove_file(&path).expect("remove an earlier screenshot");
            }
        }
        Screenshots {
            dir,
            backend: backend.to_owned(),
        }
    }

    fn save(&self, name: &str, png: &[u8]) -> PathBuf {
        let path = self.dir.join(format!("{}-{name}.png", self.backend));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }
}

/// A chromedriver on a free port, in a process group of its own with the browsers it
/// starts: the whole group is killed when dropped, so that a failed test leaves no Chromium
/// behind. Each `open` is a browser of its own (a session: its own Chromium and profile).
struct ChromeDriver {
    process: tokio::process::Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> ChromeDriver {
        let chromedriver = tool("CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let mut process = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", chromedriver.display()));
        // It says when it listens; every later line is read too, so it never blocks.
        let mut lines = tokio::io::BufReader::new(process.stdout.take().expect("stdout")).lines();
        within("chromedriver to start", async {
            while let Some(line) = lines.next_line().await.expect("chromedriver's output") {
                if line.contains("started successfully") {
                    return;
                }
            }
            panic!("chromedriver exited at start");
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChromeDriver {
            process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new headless browser showing `url`.
    async fn open(&self, url: &str) -> Client {
        let chromium = tool("CHROMIUM", "/usr/bin/chromium");
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Root (CI, the developers' machines) cannot use Chromium's sandbox.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=1000,820",
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("an object")
        };
        let client = tokio::time::timeout(
            PAGE_WAIT,
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&self.url),
        )
        .await
        .expect("a browser session within the wait")
        .expect("a browser session");
        client.goto(url).await.expect("open the page");
        client
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // Chromium outlives a killed chromedriver: the group (same id as its leader) goes.
        if let Some(group) = self.process.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
        }
        let _ = self.process.start_kill();
    }
}

/// The path of a tool: `variable` when set, else `default`, which must exist.
fn tool(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: run scripts/lib/install-browser.sh (scripts/test does), or set {variable}",
        path.display()
    );
    path
}
