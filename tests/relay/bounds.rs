//! A relay that cannot wedge: a report over `status.max_report` is refused at intake (413), a report
//! the next hop refuses for good is set aside while the reports after it are delivered, the admin
//! puts set-aside reports back or drops them, and past `status.max_store` posts get 507 while
//! nothing queued is lost. The next hop is a fake that refuses bodies over 1 MiB with 413 (as nginx
//! does by default) and any batch holding one chosen report with 400.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// A fake next hop.
#[derive(Clone, Default)]
struct Hop {
    /// (deviceId, reportId) of every report accepted, in arrival order.
    got: Arc<Mutex<Vec<(String, String)>>>,
    /// Answer 503 to everything (an outage).
    down: Arc<AtomicBool>,
    /// A reportId whose batches get 400.
    refuse: Arc<Mutex<Option<String>>>,
}

/// What the fake hop accepts in one body, like nginx's `client_max_body_size 1m`.
const HOP_MAX_BODY: usize = 1 << 20;

impl Hop {
    async fn start(self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/status", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let hop = self.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let hop = hop.clone();
                    async move {
                        let body: Bytes = BodyExt::collect(req.into_body())
                            .await
                            .map(|c: http_body_util::Collected<Bytes>| c.to_bytes())
                            .unwrap_or_default();
                        let (status, answer) = hop.answer(&body);
                        let mut r = http::Response::new(Full::new(Bytes::from(answer)));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc),
                );
            }
        });
        (url, task)
    }

    fn answer(&self, body: &[u8]) -> (u16, String) {
        if self.down.load(Ordering::SeqCst) {
            return (503, "down".into());
        }
        if body.len() > HOP_MAX_BODY {
            return (413, "<html>413 Request Entity Too Large</html>".into());
        }
        let items: Vec<Value> = serde_json::from_slice(body).unwrap_or_default();
        let refuse = self.refuse.lock().unwrap().clone();
        if let Some(bad) = refuse {
            if items.iter().any(|r| r["reportId"] == bad.as_str()) {
                return (
                    400,
                    format!("{{\"error\":\"report {bad} is not acceptable\"}}"),
                );
            }
        }
        let mut got = self.got.lock().unwrap();
        for r in items {
            let f = |k: &str| r[k].as_str().unwrap_or("").to_string();
            got.push((f("deviceId"), f("reportId")));
        }
        (200, String::new())
    }

    fn ids(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.1.clone())
            .collect()
    }
}

fn ordinary(n: usize) -> Value {
    json!({"reportId": format!("ok-{n:02}"), "deviceId": format!("dev-{}", n % 3),
           "state": "InstallSucceeded", "resultCode": 700})
}

fn with_details(id: &str, details_bytes: usize) -> Value {
    json!({"reportId": id, "deviceId": "dev-big", "state": 255, "resultCode": 0,
           "resultDetails": "x".repeat(details_bytes)})
}

/// A POST of `reports`; (status, JSON answer).
async fn post_any(p: &Proc, reports: &[Value]) -> (u16, Value) {
    let body = Bytes::from(serde_json::to_vec(reports).unwrap());
    let g = request_body(
        "POST",
        &p.url("/v1/status"),
        &[("content-type", "application/json")],
        body,
    )
    .await;
    (g.status.as_u16(), g.json())
}

