//! A range far ahead of a fill in flight is answered from an upstream Range request of its own while
//! the fill goes on; a range the fill will soon reach is served from the fill (SPEC 4, "Resume").

mod common;

use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_far_ahead_of_a_fill_goes_upstream_while_the_fill_goes_on() {
    let origin = Origin::start().await;
    let body = random_bytes(SIZE, 77);
    let b = Behaviour {
        rate: Some(1 << 20),
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/big.img", body.clone(), b);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/big.img");
    let a = {
        let url = url.clone();
        tokio::spawn(async move { get(&url).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Far ahead: about 14 s of the fill away. First bytes (here, all of them) within a second.
    let asked = Instant::now();
    let far = request("GET", &url, &[("range", "bytes=15000000-15099999")]).await;
    let took = asked.elapsed();
    assert_eq!(far.status, 206, "{:?}", far.headers);
    assert!(took < Duration::from_secs(1), "the far range took {took:?}");
    assert_eq!(
        far.header("content-range"),
        format!("bytes 15000000-15099999/{SIZE}")
    );
    assert!(
        far.body == body.slice(15_000_000..15_100_000),
        "wrong bytes"
    );
    assert!(
        far.header("cache-status").contains("fwd=bypass"),
        "{:?}",
        far.headers
    );

    // Just ahead: the fill reaches it within 2 s; it is served from the fill, not from upstream.
    let near = request("GET", &url, &[("range", "bytes=1500000-1599999")]).await;
    assert_eq!(near.status, 206, "{:?}", near.headers);
    assert!(near.body == body.slice(1_500_000..1_600_000), "wrong bytes");
    let cs = near.header("cache-status");
    assert!(!cs.contains("fwd=bypass"), "{cs}");

    // The fill went on: the first client's download completes and the object is stored.
    let a = a.await.unwrap();
    assert_eq!(a.status, 200);
    assert!(
        !a.aborted && a.body == body,
        "the fill's client got a broken body"
    );
    eventually(10, "the object stored", || node.blobs().len() == 1).await;
    let ranges: Vec<String> = origin
        .requests("/big.img")
        .iter()
        .filter_map(|(_, h)| h.get("range").map(|v| v.to_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(ranges, vec!["bytes=15000000-15099999".to_string()]);
    let again = get(&url).await;
    assert!(
        again.header("cache-status").contains("hit"),
        "{:?}",
        again.headers
    );
}
