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
