//! A fill in progress survives a restart of cistern (SPEC 4, "Resume"): the real binary killed with
//! SIGKILL late in a slow fill, started again; the fill resumes from the bytes kept with Range +
//! If-Range instead of starting over, a client resuming near the end gets its 206 at once, and the
//! origin sends little more than the object. A partial whose validator no longer matches starts
//! over; a torn record is ignored.

mod common;

use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};

fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn slow(etag: &str, rate: u64) -> Behaviour {
    Behaviour {
        rate: Some(rate),
        etag: Some(etag.into()),
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    }
}

/// Starts a full download of `url` and kills `child` once the origin sent `at` bytes; returns when
/// the process is gone.
async fn kill_at(child: Child, origin: &Origin, url: &str, at: usize) {
    cut_at(child, origin, url, at, kill9).await
}

/// Starts a full download of `url` and stops `child` with `cut` once the origin sent `at` bytes;
/// returns when the process is gone.
async fn cut_at(child: Child, origin: &Origin, url: &str, at: usize, cut: fn(Child)) {
    let client = tokio::spawn({
        let url = url.to_string();
        async move { get(&url).await }
    });
    eventually(60, "fill far enough", || {
        origin.bytes_sent.load(Ordering::Relaxed) >= at
    })
    .await;
    cut(child);
    let _ = client.await;
}

/// A GET with headers, timing its response head: (status, head time, headers, body).
async fn timed_get(url: &str, headers: &[(&str, &str)]) -> (u16, Duration, http::HeaderMap, Bytes) {
    let uri: http::Uri = url.parse().unwrap();
    let mut sender = connect_to(&uri).await;
    let mut req = http::Request::get(uri.path()).header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let asked = Instant::now();
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let head = asked.elapsed();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (parts.status.as_u16(), head, parts.headers, body)
}

fn blob(tmp: &std::path::Path, body: &[u8]) -> std::path::PathBuf {
    let hex = sha256_hex(body);
    tmp.join("data").join("sha256").join(&hex[..2]).join(&hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_killed_late_resumes_after_the_restart() {
    resumes_after_a_restart(kill9).await;
}

/// A graceful stop whose grace period ends before the fill does keeps the fill's bytes as a crash
/// would (regression: the fill was dropped with the runtime and its partial removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_cut_off_by_a_graceful_stop_resumes_after_the_restart() {
    resumes_after_a_restart(stop).await;
}

/// A slow fill cut off at 75 % by `cut`, cistern started again, and a client resuming near the end.
async fn resumes_after_a_restart(cut: fn(Child)) {
    let origin = Origin::start().await;
    let size = 16usize << 20;
    let body = random_bytes(size, 41);
    origin.put("/big.bin", body.clone(), slow("\"v1\"", 2 << 20));
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let text = std::fs::read_to_string(&conf).unwrap();
    let text = text.replace("[server]\n", "[server]\nshutdown_grace = \"1s\"\n");
    std::fs::write(&conf, text).unwrap();
    let url = format!("http://127.0.0.1:{port}/o/t/big.bin");
    let child = start_binary(&conf, port).await;
    cut_at(child, &origin, &url, size * 3 / 4, cut).await;
    let sent_before = origin.bytes_sent.load(Ordering::Relaxed);

    let child = start_binary(&conf, port).await;
    // The range the Delivery Optimization agent asks for: from 75.26 % to the last byte.
    let from = size as u64 * 7526 / 10000;
    let range = format!("bytes={from}-{}", size - 1);
    let (status, head, h, got) = timed_get(&url, &[("range", &range)]).await;
    assert_eq!(status, 206);
    assert_eq!(
        h.get("content-range").unwrap().to_str().unwrap(),
        format!("bytes {from}-{}/{size}", size - 1)
    );
    assert!(got == body[from as usize..], "the range's bytes");
    eprintln!("206 head after {head:?}");
    assert!(head < Duration::from_secs(1), "206 head after {head:?}");
    eventually(30, "object stored", || blob(tmp.path(), &body).exists()).await;
    assert_eq!(std::fs::read(blob(tmp.path(), &body)).unwrap(), body);
    let total = origin.bytes_sent.load(Ordering::Relaxed);
    let range_len = size - from as usize;
    eprintln!(
        "origin sent {total} bytes ({sent_before} before the kill) for a {size}-byte object and a {range_len}-byte range"
    );
    assert!(
        total <= size + range_len,
        "origin sent {total} bytes for a {size}-byte object and a {range_len}-byte range"
    );
    let ranged: Vec<_> = origin
        .requests("/big.bin")
        .into_iter()
        .filter(|(_, h)| h.contains_key("if-range"))
        .collect();
    assert_eq!(ranged.len(), 1, "one resume with If-Range");
    let g = get(&url).await;
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert!(!tmp
        .path()
        .join("data/partial")
        .read_dir()
        .unwrap()
        .any(|_| true));
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_whose_validator_changed_starts_over() {
    let origin = Origin::start().await;
    let size = 4usize << 20;
    let old = random_bytes(size, 42);
    origin.put("/fw.bin", old.clone(), slow("\"old\"", 2 << 20));
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let url = format!("http://127.0.0.1:{port}/o/t/fw.bin");
    let child = start_binary(&conf, port).await;
    kill_at(child, &origin, &url, size / 2).await;
    let new = random_bytes(size, 43);
    origin.put("/fw.bin", new.clone(), slow("\"new\"", 16 << 20));

    let child = start_binary(&conf, port).await;
    let g = get(&url).await;
    assert_eq!(g.status, 200);
    assert!(g.body == new, "the new bytes");
    assert_eq!(g.header("etag"), "\"new\"");
    let asked: Vec<_> = origin.requests("/fw.bin");
    let last = &asked.last().unwrap().1;
    assert_eq!(
        last.get("if-range").unwrap(),
        "\"old\"",
        "resumed with If-Range"
    );
    eventually(30, "new object stored", || blob(tmp.path(), &new).exists()).await;
    assert!(!blob(tmp.path(), &old).exists());
    let g = get(&url).await;
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert_eq!(g.header("etag"), "\"new\"");
    assert!(g.body == new);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_partial_record_is_ignored() {
    let origin = Origin::start().await;
    let size = 4usize << 20;
    let body = random_bytes(size, 44);
    origin.put("/fw.bin", body.clone(), slow("\"v\"", 2 << 20));
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let url = format!("http://127.0.0.1:{port}/o/t/fw.bin");
    let child = start_binary(&conf, port).await;
    kill_at(child, &origin, &url, size / 2).await;
    let dir = tmp.path().join("data/partial");
    let records: Vec<_> = dir
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(records.len(), 1, "the partial's record");
    let whole = std::fs::read(&records[0]).unwrap();
    std::fs::write(&records[0], &whole[..whole.len() / 2]).unwrap();

    let child = start_binary(&conf, port).await;
    assert!(
        !dir.read_dir().unwrap().any(|_| true),
        "torn partial removed"
    );
    let g = get(&url).await;
    assert!(g.body == body);
    let asked = origin.requests("/fw.bin");
    assert!(
        !asked.last().unwrap().1.contains_key("range"),
        "no resume from a torn record"
    );
    stop(child);
}
