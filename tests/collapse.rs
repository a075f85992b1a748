//! Where Vary, revalidation and invalidation meet the one-fetch-per-object table (SPEC 4 "One fetch
//! per object": a client joins only a transfer whose answer it may use), over real sockets: a client of
//! another variant never joins a revalidation, a burst for a second variant makes one fill of it, a
//! HEAD of a variant not stored starts no download, and a fill running while an unsafe method changes
//! its URL stores nothing under the URL.

mod common;

use std::time::Duration;

use common::*;

fn lang(l: &str) -> [(&'static str, String); 1] {
    [("accept-language", l.to_string())]
}

async fn get_lang(node: &Node, path: &str, l: &str) -> Got {
    let h = lang(l);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    request("GET", &node.url(path), &h).await
}

fn varying(cc: &str) -> Behaviour {
    Behaviour {
        vary_body: Some("accept-language"),
        etag: Some("\"e1\"".into()),
        cache_control: Some(cc.into()),
        ..Default::default()
    }
}

fn with_body(body: &[u8], l: &str) -> Vec<u8> {
    [body, l.as_bytes()].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_variant_never_joins_a_revalidation() {
    let origin = Origin::start().await;
    let body = random_bytes(20_000, 1);
    origin.put("/v", body.clone(), varying("max-age=1"));
    let node = Node::start(&origin, "").await;
    assert_eq!(get_lang(&node, "/o/t/v", "en").await.status, 200);
    eventually(5, "en stored", || node.blobs().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The origin now takes 1.5 s to answer: `en`'s revalidation is in flight when `de` asks.
    let slow = Behaviour {
        head_delay: Some(Duration::from_millis(1500)),
        ..varying("max-age=1")
    };
    origin.put("/v", body.clone(), slow);
    let n = node.url("/o/t/v");
    let a = tokio::spawn(async move { request("GET", &n, &[("accept-language", "en")]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = get_lang(&node, "/o/t/v", "de").await;
    assert_eq!(b.status, 200, "{:?}", String::from_utf8_lossy(&b.body));
    assert!(b.body == with_body(&body, "de"), "de got other bytes");
    let a = a.await.unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body == with_body(&body, "en"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_a_second_variant_makes_one_fill_of_it() {
    let origin = Origin::start().await;
    let body = random_bytes(50_000, 2);
    let slow = Behaviour {
        head_delay: Some(Duration::from_millis(800)),
        ..varying("max-age=3600")
    };
    origin.put("/b", body.clone(), slow);
    let node = Node::start(&origin, "").await;
    let n = node.url("/o/t/b");
    let en = tokio::spawn(async move { request("GET", &n, &[("accept-language", "en")]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut des = Vec::new();
    for _ in 0..6 {
        let n = node.url("/o/t/b");
        des.push(tokio::spawn(async move {
            request("GET", &n, &[("accept-language", "de")]).await
        }));
    }
    for d in des {
        let g = d.await.unwrap();
        assert_eq!(g.status, 200);
        assert!(
            g.body == with_body(&body, "de"),
            "a de client got other bytes"
        );
    }
    assert!(en.await.unwrap().body == with_body(&body, "en"));
    assert_eq!(origin.gets("/b"), 2, "one fill per variant");
    let again = get_lang(&node, "/o/t/b", "de").await;
    assert_eq!(
        again.header("cache-status"),
        "cistern; hit",
        "de was not stored"
    );
    assert_eq!(origin.gets("/b"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_of_a_variant_not_stored_goes_upstream_as_a_head() {
    let origin = Origin::start().await;
    origin.put("/h", random_bytes(30_000, 3), varying("max-age=3600"));
    let node = Node::start(&origin, "").await;
    assert_eq!(get_lang(&node, "/o/t/h", "en").await.status, 200);
    eventually(5, "en stored", || node.blobs().len() == 1).await;
    let g = request("HEAD", &node.url("/o/t/h"), &[("accept-language", "de")]).await;
    assert_eq!(g.status, 200);
    assert_eq!(origin.log_methods("/h"), ["GET", "HEAD"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.blobs().len(), 1, "the de body was fetched and stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_running_during_a_put_stores_nothing_under_the_url() {
    let origin = Origin::start().await;
    let old = random_bytes(300_000, 4);
    let new = random_bytes(300_000, 5);
    let slow = |rate| Behaviour {
        rate: Some(rate),
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/doc", old.clone(), slow(150_000));
    let node = Node::start(&origin, "").await;
    let n = node.url("/o/t/doc");
    let first = tokio::spawn(async move { get(&n).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The document is replaced (a PUT through the gateway) while the old fill runs on.
    origin.put("/doc", new.clone(), slow(10_000_000));
    let put = request_body(
        "PUT",
        &node.url("/o/t/doc"),
        &[("content-type", "application/octet-stream")],
        new.clone(),
    )
    .await;
    assert_eq!(put.status, 200);
    let after = get(&node.url("/o/t/doc")).await;
    assert!(after.body == new, "a GET after the PUT got the old content");
    assert!(
        first.await.unwrap().body == old,
        "the first client's download changed"
    );
    for _ in 0..2 {
        let g = get(&node.url("/o/t/doc")).await;
        assert!(
            g.body == new,
            "the old content came back ({})",
            g.header("cache-status")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_still_hit_once_the_newest_variant_is_purged() {
    let origin = Origin::start().await;
    let body = random_bytes(20_000, 6);
    origin.put("/p", body.clone(), varying("max-age=3600"));
    let node = Node::start(&origin, "").await;
    get_lang(&node, "/o/t/p", "en").await;
    eventually(5, "en stored", || node.blobs().len() == 1).await;
    get_lang(&node, "/o/t/p", "de").await;
    eventually(5, "de stored", || node.blobs().len() == 2).await;
    let de = sha256_hex(&with_body(&body, "de"));
    let purge = node.url(&format!("/v1/admin/content/sha256/{de}"));
    // The blob file appears a moment before its commit ends: the purge may say 404 until then.
    let mut status = 0;
    for _ in 0..100 {
        status = admin_request("DELETE", &purge, Default::default())
            .await
            .status
            .as_u16();
        if status == 204 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 204);
    let g = get_lang(&node, "/o/t/p", "en").await;
    assert_eq!(
        g.header("cache-status"),
        "cistern; hit",
        "en was no longer found"
    );
    assert!(g.body == with_body(&body, "en"));
    assert_eq!(origin.gets("/p"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revalidation_that_ends_after_an_invalidation_keeps_its_header_block() {
    let origin = Origin::start().await;
    let body = random_bytes(20_000, 7);
    let b = Behaviour {
        etag: Some("\"r1\"".into()),
        cache_control: Some("max-age=1".into()),
        headers: vec![("x-fw-channel", "stable".into())],
        ..Default::default()
    };
    origin.put("/r", body.clone(), b.clone());
    // A POST answered with a redirect to /r invalidates what is stored for /r (RFC 9111 §4.4).
    let moved = Behaviour {
        status: Some(303),
        location: Some("/r".into()),
        ..Default::default()
    };
    origin.put("/post", Default::default(), moved);
    let node = Node::start(&origin, "").await;
    assert_eq!(get(&node.url("/o/t/r")).await.status, 200);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let slow = Behaviour {
        head_delay: Some(Duration::from_millis(1000)),
        ..b
    };
    origin.put("/r", body.clone(), slow);
    let n = node.url("/o/t/r");
    let reval = tokio::spawn(async move { get(&n).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let post = request_body("POST", &node.url("/o/t/post"), &[], "x".into()).await;
    assert_eq!(post.status, 303);
    let g = reval.await.unwrap();
    assert_eq!(g.status, 200);
    assert!(g.body == body);
    assert_eq!(
        g.header("x-fw-channel"),
        "stable",
        "served without its header block"
    );
    assert_eq!(g.header("etag"), "\"r1\"");
}

/// A SAS URL whose token expired: the origin refuses it, and accepts the same blob with a valid one.
async fn sas_origin() -> std::net::SocketAddr {
    raw_origin(|mut s, head| async move {
        use tokio::io::AsyncWriteExt;
        let line = head.lines().next().unwrap_or("").to_string();
        let resp = if line.contains("sig=EXPIRED") {
            tokio::time::sleep(Duration::from_millis(600)).await;
            "HTTP/1.1 403 Forbidden\r\ncontent-length: 14\r\nconnection: close\r\n\r\ntoken expired.".to_string()
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\ncache-control: max-age=3600\r\n\
             connection: close\r\n\r\nfirmware"
                .to_string()
        };
        let _ = s.write_all(resp.as_bytes()).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_does_not_decide_for_a_client_with_a_valid_one() {
    let addr = sas_origin().await;
    let (node, _good) = node_for(addr).await;
    let url = |sig: &str| format!("http://{addr}/c/fw.bin?sv=1&sig={sig}");
    let (gw, expired) = (node.addr, url("EXPIRED"));
    let first = tokio::spawn(async move { proxy_get(gw, &expired, &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = proxy_get(node.addr, &url("VALID"), &[]).await;
    assert_eq!(first.await.unwrap().status, 403);
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body.as_ref(), b"firmware");
}
