//! A headless Chromium driven through chromedriver (WebDriver, with fantoccini), for tests that look at
//! a page the way a person does. Every step is bounded by [`WAIT`]. [`Browser::start`] gives None, and
//! the test skips, where Chromium or chromedriver is not installed (`.ci/run` installs both).

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

/// The longest any one browser step may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// The flags Chromium needs to run headless as root in a container, fetching nothing of its own.
const FLAGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-crash-reporter",
    "--window-size=1280,2400",
];

/// The chromedriver process a test started, in a process group of its own that the Chromium it
/// starts joins: the whole group is killed when the test is done with it, or panics before it could
/// close the session.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = self.0.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals that process group, the one made at spawn.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A browser session and the chromedriver that holds it. Call [`Browser::close`] at the end, so that
/// Chromium quits before its driver is killed.
pub struct Browser {
    pub client: Client,
    _driver: Driver,
    /// A fresh profile, so that nothing of another run (or of a person's browser) is reused.
    _profile: tempfile::TempDir,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Bounds `f` by [`WAIT`], failing the test with `what` when it takes longer.
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Waits until chromedriver answers on `port`.
async fn driver_ready(port: u16) {
    let end = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < end,
            "chromedriver did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; None (after saying why) when either is missing.
    pub async fn start(test: &str) -> Option<Browser> {
        let chromium = on_path(&["chromium", "chromium-browser"]);
        let driver = on_path(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            eprintln!(
                "SKIPPED {test}: chromium and chromedriver are not installed \
                 (Debian: apt-get install chromium chromium-driver; .ci/run does it)"
            );
            return None;
        };
        let port = super::common::free_port();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let driver = Driver(child);
        driver_ready(port).await;
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({"goog:chromeOptions": {"binary": chromium, "args": args}});
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = bounded(
            "a Chromium session",
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"));
        Some(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    pub async fn goto(&self, url: &str) {
        bounded(url, self.client.goto(url))
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn js(&self, script: &str) -> Value {
        bounded(script, self.client.execute(script, vec![]))
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` until it returns something other than null or false, for at most [`WAIT`].
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(Instant::now() < end, "timed out after {WAIT:?}: {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves what the browser shows as a PNG.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = bounded("a screenshot", self.client.screenshot())
            .await
            .unwrap_or_else(|e| panic!("cannot take a screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(self) {
        let _ = tokio::time::timeout(WAIT, self.client.close()).await;
    }
}
