//! The status relay through three real cistern processes (leaf -> mid -> top -> sink): 10,000 reports
//! from 500 devices posted at the leaf while the sink is down, the leaf killed with SIGKILL and restarted
//! mid-way, some batches posted twice. When the sink comes back every report arrives, in per-device
//! order, exactly once at every cistern hop, and every level shows the right deployment counts.
//! `bounds` (tests/relay/bounds.rs): the relay's bounds and the reports a next hop refuses.
//! `conflicts` (tests/relay/conflicts.rs): a report id claimed first does not hide the real report.

/// The relay's bounds: report and store sizes, refusals set aside, the admin's retry and drop.
#[path = "relay/bounds.rs"]
mod bounds;
mod common;
/// A different report under a (deviceId, reportId) already accepted is a conflict, not a duplicate.
#[path = "relay/conflicts.rs"]
mod conflicts;

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const DEVICES: usize = 500;
const PER_DEVICE: usize = 20;
const FAILING: usize = 50;

/// The sink at the top of the chain: records every batch it is sent.
#[derive(Clone, Default)]
struct Sink {
    batches: Arc<Mutex<Vec<Vec<Value>>>>,
}

impl Sink {
    async fn start(self, port: u16) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let sink = self.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let auth = req
                                    .headers()
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap_or("").to_string());
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                let status = if auth.as_deref() != Some("Bearer sink-token") {
                                    401
                                } else if let Ok(Value::Array(items)) =
                                    serde_json::from_slice::<Value>(&body)
                                {
                                    sink.batches.lock().unwrap().push(items);
                                    200
                                } else {
                                    400
                                };
                                let mut r = http::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        })
    }

    fn unique(&self) -> usize {
        let b = self.batches.lock().unwrap();
        b.iter()
            .flatten()
            .map(|r| (r["deviceId"].to_string(), r["reportId"].to_string()))
            .collect::<HashSet<_>>()
            .len()
    }
}

struct Proc {
    child: Child,
    port: u16,
    conf: std::path::PathBuf,
}

impl Proc {
    /// A node whose `[status]` section holds `extra` (after the test defaults).
    async fn start(dir: &std::path::Path, name: &str, extra: &str) -> Proc {
        Proc::start_with(dir, name, "", extra).await
    }

