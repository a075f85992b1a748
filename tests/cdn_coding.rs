//! `CDN-Cache-Control` (RFC 9213) in charge of this node's storage and freshness when valid, passed on
//! unchanged; responses in a content coding stored and answered as they came (SPEC 4, "Freshness").

mod common;

use common::*;

fn with_fields(cc: Option<&str>, fields: &[(&'static str, &str)]) -> Behaviour {
    Behaviour {
        cache_control: cc.map(str::to_string),
        headers: fields.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        ..Default::default()
    }
}

/// Asks twice; the number of upstream GETs says whether the first answer was stored and reused.
async fn upstream_gets_for_two(origin: &Origin, node: &Node, path: &str) -> (usize, Got) {
    let url = node.url(&format!("/o/t{path}"));
    let first = get(&url).await;
    assert_eq!(first.status, 200);
    let second = get(&url).await;
    assert_eq!(second.status, 200);
    (origin.gets(path), second)
}

#[tokio::test]
async fn cdn_cache_control_wins_over_cache_control_and_is_passed_on() {
    let origin = Origin::start().await;
    let body = random_bytes(10_000, 1);
    let cases = [
        // (path, Cache-Control, CDN-Cache-Control, upstream GETs for two requests)
        ("/fresh-cdn.bin", Some("no-store"), "max-age=3600", 1),
        ("/nostore-cdn.bin", Some("max-age=3600"), "no-store", 2),
        ("/private-cdn.bin", Some("max-age=3600"), "private", 2),
        ("/zero-cdn.bin", Some("max-age=3600"), "max-age=0", 2),
        // Invalid Structured Fields: ignored, Cache-Control decides.
        ("/wrongtype.bin", Some("no-store"), "max-age=\"3600\"", 2),
        ("/garbage.bin", Some("no-store"), "max-age=3600, &&&", 2),
        ("/ignored.bin", Some("max-age=3600"), "max-age= 5", 1),
    ];
    for (path, cc, cdn, _) in &cases {
        origin.put(
            path,
            body.clone(),
            with_fields(*cc, &[("cdn-cache-control", cdn)]),
        );
    }
    let node = Node::start(&origin, "").await;
    for (path, _, cdn, gets) in cases {
        let (n, second) = upstream_gets_for_two(&origin, &node, path).await;
        assert_eq!(n, gets, "{path} (CDN-Cache-Control: {cdn})");
        assert_eq!(second.header("cdn-cache-control"), cdn, "{path}");
        assert!(second.body == body);
    }
}

#[tokio::test]
async fn cdn_max_age_replaces_expires() {
    let origin = Origin::start().await;
    let past = httpdate::fmt_http_date(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    );
    origin.put(
        "/exp.bin",
        random_bytes(1000, 2),
        with_fields(
            None,
            &[("cdn-cache-control", "max-age=3600"), ("expires", &past)],
        ),
    );
    let node = Node::start(&origin, "").await;
    let (n, second) = upstream_gets_for_two(&origin, &node, "/exp.bin").await;
    assert_eq!(n, 1);
    assert_eq!(second.header("expires"), past);
}

#[tokio::test]
async fn a_coded_response_is_stored_and_answered_as_it_came() {
    let origin = Origin::start().await;
    // Not real gzip: cistern neither decodes nor checks the coding, it keeps the bytes.
    let coded = random_bytes(50_000, 3);
    let b = Behaviour {
        right_digest: true,
        ..with_fields(
            Some("max-age=3600"),
            &[("content-encoding", "gzip"), ("vary", "accept-encoding")],
        )
    };
    origin.put("/coded.bin", coded.clone(), b);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/coded.bin");
    let gz = [("accept-encoding", "gzip")];
    let first = request("GET", &url, &gz).await;
    assert_eq!(first.status, 200);
    assert!(first.body == coded);
    eventually(10, "the coded object stored", || node.blobs().len() == 1).await;
    assert_eq!(node.blobs()[0], sha256_hex(&coded));
    let second = request("GET", &url, &gz).await;
    assert!(
        second.header("cache-status").contains("hit"),
        "{:?}",
        second.headers
    );
    assert_eq!(second.header("content-encoding"), "gzip");
    assert!(second.body == coded);
    // A range is of the coded bytes.
    let part = request("GET", &url, &[gz[0], ("range", "bytes=10-19")]).await;
    assert_eq!(part.status, 206);
    assert!(part.body == coded.slice(10..20));
    assert_eq!(origin.gets("/coded.bin"), 1);
    // Vary: Accept-Encoding still selects: another value is another variant, fetched on its own.
    let other = request("GET", &url, &[("accept-encoding", "br")]).await;
    assert_eq!(other.status, 200);
    assert!(!other.header("cache-status").contains("hit"));
    assert_eq!(origin.gets("/coded.bin"), 2);
}
