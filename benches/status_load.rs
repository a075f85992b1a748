//! Load bench of `POST /v1/status` over real HTTP on loopback: durable reports per second, in batches of
//! 100, from several keep-alive connections at once. Every 202 counted here was flushed to disk first.
//!
//! `cargo bench --bench status_load` runs 200,000 reports; under `cargo test` it runs a small smoke.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const BATCH: usize = 100;
const CONNECTIONS: usize = 16;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: usize = if full { 200_000 } else { 2_000 };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run(total));
}

async fn run(total: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n[log]\nlevel = \"warn\"\n",
        tmp.path().join("data").display()
    );
    let cfg = cistern::config::Config::from_toml_str(&text, "bench", &[]).expect("config");
    let gw = cistern::Gateway::start(cfg).await.expect("gateway");
    let addr = gw.addr.expect("addr");
    let per_conn = total / CONNECTIONS / BATCH;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock)).await.expect("handshake");
            tokio::spawn(conn);
            let mut accepted = 0u64;
            for b in 0..per_conn {
                let mut body = String::from("[");
                for i in 0..BATCH {
                    if i > 0 {
                        body.push(',');
                    }
                    let dev = (c * 7919 + b * 13 + i) % 5000;
                    body.push_str(&format!(
                        r#"{{"reportId":"c{c}-b{b}-i{i}","deviceId":"dev-{dev}","updateId":{{"provider":"Contoso","name":"Sensor","version":"1.2.0"}},"workflowId":"wf-1","state":"DownloadSucceeded","resultCode":500,"extendedResultCode":0,"resultDetails":"","timestamp":"2026-11-24T10:00:00Z"}}"#
                    ));
                }
                body.push(']');
                let req = http::Request::post("/v1/status")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let resp = tokio::time::timeout(Duration::from_secs(30), tx.send_request(req))
                    .await
                    .expect("answer within 30 s")
                    .expect("response");
                assert_eq!(resp.status(), 202);
                let v: serde_json::Value =
                    serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).expect("json");
                accepted += v["accepted"].as_u64().unwrap_or(0);
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "status_load: {accepted} durable reports in {secs:.2} s = {:.0} reports/s ({CONNECTIONS} connections, batches of {BATCH})",
        accepted as f64 / secs
    );
    gw.shutdown().await;
}
