//! The relay's crash safety: a 202 from `POST /v1/status` means the reports are durable (SPEC 5).
//! The real binary is killed with SIGKILL while reports are being posted, and (built with
//! `--features failpoints`) at each of the relay's fail points: before, inside (the transaction
//! written, then aborted) and after the commit, after the next hop took a batch, after the batch left
//! the queue, and when setting aside a report the next hop refused. After each restart, nothing that
//! was acknowledged is missing, nothing of a failed request was kept, and the next hop counts every
//! report once.
//!
//! `cargo test --test relay_crash` runs the kill test; `cargo test --features failpoints --test
//! relay_crash` adds the fail point scenarios (`.ci/run` runs both).

mod common;

use std::collections::HashSet;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{json, Value};

/// A cistern process on a config of its own.
struct Proc {
    child: Child,
    port: u16,
    conf: std::path::PathBuf,
}

impl Proc {
    /// Writes `<name>.toml` (status settings plus `extra`) and starts the node with `failpoints` set.
    async fn start(dir: &std::path::Path, name: &str, extra: &str, failpoints: &str) -> Proc {
        let port = free_port();
        let conf = dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "[node]\nid = \"{name}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n[status]\nmax_backoff = \"1s\"\nbatch_size = 50\n{extra}\n[log]\nlevel = \"warn\"\n",
                dir.join(name).display()
            ),
        )
        .unwrap();
        let mut p = Proc {
            child: spawn_cistern(&conf, failpoints),
            port,
            conf,
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, _)) = call("GET", &self.url("/readyz"), None).await {
                return;
            }
            assert!(Instant::now() < end, "cistern on {} not ready", self.port);
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "cistern on {} exited at start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGKILL, then a start on the same store with `failpoints` (none: "").
    async fn restart(&mut self, failpoints: &str) {
        self.kill9();
        self.child = spawn_cistern(&self.conf, failpoints);
        self.wait_ready().await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn json(&self, path: &str) -> Value {
        match call("GET", &self.url(path), None).await {
            Some((_, v)) => v,
            None => panic!("no answer from {} for {path}", self.port),
        }
    }

    /// The reportIds in a device's history, oldest first (empty for an unknown device).
    async fn history(&self, device: &str) -> Vec<String> {
        let h = self.json(&format!("/v1/devices/{device}")).await;
        h.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["reportId"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn relay(&self, field: &str) -> u64 {
        self.json("/v1/relay").await[field].as_u64().unwrap_or(0)
    }

    /// Waits until `/v1/relay`'s `field` is `want`.
    async fn wait_relay(&self, field: &str, want: u64, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        while self.relay(field).await != want {
            assert!(
                Instant::now() < end,
                "{field} on {} is not {want}: {}",
                self.port,
                self.json("/v1/relay").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh connection, within 3 s: (status, JSON body), or None when the node did
/// not answer (refused, killed, timed out).
async fn call(method: &str, url: &str, body: Option<Vec<u8>>) -> Option<(u16, Value)> {
    let uri: http::Uri = url.parse().ok()?;
    let authority = uri.authority()?.to_string();
    let exchange = async {
        let sock = tokio::net::TcpStream::connect(&authority).await.ok()?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(uri.path())
            .header("host", &authority)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .ok()?;
        let resp = tx.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .ok()?
}

fn report(device: usize, id: &str) -> Value {
    json!({"reportId": id, "deviceId": format!("dev-{device}"), "state": "DownloadSucceeded",
           "resultCode": 500})
}

/// A next hop that records every report it is sent; it can be started late (down until then).
#[derive(Clone, Default)]
struct Sink {
    reports: Arc<Mutex<Vec<(String, String)>>>,
}

impl Sink {
    async fn start(self, port: u16) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let sink = self.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let sink = sink.clone();
                    async move {
                        let body: Bytes = BodyExt::collect(req.into_body())
                            .await
                            .map(|c: http_body_util::Collected<Bytes>| c.to_bytes())
                            .unwrap_or_default();
                        let items: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
                        let mut r = sink.reports.lock().unwrap();
                        for v in items {
                            let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
                            r.push((field("deviceId"), field("reportId")));
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc),
                );
            }
        })
    }

    fn unique(&self) -> HashSet<(String, String)> {
        self.reports.lock().unwrap().iter().cloned().collect()
    }
}

const DEVICES: usize = 10;
const ROUNDS: usize = 3;
const POSTERS: usize = 4;
const BATCHES: usize = 5;
const BATCH: usize = 4;

/// Posts `BATCHES` batches from each of `POSTERS` tasks at once, retrying first what went
/// unanswered in the previous round; returns the reports acknowledged and those left unanswered.
async fn post_round(
    leaf: &Proc,
    round: usize,
    retry: Vec<Vec<Value>>,
) -> (Vec<Value>, Vec<Vec<Value>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let unanswered = Arc::new(Mutex::new(Vec::new()));
    let retry = Arc::new(Mutex::new(retry));
    let url = leaf.url("/v1/status");
    let mut tasks = Vec::new();
    for p in 0..POSTERS {
        let (acked, unanswered, retry) = (acked.clone(), unanswered.clone(), retry.clone());
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut batches: Vec<Vec<Value>> = retry.lock().unwrap().drain(..).collect();
            for b in 0..BATCHES {
                batches.push(
                    (0..BATCH)
                        .map(|i| report((p + b + i) % DEVICES, &format!("r{round}-p{p}-b{b}-{i}")))
                        .collect(),
                );
            }
            for batch in batches {
                let body = serde_json::to_vec(&batch).unwrap();
                match call("POST", &url, Some(body)).await {
                    Some((202, v)) => {
                        let counted = v["accepted"].as_u64().unwrap_or(0)
                            + v["duplicates"].as_u64().unwrap_or(0);
                        assert_eq!(counted, batch.len() as u64, "{v}");
                        acked.lock().unwrap().extend(batch);
                    }
                    Some((s, v)) => panic!("POST answered {s}: {v}"),
                    None => unanswered.lock().unwrap().push(batch),
                }
            }
        }));
    }
    for t in tasks {
        // The posters end by themselves: every request has a 3 s bound.
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the posters ended")
            .expect("a poster failed");
    }
    let a = acked.lock().unwrap().drain(..).collect();
    let u = unanswered.lock().unwrap().drain(..).collect();
    (a, u)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_reports_survive_kill_9_while_posting() {
    let tmp = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    let hop = format!("forward_to = \"http://127.0.0.1:{sink_port}/v1/status\"");
    let mut leaf = Proc::start(tmp.path(), "leaf", &hop, "").await;
    let mut acked: Vec<Value> = Vec::new();
    let mut retry = Vec::new();
    for round in 0..ROUNDS {
        let delay = Duration::from_millis(rand::thread_rng().gen_range(5..60));
        let killer = {
            let pid = leaf.child.id() as i32;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // SIGKILL in the middle of the posts: no chance to flush anything.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            })
        };
        let (a, u) = post_round(&leaf, round, retry).await;
        killer.await.unwrap();
        println!(
            "round {round}: killed after {delay:?}, {} reports acknowledged, {} requests unanswered",
            a.len(),
            u.len()
        );
        acked.extend(a);
        retry = u;
        leaf.restart("").await;
    }
    // Once more without a kill, so the requests left unanswered are retried.
    let (a, u) = post_round(&leaf, ROUNDS, retry).await;
    assert!(u.is_empty(), "requests unanswered without a kill");
    acked.extend(a);
    leaf.restart("").await;

    let want: HashSet<(String, String)> = acked
        .iter()
        .map(|r| {
            (
                r["deviceId"].as_str().unwrap().into(),
                r["reportId"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        want.len() >= POSTERS * BATCHES * BATCH,
        "too few acknowledged"
    );
    let mut stored = 0;
    for d in 0..DEVICES {
        let dev = format!("dev-{d}");
        let h = leaf.history(&dev).await;
        let ids: HashSet<&String> = h.iter().collect();
        assert_eq!(ids.len(), h.len(), "{dev}: a report twice in its history");
        for (_, id) in want.iter().filter(|(wd, _)| *wd == dev) {
            assert!(ids.contains(id), "{dev}/{id} was acknowledged, then lost");
        }
        stored += h.len() as u64;
    }
    // The next hop is down: every stored report is still queued.
    assert_eq!(leaf.relay("queueDepth").await, stored);

    let sink = Sink::default();
    let _server = sink.clone().start(sink_port).await;
    leaf.wait_relay("queueDepth", 0, 30).await;
    let got = sink.unique();
    for w in &want {
        assert!(got.contains(w), "{w:?} acknowledged but never forwarded");
    }
    unsafe { libc::kill(leaf.child.id() as i32, libc::SIGTERM) };
    assert!(leaf.child.wait().unwrap().success(), "SIGTERM: not exit 0");
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn failpoint_scenarios_skipped_without_the_failpoints_feature() {
    println!(
        "skipped: the fail point scenarios need the binary built with them: \
         cargo test --features failpoints --test relay_crash"
    );
}

#[cfg(feature = "failpoints")]
mod failpoints {
    use super::*;

    async fn leaf(dir: &std::path::Path, extra: &str, failpoints: &str) -> Proc {
        Proc::start(dir, "leaf", extra, failpoints).await
    }

    async fn post(p: &Proc, reports: &[Value]) -> Option<(u16, Value)> {
        call(
            "POST",
            &p.url("/v1/status"),
            Some(serde_json::to_vec(reports).unwrap()),
        )
        .await
    }

    fn one() -> Vec<Value> {
        vec![report(1, "only")]
    }

    /// The commit fails: the request gets an error, nothing of it is kept, on disk or in the dedup
    /// set, so the retry is accepted (not a "duplicate" of a report that was never written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_keeps_nothing_and_the_retry_is_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut leaf = leaf(tmp.path(), "", "relay-before-commit=1*return").await;
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!(s, 500, "{v}");
        assert!(
            leaf.history("dev-1").await.is_empty(),
            "kept after a failed commit"
        );
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");
        let (_, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!(v["duplicates"], 1, "{v}");
        leaf.restart("").await;
        assert_eq!(leaf.history("dev-1").await, ["only"]);
    }

    /// The transaction holding the report was written, then its commit failed (redb aborts it):
    /// nothing of it is kept, in the file or in the dedup set, so the retry is new, not a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_commit_keeps_nothing_and_the_retry_is_accepted_as_new() {
        let tmp = tempfile::tempdir().unwrap();
        let mut leaf = leaf(tmp.path(), "", "relay-commit=1*return").await;
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!(s, 500, "{v}");
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!(
            (s, &v["accepted"], &v["duplicates"]),
            (202, &json!(1), &json!(0)),
            "{v}"
        );
        leaf.restart("").await;
        assert_eq!(leaf.history("dev-1").await, ["only"]);
    }

    /// The parent refuses a report for good (over its `max_report`, 413): while writing it aside
    /// fails, it stays queued and is sent again; then it is set aside once, and the report after it
    /// is delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_set_aside_keeps_the_report_queued_until_it_is_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = Proc::start(tmp.path(), "parent", "max_report = \"1KiB\"", "").await;
        let hop = format!(
            "forward_to = \"{}\"\nmax_report = \"4KiB\"",
            parent.url("/v1/status")
        );
        let leaf = leaf(tmp.path(), &hop, "relay-set-aside=1*return").await;
        let mut big = report(1, "big");
        big["resultDetails"] = json!("x".repeat(2000));
        let (s, v) = post(&leaf, &[big, report(2, "after")])
            .await
            .expect("an answer");
        assert_eq!((s, &v["accepted"]), (202, &json!(2)), "{v}");
        parent.wait_relay("accepted", 1, 20).await;
        leaf.wait_relay("queueDepth", 0, 20).await;
        let r = leaf.json("/v1/relay").await;
        assert_eq!(
            (&r["setAsideCount"], &r["setAsideTotal"]),
            (&json!(1), &json!(1)),
            "{r}"
        );
        assert_eq!(r["setAside"][0]["status"], 413, "{r}");
        assert!(r["setAside"][0]["answer"]
            .as_str()
            .unwrap()
            .contains("status.max_report"));
        assert!(
            r["lastError"].as_str().unwrap().contains("set aside"),
            "{r}"
        );
        assert_eq!(parent.history("dev-2").await, ["after"]);
        assert!(parent.history("dev-1").await.is_empty());
    }

    /// A panic while writing fails that request, not the writer: the next post is accepted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_writing_fails_only_that_request() {
        let tmp = tempfile::tempdir().unwrap();
        let leaf = leaf(tmp.path(), "", "relay-before-commit=1*panic").await;
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!(s, 500, "{v}");
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");
    }

    /// Killed while the commit has not happened: the request was never answered and nothing of it
    /// is kept; its retry is accepted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_before_the_commit_nothing_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mut leaf = leaf(tmp.path(), "", "relay-before-commit=1*sleep(20000)").await;
        assert!(
            post(&leaf, &one()).await.is_none(),
            "answered before the commit"
        );
        leaf.restart("").await;
        assert!(leaf.history("dev-1").await.is_empty());
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!((s, v["accepted"].as_u64()), (202, Some(1)), "{v}");
    }

    /// Killed after the commit, before the 202: the report is there once; a retry is a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_after_the_commit_the_report_is_kept_once() {
        let tmp = tempfile::tempdir().unwrap();
        let mut leaf = leaf(tmp.path(), "", "relay-after-commit=1*sleep(20000)").await;
        assert!(post(&leaf, &one()).await.is_none(), "answered while paused");
        leaf.restart("").await;
        assert_eq!(leaf.history("dev-1").await, ["only"]);
        let (s, v) = post(&leaf, &one()).await.expect("an answer");
        assert_eq!((s, v["duplicates"].as_u64()), (202, Some(1)), "{v}");
    }

    const N: usize = 20;

    /// A leaf forwarding to a real parent, `N` reports accepted and forwarded once, the leaf's
    /// forwarder stopped at `failpoint` (a panic) with `queued` reports left, then the leaf killed
    /// and restarted without it.
    async fn forward_then_kill(failpoint: &str, queued: u64) -> (Proc, Proc, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let parent = Proc::start(tmp.path(), "parent", "", "").await;
        let hop = format!("forward_to = \"{}\"", parent.url("/v1/status"));
        let mut leaf = leaf(tmp.path(), &hop, &format!("{failpoint}=panic")).await;
        let reports: Vec<Value> = (0..N).map(|i| report(i % 4, &format!("f{i}"))).collect();
        let (s, v) = post(&leaf, &reports).await.expect("an answer");
        assert_eq!((s, v["accepted"].as_u64()), (202, Some(N as u64)), "{v}");
        parent.wait_relay("accepted", N as u64, 20).await;
        leaf.wait_relay("queueDepth", queued, 20).await;
        leaf.restart("").await;
        (leaf, parent, tmp)
    }

    /// Every device's history at the parent holds its reports once.
    async fn once_at(parent: &Proc) {
        let mut total = 0;
        for d in 0..4 {
            let h = parent.history(&format!("dev-{d}")).await;
            assert_eq!(h.iter().collect::<HashSet<_>>().len(), h.len(), "{h:?}");
            total += h.len();
        }
        assert_eq!(total, N, "reports at the parent");
    }

    /// The parent took the batch, the leaf died before removing it: it is forwarded again after
    /// the restart, and the parent counts it once (its dedup).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_but_not_deleted_is_forwarded_again_and_counted_once() {
        let (leaf, parent, _tmp) = forward_then_kill("relay-forward-sent", N as u64).await;
        leaf.wait_relay("queueDepth", 0, 20).await;
        parent.wait_relay("duplicates", N as u64, 20).await;
        assert_eq!(parent.relay("accepted").await, N as u64);
        once_at(&parent).await;
    }

    /// The batch left the queue before the kill: it is not forwarded again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_after_forwarding_is_not_forwarded_again() {
        let (leaf, parent, _tmp) = forward_then_kill("relay-after-delete", 0).await;
        // Read back from the file at start: nothing left to send again.
        assert_eq!(
            leaf.relay("queueDepth").await,
            0,
            "the delete was not durable"
        );
        assert_eq!(parent.relay("duplicates").await, 0);
        assert_eq!(parent.relay("accepted").await, N as u64);
        once_at(&parent).await;
    }
}
