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

const SIZE: usize = 1 << 20;

/// An origin whose `/a.bin` and `/b.bin` are version 1 (`ETag "v1"`) to a plain GET, broken after
/// 400 KiB, and version 2 (`ETag "v2"`, same length) to a resume, answered 200 whole (its If-Range
/// does not match). `/a.bin`'s v2 differs from byte 0, `/b.bin`'s only after the break.
async fn changing_origin() -> (
    std::net::SocketAddr,
    bytes::Bytes,
    bytes::Bytes,
    bytes::Bytes,
) {
    let v1 = random_bytes(SIZE, 91);
    let a2 = random_bytes(SIZE, 92);
    let mut b2 = v1.to_vec();
    b2[600 << 10..].copy_from_slice(&random_bytes(SIZE - (600 << 10), 93));
    let b2 = bytes::Bytes::from(b2);
    let (o1, oa, ob) = (v1.clone(), a2.clone(), b2.clone());
    let addr = raw_origin(move |mut s, head| {
        let (v1, a2, b2) = (o1.clone(), oa.clone(), ob.clone());
        async move {
            let resume = head.to_lowercase().contains("\r\nrange:");
            let (etag, body) = match (resume, head.contains("/a.bin")) {
                (false, _) => ("v1", v1.slice(..400 << 10)),
                (true, true) => ("v2", a2),
                (true, false) => ("v2", b2),
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\netag: \"{etag}\"\r\n\
                 content-type: application/x-{etag}\r\ncache-control: max-age=600\r\n\r\n"
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
        }
    })
    .await;
    (addr, v1, a2, b2)
}

/// The first 200 breaks half-way; the resume finds version 2 (same length) and gets a 200: what is
/// stored, and what later clients get, is version 2 under version 2's validators and header block, so
/// that a device resuming with `If-Range: "v1"` gets the whole new version, never a 206 of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_to_a_new_version_stores_it_under_its_own_validators() {
    let (addr, _v1, a2, b2) = changing_origin().await;
    let (node, _good) = node_for(addr).await;
    for (path, v2) in [("/o/t/a.bin", a2), ("/o/t/b.bin", b2)] {
        let url = node.url(path);
        let first = get(&url).await;
        if path.ends_with("a.bin") {
            assert!(
                first.aborted,
                "{path}: the first client got a mix of versions"
            );
        }
        eventually(20, "the new version stored", || {
            node.blobs().contains(&sha256_hex(&v2))
        })
        .await;
        let g = get(&url).await;
        assert_eq!(g.status, 200);
        assert!(
            g.body == v2,
            "{path}: the stored bytes are not the new version"
        );
        assert_eq!(g.header("etag"), "\"v2\"", "{path}");
        assert_eq!(g.header("content-type"), "application/x-v2", "{path}");
        let range = [("range", "bytes=500000-"), ("if-range", "\"v1\"")];
        let g = request("GET", &url, &range).await;
        assert_eq!(
            g.status, 200,
            "{path}: a range of v2 for a client holding v1"
        );
        assert!(g.body == v2);
        let range = [("range", "bytes=500000-"), ("if-range", "\"v2\"")];
        let g = request("GET", &url, &range).await;
        assert_eq!(g.status, 206, "{path}");
        assert!(g.body == v2.slice(500_000..));
    }
}
