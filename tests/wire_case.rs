//! Header names on the wire (SPEC 3): in their canonical case, read from the raw bytes a node sends.
//! Title case for most (`Content-Length`, `Content-Range`, `Cache-Status`), and the names whose
//! canonical spelling is not their title case spelled right (`ETag`, `WWW-Authenticate`): the
//! Delivery Optimization agent looks names up by exact case.

mod common;

use common::*;

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

/// Every line of `want` is in `head` exactly (after a CRLF, so at a line start); no line of
/// `wrong` is.
fn assert_lines(head: &str, want: &[&str], wrong: &[&str]) {
    for w in want {
        assert!(head.contains(&format!("\r\n{w}")), "{w:?} not in {head:?}");
    }
    for w in wrong {
        assert!(!head.contains(&format!("\r\n{w}")), "{w:?} in {head:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_and_a_range_carry_their_names_in_canonical_case() {
    let origin = Origin::start().await;
    let body = random_bytes(50_000, 7);
    let b = Behaviour {
        etag: Some("\"v1\"".into()),
        cache_control: Some("max-age=600".into()),
        ..Default::default()
    };
    origin.put("/fw.bin", body.clone(), b);
    let node = Node::start(&origin, "").await;

    let (head, got) = raw_response(node.addr, &get("/o/t/fw.bin", "")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(got, body);
    eventually(10, "the object is stored", || node.blobs().len() == 1).await;

    let (head, got) = raw_response(node.addr, &get("/o/t/fw.bin", "")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(got, body);
    assert_lines(
        &head,
        &[
            "ETag: \"v1\"\r\n",
            "Content-Length: 50000\r\n",
            "Accept-Ranges: bytes\r\n",
            "Cache-Status: cistern; hit\r\n",
            "Repr-Digest: sha-256=:",
            "Content-Type: ",
        ],
        &["Etag:", "etag:", "content-length:"],
    );

    let (head, got) = raw_response(node.addr, &get("/o/t/fw.bin", "Range: bytes=10-19\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert_eq!(got, &body[10..20]);
    assert_lines(
        &head,
        &[
            "Content-Range: bytes 10-19/50000\r\n",
            "Content-Length: 10\r\n",
            "ETag: \"v1\"\r\n",
            "Cache-Status: ",
        ],
        &["Etag:"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_refusal_challenges_in_canonical_case() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.admin_token = "t0ken".into();
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);

    let (head, _) = raw_response(node.addr, &get("/v1/admin/content", "")).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_lines(
        &head,
        &[
            "WWW-Authenticate: Bearer\r\n",
            "Content-Length: ",
            "Content-Type: ",
        ],
        &["Www-Authenticate:", "www-authenticate:"],
    );
}
