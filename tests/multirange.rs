//! Requests for several ranges at once (SPEC 4 "Ranges", RFC 9110 §14.6), as delta downloaders send
//! them: answered 206 `multipart/byteranges` from a stored object, from a fill in flight and from a
//! cold key (which starts the whole object's fill), through a chain of two nodes, with the merging of
//! near ranges, the bounds against abuse (`server.max_ranges`, twice the object) and `If-Range`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

const SIZE: usize = 1 << 20;

/// One part of a multipart/byteranges body: its Content-Range and its bytes.
#[derive(Debug)]
struct Part {
    range: String,
    content_type: String,
    body: Bytes,
}

/// Splits a multipart/byteranges answer into its parts, checking its framing on the way.
fn parts(got: &Got) -> Vec<Part> {
    let ct = got.header("content-type");
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart: {ct:?}"));
    assert_eq!(
        got.header("content-length"),
        got.body.len().to_string(),
        "Content-Length is not the length sent"
    );
    let delim = format!("\r\n--{boundary}");
    let body = &got.body[..];
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        assert_eq!(&body[at..at + delim.len()], delim.as_bytes(), "at {at}");
        at += delim.len();
        if &body[at..] == b"--\r\n" {
            return out;
        }
        let head_end = find(&body[at..], b"\r\n\r\n").expect("a part head") + at;
        let head = std::str::from_utf8(&body[at + 2..head_end]).unwrap();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("no {name} in {head:?}"))
                .to_string()
        };
        let range = field("Content-Range");
        let (first, last) = range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
            .unwrap();
        let start = head_end + 4;
        let end = start + (last - first + 1);
        out.push(Part {
            range: range.clone(),
            content_type: field("Content-Type"),
            body: got.body.slice(start..end),
        });
        at = end;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks that `got` holds exactly these parts ([first, last] inclusive) of `object`, in this order.
fn assert_parts(got: &Got, object: &Bytes, want: &[(usize, usize)]) {
    assert_eq!(got.status, 206, "{:?}", got.headers);
    let ps = parts(got);
    let asked: Vec<String> = ps.iter().map(|p| p.range.clone()).collect();
    let expected: Vec<String> = want
        .iter()
        .map(|(a, b)| format!("bytes {a}-{b}/{}", object.len()))
        .collect();
    assert_eq!(asked, expected);
    for (p, (a, b)) in ps.iter().zip(want) {
        assert!(
            p.body == object.slice(*a..b + 1),
            "wrong bytes in {}",
            p.range
        );
        assert_eq!(p.content_type, "application/x-test");
    }
}

fn behaviour() -> Behaviour {
    Behaviour {
        cache_control: Some("max-age=3600".into()),
        etag: Some("\"v1\"".into()),
        headers: vec![("content-type", "application/x-test".into())],
        ..Default::default()
    }
}

/// Upstream requests for `path` that asked for a range.
fn ranged_requests(origin: &Origin, path: &str) -> usize {
    origin
        .requests(path)
        .iter()
        .filter(|(_, h)| h.contains_key("range"))
        .count()
}

#[tokio::test]
async fn a_stored_object_answers_several_ranges_in_the_order_asked() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 1);
    origin.put("/o.bin", body.clone(), behaviour());
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/o.bin");
    assert_eq!(get(&url).await.status, 200);
    eventually(10, "the object stored", || node.blobs().len() == 1).await;

    let range = "bytes=500000-500099, 0-99, -10";
    let got = request("GET", &url, &[("range", range)]).await;
    assert_parts(
        &got,
        &body,
        &[(500000, 500099), (0, 99), (SIZE - 10, SIZE - 1)],
    );
    assert!(
        got.header("cache-status").contains("hit"),
        "{:?}",
        got.headers
    );
    // A HEAD announces the same length without a body.
    let head = request("HEAD", &url, &[("range", range)]).await;
    assert_eq!(head.status, 206);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), got.body.len().to_string());
    // Unsatisfiable members are left out; a set with none satisfiable gets 416.
    let got = request("GET", &url, &[("range", "bytes=0-9,9999999-,100-109")]).await;
    assert_parts(&got, &body, &[(0, 9), (100, 109)]);
    let got = request("GET", &url, &[("range", "bytes=9999999-,99999999-")]).await;
    assert_eq!(got.status, 416);
    assert_eq!(got.header("content-range"), format!("bytes */{SIZE}"));
    assert_eq!(origin.gets("/o.bin"), 1);
}

