//! The core gateway against a real loopback origin: collapsing, streaming, verification, resume, ranges,
//! freshness and the store on disk (the request forms and access control: `forms.rs`).

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::*;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_clients_make_one_origin_transfer() {
    let origin = Origin::start().await;
    let body = random_bytes(4 << 20, 1);
    let cc = Some("max-age=3600".to_string());
    origin.put(
        "/fw.bin",
        body.clone(),
        Behaviour {
            rate: Some(16 << 20),
            cache_control: cc,
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/fw.bin");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert!(!g.aborted);
        assert_eq!(g.body, body, "a client got different bytes");
        statuses.push(g.header("cache-status"));
    }
    assert_eq!(origin.gets("/fw.bin"), 1, "more than one origin transfer");
    assert_eq!(statuses.iter().filter(|s| s.ends_with("stored")).count(), 1);
    assert_eq!(
        statuses.iter().filter(|s| s.ends_with("collapsed")).count(),
        49
    );
    let m = String::from_utf8_lossy(&get(&node.url("/metrics")).await.body).to_string();
    assert!(m.contains("cistern_collapsed_total 49"), "{m}");
    assert!(m.contains("cistern_upstream_fetches_total 1\n"), "{m}");
    let hex = sha256_hex(&body);
    eventually(5, "object on disk", || node.blobs() == vec![hex.clone()]).await;
    assert_eq!(
        std::fs::read(node.data().join("sha256").join(&hex[..2]).join(&hex)).unwrap(),
        body
    );
    // A later client is a hit, with the validators of a stored object.
    let g = get(&url).await;
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert_eq!(g.header("etag"), format!("\"{hex}\""));
    assert!(g.header("repr-digest").starts_with("sha-256=:"));
    assert_eq!(origin.gets("/fw.bin"), 1);
    // The Connected Cache style summary counts that hit (and spells egress both ways).
    let sum = get(&node.url("/summary")).await.json();
    assert_eq!(sum["hitBytes"], body.len() as u64);
    assert_eq!(sum["missBytes"], 50 * body.len() as u64);
    assert_eq!(sum["eggressBytes"], sum["egressBytes"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_arrive_before_the_object_is_complete() {
    let origin = Origin::start().await;
    let body = random_bytes(2 << 20, 2);
    // 2 MiB at 2 MiB/s: about a second for the whole object.
    origin.put(
        "/slow.bin",
        body.clone(),
        Behaviour {
            rate: Some(2 << 20),
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let started = Instant::now();
    let uri: http::Uri = node.url("/o/t/slow.bin").parse().unwrap();
    let sock = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(uri.path())
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let mut b = resp.into_body();
    let first = b.frame().await.unwrap().unwrap();
    let ttfb = started.elapsed();
    assert!(first.is_data());
    assert!(
        origin.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) < body.len(),
        "first byte came only after the whole object ({ttfb:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_repr_digest_is_never_delivered_whole_nor_stored() {
    let origin = Origin::start().await;
    let body = random_bytes(1 << 20, 3);
    origin.put(
        "/bad.bin",
        body.clone(),
        Behaviour {
            wrong_digest: true,
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/bad.bin")).await;
    assert!(
        g.aborted || g.status != 200,
        "a corrupt payload looked complete"
    );
    assert!(g.body.len() < body.len());
    assert!(node.blobs().is_empty());
    // Later requests: 502 without contacting the origin again.
    let g = get(&node.url("/o/t/bad.bin")).await;
    assert_eq!(g.status, 502);
    assert_eq!(g.json()["error"], "digest-mismatch");
    assert_eq!(origin.gets("/bad.bin"), 1);
    assert!(
        std::fs::read_dir(node.data().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "temp file left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_right_repr_digest_gives_validators_up_front() {
    let origin = Origin::start().await;
    let body = random_bytes(300_000, 4);
    origin.put(
        "/ok.bin",
        body.clone(),
        Behaviour {
            right_digest: true,
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/ok.bin")).await;
    assert_eq!(g.body, body);
    assert_eq!(g.header("etag"), format!("\"{}\"", sha256_hex(&body)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_resumes_with_range_and_if_range() {
    let origin = Origin::start().await;
    let body = random_bytes(3 << 20, 5);
    origin.put(
        "/big.bin",
        body.clone(),
        Behaviour {
            break_after: Some(1 << 20),
            breaks: 1,
            etag: Some("\"v1\"".into()),
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/big.bin")).await;
    assert!(!g.aborted);
    assert_eq!(g.body, body);
    let reqs = origin.requests("/big.bin");
    assert_eq!(reqs.len(), 2);
    let resume = &reqs[1].1;
    assert_eq!(resume.get("range").unwrap(), "bytes=1048576-");
    assert_eq!(resume.get("if-range").unwrap(), "\"v1\"");
    eventually(5, "object stored", || node.blobs().len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_ignores_range_restarts_from_zero() {
    let origin = Origin::start().await;
    let body = random_bytes(2 << 20, 6);
    origin.put(
        "/norange.bin",
        body.clone(),
        Behaviour {
            break_after: Some(700_000),
            breaks: 2,
            ignore_range: true,
            etag: Some("\"e\"".into()),
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/norange.bin")).await;
    assert!(!g.aborted);
    assert_eq!(g.body, body);
    assert_eq!(origin.gets("/norange.bin"), 3);
    let hex = sha256_hex(&body);
    eventually(5, "object stored", || node.blobs() == vec![hex.clone()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_stored_and_arriving_objects() {
    let origin = Origin::start().await;
    let body = random_bytes(1 << 20, 7);
    let cc = Some("max-age=3600".to_string());
    origin.put(
        "/r.bin",
        body.clone(),
        Behaviour {
            rate: Some(4 << 20),
            cache_control: cc,
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/r.bin");
    // A cold range request is answered 206 from the fill of the whole object.
    let g = request("GET", &url, &[("range", "bytes=100-199")]).await;
    assert_eq!(g.status, 206);
    assert_eq!(g.header("content-range"), "bytes 100-199/1048576");
    assert_eq!(g.body, body.slice(100..200));
    eventually(10, "object stored", || node.blobs().len() == 1).await;
    let g = request("GET", &url, &[("range", "bytes=-10")]).await;
    assert_eq!(g.body, body.slice(body.len() - 10..));
    let g = request("GET", &url, &[("range", "bytes=1048000-9999999")]).await;
    assert_eq!(g.header("content-range"), "bytes 1048000-1048575/1048576");
    let g = request("GET", &url, &[("range", "bytes=1048576-")]).await;
    assert_eq!(g.status, 416);
    assert_eq!(g.header("content-range"), "bytes */1048576");
    // Two ranges within 80 bytes of each other are one part: a plain 206 (tests/multirange.rs has
    // the multipart answers).
    let g = request("GET", &url, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(g.status, 206);
    assert_eq!(g.header("content-range"), "bytes 0-6/1048576");
    assert_eq!(g.body, body.slice(0..7));
    let etag = get(&url).await.header("etag");
    let g = request("GET", &url, &[("range", "bytes=0-9"), ("if-range", &etag)]).await;
    assert_eq!(g.status, 206);
    let g = request(
        "GET",
        &url,
        &[("range", "bytes=0-9"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!(g.status, 200);
    let g = request("GET", &url, &[("if-none-match", &etag)]).await;
    assert_eq!(g.status, 304);
    assert_eq!(origin.gets("/r.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_and_stale_copies_when_the_origin_is_down() {
    let origin = Origin::start().await;
    let body = random_bytes(100_000, 8);
    origin.put(
        "/m.txt",
        body.clone(),
        Behaviour {
            etag: Some("\"m1\"".into()),
            cache_control: Some("max-age=0".into()),
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/m.txt");
    assert_eq!(get(&url).await.body, body);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    let g = get(&url).await;
    assert_eq!(
        g.header("cache-status"),
        "cistern; fwd=stale; fwd-status=304"
    );
    assert_eq!(g.body, body);
    let reqs = origin.requests("/m.txt");
    assert_eq!(
        reqs.last().unwrap().1.get("if-none-match").unwrap(),
        "\"m1\""
    );
    origin.stop();
    let g = request("GET", &url, &[("cache-control", "max-age=0")]).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, body);
    assert!(
        g.header("cache-status").contains("detail=stale"),
        "{}",
        g.header("cache-status")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_miss_is_a_json_504_and_hits_still_serve() {
    let origin = Origin::start().await;
    let body = random_bytes(10_000, 9);
    origin.put("/a.bin", body.clone(), Behaviour::default());
    let node = Node::start(
        &origin,
        "[[origins]]\nname = \"imm\"\nurl = \"http://127.0.0.1:1\"\nimmutable = true\n",
    )
    .await;
    let g = get(&node.url("/o/imm/x.bin")).await;
    assert_eq!(g.status, 504);
    assert_eq!(g.json()["error"], "upstream-unreachable");
    assert!(g.header("cache-status").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_over_the_budget_streams_through_unstored() {
    let origin = Origin::start().await;
    let body = random_bytes(2 << 20, 14);
    origin.put("/huge.bin", body.clone(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.store.max_size = cistern::config::ByteSize(1 << 20);
    let node = Node::start_with(cfg).await;
    let g = get(&node.url("/o/t/huge.bin")).await;
    assert_eq!(g.body, body);
    assert!(!g.aborted);
    assert!(node.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sideload_then_serve_by_digest() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    let body = random_bytes(70_000, 15);
    let hex = sha256_hex(&body);
    let url = node.url(&format!("/v1/admin/content/sha256/{hex}"));
    let wrong = admin_request("PUT", &url, Bytes::from_static(b"something else")).await;
    assert_eq!(wrong.status, 422);
    assert!(node.blobs().is_empty());
    let ok = admin_request("PUT", &url, body.clone()).await;
    assert_eq!(ok.status, 201);
    let g = get(&node.url(&format!("/v1/content/sha256/{hex}"))).await;
    assert_eq!(g.body, body);
    assert_eq!(g.header("cache-status"), "cistern; hit");
    let missing = get(&node.url(&format!("/v1/content/sha256/{}", "0".repeat(64)))).await;
    assert_eq!(missing.status, 404);
    let del = admin_request("DELETE", &url, Bytes::new()).await;
    assert_eq!(del.status, 204);
    assert!(node.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_index_is_rebuilt_at_start() {
    let origin = Origin::start().await;
    let body = random_bytes(200_000, 16);
    origin.put(
        "/i.bin",
        body.clone(),
        Behaviour {
            cache_control: Some("max-age=3600".into()),
            ..Default::default()
        },
    );
    let mut node = Node::start(&origin, "").await;
    assert_eq!(get(&node.url("/o/t/i.bin")).await.body, body);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    node.stop().await;
    std::fs::remove_dir_all(node.data().join("index")).unwrap();
    node.restart().await;
    let g = get(&node.url("/o/t/i.bin")).await;
    assert_eq!(g.body, body);
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/i.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_unknown_length_stream_verify_and_store() {
    let origin = Origin::start().await;
    let body = random_bytes(1 << 20, 18);
    let cc = Some("max-age=600".to_string());
    let chunked = |cc: &Option<String>| Behaviour {
        chunked: true,
        rate: Some(8 << 20),
        cache_control: cc.clone(),
        ..Default::default()
    };
    origin.put("/c.bin", body.clone(), chunked(&cc));
    origin.put("/c2.bin", body.clone(), chunked(&cc));
    origin.put(
        "/cbad.bin",
        body.clone(),
        Behaviour {
            wrong_digest: true,
            ..chunked(&cc)
        },
    );
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/c.bin");
    let (a, b) = tokio::join!(get(&url), get(&url));
    for g in [&a, &b] {
        assert!(!g.aborted);
        assert_eq!(g.body, body);
    }
    assert_eq!(origin.gets("/c.bin"), 1);
    eventually(5, "stored", || node.blobs() == vec![sha256_hex(&body)]).await;
    // `a-b` on an object whose size is not known yet: 206 as the bytes arrive, `a-b/*`.
    let g = request("GET", &node.url("/o/t/c2.bin"), &[("range", "bytes=10-19")]).await;
    assert_eq!(g.status, 206);
    assert_eq!(g.header("content-range"), "bytes 10-19/*");
    assert_eq!(g.body, body.slice(10..20));
    // A corrupt body of unknown length never ends cleanly: its last chunk is withheld.
    let g = get(&node.url("/o/t/cbad.bin")).await;
    assert!(
        g.aborted,
        "a corrupt chunked body looked complete ({} bytes)",
        g.body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_an_unstored_object_goes_upstream_as_a_range() {
    let origin = Origin::start().await;
    let body = random_bytes(2 << 20, 19);
    origin.put(
        "/big.img",
        body.clone(),
        Behaviour {
            etag: Some("\"b\"".into()),
            ..Default::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.store.max_object_size = cistern::config::ByteSize(1 << 20);
    let node = Node::start_with(cfg).await;
    let url = node.url("/o/t/big.img");
    assert_eq!(get(&url).await.body, body);
    assert!(node.blobs().is_empty());
    // A device resuming its download of the over-size image: its own upstream request, Range included.
    let g = request("GET", &url, &[("range", "bytes=2000000-")]).await;
    assert_eq!(g.status, 206);
    assert_eq!(g.body, body.slice(2_000_000..));
    let reqs = origin.requests("/big.img");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].1.get("range").unwrap(), "bytes=2000000-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_transfer_in_flight_finish() {
    let origin = Origin::start().await;
    let body = random_bytes(1 << 20, 20);
    origin.put(
        "/s.bin",
        body.clone(),
        Behaviour {
            rate: Some(2 << 20),
            ..Default::default()
        },
    );
    let mut node = Node::start(&origin, "").await;
    let url = node.url("/o/t/s.bin");
    let client = tokio::spawn(async move { get(&url).await });
    eventually(5, "transfer under way", || {
        origin.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    node.stop().await;
    let g = client.await.unwrap();
    assert!(!g.aborted);
    assert_eq!(g.body, body);
}

/// A transfer whose client left is part of the shutdown drain: the stop waits for it to store what it
/// fetched, within the grace period, instead of leaving it to die with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_transfer_no_client_waits_for() {
    let origin = Origin::start().await;
    let body = random_bytes(1 << 20, 21);
    origin.put(
        "/left.bin",
        body.clone(),
        Behaviour {
            rate: Some(1 << 20),
            ..Default::default()
        },
    );
    let mut node = Node::start(&origin, "").await;
    let url = node.url("/o/t/left.bin");
    let client = tokio::spawn(async move { get(&url).await });
    eventually(5, "transfer under way", || {
        origin.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    client.abort();
    node.stop().await;
    assert!(
        node.blobs().contains(&sha256_hex(&body)),
        "the stop returned before the transfer stored its object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_still_being_sent_is_not_evicted() {
    let origin = Origin::start().await;
    let cc = || Behaviour {
        cache_control: Some("max-age=600".into()),
        ..Default::default()
    };
    let (a, b, c) = (
        random_bytes(16 << 20, 71),
        random_bytes(16 << 20, 72),
        random_bytes(16 << 20, 73),
    );
    origin.put("/a", a.clone(), cc());
    origin.put("/b", b.clone(), cc());
    origin.put("/c", c.clone(), cc());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.store.max_size = cistern::config::ByteSize(33 << 20);
    let node = Node::start_with(cfg).await;
    assert_eq!(get(&node.url("/o/t/a")).await.body, a);
    eventually(5, "a stored", || node.blobs().len() == 1).await;
    assert_eq!(get(&node.url("/o/t/b")).await.body, b);
    eventually(5, "b stored", || node.blobs().len() == 2).await;
    // A slow client starts on `a` (the least recently used) and reads nothing for now.
    let sock = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/o/t/a")
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let slow = tx.send_request(req).await.unwrap();
    assert_eq!(slow.status(), 200);
    // `b` is read after `a`'s headers went out, so `a` is the least recently used object now.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await; // access times are in ms
    assert_eq!(
        get(&node.url("/o/t/b")).await.header("cache-status"),
        "cistern; hit"
    );
    // Room for `c` must come from `b`, not from the object still being sent.
    assert_eq!(get(&node.url("/o/t/c")).await.body, c);
    let (ha, hb, hc) = (sha256_hex(&a), sha256_hex(&b), sha256_hex(&c));
    eventually(5, "c stored", || node.blobs().contains(&hc)).await;
    let blobs = node.blobs();
    assert!(blobs.contains(&ha), "the object being sent was evicted");
    assert!(!blobs.contains(&hb));
    use http_body_util::BodyExt;
    let got = slow.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, a);
}
