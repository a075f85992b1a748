use super::*;
use serde_json::json;

/// A small relay configuration for tests (also the forwarder's, `forward_tests.rs`).
pub(super) fn cfg() -> RelayConfig {
    RelayConfig {
        node_id: "n1".into(),
        batch_size: 10,
        max_queue: 1 << 20,
        max_store: 64 << 20,
        max_report: 64 << 10,
        history_per_device: 3,
        max_backoff: std::time::Duration::from_secs(1),
        dedup_entries: 100,
    }
}

fn body(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// (accepted, duplicates, conflicts) of a post's answer.
fn n(a: Accepted) -> (usize, usize, usize) {
    (a.accepted, a.duplicates, a.conflicts)
}

#[tokio::test]
async fn accepts_dedups_and_keeps_history() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let b = body(json!([
        {"reportId": "1", "deviceId": "d", "state": 1},
        {"reportId": "2", "deviceId": "d", "state": 2},
        {"reportId": "2", "deviceId": "d", "state": 2}
    ]));
    assert_eq!(n(r.accept(&b).await.unwrap()), (2, 1, 0));
    assert_eq!(n(r.accept(&b).await.unwrap()), (0, 3, 0));
    for i in 3..8 {
        r.accept(&body(
            json!({"reportId": i.to_string(), "deviceId": "d", "state": 255}),
        ))
        .await
        .unwrap();
    }
    let h = r.device("d").unwrap();
    assert_eq!(h.as_array().unwrap().len(), 3, "history not trimmed");
    assert_eq!(h[2]["reportId"], "7");
    assert_eq!(r.devices().as_array().unwrap().len(), 1);
    // No next hop: nothing queued.
    assert_eq!(r.queue_depth(), 0);
}

#[tokio::test]
async fn a_bad_report_stores_nothing_of_its_request() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let b = body(
        json!([{"reportId": "1", "deviceId": "d", "state": 1}, {"reportId": "2", "state": 1}]),
    );
    let e = r.accept(&b).await.unwrap_err().to_string();
    assert!(e.contains("reports[1].deviceId"), "{e}");
    assert!(r.devices().as_array().unwrap().is_empty());
}

#[tokio::test]
async fn the_queue_is_bounded_and_survives_reopening() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.max_queue = 600;
    let hop = Some(NextHop::Url {
        url: "http://127.0.0.1:1/v1/status".parse().unwrap(),
        token: None,
    });
    {
        let r = Relay::open(t.path(), c.clone(), hop.clone()).unwrap();
        r.accept(&body(json!({"reportId": "1", "deviceId": "d", "state": 1})))
            .await
            .unwrap();
        r.accept(&body(json!({"reportId": "2", "deviceId": "d", "state": 2})))
            .await
            .unwrap();
        assert_eq!(r.queue_depth(), 2);
        let big = "x".repeat(700);
        let e = r
            .accept(&body(
                json!({"reportId": "3", "deviceId": "d", "state": 2, "pad": big}),
            ))
            .await;
        assert!(matches!(e, Err(RelayError::Full(_))));
    }
    let r = Relay::open(t.path(), c, hop).unwrap();
    assert_eq!(r.queue_depth(), 2);
    let out = r.outgoing(10).unwrap();
    assert_eq!(out.items.len(), 2);
    let sent: serde_json::Value = serde_json::from_slice(&out.body()).unwrap();
    assert_eq!(sent[0]["reportId"], "1");
    assert_eq!(sent[0]["via"], json!(["n1"]));
    // Dedup survives a restart too.
    let again = body(json!({"reportId": "1", "deviceId": "d", "state": 1}));
    assert_eq!(n(r.accept(&again).await.unwrap()), (0, 1, 0));
}

#[tokio::test]
async fn deployments_explain_failures() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let up = json!({"provider": "Contoso", "name": "Sensor", "version": "1.2.0"});
    r.accept(&body(json!([
        {"reportId": "a", "deviceId": "d1", "state": "InstallSucceeded", "updateId": up, "workflowId": "w"},
        {"reportId": "b", "deviceId": "d2", "state": 255, "updateId": up, "workflowId": "w",
         "resultCode": 0, "extendedResultCode": "D0190193", "resultDetails": "forbidden"}
    ])))
    .await
    .unwrap();
    let d = r.deployments();
    assert_eq!(d[0]["devices"], 2);
    assert_eq!(d[0]["states"]["Failed"], 1);
    assert_eq!(d[0]["failed"][0]["extendedResultCode"], "D0190193");
    assert_eq!(
        d[0]["failed"][0]["explanation"],
        "HTTP 403 from the download source"
    );
}

