//! Container images on a child gateway (SPEC 6, 9): a child with no `[[registries]]` stages images
//! through its parent's `/v2/`, and presents the parent's `pull_token` (on pulls and on a prefetch's
//! every request); an expired tag asked by many clients at once is revalidated with one HEAD. Plain
//! chains of two nodes: tests/registry.rs.

mod common;

use common::registry::*;
use common::*;
use http::StatusCode;
use std::sync::atomic::Ordering;

/// A child node of `parent` with no registries; `server` is added to its `[server]` section.
async fn child_of(parent: &Node, server: &str) -> Node {
    child_at(parent.addr, server).await
}

/// A child node whose parent is at `parent` (a node, or a front before one).
async fn child_at(parent: std::net::SocketAddr, server: &str) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nid = \"child\"\n[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[store]\ndir = \"{}\"\n\
         min_free = \"0\"\n[upstream]\nparents = [\"http://{}\"]\nallowed_origins = []\n\
         connect_timeout = \"2s\"\nidle_timeout = \"2s\"\n",
        tmp.path().join("data").display(),
        parent
    );
    let cfg = cistern::config::Config::from_toml_str(&text, "child", &[]).unwrap();
    let mut child = Node::start_with(cfg).await;
    child.keep(tmp);
    child
}

/// Posts a prefetch job to `node` and waits for its end; the job as `GET /v1/admin/prefetch/<id>`
/// answers it.
async fn prefetch(node: &Node, body: serde_json::Value) -> serde_json::Value {
    let url = node.url("/v1/admin/prefetch");
    let g = admin_request("POST", &url, body.to_string().into()).await;
    let text = String::from_utf8_lossy(&g.body).to_string();
    assert_eq!(g.status, StatusCode::ACCEPTED, "{text}");
    let id = g.json()["id"].as_str().unwrap().to_string();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let job = get(&node.url(&format!("/v1/admin/prefetch/{id}")))
            .await
            .json();
        if job["state"] != "running" {
            return job;
        }
        assert!(
            std::time::Instant::now() < end,
            "the job did not end: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A prefetch of an image on a child with no registries: fetched through the parent's `/v2/` (by the
/// registry's host, as `?ns=`, and by a path the parent resolves), stored on both; a later pull from
/// the child asks the registry for no blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_stages_images_through_its_parent() {
    let Some(s) = site("").await else { return };
    let child = child_of(&s.node, "").await;
    let image = format!("{}/test/app:1", s.front.addr);
    let job = prefetch(&child, serde_json::json!({"images": [image]})).await;
    assert_eq!(job["state"], "done", "{job}");
    for hex in s
        .image
        .layers
        .iter()
        .chain([&s.image.config, &s.image.manifest])
    {
        assert!(child.blobs().contains(hex), "the child stored {hex}");
        assert!(s.node.blobs().contains(hex), "the parent stored {hex}");
    }
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
    // By a path without a host: the parent picks its registry (its first).
    let job = prefetch(&child, serde_json::json!({"images": ["test/app:1"]})).await;
    assert_eq!(job["state"], "done", "{job}");
    pull(&child, &s.tmp.path().join("out")).await.unwrap();
    assert_eq!(s.front.blob_gets(), 3, "nothing more asked of the registry");
    // A child with no parent and no registries still refuses.
    let lone = registry_node(&s.front, "").await;
    let mut cfg = lone.cfg.clone();
    cfg.registries.clear();
    cfg.store.dir = s.tmp.path().join("lone");
    let lone = Node::start_with(cfg).await;
    let url = lone.url("/v1/admin/prefetch");
    let body = serde_json::json!({"images": ["test/app:1"]});
    let g = admin_request("POST", &url, body.to_string().into()).await;
    assert_eq!(g.status, StatusCode::BAD_REQUEST);
}

/// A parent with `server.pull_token`: a child that requires the same token presents it on its `/v2/`
/// requests up, and stores what it passes; a child without it is refused by the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_presents_its_pull_token_to_its_parent() {
    let Some(s) = site("").await else { return };
    let mut cfg = s.node.cfg.clone();
    cfg.server.pull_token = "pt-1234".into();
    cfg.store.dir = s.tmp.path().join("locked");
    let parent = Node::start_with(cfg).await;
    let child = child_of(&parent, "pull_token = \"pt-1234\"").await;
    let src = format!("docker://{}/test/app:1", child.addr);
    for i in 0..2 {
        let out = s.tmp.path().join(format!("out{i}"));
        let args = [
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "site:pt-1234",
            &src,
            &format!("oci:{}:1", out.display()),
        ];
        let o = skopeo(args.iter().map(|a| a.to_string()).collect()).await;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        same_blobs(&s.image, &out);
    }
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
    for hex in s.image.layers.iter().chain([&s.image.config]) {
        assert!(child.blobs().contains(hex), "the child stored {hex}");
    }
    let open = child_of(&parent, "").await;
    let layer = &s.image.layers[0];
    let g = get(&open.url(&format!("/v2/test/app/blobs/sha256:{layer}"))).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED, "the parent refused it");
}

