//! A report id claimed first does not hide the real report (report ids are predictable): a success
//! posted under the id of a device's next report, then the device's real failure under that id. The
//! failure is kept as a conflict, not answered as a duplicate; it is the device's latest state on
//! every hop; an exact retry of either report, direct or relayed again through a child (which adds
//! itself to `via`), stays a duplicate.

use super::*;

const DEVICE: &str = "dev-17";
const ID: &str = "dev-17-000043";

fn claimed() -> Value {
    json!({"reportId": ID, "deviceId": DEVICE, "workflowId": "wf-1",
           "updateId": {"provider": "Contoso", "name": "Sensor", "version": "1.2.0"},
           "state": "InstallSucceeded", "resultCode": 700, "extendedResultCode": 0})
}

fn real_failure() -> Value {
    json!({"reportId": ID, "deviceId": DEVICE, "workflowId": "wf-1",
           "updateId": {"provider": "Contoso", "name": "Sensor", "version": "1.2.0"},
           "state": 255, "resultCode": 0, "extendedResultCode": "D0190193",
           "resultDetails": "forbidden"})
}

/// (accepted, duplicates, conflicts) of a 202.
fn counts(v: &Value) -> (u64, u64, u64) {
    let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    (n("accepted"), n("duplicates"), n("conflicts"))
}

/// Waits until `path` on `p` satisfies `cond`; returns it.
async fn until(p: &Proc, path: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let v = p.json(path).await;
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the deployments table says of the device: its state count and failed row.
fn shows_failed(deps: &Value) -> bool {
    deps[0]["states"] == json!({"Failed": 1}) && deps[0]["failed"][0]["deviceId"] == DEVICE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_id_claimed_first_does_not_hide_the_real_report() {
    let tmp = tempfile::tempdir().unwrap();
    let top = Proc::start(tmp.path(), "top", "").await;
    let up = format!("[upstream]\nparents = [\"http://127.0.0.1:{}\"]", top.port);
    let leaf = Proc::start(tmp.path(), "leaf", &up).await;

    assert_eq!(counts(&post(&leaf, &[claimed()]).await), (1, 0, 0));
    let v = post(&leaf, &[real_failure()]).await;
    assert_eq!(
        counts(&v),
        (1, 0, 1),
        "the real report is not a duplicate: {v}"
    );
    // Exact retries of either are duplicates.
    assert_eq!(counts(&post(&leaf, &[real_failure()]).await), (0, 1, 0));
    assert_eq!(counts(&post(&leaf, &[claimed()]).await), (0, 1, 0));

    let r = leaf.json("/v1/relay").await;
    assert_eq!(r["conflicts"], 1, "{r}");
    let c = &r["recentConflicts"][0];
    assert_eq!(
        (&c["deviceId"], &c["reportId"]),
        (&json!(DEVICE), &json!(ID))
    );
    let deps = leaf.json("/v1/deployments").await;
    assert!(shows_failed(&deps), "{deps}");
    assert_eq!(leaf.json("/v1/devices").await[0]["state"], "Failed");

    // The parent gets both and records the conflict itself.
    let r = until(&top, "/v1/relay", "both reports at the top", |r| {
        r["accepted"] == 2
    })
    .await;
    assert_eq!(r["conflicts"], 1, "{r}");
    assert!(shows_failed(&top.json("/v1/deployments").await));

    // A child's retried batch (its id in `via`), and the same reports through another child (its
    // own `via` and `receivedAt`): duplicates at the top.
    let history = leaf.json(&format!("/v1/devices/{DEVICE}")).await;
    let mut retried = history.as_array().unwrap().clone();
    for r in &mut retried {
        r["via"] = json!(["leaf"]);
    }
    assert_eq!(counts(&post(&top, &retried).await), (0, 2, 0));
    let other = format!("[upstream]\nparents = [\"http://127.0.0.1:{}\"]", top.port);
    let leaf2 = Proc::start(tmp.path(), "leaf2", &other).await;
    // A second later than the leaf's, so that leaf2 stamps another `receivedAt` (to the second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let both = [claimed(), real_failure()];
    assert_eq!(counts(&post(&leaf2, &both).await), (2, 0, 1));
    let stamped = leaf2.json(&format!("/v1/devices/{DEVICE}")).await;
    assert_ne!(stamped[0]["receivedAt"], history[0]["receivedAt"]);
    let r = until(&top, "/v1/relay", "leaf2's reports at the top", |r| {
        r["duplicates"] == 4
    })
    .await;
    assert_eq!((&r["accepted"], &r["conflicts"]), (&json!(2), &json!(1)));
    let h = top.json(&format!("/v1/devices/{DEVICE}")).await;
    assert_eq!(h.as_array().unwrap().len(), 2, "{h}");

    // The dashboard and the metrics count it.
    let state = leaf.json("/dashboard/state.json").await;
    assert_eq!(state["relay"]["conflicts"], 1, "{}", state["relay"]);
    assert_eq!(state["relay"]["recentConflicts"][0]["reportId"], ID);
    let page = String::from_utf8_lossy(&get(&leaf.url("/")).await.body).to_string();
    assert!(page.contains("data-field=\"relay.conflicts\">1<"), "{page}");
    let m = String::from_utf8_lossy(&get(&leaf.url("/metrics")).await.body).to_string();
    assert!(m.contains("cistern_status_conflicts_total 1\n"), "{m}");
}
