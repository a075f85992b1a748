use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

const A: &str = "http://a.test:8080/";
const B: &str = "http://b.test:8080/";

/// A director over parents a and b whose clock the test moves on (seconds after its start).
fn director(allow_direct: bool) -> (Director, Arc<AtomicU64>) {
    let secs = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let s = secs.clone();
    let clock: Clock = Arc::new(move || start + Duration::from_secs(s.load(Ordering::Relaxed)));
    let parents = [A.to_string(), B.to_string()];
    let d = Director::with_clock(&parents, allow_direct, clock).unwrap();
    (d, secs)
}

fn parent(u: &str) -> Hop {
    Hop::Parent(u.parse().unwrap())
}

const OBJECT: Ask = Ask::Object {
    origin: true,
    peer: None,
};

#[test]
fn hops_are_the_healthy_parents_in_order_then_the_origin_when_allowed() {
    let (d, _) = director(false);
    assert_eq!(d.hops(OBJECT), vec![parent(A), parent(B)]);
    assert_eq!(d.hops(Ask::Status), vec![parent(A), parent(B)]);
    let (d, _) = director(true);
    assert_eq!(d.hops(OBJECT), vec![parent(A), parent(B), Hop::Origin]);
    // No origin URL (content by digest), or status reports: never the origin.
    let by_digest = Ask::Object {
        origin: false,
        peer: None,
    };
    assert_eq!(d.hops(by_digest), vec![parent(A), parent(B)]);
    assert_eq!(d.hops(Ask::Status), vec![parent(A), parent(B)]);
    d.record(&parent(A), Outcome::Failed("refused".into()));
    assert_eq!(d.hops(OBJECT), vec![parent(B), Hop::Origin]);
    // Every parent skipped: all are asked anyway, in order.
    d.record(&parent(B), Outcome::Failed("refused".into()));
    assert_eq!(d.hops(OBJECT), vec![parent(A), parent(B), Hop::Origin]);
    // Without parents: the origin, when there is an origin URL.
    let top = Director::new(&[], false).unwrap();
    assert_eq!(top.hops(OBJECT), vec![Hop::Origin]);
    assert!(top.hops(by_digest).is_empty());
    assert!(top.hops(Ask::Status).is_empty());
}

#[test]
fn a_503_skips_a_parent_a_502_or_504_does_not_any_other_answer_brings_it_back() {
    let (d, _) = director(false);
    for s in [502, 504] {
        d.record(
            &parent(A),
            Outcome::Answered(StatusCode::from_u16(s).unwrap()),
        );
        assert_eq!(d.hops(OBJECT)[0], parent(A), "{s} marked the parent down");
    }
    d.record(
        &parent(A),
        Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE),
    );
    assert_eq!(d.hops(OBJECT), vec![parent(B)]);
    let h = d.health();
    assert!(!h[0].healthy && h[1].healthy);
    assert_eq!(
        h[0].last_error.as_deref(),
        Some("answered 503 Service Unavailable")
    );
    d.record(&parent(A), Outcome::Answered(StatusCode::NOT_FOUND));
    assert_eq!(d.hops(OBJECT), vec![parent(A), parent(B)]);
    assert_eq!(d.health()[0].seconds_since_ok, Some(0));
    // The origin and unknown parents have no health: recording them changes nothing.
    d.record(&Hop::Origin, Outcome::Failed("x".into()));
    d.record(&parent("http://c.test/"), Outcome::Failed("x".into()));
    assert!(d.health().iter().all(|h| h.healthy));
}

#[test]
fn a_skipped_parent_comes_back_after_30_s() {
    let (d, secs) = director(false);
    d.record(&parent(A), Outcome::Failed("timed out".into()));
    secs.store(29, Ordering::Relaxed);
    assert_eq!(d.hops(Ask::Status), vec![parent(B)]);
    assert!(!d.health()[0].healthy);
    secs.store(30, Ordering::Relaxed);
    assert_eq!(d.hops(Ask::Status), vec![parent(A), parent(B)]);
    assert!(d.health()[0].healthy);
}

#[test]
fn members_are_urls_not_positions() {
    let parents = [B.to_string(), A.to_string(), B.to_string()];
    let d = Director::new(&parents, false).unwrap();
    assert_eq!(d.hops(Ask::Status), vec![parent(B), parent(A)]);
    d.record(&parent(A), Outcome::Failed("refused".into()));
    assert_eq!(d.hops(Ask::Status), vec![parent(B)]);
    assert!(Director::new(&["not a url".to_string()], false).is_err());
}

#[test]
fn the_owner_among_the_peers_comes_first_unless_the_request_came_from_a_peer() {
    use super::super::peers::{Peers, SelfRule};
    let members = [
        "http://10.0.0.1:8080".to_string(),
        "http://10.0.0.2:8080".to_string(),
    ];
    let me = SelfRule {
        listen: vec!["10.0.0.1:8080".parse().unwrap()],
        ..SelfRule::default()
    };
    let peers = Peers::new(&members, me, Arc::new(Instant::now)).unwrap();
    let (d, _) = director(false);
    let d = d.with_peers(Arc::new(peers));
    let names = ["http://10.0.0.1:8080/", "http://10.0.0.2:8080/"];
    let theirs = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| super::super::rendezvous::owner(&names, k) == Some(names[1]))
        .unwrap();
    let ours = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| super::super::rendezvous::owner(&names, k) == Some(names[0]))
        .unwrap();
    let ask = |k: Option<&str>| {
        d.hops(Ask::Object {
            origin: true,
            peer: k,
        })
    };
    let peer = Hop::Peer(members[1].parse().unwrap());
    assert_eq!(ask(Some(&theirs)), vec![peer.clone(), parent(A), parent(B)]);
    assert_eq!(ask(Some(&ours)), vec![parent(A), parent(B)]);
    // From a peer (no key given): never another peer.
    assert_eq!(ask(None), vec![parent(A), parent(B)]);
    // A peer that failed is skipped, as a parent is.
    d.record(&peer, Outcome::Failed("refused".into()));
    assert_eq!(ask(Some(&theirs)), vec![parent(A), parent(B)]);
    assert!(
        d.health().iter().all(|h| h.healthy),
        "a peer is not a parent"
    );
}