/// A prefetch of an image on a child whose parent requires `server.pull_token`: every request of the
/// job to the parent's `/v2/`, its blobs' as well as its manifests', carries the child's token (which
/// a front before the parent records); the job ends `done`, and the child serves the image's blobs
/// with its parent gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_stages_images_through_a_parent_that_requires_its_pull_token() {
    let Some(s) = site("").await else { return };
    let mut cfg = s.node.cfg.clone();
    cfg.server.pull_token = "pt-1234".into();
    cfg.store.dir = s.tmp.path().join("locked");
    let parent = Node::start_with(cfg).await;
    let tap = Front::start(parent.addr.port()).await;
    tap.state.pass_auth.store(true, Ordering::SeqCst);
    let child = child_at(tap.addr, "pull_token = \"pt-1234\"").await;
    let image = format!("{}/test/app:1", s.front.addr);
    let job = prefetch(&child, serde_json::json!({"images": [image]})).await;
    assert_eq!(job["state"], "done", "{job}");
    let log = tap.state.log.lock().unwrap().clone();
    let auths = tap.state.authorizations.lock().unwrap().clone();
    for ((m, p), a) in log.iter().zip(&auths) {
        assert_eq!(a, "Bearer pt-1234", "{m} {p} without the token");
    }
    assert_eq!(
        tap.blob_gets(),
        3,
        "the blobs came through the parent: {log:?}"
    );
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
    tap.state.down.store(true, Ordering::SeqCst);
    s.front.state.down.store(true, Ordering::SeqCst);
    let token = [("authorization", "Bearer pt-1234")];
    for hex in s.image.layers.iter().chain([&s.image.config]) {
        let url = child.url(&format!("/v2/test/app/blobs/sha256:{hex}"));
        let g = request("GET", &url, &token).await;
        assert_eq!(g.status, StatusCode::OK, "{hex} served offline");
        assert_eq!(sha256_hex(&g.body), *hex);
    }
    let url = child.url(&format!(
        "/v2/test/app/manifests/sha256:{}",
        s.image.manifest
    ));
    let g = request("GET", &url, &token).await;
    assert_eq!(g.status, StatusCode::OK, "the manifest served offline");
    assert_eq!(sha256_hex(&g.body), s.image.manifest);
}

/// Sixteen clients asking a tag whose `tag_ttl` has passed, at once: one HEAD to the registry renews it
/// for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_tag_is_revalidated_once_for_concurrent_clients() {
    let Some(s) = site("tag_ttl = \"1s\"").await else {
        return;
    };
    let url = s.node.url("/v2/test/app/manifests/1");
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let g = request("GET", &url, &accept).await;
    assert_eq!(g.status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let asks: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { request("GET", &url, &accept).await })
        })
        .collect();
    for a in asks {
        let g = tokio::time::timeout(std::time::Duration::from_secs(20), a)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(sha256_hex(&g.body), s.image.manifest);
    }
    let heads = s
        .front
        .count(|m, p| m == "HEAD" && p.contains("/manifests/1"));
    assert_eq!(heads, 1, "one revalidation for sixteen clients");
    let gets = s
        .front
        .count(|m, p| m == "GET" && p.contains("/manifests/1"));
    assert_eq!(gets, 1, "renewed, not fetched again");
}
