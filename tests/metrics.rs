//! `/metrics` and `/summary` as a monitoring system reads them: the OpenMetrics text passes
//! `promtool check metrics` (Debian package prometheus; skipped with a message where it is missing)
//! on a scrape taken during a fan-out and a relay outage, and `/summary` counts body bytes as they are
//! sent, not whole objects when their headers go out.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some((out.status.success(), said))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_fan_out_and_a_relay_outage_passes_promtool() {
    let origin = Origin::start().await;
    let body = random_bytes(4 << 20, 100);
    let slow = Behaviour {
        rate: Some(4 << 20),
        ..Default::default()
    };
    origin.put("/fan.bin", body.clone(), slow);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    // A next hop that is down: the relay queues and counts errors.
    cfg.status.forward_to = format!("http://127.0.0.1:{}/v1/status", free_port());
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    let report = r#"{"reportId":"r1","deviceId":"d1","updateId":{"provider":"p","name":"n","version":"1"},"workflowId":"w","state":"Failed","resultCode":500,"extendedResultCode":"D0190193"}"#;
    let g = request_body(
        "POST",
        &node.url("/v1/status"),
        &[("content-type", "application/json")],
        report.into(),
    )
    .await;
    assert_eq!(g.status, 202);
    let url = node.url("/o/t/fan.bin");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let u = url.clone();
            tokio::spawn(async move { get(&u).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // What Prometheus asks for, and what curl gets.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let om = request("GET", &node.url("/metrics"), &[("accept", accept)]).await;
    assert!(om
        .header("content-type")
        .starts_with("application/openmetrics-text"));
    let om = String::from_utf8_lossy(&om.body).to_string();
    let scrape = get(&node.url("/metrics")).await;
    assert!(scrape
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8_lossy(&scrape.body).to_string();
    for c in clients {
        assert_eq!(c.await.unwrap().body, body);
    }
    assert!(text.contains("cistern_transfers_in_flight 1"), "{text}");
    assert!(
        text.contains("cistern_requests_total{form=\"named-origin\",cache_status=\"collapsed\"}"),
        "{text}"
    );
    assert!(
        text.contains("cistern_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("cistern_status_queue_depth 1"), "{text}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# UNIT cistern_request_duration_seconds seconds"),
        "{om}"
    );
    assert!(om.contains("# TYPE cistern_requests counter"), "{om}");
    match promtool(&text) {
        None => eprintln!("SKIPPED: promtool not found (apt-get install prometheus)"),
        Some((ok, said)) => assert!(ok, "promtool check metrics failed:\n{said}\n{text}"),
    }
}

/// Two clients a quarter into a slow 8 MiB transfer: `/summary` has counted what they were sent, not
/// 16 MiB; at the end, hit and miss bytes add up to egress, which is what the clients received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_counts_bytes_as_they_are_sent() {
    let origin = Origin::start().await;
    let size = 8usize << 20;
    let body = random_bytes(size, 101);
    let slow = Behaviour {
        rate: Some(2 << 20),
        cache_control: Some("max-age=600".into()),
        ..Default::default()
    };
    origin.put("/s.bin", body.clone(), slow);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/s.bin");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let u = url.clone();
            tokio::spawn(async move { get(&u).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early = get(&node.url("/summary")).await.json();
    let miss = early["missBytes"].as_u64().unwrap();
    assert!(miss > 0, "nothing counted yet: {early}");
    assert!(
        miss < size as u64,
        "whole objects counted when the headers went out: {early}"
    );
    let mut received = 0;
    for c in clients {
        let g = c.await.unwrap();
        assert_eq!(g.body, body);
        received += g.body.len() as u64;
    }
    eventually(10, "the object stored", || node.blobs().len() == 1).await;
    let hit = get(&url).await;
    assert_eq!(hit.header("cache-status"), "cistern; hit");
    received += hit.body.len() as u64;
    let end = get(&node.url("/summary")).await.json();
    let (h, m, e) = (
        end["hitBytes"].as_u64().unwrap(),
        end["missBytes"].as_u64().unwrap(),
        end["egressBytes"].as_u64().unwrap(),
    );
    assert_eq!(h + m, e, "{end}");
    assert_eq!(e, received, "{end}");
    assert_eq!(h, size as u64, "{end}");
}

/// The request's log line is written when its response ends, with the bytes actually sent, the time
/// to the first byte and the whole duration, and how it ended; JSON logs are one object per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_line_says_what_was_sent_when_the_response_ends() {
    use std::io::BufRead;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let whole = random_bytes(2 << 20, 102);
    origin.put("/whole.bin", whole.clone(), Behaviour::default());
    let slow = Behaviour {
        rate: Some(1 << 20),
        ..Default::default()
    };
    origin.put("/slow.bin", random_bytes(8 << 20, 103), slow);
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = t.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n\
             [upstream]\nallowed_origins = [\"127.0.0.1:{o}\"]\n[[origins]]\nname = \"t\"\n\
             url = \"http://127.0.0.1:{o}\"\n[log]\nformat = \"json\"\n",
            t.path().join("data").display(),
            o = origin.addr.port()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--config"])
        .arg(&conf)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let base = format!("http://127.0.0.1:{port}");
    let ready = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < ready, "cistern not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = get(&format!("{base}/o/t/whole.bin")).await;
    assert_eq!(g.body, whole);
    // A client that takes the head and a little of the body, then leaves.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /o/t/slow.bin HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let _ = s.read(&mut buf).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _ = child.kill();
    let _ = child.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    let mut requests = Vec::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"));
        if v["fields"]["message"] == "request" {
            requests.push(v["fields"].clone());
        }
    }
    let done = requests
        .iter()
        .find(|r| r["key"].as_str().is_some_and(|k| k.ends_with("/whole.bin")))
        .unwrap_or_else(|| panic!("no request line for whole.bin: {lines:?}"));
    assert_eq!(done["bytes"], whole.len() as u64, "{done}");
    assert_eq!(done["end"], "complete", "{done}");
    assert!(
        done["ttfb_ms"].as_u64().unwrap() <= done["ms"].as_u64().unwrap(),
        "{done}"
    );
    let left = requests
        .iter()
        .find(|r| r["key"].as_str().is_some_and(|k| k.ends_with("/slow.bin")))
        .unwrap_or_else(|| panic!("no request line for the client that left: {lines:?}"));
    assert_eq!(left["end"], "client-left", "{left}");
    assert!(left["bytes"].as_u64().unwrap() < 8 << 20, "{left}");
    assert!(
        left["ms"].as_u64().unwrap() >= 400,
        "logged when the headers went out: {left}"
    );
}
