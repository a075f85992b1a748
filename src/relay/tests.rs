use super::*;
use serde_json::json;

fn cfg() -> RelayConfig {
    RelayConfig {
        node_id: "n1".into(),
        batch_size: 10,
        max_queue: 1 << 20,
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
    let (keys, b, _) = r.peek(10).unwrap();
    assert_eq!(keys.len(), 2);
    let sent: serde_json::Value = serde_json::from_slice(&b).unwrap();
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