#[tokio::test]
async fn concurrent_posts_of_one_report_count_it_once() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let b = body(json!({"reportId": "1", "deviceId": "d", "state": 1}));
    let all = futures_util::future::join_all((0..8).map(|_| r.accept(&b))).await;
    let accepted: usize = all.iter().map(|x| x.as_ref().unwrap().accepted).sum();
    let dups: usize = all.iter().map(|x| x.as_ref().unwrap().duplicates).sum();
    assert_eq!((accepted, dups), (1, 7));
    assert_eq!(r.device("d").unwrap().as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_oldest_pairs_are_forgotten_past_dedup_entries() {
    let t = tempfile::tempdir().unwrap();
    let post = |i: usize| body(json!({"reportId": i.to_string(), "deviceId": "d", "state": 1}));
    {
        let r = Relay::open(t.path(), cfg(), None).unwrap();
        for i in 0..150 {
            assert_eq!(n(r.accept(&post(i)).await.unwrap()), (1, 0, 0));
        }
    }
    // dedup_entries is 100: after a restart, 0..50 are forgotten, 50..150 remembered.
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    assert_eq!(n(r.accept(&post(149)).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&post(50)).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&post(0)).await.unwrap()), (1, 0, 0));
    assert_eq!(r.mem().dedup.records(), 100);
}

fn forwarding() -> Option<NextHop> {
    Some(NextHop::Url {
        url: "http://127.0.0.1:1/v1/status".parse().unwrap(),
        token: None,
    })
}

/// What memory says the store holds: (queue len, queue bytes, set aside, their bytes, history
/// entries, history bytes, dedup pairs).
fn figures(r: &Relay) -> (u64, u64, u64, u64, u64, u64, usize) {
    let m = r.mem();
    (
        m.queue_len,
        m.queue_bytes,
        m.aside_len,
        m.aside_bytes,
        m.history.entries(),
        m.history.bytes(),
        m.dedup.records(),
    )
}

#[tokio::test]
async fn a_report_over_max_report_refuses_its_request() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.max_report = 1024;
    let r = Relay::open(t.path(), c, forwarding()).unwrap();
    let b = body(json!([
        {"reportId": "1", "deviceId": "d", "state": 1},
        {"reportId": "2", "deviceId": "d", "state": 1, "resultDetails": "x".repeat(1024)}
    ]));
    let e = r.accept(&b).await.unwrap_err();
    assert!(
        matches!(
            e,
            RelayError::ReportTooLarge {
                index: 1,
                max: 1024,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(figures(&r), (0, 0, 0, 0, 0, 0, 0));
}

/// Set aside, requeued, dropped: the memory the bounds are checked against always matches what a
/// restart reads back from the file.
#[tokio::test]
async fn set_aside_reports_are_counted_as_the_file_holds_them() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
    for i in 0..3 {
        r.accept(&body(
            json!({"reportId": i.to_string(), "deviceId": "d", "state": 1}),
        ))
        .await
        .unwrap();
    }
    let out = r.outgoing(1).unwrap();
    let (seq, report) = out.items[0].clone();
    let refusal = b"{\"status\":400}".to_vec();
    r.submit(|reply| writer::Job::SetAside {
        seq,
        report,
        refusal,
        reply,
    })
    .await
    .unwrap();
    let before = figures(&r);
    assert_eq!((before.0, before.2), (2, 1));
    assert_eq!(r.set_aside(), [json!({"status": 400})]);
    drop(r);
    let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
    assert_eq!(figures(&r), before, "memory and file agree");
    assert_eq!(r.set_aside_op(AsideOp::Requeue).await.unwrap(), 1);
    assert_eq!(r.outgoing(10).unwrap().items[0].0, seq, "back at its place");
    let requeued = figures(&r);
    assert_eq!(
        (requeued.0, requeued.1, requeued.2),
        (3, before.1 + before.3 - 8 - 14, 0)
    );
    assert_eq!(r.set_aside_op(AsideOp::Drop).await.unwrap(), 0);
    drop(r);
    let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
    assert_eq!(figures(&r), requeued, "memory and file agree");
}

/// A node without a next hop keeps history only: past half of `max_store` the oldest history of the
/// least recently reporting devices goes, their latest reports last; posts are never refused.
#[tokio::test]
async fn history_is_bounded_by_the_store_and_keeps_latest_reports() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.max_store = 16 << 10;
    c.history_per_device = 100;
    // Room for the dedup records (150 x 48 bytes) beside half the store of history.
    c.dedup_entries = 150;
    {
        let r = Relay::open(t.path(), c.clone(), None).unwrap();
        for i in 0..200 {
            let dev = if i < 100 { i % 5 } else { 5 + i % 5 };
            r.accept(&body(
                json!({"reportId": i.to_string(), "deviceId": format!("d{dev}"), "state": 1}),
            ))
            .await
            .unwrap();
            let (_, _, _, _, _, history, _) = figures(&r);
            assert!(history <= 8 << 10, "history {history} over half the store");
        }
        // d0..d4 went quiet before d5..d9 reported: they keep their latest reports only.
        for d in 0..5 {
            let h = r.device(&format!("d{d}")).unwrap();
            assert_eq!(h.as_array().unwrap().len(), 1, "d{d}");
            assert_eq!(h[0]["reportId"], (95 + d).to_string());
        }
        assert!(r.device("d9").unwrap().as_array().unwrap().len() > 1);
    }
    let r = Relay::open(t.path(), c, None).unwrap();
    assert!(figures(&r).5 <= 8 << 10);
    assert_eq!(r.devices().as_array().unwrap().len(), 10);
}

