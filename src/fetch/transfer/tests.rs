use super::*;

#[test]
fn content_range_continuation() {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_RANGE,
        "bytes 100-199/200".parse().unwrap(),
    );
    assert!(continues(&h, 100, Some(200)));
    assert!(!continues(&h, 50, Some(200)));
    assert!(!continues(&h, 100, Some(300)));
    h.insert(
        http::header::CONTENT_RANGE,
        "bytes 100-199/*".parse().unwrap(),
    );
    assert!(continues(&h, 100, None));
}
