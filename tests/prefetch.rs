//! Staging ahead of need (SPEC 6): a prefetch job fetches and verifies what a manifest names; devices
//! asking by URL later get verified hits; a digest the manifest named is fetched from its URL on demand.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::json;

async fn wait_job(node: &Node, id: &str) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let j = get(&node.url(&format!("/v1/admin/prefetch/{id}")))
            .await
            .json();
        if j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < end, "job still running: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts a manifest; returns the id of the job it started (202).
async fn start_job(node: &Node, manifest: &serde_json::Value) -> String {
    let r = admin_request(
        "POST",
        &node.url("/v1/admin/prefetch"),
        Bytes::from(manifest.to_string()),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_job_stages_verified_pinned_objects() {
    let origin = Origin::start().await;
    let a = random_bytes(300_000, 51);
    let b = random_bytes(1000, 52);
    origin.put("/c/a.swu", a.clone(), Behaviour::default());
    origin.put("/c/b.swu", b.clone(), Behaviour::default());
    let mut node = Node::start(&origin, "").await;
    let base = origin.url();
    let manifest = json!({
        "files": [
            {"url": format!("{base}/c/a.swu?sv=1&sig=SECRET"), "sha256": sha256_hex(&a), "size": a.len()},
            {"url": format!("{base}/c/b.swu"), "sha256": sha256_hex(b"something else"), "size": b.len()}
        ],
        "pin": true
    });
    let id = start_job(&node, &manifest).await;
    let job = wait_job(&node, &id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["files"][0]["state"], "stored");
    assert_eq!(job["files"][0]["bytes"], a.len() as u64);
    assert_eq!(job["files"][1]["state"], "failed");
    assert!(
        !job.to_string().contains("SECRET"),
        "a SAS signature leaked into the job: {job}"
    );
    assert_eq!(node.blobs(), vec![sha256_hex(&a)]);
    let listing = get(&node.url("/v1/admin/content")).await.json();
    assert_eq!(listing[0]["pinned"], true);

    // A device asks by URL with another SAS token: a verified hit, immutable.
    let g = proxy_get(node.addr, &format!("{base}/c/a.swu?sv=1&sig=OTHER"), &[]).await;
    assert_eq!(g.body, a);
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/c/a.swu"), 1);

    // Purged, restarted, then asked for by digest: fetched again from the URL the manifest named.
    let hex = sha256_hex(&a);
    assert_eq!(
        admin_request(
            "DELETE",
            &node.url(&format!("/v1/admin/content/sha256/{hex}")),
            Bytes::new()
        )
        .await
        .status,
        204
    );
    node.restart().await;
    let g = get(&node.url(&format!("/v1/content/sha256/{hex}"))).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, a);
    assert_eq!(origin.gets("/c/a.swu"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_are_400_and_foreign_origins_403() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    let r = admin_request(
        "POST",
        &node.url("/v1/admin/prefetch"),
        Bytes::from_static(b"{\"files\": [{}]}"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].as_str().unwrap().contains("files[0]"));
    let m = json!({"files": [{"url": "http://evil.example/x", "sha256": "0".repeat(64)}]});
    let r = admin_request(
        "POST",
        &node.url("/v1/admin/prefetch"),
        Bytes::from(m.to_string()),
    )
    .await;
    assert_eq!(r.status, 403);
}

/// A restart in the middle of a job: the job carries on from its first file not stored and ends
/// done, each file fetched once more at most; its state is readable after it ends, across another
/// restart too, and its record keeps no SAS signature where the job is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_job_survives_a_restart_and_completes() {
    let origin = Origin::start().await;
    let files: Vec<Bytes> = (0..3).map(|i| random_bytes(2 << 20, 60 + i)).collect();
    for (i, b) in files.iter().enumerate() {
        let slow = Behaviour {
            rate: Some(4 << 20),
            ..Default::default()
        };
        origin.put(&format!("/j/{i}.swu"), b.clone(), slow);
    }
    let mut node = Node::start(&origin, "").await;
    let base = origin.url();
    let list: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, b)| json!({"url": format!("{base}/j/{i}.swu?sig=SECRET"), "sha256": sha256_hex(b), "size": b.len()}))
        .collect();
    let manifest = json!({ "files": list, "pin": true });
    let id = start_job(&node, &manifest).await;
    let job_url = format!("/v1/admin/prefetch/{id}");
    // Stop it while its second file is being fetched.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let j = get(&node.url(&job_url)).await.json();
        if j["files"][1]["state"] == "fetching" {
            break;
        }
        assert!(
            Instant::now() < end,
            "the job never reached its second file: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.restart().await;
    let job = wait_job(&node, &id).await;
    assert_eq!(job["state"], "done", "{job}");
    for i in 0..3 {
        assert_eq!(job["files"][i]["state"], "stored", "{job}");
        assert!(
            origin.gets(&format!("/j/{i}.swu")) <= 2,
            "file {i} fetched again and again"
        );
    }
    assert_eq!(
        origin.gets("/j/0.swu"),
        1,
        "a stored file was fetched again"
    );
    let mut blobs = node.blobs();
    blobs.sort();
    let mut want: Vec<_> = files.iter().map(|b| sha256_hex(b)).collect();
    want.sort();
    assert_eq!(blobs, want);
    node.restart().await;
    let again = get(&node.url(&job_url)).await;
    assert_eq!(again.status, 200, "an ended job was forgotten by a restart");
    assert_eq!(again.json()["state"], "done");
    assert!(!again.json().to_string().contains("SECRET"));
}

/// Sideloads `body` (stored under its digest, no key).
async fn sideload(node: &Node, body: &Bytes) {
    let url = node.url(&format!("/v1/admin/content/sha256/{}", sha256_hex(body)));
    assert_eq!(admin_request("PUT", &url, body.clone()).await.status, 201);
}

/// The keys the store lists for an object.
async fn keys_of(node: &Node, hex: &str) -> String {
    let listing = get(&node.url("/v1/admin/content")).await.json();
    let o = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["digest"] == hex);
    o.map(|o| o["keys"].to_string()).unwrap_or_default()
}