/// A retry of reports already accepted is answered as duplicates even when the queue is over its
/// bound (here: lowered since they were queued).
#[tokio::test]
async fn duplicates_are_answered_when_the_queue_is_over_its_bound() {
    let t = tempfile::tempdir().unwrap();
    let post = |i: usize| body(json!({"reportId": i.to_string(), "deviceId": "d", "state": 1}));
    {
        let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
        for i in 0..3 {
            assert_eq!(n(r.accept(&post(i)).await.unwrap()), (1, 0, 0));
        }
    }
    let mut c = cfg();
    c.max_queue = 100;
    c.max_store = 100;
    let r = Relay::open(t.path(), c, forwarding()).unwrap();
    assert!(matches!(r.accept(&post(3)).await, Err(RelayError::Full(_))));
    assert_eq!(n(r.accept(&post(0)).await.unwrap()), (0, 1, 0));
}

fn success_and_failure() -> (Vec<u8>, Vec<u8>) {
    let up = json!({"provider": "Contoso", "name": "Sensor", "version": "1.2.0"});
    let ids = json!({"reportId": "dev-17-000043", "deviceId": "dev-17", "updateId": up,
                     "workflowId": "w"});
    let mut ok = ids.clone();
    ok["state"] = json!("InstallSucceeded");
    let mut failed = ids;
    failed["state"] = json!(255);
    failed["extendedResultCode"] = json!("D0190193");
    (body(ok), body(failed))
}

/// A report posted first under the id of a device's next report does not hide the real one: the
/// real one is kept and forwarded as a conflict, and is the device's latest; retries of either are
/// duplicates, before and after a restart.
#[tokio::test]
async fn another_report_under_a_known_id_is_a_conflict_not_a_duplicate() {
    let t = tempfile::tempdir().unwrap();
    let (ok, failed) = success_and_failure();
    let before = {
        let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
        assert_eq!(n(r.accept(&ok).await.unwrap()), (1, 0, 0));
        assert_eq!(n(r.accept(&failed).await.unwrap()), (1, 0, 1));
        assert_eq!(n(r.accept(&failed).await.unwrap()), (0, 1, 0));
        assert_eq!(n(r.accept(&ok).await.unwrap()), (0, 1, 0));
        assert_eq!(r.queue_depth(), 2, "the conflict is forwarded too");
        assert_eq!(r.device("dev-17").unwrap().as_array().unwrap().len(), 2);
        assert_eq!(r.devices()[0]["state"], "Failed");
        assert_eq!(r.deployments()[0]["states"], json!({"Failed": 1}));
        let s = r.status();
        assert_eq!(s["conflicts"], 1);
        assert_eq!(s["recentConflicts"][0]["deviceId"], "dev-17");
        assert_eq!(s["recentConflicts"][0]["reportId"], "dev-17-000043");
        let kept = r.mem().conflicts;
        (figures(&r), kept)
    };
    let r = Relay::open(t.path(), cfg(), forwarding()).unwrap();
    assert_eq!(
        (figures(&r), r.mem().conflicts),
        before,
        "memory and file agree"
    );
    assert_eq!(n(r.accept(&ok).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&failed).await.unwrap()), (0, 1, 0));
    assert_eq!(r.status()["recentConflicts"].as_array().unwrap().len(), 1);
    // A third report under the same id is one more conflict.
    let (_, mut third) = success_and_failure();
    third.splice(1..1, b"\"resultDetails\":\"again\",".iter().copied());
    assert_eq!(n(r.accept(&third).await.unwrap()), (1, 0, 1));
    assert_eq!(r.conflicts_total(), 2);
}

