use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

const URLS: [&str; 3] = [
    "http://10.0.0.1:8080",
    "http://10.0.0.2:8080",
    "http://10.0.0.3:8080",
];

/// Peers over URLS, this node the one at `me`, with a clock the test moves on (seconds).
fn peers(me: &str) -> (Peers, Arc<AtomicU64>) {
    let secs = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let s = secs.clone();
    let clock: Clock = Arc::new(move || start + Duration::from_secs(s.load(Ordering::Relaxed)));
    let rule = SelfRule {
        listen: vec![me.trim_start_matches("http://").parse().unwrap()],
        ..SelfRule::default()
    };
    let members: Vec<String> = URLS.iter().map(|u| u.to_string()).collect();
    (Peers::new(&members, rule, clock).unwrap(), secs)
}

/// A key that `owner` owns among all three.
fn key_of(owner: &str) -> String {
    let names: Vec<String> = URLS.iter().map(|u| format!("{u}/")).collect();
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| rendezvous::owner(&names, k) == Some(&format!("{owner}/")))
        .unwrap()
}

#[test]
fn the_owner_is_asked_unless_it_is_this_node_or_down() {
    let (p, secs) = peers(URLS[0]);
    assert!(p.ahead(&key_of(URLS[0])).is_empty(), "this node owns it");
    let k = key_of(URLS[1]);
    let first = p.ahead(&k);
    assert_eq!(first[0], URLS[1].parse::<Uri>().unwrap());
    p.record(&first[0], &Outcome::Failed("refused".into()));
    assert!(!p.ahead(&k).contains(&first[0]), "a down owner is skipped");
    assert_eq!(p.down(), vec![first[0].clone()]);
    secs.store(30, Ordering::Relaxed);
    assert_eq!(p.ahead(&k)[0], first[0], "back after 30 s");
    p.record(&first[0], &Outcome::Answered(StatusCode::BAD_GATEWAY));
    assert!(!p.ahead(&k).contains(&first[0]), "a 5xx marks it down");
    p.probed(&first[0], StatusCode::OK);
    assert_eq!(p.ahead(&k)[0], first[0], "a probe brings it back");
    let st = p.status();
    assert!(st[0].is_self && st.iter().all(|m| m.up));
    assert_eq!((st[1].sent_failed, st[1].sent_5xx), (1, 1));
}

#[test]
fn a_new_list_keeps_the_members_it_still_names() {
    let (p, _) = peers(URLS[0]);
    let u1: Uri = URLS[1].parse().unwrap();
    p.record(&u1, &Outcome::Answered(StatusCode::OK));
    p.served_from("10.0.0.2".parse().unwrap());
    let same = URLS.iter().rev().map(|u| u.parse().unwrap()).collect();
    assert!(
        !p.set(same),
        "the same members in another order are no change"
    );
    assert!(p.set(vec![URLS[0].parse().unwrap(), u1.clone()]));
    let st = p.status();
    assert_eq!(st.len(), 2);
    assert_eq!((st[1].sent_ok, st[1].served), (1, 1));
    // This node alone: nothing is ever sent to a peer.
    assert!(p.set(vec![URLS[0].parse().unwrap()]));
    assert!(p.ahead(&key_of(URLS[1])).is_empty());
}