/// An entry whose digest is already stored is checked against its URL before the URL's key maps to
/// it (SPEC 6): a URL that answers other bytes is not mapped (the new-firmware URL must not serve the
/// old firmware as a verified hit); one that answers those bytes is, after one fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_digest_maps_a_url_only_once_the_url_answered_it() {
    let origin = Origin::start().await;
    let old = random_bytes(100_000, 71);
    let new = random_bytes(100_000, 72);
    origin.put("/fw/old.swu", old.clone(), Behaviour::default());
    origin.put("/fw/new.swu", new.clone(), Behaviour::default());
    let node = Node::start(&origin, "").await;
    sideload(&node, &old).await;
    let base = origin.url();
    let hex = sha256_hex(&old);
    let wrong =
        json!({"files": [{"url": format!("{base}/fw/new.swu"), "sha256": hex}], "pin": true});
    let job = wait_job(&node, &start_job(&node, &wrong).await).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["files"][0]["state"], "failed", "{job}");
    assert_eq!(origin.gets("/fw/new.swu"), 1, "the URL was not checked");
    assert!(!keys_of(&node, &hex).await.contains("new.swu"));
    let g = proxy_get(node.addr, &format!("{base}/fw/new.swu"), &[]).await;
    assert_ne!(g.body, old, "the new URL serves the old firmware");
    assert_ne!(g.header("cache-status"), "cistern; hit");

    let right = json!({"files": [{"url": format!("{base}/fw/old.swu"), "sha256": hex}]});
    let job = wait_job(&node, &start_job(&node, &right).await).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(origin.gets("/fw/old.swu"), 1);
    assert!(keys_of(&node, &hex).await.contains("old.swu"));
    let g = proxy_get(node.addr, &format!("{base}/fw/old.swu"), &[]).await;
    assert_eq!(g.body, old);
    assert_eq!(g.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/fw/old.swu"), 1);
}

