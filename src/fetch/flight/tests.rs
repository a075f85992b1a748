use super::*;

async fn drain(r: &mut FlightReader) -> Result<Vec<u8>, FetchError> {
    let mut out = Vec::new();
    while let Some(c) = r.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// A flight of the 4 bytes `abcd`, all arrived, and a reader that took the 3 it may before the end.
async fn all_but_last_byte_read(storing: bool) -> (Arc<Flight>, FlightReader) {
    let f = Flight::new();
    f.set_head(
        Head {
            size: Some(4),
            storing,
            ..Default::default()
        },
        None,
        None,
    );
    let mut r = f.reader(0, None);
    f.append(vec![Bytes::from_static(b"abcd")]);
    assert_eq!(&r.next().await.unwrap().unwrap()[..], b"abc");
    (f, r)
}

#[tokio::test]
async fn last_byte_is_held_until_complete() {
    let (f, mut r) = all_but_last_byte_read(false).await;
    let pending = tokio::time::timeout(std::time::Duration::from_millis(50), r.next()).await;
    assert!(pending.is_err(), "last byte delivered before the end");
    f.finish(End::Complete(Digest([0; 32])));
    assert_eq!(&r.next().await.unwrap().unwrap()[..], b"d");
    assert!(r.next().await.is_none());
}

/// Clients get the last byte once the digest checks, without waiting for the object's fsync.
#[tokio::test]
async fn verified_bytes_are_released_before_the_flight_ends() {
    let (f, mut r) = all_but_last_byte_read(true).await;
    f.verified(Digest([0; 32]), None);
    assert_eq!(drain(&mut r).await.unwrap(), b"d");
    assert!(
        f.end().is_none(),
        "the flight ended before the object was stored"
    );
    // A client joining now still reads the whole object from the flight.
    assert_eq!(drain(&mut f.reader(0, None)).await.unwrap(), b"abcd");
}

/// Regression: a pass-through transfer used to see no reader (the client attached only once the
/// head was known), drop its first bytes and stop; the client's connection then closed unanswered.
#[tokio::test]
async fn a_reader_attached_at_join_keeps_pass_through_bytes() {
    let f = Flight::new();
    let mut r = f.reader(0, None);
    f.set_head(
        Head {
            size: Some(6),
            storing: false,
            ..Default::default()
        },
        None,
        None,
    );
    f.append(vec![Bytes::from_static(b"abcdef")]);
    assert!(f.wait_for_readers().await, "the transfer saw no reader");
    r.seek(2, Some(5));
    assert_eq!(drain(&mut r).await.unwrap(), b"cde");
}

#[tokio::test]
async fn failure_cuts_readers_off() {
    let f = Flight::new();
    f.set_head(
        Head {
            size: Some(6),
            ..Default::default()
        },
        None,
        None,
    );
    let mut r = f.reader(0, None);
    f.append(vec![Bytes::from_static(b"abcdef")]);
    f.finish(End::Failed(FetchError::DigestMismatch("x".into())));
    let got = drain(&mut r).await;
    assert!(got.is_err());
}

#[tokio::test]
async fn ranges_before_the_end_need_no_verification() {
    let f = Flight::new();
    f.set_head(
        Head {
            size: Some(10),
            ..Default::default()
        },
        None,
        None,
    );
    let mut r = f.reader(2, Some(5));
    f.append(vec![
        Bytes::from_static(b"0123"),
        Bytes::from_static(b"456"),
    ]);
    assert_eq!(drain(&mut r).await.unwrap(), b"234");
}

#[tokio::test]
async fn divergence_cuts_old_readers() {
    let f = Flight::new();
    f.set_head(
        Head {
            size: None,
            ..Default::default()
        },
        None,
        None,
    );
    let mut r = f.reader(0, None);
    f.append(vec![Bytes::from_static(b"aaaa")]);
    assert_eq!(&r.next().await.unwrap().unwrap()[..], b"aaa");
    f.diverge(2, None);
    assert!(matches!(r.next().await, Some(Err(FetchError::Diverged))));
    let mut r2 = f.reader(0, None);
    f.append(vec![Bytes::from_static(b"bb")]);
    f.finish(End::Complete(Digest([0; 32])));
    // The new reader starts behind the window of a pass-through flight: it cannot be served.
    assert!(drain(&mut r2).await.is_err());
}

/// Regression: a fill that ran out of disk went on serving its mapped file, whose hole past the last
/// written byte reads as zeros. Bytes from the failure on come from memory.
#[tokio::test]
async fn bytes_past_a_failed_write_never_come_from_the_file() {
    let f = Flight::new();
    // The "file": the first two bytes written, then a hole.
    let map = Bytes::from(vec![b'a', b'b', 0, 0, 0, 0]);
    f.set_head(
        Head {
            size: Some(6),
            storing: true,
            ..Default::default()
        },
        None,
        Some(map),
    );
    let mut r = f.reader(0, None);
    f.append(vec![Bytes::from_static(b"ab")]);
    f.stop_storing(2);
    f.append(vec![Bytes::from_static(b"cdef")]);
    f.finish(End::Complete(Digest([0; 32])));
    assert_eq!(drain(&mut r).await.unwrap(), b"abcdef");
}

/// A client that joins while the object is being stored is served from the flight only when the
/// response's freshness allows it at the client's time and under its request's directives (the one
/// reuse rule), not by the head's freshness when it arrived.
#[tokio::test]
async fn joining_while_storing_follows_the_reuse_rule() {
    let (f, _r) = all_but_last_byte_read(true).await;
    let meta = |age_s: u64| KeyMeta {
        fetched_at: now_ms().saturating_sub(age_s * 1000),
        fresh_for: Some(60),
        ..KeyMeta::immutable()
    };
    let cc = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::CACHE_CONTROL, v.parse().unwrap());
        h
    };
    f.verified(Digest([0; 32]), Some(meta(0)));
    assert_eq!(f.joinable(&http::HeaderMap::new()), Some(Joined::Verified));
    assert_eq!(
        f.joinable(&cc("max-age=0")),
        None,
        "max-age=0 was served a hit"
    );
    assert_eq!(f.joinable(&cc("no-cache")), None);
    // The download took longer than the response's lifetime: stale by now, though fresh at its head.
    f.verified(Digest([0; 32]), Some(meta(90)));
    assert_eq!(
        f.joinable(&http::HeaderMap::new()),
        None,
        "a stale response was served as a hit"
    );
}
