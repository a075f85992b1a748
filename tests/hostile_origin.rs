//! Hostile upstreams over real sockets: endless headers, an endless chunk extension, a Content-Length
//! that lies either way, redirects to loopback and to themselves (names that resolve to refused
//! addresses: `gateway.rs`). Each gets a clear error (never a stored or whole wrong body), and the gateway keeps
//! serving other clients meanwhile.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An origin that reads each request head and hands the socket and the head to `answer`.
async fn raw_origin<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        for _ in 0..50 {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answer(s, String::from_utf8_lossy(&head).to_string()).await
            });
        }
    });
    addr
}

/// A node whose origin `t` is the raw origin at `addr` (retries 1, so that failures come quickly).
async fn node_for(addr: SocketAddr) -> (Node, Origin) {
    let good = Origin::start().await;
    good.put("/ok.bin", random_bytes(100_000, 80), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &good, "");
    cfg.upstream.retries = 1;
    cfg.origins[0].url = format!("http://{addr}");
    cfg.upstream.allowed_origins.push(addr.to_string());
    let mut o = cfg.origins[0].clone();
    o.name = "good".into();
    o.url = good.url();
    cfg.origins.push(o);
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    (node, good)
}

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
