//! Hostile upstreams over real sockets: endless headers, an endless chunk extension, a Content-Length
//! that lies either way, redirects to loopback and to themselves (names that resolve to refused
//! addresses: `gateway.rs`). Each gets a clear error (never a stored or whole wrong body), and the gateway keeps
//! serving other clients meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

/// The other origin still answers through the node.
async fn still_serving(node: &Node) {
    let g = get(&node.url("/o/good/ok.bin")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body.len(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_sending_endless_headers_gets_a_502_quickly() {
    let addr = raw_origin(|mut s, _| async move {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
        let line = format!("x-junk: {}\r\n", "a".repeat(1000));
        // Up to 1 GiB of header lines, for as long as the gateway reads them.
        for _ in 0..(1 << 20) {
            if s.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let (node, _good) = node_for(addr).await;
    let started = Instant::now();
    let g = get(&node.url("/o/t/huge-head.bin")).await;
    assert_eq!(g.status, 502, "{:?}", g.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    still_serving(&node).await;
    assert!(node.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_chunk_extension_is_a_broken_body() {
    let addr = raw_origin(|mut s, _| async move {
        let head =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncache-control: max-age=60\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(b"10\r\n0123456789abcdef\r\n10;ext=").await;
        let junk = vec![b'x'; 64 << 10];
        for _ in 0..(16 << 10) {
            if s.write_all(&junk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let (node, _good) = node_for(addr).await;
    let g = tokio::time::timeout(Duration::from_secs(30), get(&node.url("/o/t/ext.bin")))
        .await
        .expect("the gateway kept reading a chunk extension");
    assert!(g.aborted || g.status != 200, "a broken body looked whole");
    still_serving(&node).await;
    assert!(node.blobs().is_empty(), "a broken body was stored");
}

/// Content-Length 1000 with 3000 bytes sent, and Content-Length 100000 with 1000 sent then a close:
/// the first is the 1000 bytes it announced, the second broken (never stored, never whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_content_length_never_yields_a_wrong_stored_body() {
    let body = random_bytes(3000, 81);
    let b = body.clone();
    let addr = raw_origin(move |mut s, head| {
        let b = b.clone();
        async move {
            let (cl, n) = if head.contains("/long") {
                (100_000, 1000)
            } else {
                (1000, 3000)
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {cl}\r\ncache-control: max-age=60\r\n\r\n"
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&b[..n]).await;
        }
    })
    .await;
    let (node, _good) = node_for(addr).await;
    let short = get(&node.url("/o/t/short")).await;
    assert_eq!(short.status, 200);
    assert!(!short.aborted);
    assert_eq!(
        short.body,
        body.slice(..1000),
        "not the announced 1000 bytes"
    );
    let long = get(&node.url("/o/t/long")).await;
    assert!(
        long.aborted || long.status != 200,
        "a short body looked whole"
    );
    assert!(long.body.len() < 100_000);
    eventually(5, "the announced body stored", || {
        node.blobs() == vec![sha256_hex(&body[..1000])]
    })
    .await;
    still_serving(&node).await;
}

/// Redirects to a loopback address, to the gateway itself and in a loop are refused with an error
/// that says so; nothing is fetched from where they point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_loopback_to_the_gateway_and_in_loops_are_refused() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &origin, "");
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    origin.redirect("/to-loopback", "http://127.0.0.2:9/secret");
    origin.redirect(
        "/to-gateway",
        &format!("http://{}/v1/admin/pins", node.addr),
    );
    origin.redirect("/loop", "/loop");
    for path in ["/to-loopback", "/to-gateway", "/loop"] {
        let g = get(&node.url(&format!("/o/t{path}"))).await;
        assert!(
            g.status == 403 || g.status == 502 || g.status == 508,
            "{path}: {} {:?}",
            g.status,
            g.body
        );
        assert!(g.json()["error"].is_string(), "{path}: no JSON error");
    }
    assert!(
        origin.gets("/loop") <= 11,
        "a redirect loop was followed without bound"
    );
}