/// A prefetch whose fetch fails leaves no mapping of its URL: once the origin serves the URL, a
/// device gets what it serves, not a digest mismatch against the manifest's digest. A staged record
/// left by an earlier version (which staged every entry before fetching it) goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prefetch_leaves_no_mapping_of_its_url() {
    let origin = Origin::start().await;
    let mut node = Node::start(&origin, "").await;
    let base = origin.url();
    let named = random_bytes(10_000, 73);
    let later = random_bytes(10_000, 74);
    let m =
        json!({"files": [{"url": format!("{base}/fw/late.swu"), "sha256": sha256_hex(&named)}]});
    let job = wait_job(&node, &start_job(&node, &m).await).await;
    assert_eq!(job["files"][0]["state"], "failed", "{job}");
    origin.put("/fw/late.swu", later.clone(), Behaviour::default());
    let g = proxy_get(node.addr, &format!("{base}/fw/late.swu"), &[]).await;
    assert_eq!(g.status, 200, "{:?}", g.body);
    assert_eq!(g.body, later);

    // A record staged before any fetch, as an earlier version left it.
    let url = format!("{base}/fw/legacy.swu");
    node.stop().await;
    stage_offline(&node, &named, &url).await;
    node.restart().await;
    let job = wait_job(
        &node,
        &start_job(
            &node,
            &json!({"files": [{"url": url, "sha256": sha256_hex(&named)}]}),
        )
        .await,
    )
    .await;
    assert_eq!(job["files"][0]["state"], "failed", "{job}");
    origin.put("/fw/legacy.swu", later.clone(), Behaviour::default());
    let g = proxy_get(node.addr, &url, &[]).await;
    assert_eq!(g.status, 200, "{:?}", g.body);
    assert_eq!(g.body, later);
}

/// Writes a staged record (key -> digest, digest -> URL) into a stopped node's store.
async fn stage_offline(node: &Node, body: &Bytes, url: &str) {
    let d = cistern::store::Digest::parse_any(&sha256_hex(body)).unwrap();
    let key = cistern::fetch::key::cache_key(&url.parse().unwrap(), &node.cfg.upstream.strip_query);
    let end = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match cistern::open_store(&node.cfg) {
            Ok(s) => break s,
            Err(_) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("opening the store: {e:#}"),
        }
    };
    store.stage(&d, &key, url).unwrap();
    store.flush().unwrap();
}

/// A prefetch that joins a device's transfer which will not store what it fetches (no digest known to
/// the device's request, under `require_digest`) still stores the file: it fetches it again itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_joining_a_device_transfer_that_stores_nothing_still_stores_the_file() {
    let origin = Origin::start().await;
    let body = random_bytes(200_000, 61);
    let slow_head = Behaviour {
        head_delay: Some(Duration::from_millis(800)),
        ..Default::default()
    };
    origin.put("/c/fw.swu", body.clone(), slow_head);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.upstream.require_digest = true;
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    let url = format!("{}/c/fw.swu", origin.url());
    let (gw, u) = (node.addr, url.clone());
    let device = tokio::spawn(async move { proxy_get(gw, &u, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = start_job(
        &node,
        &json!({"files": [{"url": url, "sha256": sha256_hex(&body), "size": body.len()}]}),
    )
    .await;
    let job = wait_job(&node, &id).await;
    assert_eq!(job["state"], "done", "{job}");
    assert!(device.await.unwrap().body == body);
    assert!(node.blobs().contains(&sha256_hex(&body)));
}

/// A manifest that names a wrong digest for a URL fails its entry, and holds back only requests that
/// expect that digest: a device asking the URL right after gets what the URL serves (it was held
/// 502 `digest-mismatch` for a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_in_a_manifest_does_not_hold_back_devices() {
    let origin = Origin::start().await;
    let body = random_bytes(50_000, 62);
    origin.put("/c/new.swu", body.clone(), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let url = format!("{}/c/new.swu", origin.url());
    let wrong = sha256_hex(b"the previous firmware");
    let id = start_job(&node, &json!({"files": [{"url": url, "sha256": wrong}]})).await;
    assert_eq!(wait_job(&node, &id).await["files"][0]["state"], "failed");
    let g = proxy_get(node.addr, &url, &[]).await;
    assert_eq!(g.status, 200, "{:?}", String::from_utf8_lossy(&g.body));
    assert!(g.body == body);
}