#[tokio::test]
async fn overlapping_and_near_ranges_are_merged() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 2);
    origin.put("/m.bin", body.clone(), behaviour());
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/m.bin");
    assert_eq!(get(&url).await.status, 200);

    // Overlapping (0-99, 50-149), within 80 bytes (149 -> 200), apart (9000-9099).
    let got = request(
        "GET",
        &url,
        &[("range", "bytes=0-99,50-149,200-299,9000-9099")],
    )
    .await;
    assert_parts(&got, &body, &[(0, 299), (9000, 9099)]);
    // Merged into one: a plain 206.
    let got = request("GET", &url, &[("range", "bytes=1000-1099,1100-1199")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(
        got.header("content-range"),
        format!("bytes 1000-1199/{SIZE}")
    );
    assert!(got.body == body.slice(1000..1200));
}

#[tokio::test]
async fn too_many_ranges_or_too_much_of_the_object_get_the_whole_body() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 3);
    origin.put("/a.bin", body.clone(), behaviour());
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/a.bin");
    assert_eq!(get(&url).await.status, 200);

    let set = |n: usize| {
        let specs: Vec<String> = (0..n)
            .map(|i| format!("{}-{}", i * 1000, i * 1000 + 9))
            .collect();
        format!("bytes={}", specs.join(","))
    };
    // 200 ranges (the default max_ranges): 206 with 200 parts.
    let got = request("GET", &url, &[("range", &set(200))]).await;
    assert_eq!(got.status, 206);
    assert_eq!(parts(&got).len(), 200);
    // 201: the whole body.
    let got = request("GET", &url, &[("range", &set(201))]).await;
    assert_eq!(got.status, 200, "{:?}", got.headers);
    assert!(got.body == body);
    // Three times the object: the whole body.
    let got = request("GET", &url, &[("range", "bytes=0-,1-,2-")]).await;
    assert_eq!(got.status, 200, "{:?}", got.headers);
    assert!(got.body == body);
}

#[tokio::test]
async fn max_ranges_is_configurable() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 4);
    origin.put("/c.bin", body.clone(), behaviour());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.max_ranges = 2;
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    let url = node.url("/o/t/c.bin");
    let got = request("GET", &url, &[("range", "bytes=0-9,1000-1009")]).await;
    assert_parts(&got, &body, &[(0, 9), (1000, 1009)]);
    let got = request("GET", &url, &[("range", "bytes=0-9,1000-1009,2000-2009")]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn if_range_decides_between_the_parts_and_the_whole_body() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 5);
    origin.put("/i.bin", body.clone(), behaviour());
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/i.bin");
    let first = get(&url).await;
    let digest_etag = format!("\"{}\"", sha256_hex(&body));
    let range = ("range", "bytes=0-9,2000-2009");
    for ok in ["\"v1\"", digest_etag.as_str()] {
        let got = request("GET", &url, &[range, ("if-range", ok)]).await;
        assert_parts(&got, &body, &[(0, 9), (2000, 2009)]);
    }
    for stale in ["\"v0\"", "W/\"v1\""] {
        let got = request("GET", &url, &[range, ("if-range", stale)]).await;
        assert_eq!(got.status, 200, "If-Range {stale}");
        assert!(got.body == body);
    }
    assert_eq!(first.status, 200);
}