/// Inside one request: the same report twice is a duplicate, another under the same id a conflict.
#[tokio::test]
async fn a_request_holding_two_reports_under_one_id_keeps_both() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let (ok, failed) = success_and_failure();
    let one = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    let b = body(json!([one(&ok), one(&failed), one(&ok), one(&failed)]));
    assert_eq!(n(r.accept(&b).await.unwrap()), (2, 2, 1));
    assert_eq!(r.devices()[0]["state"], "Failed");
    // Concurrent posts of the two: one is new, the other a conflict, whatever their order.
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let (a, b) = futures_util::future::join(r.accept(&ok), r.accept(&failed)).await;
    let sum = |f: fn(&Accepted) -> usize| f(a.as_ref().unwrap()) + f(b.as_ref().unwrap());
    assert_eq!((sum(|x| x.accepted), sum(|x| x.conflicts)), (2, 1));
}

/// What a parent receives from this node (its id in `via`, `receivedAt` stamped) is the report as
/// it was posted: a retried batch, or the same report through another child, is a duplicate there.
#[tokio::test]
async fn a_report_relayed_again_through_any_hop_is_a_duplicate() {
    let (tc, tp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let child = Relay::open(tc.path(), cfg(), forwarding()).unwrap();
    let (ok, failed) = success_and_failure();
    child.accept(&ok).await.unwrap();
    child.accept(&failed).await.unwrap();
    let sent = child.outgoing(10).unwrap().body();
    let mut c = cfg();
    c.node_id = "n2".into();
    let parent = Relay::open(tp.path(), c, forwarding()).unwrap();
    assert_eq!(n(parent.accept(&sent).await.unwrap()), (2, 0, 1));
    assert_eq!(n(parent.accept(&sent).await.unwrap()), (0, 2, 0));
    let mut other: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    for r in other.as_array_mut().unwrap() {
        r["via"] = json!(["other-child", "n1"]);
        r["receivedAt"] = json!("2030-01-01T00:00:00Z");
    }
    assert_eq!(n(parent.accept(&body(other)).await.unwrap()), (0, 2, 0));
    assert_eq!(parent.devices()[0]["state"], "Failed");
    let up: serde_json::Value =
        serde_json::from_slice(&parent.outgoing(10).unwrap().body()).unwrap();
    assert_eq!(up[1]["via"], json!(["n1", "n2"]));
}

/// Dedup records written before digests were kept: any report under their pair stays a duplicate.
#[tokio::test]
async fn records_without_a_digest_count_every_report_as_a_duplicate() {
    let t = tempfile::tempdir().unwrap();
    {
        let (db, _) = db::StatusDb::open(&t.path().join("status.redb")).unwrap();
        let old = db::Batch {
            dedup: vec![(0, pair_hash("dev-17", "dev-17-000043"), None)],
            next_seq: 1,
            ..Default::default()
        };
        db.commit(&old).unwrap();
    }
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let (ok, failed) = success_and_failure();
    assert_eq!(n(r.accept(&ok).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&failed).await.unwrap()), (0, 1, 0));
}

/// Records of conflicts: the newest `CONFLICTS_KEPT`, newest first, counted as the file holds them;
/// the dedup records of conflicts are forgotten with their digests past `dedup_entries`.
#[tokio::test]
async fn conflict_records_and_their_dedup_records_are_bounded() {
    let t = tempfile::tempdir().unwrap();
    let post = |i: usize| body(json!({"reportId": "r", "deviceId": "d", "state": 1, "n": i}));
    let before = {
        let r = Relay::open(t.path(), cfg(), None).unwrap();
        for i in 0..120 {
            assert_eq!(
                n(r.accept(&post(i)).await.unwrap()),
                (1, 0, (i > 0) as usize)
            );
        }
        // dedup_entries is 100: the first 20 reports are forgotten, digests included, and the pair
        // is still known.
        assert_eq!(n(r.accept(&post(0)).await.unwrap()), (1, 0, 1));
        let recent = r.recent_conflicts();
        assert_eq!(recent.len(), db::CONFLICTS_KEPT as usize);
        let kept = r.mem().conflicts;
        assert_eq!((kept.total, kept.kept), (120, db::CONFLICTS_KEPT));
        (figures(&r), kept)
    };
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    assert_eq!(
        (figures(&r), r.mem().conflicts),
        before,
        "memory and file agree"
    );
    assert_eq!(n(r.accept(&post(119)).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&post(0)).await.unwrap()), (0, 1, 0));
    assert_eq!(n(r.accept(&post(1)).await.unwrap()), (1, 0, 1));
    assert_eq!(r.mem().dedup.records(), 100);
}
