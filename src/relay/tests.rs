use super::*;
use serde_json::json;

fn cfg() -> RelayConfig {
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

#[tokio::test]
async fn accepts_dedups_and_keeps_history() {
    let t = tempfile::tempdir().unwrap();
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    let b = body(json!([
        {"reportId": "1", "deviceId": "d", "state": 1},
        {"reportId": "2", "deviceId": "d", "state": 2},
        {"reportId": "2", "deviceId": "d", "state": 2}
    ]));
    assert_eq!(r.accept(&b).await.unwrap(), (2, 1));
    assert_eq!(r.accept(&b).await.unwrap(), (0, 3));
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
    assert_eq!(
        r.accept(&body(json!({"reportId": "1", "deviceId": "d", "state": 1})))
            .await
            .unwrap(),
        (0, 1)
    );
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
    let accepted: usize = all.iter().map(|x| x.as_ref().unwrap().0).sum();
    let dups: usize = all.iter().map(|x| x.as_ref().unwrap().1).sum();
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
            assert_eq!(r.accept(&post(i)).await.unwrap(), (1, 0));
        }
    }
    // dedup_entries is 100: after a restart, 0..50 are forgotten, 50..150 remembered.
    let r = Relay::open(t.path(), cfg(), None).unwrap();
    assert_eq!(r.accept(&post(149)).await.unwrap(), (0, 1));
    assert_eq!(r.accept(&post(50)).await.unwrap(), (0, 1));
    assert_eq!(r.accept(&post(0)).await.unwrap(), (1, 0));
    assert_eq!(r.mem().dedup.len(), 100);
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
        m.dedup.len(),
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
    c.dedup_entries = 200;
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
            assert_eq!(r.accept(&post(i)).await.unwrap(), (1, 0));
        }
    }
    let mut c = cfg();
    c.max_queue = 100;
    c.max_store = 100;
    let r = Relay::open(t.path(), c, forwarding()).unwrap();
    assert!(matches!(r.accept(&post(3)).await, Err(RelayError::Full(_))));
    assert_eq!(r.accept(&post(0)).await.unwrap(), (0, 1));
}