    /// A node with `server` lines in `[server]` and `status` lines in `[status]`.
    async fn start_with(dir: &std::path::Path, name: &str, server: &str, status: &str) -> Proc {
        let port = free_port();
        let conf = dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "[node]\nid = \"{name}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n{server}\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n[status]\nmax_backoff = \"1s\"\nbatch_size = 250\n{status}\n[log]\nlevel = \"warn\"\n",
                dir.join(name).display()
            ),
        )
        .unwrap();
        let mut p = Proc {
            child: spawn_cistern(&conf, ""),
            port,
            conf,
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && get(&self.url("/readyz")).await.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "cistern on {} did not become ready",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn_cistern(&self.conf, "");
        self.wait_ready().await;
    }

    async fn json(&self, path: &str) -> Value {
        get(&self.url(path)).await.json()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn report(device: usize, n: usize) -> Value {
    let last = n == PER_DEVICE - 1;
    let failing = device < FAILING;
    let (state, code) = match (last, failing) {
        (true, true) => (255, "D0190193"),
        (true, false) => (4, "0"),
        _ => ((n % 6) as i64 as u8 as i64 + 1, "0"),
    };
    json!({
        "reportId": format!("dev-{device}-{n:04}"),
        "deviceId": format!("dev-{device}"),
        "updateId": {"provider": "Contoso", "name": "Sensor", "version": "1.2.0"},
        "workflowId": "wf-1",
        "state": state,
        "resultCode": if failing && last { 0 } else { 700 },
        "extendedResultCode": code,
        "resultDetails": "",
    })
}

async fn post(p: &Proc, batch: &[Value]) -> Value {
    let body = Bytes::from(serde_json::to_vec(batch).unwrap());
    let g = request_body(
        "POST",
        &p.url("/v1/status"),
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(g.status, 202, "{:?}", String::from_utf8_lossy(&g.body));
    g.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_reports_survive_an_outage_and_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    let top = Proc::start(
        tmp.path(),
        "top",
        &format!(
            "forward_to = \"http://127.0.0.1:{sink_port}/ingest\"\nforward_token = \"sink-token\""
        ),
    )
    .await;
    let mid_up = format!("[upstream]\nparents = [\"http://127.0.0.1:{}\"]", top.port);
    let mid = Proc::start(tmp.path(), "mid", &mid_up).await;
    let leaf_up = format!("[upstream]\nparents = [\"http://127.0.0.1:{}\"]", mid.port);
    let mut leaf = Proc::start(tmp.path(), "leaf", &leaf_up).await;

    // Reports in per-device order, interleaved across devices, in batches of 100.
    let mut all = Vec::new();
    for n in 0..PER_DEVICE {
        for d in 0..DEVICES {
            all.push(report(d, n));
        }
    }
    let batches: Vec<&[Value]> = all.chunks(100).collect();
    let mut accepted = 0u64;
    for (i, b) in batches.iter().enumerate() {
        if i == batches.len() / 2 {
            leaf.kill9_and_restart().await;
        }
        let r = post(&leaf, b).await;
        accepted += r["accepted"].as_u64().unwrap();
        if i % 10 == 3 {
            // The same batch again (a client retry): all duplicates.
            let again = post(&leaf, b).await;
            assert_eq!(again["duplicates"].as_u64().unwrap(), b.len() as u64);
        }
    }
    assert_eq!(accepted, (DEVICES * PER_DEVICE) as u64);

    // The sink is down: everything waits in top's queue.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = top.json("/v1/relay").await;
        if q["queueDepth"].as_u64() == Some((DEVICES * PER_DEVICE) as u64) {
            assert!(q["lastError"].is_string());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reports did not reach the top: {q}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sink = Sink::default();
    let _server = sink.clone().start(sink_port).await;
    eventually(60, "every report at the sink", || {
        sink.unique() == DEVICES * PER_DEVICE
    })
    .await;

    // Per-device order at the sink (first arrival of each report).
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for r in sink.batches.lock().unwrap().iter().flatten() {
        let (d, id) = (
            r["deviceId"].as_str().unwrap().to_string(),
            r["reportId"].as_str().unwrap().to_string(),
        );
        if seen.insert((d.clone(), id.clone())) {
            if let Some(prev) = last.get(&d) {
                assert!(prev < &id, "device {d}: {id} arrived after {prev}");
            }
            last.insert(d, id);
        }
        assert_eq!(r["via"], json!(["leaf", "mid", "top"]));
    }

    for node in [&leaf, &mid, &top] {
        // Exactly once at every hop: each device's history holds its 20 reports, each once.
        for d in [0, 17, 499] {
            let h = node.json(&format!("/v1/devices/dev-{d}")).await;
            let ids: Vec<&str> = h
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["reportId"].as_str().unwrap())
                .collect();
            assert_eq!(ids.len(), PER_DEVICE, "device {d} history on {}", node.port);
            assert_eq!(ids.iter().collect::<HashSet<_>>().len(), PER_DEVICE);
        }
        let deps = node.json("/v1/deployments").await;
        assert_eq!(deps.as_array().unwrap().len(), 1, "{deps}");
        let d = &deps[0];
        assert_eq!(d["devices"], DEVICES as u64);
        assert_eq!(d["states"]["Failed"], FAILING as u64);
        assert_eq!(d["states"]["InstallSucceeded"], (DEVICES - FAILING) as u64);
        assert_eq!(
            d["failed"][0]["explanation"],
            "HTTP 403 from the download source"
        );
        assert_eq!(
            node.json("/v1/devices").await.as_array().unwrap().len(),
            DEVICES
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in [&leaf, &mid, &top] {
        loop {
            let q = node.json("/v1/relay").await;
            if q["queueDepth"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue not drained on {}: {q}",
                node.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The queue's figures on /metrics.
    let m = String::from_utf8_lossy(&get(&top.url("/metrics")).await.body).to_string();
    assert!(m.contains("cistern_status_queue_depth 0"), "{m}");
    assert!(
        m.contains(&format!(
            "cistern_status_forwarded_total {}",
            DEVICES * PER_DEVICE
        )),
        "{m}"
    );
    assert!(
        m.contains("cistern_status_oldest_undelivered_seconds 0"),
        "{m}"
    );
    let relay_errors = m
        .lines()
        .find(|l| l.starts_with("cistern_status_relay_errors_total "))
        .unwrap();
    assert_ne!(
        relay_errors, "cistern_status_relay_errors_total 0",
        "the sink outage left no error count"
    );
    let m = String::from_utf8_lossy(&get(&leaf.url("/metrics")).await.body).to_string();
    assert!(!m.contains("cistern_status_duplicates_total 0\n"), "{m}");
}
