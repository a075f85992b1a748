//! Edges of a fill over real sockets: an empty body whose digest is known (its head waits for the
//! check), a restart that diverges to a new version (stored under the new validators), and the `Age`
//! of a client that joins a fill late (SPEC 4).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

/// A node whose parent is the raw origin at `parent`.
async fn node_with_parent(parent: std::net::SocketAddr) -> (Node, Origin) {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.upstream.retries = 1;
    cfg.upstream.parents = vec![format!("http://{parent}")];
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    (node, origin)
}

/// A parent answers an empty 200 for a digest that is not that of zero bytes: no complete empty 200
/// reaches the client, it gets a 502 `digest-mismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_from_a_parent_for_a_digest_is_a_502() {
    let parent = raw_origin(|mut s, _| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncache-control: max-age=600\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).await;
    })
    .await;
    let (node, _origin) = node_with_parent(parent).await;
    let hex = sha256_hex(b"not an empty payload");
    let url = node.url(&format!("/v1/content/sha256/{hex}"));
    let g = get(&url).await;
    assert_eq!(g.status, 502, "{:?} {:?}", g.headers, g.body);
    assert_eq!(g.json()["error"], "digest-mismatch", "{:?}", g.body);
    assert!(node.blobs().is_empty());
    let again = get(&url).await;
    assert_eq!(again.status, 502);
}

/// An origin's empty 200 whose `Repr-Digest` names other bytes, announced as `Content-Length: 0` or
/// chunked: a 502 `digest-mismatch`, never a complete empty 200. The right digest still gives a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_against_its_repr_digest_is_a_502() {
    let origin = Origin::start().await;
    for (path, chunked) in [("/empty.bin", false), ("/empty-chunked.bin", true)] {
        let b = Behaviour {
            wrong_digest: true,
            chunked,
            ..Default::default()
        };
        origin.put(path, bytes::Bytes::new(), b);
    }
    let good = Behaviour {
        right_digest: true,
        ..Default::default()
    };
    origin.put("/empty-good.bin", bytes::Bytes::new(), good);
    let node = Node::start(&origin, "").await;
    for path in ["/empty.bin", "/empty-chunked.bin"] {
        let g = get(&node.url(&format!("/o/t{path}"))).await;
        assert_eq!(g.status, 502, "{path}: {:?}", g.headers);
        assert_eq!(g.json()["error"], "digest-mismatch", "{path}: {:?}", g.body);
    }
    let g = get(&node.url("/o/t/empty-good.bin")).await;
    assert_eq!(g.status, 200);
    assert!(g.body.is_empty() && !g.aborted);
    assert_eq!(g.header("content-length"), "0");
    assert!(node.blobs().is_empty() || node.blobs() == vec![sha256_hex(b"")]);
}

/// A client that joins a fill in flight two seconds after its head arrived is given the response's
/// age at its own answer (initial age plus resident time, RFC 9111 §4.2.3), not the age at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_age_of_its_own_answer() {
    let origin = Origin::start().await;
    let body = random_bytes(500_000, 90);
    let b = Behaviour {
        rate: Some(100_000),
        cache_control: Some("max-age=3600".into()),
        headers: vec![("age", "100".into())],
        ..Default::default()
    };
    origin.put("/aged.bin", body.clone(), b);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/aged.bin");
    let u = url.clone();
    let first = tokio::spawn(async move { get(&u).await });
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let late = get(&url).await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    assert!(first.body == body);
    let age: u64 = first.header("age").parse().unwrap();
    assert!((100..102).contains(&age), "the first client's Age: {age}");
    assert_eq!(
        late.header("cache-status"),
        "cistern; fwd=uri-miss; collapsed"
    );
    assert!(late.body == body);
    let age: u64 = late.header("age").parse().unwrap();
    assert!(age >= 102, "a client joining 2 s late got Age {age}");
    assert_eq!(origin.gets("/aged.bin"), 1);
}