/// Waits until `/v1/relay` satisfies `cond`; returns it.
async fn relay_until(p: &Proc, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = p.json("/v1/relay").await;
        if cond(&r) {
            return r;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hop_line(url: &str) -> String {
    format!("forward_to = \"{url}\"")
}

/// Issue 10, as reported: a 3 MiB report accepted (here `max_report` allows it), a next hop that
/// refuses bodies over 1 MiB, ten ordinary reports after it. The ten arrive; the big one is set
/// aside with the hop's 413 and its answer, and shown by `/v1/relay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_next_hop_refuses_as_too_large_does_not_wedge_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let hop = Hop::default();
    hop.down.store(true, Ordering::SeqCst);
    let (url, _task) = hop.clone().start().await;
    let status = format!("{}\nmax_report = \"4MiB\"", hop_line(&url));
    let leaf = Proc::start(tmp.path(), "leaf", &status).await;
    let (s, v) = post_any(&leaf, &[with_details("big", 3 << 20)]).await;
    assert_eq!(s, 202, "{v}");
    for n in 0..10 {
        let (s, v) = post_any(&leaf, &[ordinary(n)]).await;
        assert_eq!(s, 202, "{v}");
    }
    hop.down.store(false, Ordering::SeqCst);
    let r = relay_until(&leaf, "the queue to drain", |r| r["queueDepth"] == 0).await;
    let want: Vec<String> = (0..10).map(|n| format!("ok-{n:02}")).collect();
    assert_eq!(hop.ids(), want, "the ten, in order, once");
    assert_eq!(r["setAsideCount"], 1, "{r}");
    let aside = &r["setAside"][0];
    assert_eq!(
        (&aside["deviceId"], &aside["reportId"]),
        (&json!("dev-big"), &json!("big"))
    );
    assert_eq!(aside["status"], 413, "{r}");
    assert!(aside["answer"].as_str().unwrap().contains("413"), "{r}");
    assert!(aside["at"].is_string(), "{r}");
    // Durable: still set aside after a restart.
    let mut leaf = leaf;
    leaf.kill9_and_restart().await;
    let r = leaf.json("/v1/relay").await;
    assert_eq!(
        (r["setAsideCount"].as_u64(), r["queueDepth"].as_u64()),
        (Some(1), Some(0))
    );
}

/// One report over `max_report` refuses its whole request with 413 naming the limit; nothing of
/// the request is kept or queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_over_max_report_is_refused_with_413_and_nothing_of_its_request_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let hop = Hop::default();
    let (url, _task) = hop.clone().start().await;
    let leaf = Proc::start(tmp.path(), "leaf", &hop_line(&url)).await;
    let mut batch: Vec<Value> = (0..3).map(ordinary).collect();
    batch.push(with_details("big", 3 << 20));
    let (s, v) = post_any(&leaf, &batch).await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"], "report-too-large", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.starts_with("report 3 is 314"), "{detail}");
    assert!(
        detail.ends_with("over status.max_report (65536)"),
        "{detail}"
    );
    assert!(leaf
        .json("/v1/devices")
        .await
        .as_array()
        .unwrap()
        .is_empty());
    let r = leaf.json("/v1/relay").await;
    assert_eq!(
        (r["queueDepth"].as_u64(), r["accepted"].as_u64()),
        (Some(0), Some(0))
    );
    // Just under the bound is accepted and delivered.
    let (s, v) = post_any(&leaf, &[with_details("fits", 60 << 10)]).await;
    assert_eq!(s, 202, "{v}");
    relay_until(&leaf, "delivery", |r| r["forwarded"] == 1).await;
}