#[tokio::test]
async fn a_cold_request_for_several_ranges_starts_the_whole_fill() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 6);
    origin.put("/cold.bin", body.clone(), behaviour());
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/cold.bin");
    let got = request("GET", &url, &[("range", "bytes=100-199,700000-700099")]).await;
    assert_parts(&got, &body, &[(100, 199), (700000, 700099)]);
    eventually(10, "the object stored", || node.blobs().len() == 1).await;
    assert_eq!(origin.gets("/cold.bin"), 1);
    assert_eq!(ranged_requests(&origin, "/cold.bin"), 0);
    let again = request("GET", &url, &[("range", "bytes=0-0,500-500")]).await;
    assert_parts(&again, &body, &[(0, 0), (500, 500)]);
    assert!(again.header("cache-status").contains("hit"));
    assert_eq!(origin.gets("/cold.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_of_a_fill_in_flight_are_sent_as_their_bytes_arrive() {
    let origin = Origin::start().await;
    let size = 4 << 20;
    let body = random_bytes(size, 7);
    let b = Behaviour {
        rate: Some(1 << 20),
        ..behaviour()
    };
    origin.put("/slow.bin", body.clone(), b);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/slow.bin");
    let started = Instant::now();
    let whole = {
        let url = url.clone();
        tokio::spawn(async move { get(&url).await })
    };
    eventually(10, "the fill started", || origin.gets("/slow.bin") == 1).await;

    // The first part is near the start: it arrives long before the fill's end (about 4 s).
    let uri: http::Uri = url.parse().unwrap();
    let mut sender = connect_to::<Full<Bytes>>(&uri).await;
    let req = http::Request::get(uri.path())
        .header("host", uri.authority().unwrap().as_str())
        .header("range", "bytes=0-99,1500000-1500099,4194000-4194303")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 206);
    let (parts_head, mut stream) = resp.into_parts();
    let mut received = Vec::new();
    let mut first_part_at = None;
    while let Some(f) = stream.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            received.extend_from_slice(&d);
        }
        if first_part_at.is_none()
            && find(&received, b"\r\n\r\n").is_some_and(|at| received.len() >= at + 4 + 100)
        {
            first_part_at = Some(started.elapsed());
        }
    }
    let first_part_at = first_part_at.expect("the first part");
    let all_at = started.elapsed();
    assert!(
        first_part_at < Duration::from_millis(2500) && all_at > Duration::from_millis(3000),
        "first part at {first_part_at:?}, all at {all_at:?}"
    );
    let got = Got {
        status: parts_head.status,
        headers: parts_head.headers,
        body: Bytes::from(received),
        aborted: false,
    };
    assert_parts(
        &got,
        &body,
        &[(0, 99), (1500000, 1500099), (4194000, 4194303)],
    );
    let whole = whole.await.unwrap();
    assert!(whole.body == body);
    assert_eq!(origin.gets("/slow.bin"), 1);
    assert_eq!(ranged_requests(&origin, "/slow.bin"), 0);
}

#[tokio::test]
async fn a_child_fills_whole_from_its_parent_and_answers_the_parts_itself() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 8);
    origin.put("/chain.bin", body.clone(), behaviour());
    let (top, child) = top_and_child(&origin, "TOP").await;
    let url = child.url("/o/t/chain.bin");
    let range = ("range", "bytes=10-19,600000-600009,-5");
    let got = request("GET", &url, &[range]).await;
    assert_parts(
        &got,
        &body,
        &[(10, 19), (600000, 600009), (SIZE - 5, SIZE - 1)],
    );
    eventually(10, "both nodes stored it", || {
        top.blobs().len() == 1 && child.blobs().len() == 1
    })
    .await;
    assert_eq!(origin.gets("/chain.bin"), 1);
    assert_eq!(ranged_requests(&origin, "/chain.bin"), 0);
    // Warm: the child answers from its store.
    let again = request("GET", &url, &[range]).await;
    assert_parts(
        &again,
        &body,
        &[(10, 19), (600000, 600009), (SIZE - 5, SIZE - 1)],
    );
    let cs = again.header("cache-status");
    assert!(cs.ends_with("cistern; hit"), "{cs}");
    assert_eq!(origin.gets("/chain.bin"), 1);
}
