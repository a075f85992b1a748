//! The real binary killed with SIGKILL, then restarted on the same store: in the middle of a
//! transfer, nothing partial is served or kept and the object is fetched and stored again; right
//! after an invalidation, a pin or an unpin was answered, it holds after the restart. And SIGTERM
//! as soon as the node is ready is a graceful stop.

mod common;

use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

/// SIGTERM, which flushes the index: what was written before is in it for sure.
fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status} on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transfer_leaves_nothing_partial() {
    let origin = Origin::start().await;
    let body = random_bytes(4 << 20, 21);
    origin.put(
        "/fw.bin",
        body.clone(),
        Behaviour {
            rate: Some(2 << 20),
            cache_control: Some("max-age=3600".into()),
            ..Default::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let child = start_binary(&conf, port).await;
    let url = format!("http://127.0.0.1:{port}/o/t/fw.bin");
    let client = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(10, "transfer under way", || {
        origin.bytes_sent.load(Ordering::Relaxed) > 512 << 10
    })
    .await;
    let tmpdir = tmp.path().join("data").join("tmp");
    assert_eq!(
        std::fs::read_dir(&tmpdir).unwrap().count(),
        1,
        "the fill's temp file"
    );
    kill9(child);
    let g = client.await.unwrap();
    assert!(
        g.aborted || g.body.len() < body.len(),
        "a killed transfer looked complete"
    );

    let child = start_binary(&conf, port).await;
    assert_eq!(
        std::fs::read_dir(&tmpdir).unwrap().count(),
        0,
        "orphan temp file survived the restart"
    );
    let g = get(&url).await;
    assert_eq!(g.body, body);
    let hex = sha256_hex(&body);
    let blob = tmp
        .path()
        .join("data")
        .join("sha256")
        .join(&hex[..2])
        .join(&hex);
    eventually(10, "object stored after restart", || blob.exists()).await;
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    let g = get(&url).await;
    assert_eq!(g.header("cache-status"), "cistern; hit");
    // SIGTERM: graceful stop, exit 0.
    stop(child);
}

/// What a 2xx to an unsafe request invalidated (RFC 9111 §4.4) stays invalidated when the process
/// is killed right after: the index's older entry does not bring the key back at the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_key_is_not_brought_back_by_kill_9() {
    let origin = Origin::start().await;
    let body = random_bytes(100_000, 22);
    let b = Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/fw.bin", body.clone(), b);
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let child = start_binary(&conf, port).await;
    let url = format!("http://127.0.0.1:{port}/o/t/fw.bin");
    get(&url).await;
    let end = Instant::now() + Duration::from_secs(10);
    while get(&url).await.header("cache-status") != "cistern; hit" {
        assert!(Instant::now() < end, "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(child);
    let child = start_binary(&conf, port).await;
    let p = request_body("POST", &url, &[], bytes::Bytes::from_static(b"x")).await;
    assert_eq!(p.status, 200);
    kill9(child);

    let child = start_binary(&conf, port).await;
    let g = get(&url).await;
    stop(child);
    assert_eq!(g.body, body);
    assert_ne!(
        g.header("cache-status"),
        "cistern; hit",
        "invalidation undone"
    );
    assert_eq!(origin.gets("/fw.bin"), 2);
}

/// A pin or an unpin, once answered, survives a SIGKILL right after it (the `.meta` says it, and
/// the index may not have written it yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_and_an_unpin_survive_kill_9() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    let body = random_bytes(50_000, 23);
    let hex = sha256_hex(&body);
    let base = format!("http://127.0.0.1:{port}/v1/admin");
    let pinned = || async {
        let v = get(&format!("{base}/content")).await.json();
        v[0]["pinned"].as_bool()
    };
    let child = start_binary(&conf, port).await;
    let put = format!("{base}/content/sha256/{hex}");
    let g = admin_request("PUT", &put, body.clone()).await;
    assert_eq!(g.status, 201);
    stop(child);
    // Pinned by a second sideload with `?pin=true`, then killed.
    let child = start_binary(&conf, port).await;
    let g = admin_request("PUT", &format!("{put}?pin=true"), body.clone()).await;
    assert!(g.status.is_success(), "{}", g.status);
    assert_eq!(pinned().await, Some(true));
    kill9(child);
    let child = start_binary(&conf, port).await;
    assert_eq!(pinned().await, Some(true), "the pin was lost");
    stop(child);
    // Unpinned, then killed.
    let child = start_binary(&conf, port).await;
    let g = admin_request("DELETE", &format!("{base}/pins/{hex}"), bytes::Bytes::new()).await;
    assert!(g.status.is_success(), "{}", g.status);
    kill9(child);
    let child = start_binary(&conf, port).await;
    let unpinned = pinned().await;
    stop(child);
    assert_eq!(unpinned, Some(false), "the unpin was lost");
}

/// SIGTERM as soon as `/readyz` answers is a graceful stop (exit 0), not the signal's default
/// action: the handler is in place before the node is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_ready_is_a_graceful_stop() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = binary_config(tmp.path(), &origin);
    for _ in 0..10 {
        stop(start_binary(&conf, port).await);
    }
}