/// A report under `max_report` that the hop refuses for its own reasons (400), in the middle of a
/// batch: the batch is split until that report alone is refused; it is set aside, the ten around it
/// arrive in order. The admin's retry (token required) puts it back; once the hop takes it, it is
/// delivered; a drop removes what is set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_set_aside_retried_and_dropped_by_the_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let hop = Hop::default();
    hop.down.store(true, Ordering::SeqCst);
    *hop.refuse.lock().unwrap() = Some("bad".into());
    let (url, _task) = hop.clone().start().await;
    let leaf = Proc::start_with(
        tmp.path(),
        "leaf",
        "admin_token = \"adm-secret\"",
        &hop_line(&url),
    )
    .await;
    let mut batch: Vec<Value> = (0..5).map(ordinary).collect();
    batch.push(json!({"reportId": "bad", "deviceId": "dev-9", "state": 1}));
    batch.extend((5..10).map(ordinary));
    assert_eq!(post_any(&leaf, &batch).await.0, 202);
    hop.down.store(false, Ordering::SeqCst);
    let r = relay_until(&leaf, "the queue to drain", |r| r["queueDepth"] == 0).await;
    let want: Vec<String> = (0..10).map(|n| format!("ok-{n:02}")).collect();
    assert_eq!(hop.ids(), want);
    assert_eq!(r["setAsideCount"], 1, "{r}");
    assert_eq!(r["setAside"][0]["status"], 400, "{r}");
    assert!(r["setAside"][0]["answer"]
        .as_str()
        .unwrap()
        .contains("not acceptable"));
    let dash = get(&leaf.url("/dashboard/state.json")).await.json();
    assert_eq!(dash["relay"]["setAsideCount"], 1, "the dashboard: {dash}");
    let refused = &dash["relay"]["setAside"][0];
    assert_eq!(refused["status"], "400", "the dashboard: {dash}");
    assert!(refused["answer"]
        .as_str()
        .unwrap_or("")
        .contains("not acceptable"));

    let admin = |method: &'static str, path: &'static str, token: Option<&'static str>| {
        let url = leaf.url(path);
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let mut h = vec![];
            if let Some(a) = &auth {
                h.push(("authorization", a.as_str()));
            }
            let g = request(method, &url, &h).await;
            (g.status.as_u16(), g.json())
        }
    };
    for (m, p) in [
        ("POST", "/v1/admin/relay/retry"),
        ("DELETE", "/v1/admin/relay/set-aside"),
    ] {
        assert_eq!(admin(m, p, None).await.0, 401, "{m} {p} without a token");
        assert_eq!(
            admin(m, p, Some("wrong")).await.0,
            401,
            "{m} {p} wrong token"
        );
    }
    assert_eq!(leaf.json("/v1/relay").await["setAsideCount"], 1);

    // Retried while the hop still refuses it: set aside again, nothing else sent.
    let (s, v) = admin("POST", "/v1/admin/relay/retry", Some("adm-secret")).await;
    assert_eq!((s, &v), (200, &json!({"requeued": 1})));
    relay_until(&leaf, "set aside again", |r| {
        r["setAsideCount"] == 1 && r["queueDepth"] == 0 && r["setAsideTotal"] == 2
    })
    .await;
    // The hop takes it now: retried and delivered.
    *hop.refuse.lock().unwrap() = None;
    let (s, v) = admin("POST", "/v1/admin/relay/retry", Some("adm-secret")).await;
    assert_eq!((s, &v), (200, &json!({"requeued": 1})));
    relay_until(&leaf, "delivered", |r| {
        r["setAsideCount"] == 0 && r["queueDepth"] == 0
    })
    .await;
    assert_eq!(hop.ids().last().map(String::as_str), Some("bad"));

    // Dropped.
    *hop.refuse.lock().unwrap() = Some("worse".into());
    let worse = json!({"reportId": "worse", "deviceId": "dev-9", "state": 1});
    assert_eq!(post_any(&leaf, &[worse]).await.0, 202);
    relay_until(&leaf, "set aside", |r| r["setAsideCount"] == 1).await;
    let (s, v) = admin("DELETE", "/v1/admin/relay/set-aside", Some("adm-secret")).await;
    assert_eq!((s, &v), (200, &json!({"dropped": 1})));
    let r = leaf.json("/v1/relay").await;
    assert_eq!(
        (r["setAsideCount"].as_u64(), r["queueDepth"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        admin("GET", "/v1/admin/relay/retry", Some("adm-secret"))
            .await
            .0,
        405
    );
}

/// Past `status.max_store` a post gets 507 naming it, and nothing acknowledged is lost: once the
/// hop is back every accepted report arrives, and posts are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_store_posts_get_507_and_every_accepted_report_is_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let hop = Hop::default();
    hop.down.store(true, Ordering::SeqCst);
    let (url, _task) = hop.clone().start().await;
    let status = format!(
        "{}\nmax_store = \"16KiB\"\nmax_report = \"1KiB\"\ndedup_entries = 10",
        hop_line(&url)
    );
    let leaf = Proc::start(tmp.path(), "leaf", &status).await;
    let mut accepted = Vec::new();
    let mut refused = None;
    for n in 0..400 {
        let (s, v) = post_any(&leaf, &[ordinary(n)]).await;
        match s {
            202 => accepted.push(format!("ok-{n:02}")),
            _ => {
                refused = Some((s, v));
                break;
            }
        }
    }
    let (s, v) = refused.expect("the store filled up");
    assert_eq!((s, v["error"].as_str()), (507, Some("store-full")), "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("status.max_store"),
        "{v}"
    );
    assert!(accepted.len() > 10, "{} accepted", accepted.len());
    let r = leaf.json("/v1/relay").await;
    assert_eq!(r["queueDepth"], accepted.len() as u64, "{r}");
    assert!(r["storeBytes"].as_u64().unwrap() <= 16 << 10, "{r}");

    hop.down.store(false, Ordering::SeqCst);
    relay_until(&leaf, "the queue to drain", |r| r["queueDepth"] == 0).await;
    assert_eq!(hop.ids(), accepted, "every accepted report, in order, once");
    let (s, v) = post_any(&leaf, &[ordinary(999)]).await;
    assert_eq!(s, 202, "{v}");
}

/// Between two cisterns: the parent's `max_report` is smaller than the leaf's, so the parent refuses
/// one report with 413 (`report-too-large`); the leaf sets it aside with the parent's JSON answer and
/// delivers the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_refusing_a_report_over_its_max_report_gets_it_set_aside_at_the_child() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = Proc::start(tmp.path(), "parent", "max_report = \"1KiB\"").await;
    let up = format!(
        "forward_to = \"{}\"\nmax_report = \"4KiB\"",
        parent.url("/v1/status")
    );
    let leaf = Proc::start(tmp.path(), "leaf", &up).await;
    let batch = [ordinary(0), with_details("big", 2000), ordinary(1)];
    assert_eq!(post_any(&leaf, &batch).await.0, 202);
    let r = relay_until(&leaf, "the queue to drain", |r| r["queueDepth"] == 0).await;
    assert_eq!(r["setAsideCount"], 1, "{r}");
    assert_eq!(r["setAside"][0]["status"], 413, "{r}");
    let answer: Value = serde_json::from_str(r["setAside"][0]["answer"].as_str().unwrap()).unwrap();
    assert_eq!(answer["error"], "report-too-large", "{answer}");
    let at_parent = parent.json("/v1/relay").await;
    assert_eq!(at_parent["accepted"], 2, "{at_parent}");
    assert_eq!(
        parent.json("/v1/devices/dev-big").await["error"],
        "not-found"
    );
}
