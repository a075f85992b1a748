//! Container images through cistern (SPEC 9) against a real registry (Debian's `docker-registry`) and a
//! real client (`skopeo`): pulled twice, the second pull asks the registry for no blob; a registry that
//! lies about a blob's bytes; a chain of two nodes; the registry stopped (offline pull, tags stale); a
//! layer shared by two images; a tag that moves. Upstream and downstream logins: tests/registry_auth.rs.

mod common;

use std::sync::atomic::Ordering;

use common::registry::*;
use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_twice_and_the_second_asks_the_registry_for_no_blob() {
    let Some(s) = site("").await else { return };
    let out1 = s.tmp.path().join("out1");
    pull(&s.node, &out1).await.unwrap();
    same_blobs(&s.image, &out1);
    let first = s.front.blob_gets();
    assert_eq!(first, 3, "two layers and the config, once each");
    let out2 = s.tmp.path().join("out2");
    pull(&s.node, &out2).await.unwrap();
    same_blobs(&s.image, &out2);
    assert_eq!(
        s.front.blob_gets(),
        first,
        "the second pull asked for no blob"
    );
    // A blob is the same object as the content-addressed form; stored on disk once.
    let layer = &s.image.layers[0];
    let g = get(&s.node.url(&format!("/v1/content/sha256/{layer}"))).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        g.header("cache-status").contains("hit"),
        "{}",
        g.header("cache-status")
    );
    assert_eq!(sha256_hex(&g.body), *layer);
    assert!(s.node.blobs().contains(layer));
    // The manifest by digest: its digest and media type.
    let m = &s.image.manifest;
    let g = get(&s.node.url(&format!("/v2/test/app/manifests/sha256:{m}"))).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.header("docker-content-digest"), format!("sha256:{m}"));
    assert_eq!(
        g.header("content-type"),
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(g.header("docker-distribution-api-version"), "registry/2.0");
    // A range of a blob, from the store.
    let g = request(
        "GET",
        &s.node.url(&format!("/v2/test/app/blobs/sha256:{layer}")),
        &[("range", "bytes=10-19")],
    )
    .await;
    assert_eq!(g.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(g.body.len(), 10);
    // The stored image, as the admin API lists it.
    let g = get(&s.node.url("/v1/admin/images")).await;
    assert_eq!(g.status, StatusCode::OK);
    let want = serde_json::json!([{
        "registry": s.front.addr.to_string(),
        "repository": "test/app",
        "tag": "1",
        "digest": format!("sha256:{m}"),
        "platforms": ["linux/amd64"],
        "size": s.image.size,
    }]);
    assert_eq!(g.json(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_choice_grammar_and_pushes() {
    let Some(s) = site("").await else { return };
    let n = &s.node;
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let g = get(&n.url("/v2/")).await;
    assert_eq!((g.status, g.body.as_ref()), (StatusCode::OK, &b"{}"[..]));
    assert_eq!(g.header("docker-distribution-api-version"), "registry/2.0");
    // By name prefix, by ns, and the default registry: the same manifest.
    let m = format!("sha256:{}", s.image.manifest);
    for path in [
        "/v2/local/test/app/manifests/1".to_string(),
        format!("/v2/test/app/manifests/1?ns={}", s.front.addr),
        "/v2/test/app/manifests/1".to_string(),
    ] {
        let g = request("GET", &n.url(&path), &[accept]).await;
        assert_eq!(g.status, StatusCode::OK, "{path}");
        assert_eq!(g.header("docker-content-digest"), m, "{path}");
    }
    let g = get(&n.url("/v2/test/app/manifests/1?ns=elsewhere.example")).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(g.json()["errors"][0]["code"], "NAME_UNKNOWN");
    let before = s.front.count(|_, _| true);
    for bad in [
        "/v2/Test/app/manifests/1",
        "/v2/a//b/manifests/1",
        "/v2/a/manifests/.x",
        "/v2/a/blobs/sha256:00",
    ] {
        let g = get(&n.url(bad)).await;
        assert_eq!(g.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(g.json()["errors"][0]["code"].is_string(), "{bad}");
    }
    for method in ["PUT", "POST", "PATCH", "DELETE"] {
        let g = request(method, &n.url("/v2/test/app/manifests/1"), &[]).await;
        assert_eq!(g.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(g.json()["errors"][0]["code"], "UNSUPPORTED");
    }
    assert_eq!(
        s.front.count(|_, _| true),
        before,
        "nothing refused reached the registry"
    );
    // A HEAD of a blob not stored asks the registry's HEAD and stores nothing; with a Via (a child
    // mirror asking) it starts the fill (distribution #4747).
    let layer = s.image.layers[0].clone();
    let size = s.image.sizes[0];
    let url = n.url(&format!("/v2/test/app/blobs/sha256:{layer}"));
    let g = request("HEAD", &url, &[]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(s.front.count(|m, p| m == "HEAD" && p.contains(&layer)), 1);
    assert_eq!(s.front.blob_gets(), 0);
    let g = request("HEAD", &url, &[("via", "1.1 child-gw")]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.header("content-length"), size.to_string());
    eventually(10, "the HEAD's fill stored the blob", || {
        n.blobs().contains(&layer)
    })
    .await;
    assert_eq!(s.front.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_blob_is_never_delivered_whole_nor_stored() {
    let Some(s) = site("").await else { return };
    s.front.state.tamper.store(true, Ordering::SeqCst);
    let layer = &s.image.layers[0];
    let url = s.node.url(&format!("/v2/test/app/blobs/sha256:{layer}"));
    let g = get(&url).await;
    assert!(
        g.aborted || g.status != StatusCode::OK,
        "a tampered blob came through whole"
    );
    assert_ne!(sha256_hex(&g.body), *layer);
    let g = get(&url).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
    assert!(!s.node.blobs().contains(layer));
    let out = s.tmp.path().join("out");
    assert!(
        pull(&s.node, &out).await.is_err(),
        "skopeo pulled a tampered image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chain_of_two_nodes_fetches_each_blob_once() {
    let Some(s) = site("").await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nid = \"child\"\n[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n\
         [upstream]\nparents = [\"http://{}\"]\nallowed_origins = []\nconnect_timeout = \"2s\"\nidle_timeout = \"2s\"\n",
        tmp.path().join("data").display(),
        s.node.addr
    );
    let cfg = cistern::config::Config::from_toml_str(&text, "child", &[]).unwrap();
    let mut child = Node::start_with(cfg).await;
    child.keep(tmp);
    for i in 0..2 {
        let out = s.tmp.path().join(format!("out{i}"));
        pull(&child, &out).await.unwrap();
        same_blobs(&s.image, &out);
    }
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
    for hex in s.image.layers.iter().chain([&s.image.config]) {
        assert!(child.blobs().contains(hex), "the child stored {hex}");
        assert!(s.node.blobs().contains(hex), "the top stored {hex}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_registry_stopped_stored_images_pull_and_tags_are_stale() {
    let Some(s) = site("tag_ttl = \"0s\"").await else {
        return;
    };
    let out = s.tmp.path().join("out1");
    pull(&s.node, &out).await.unwrap();
    let manifest_gets = |s: &Site| {
        s.front
            .count(|m, p| m == "GET" && p.contains("/manifests/"))
    };
    let gets = manifest_gets(&s);
    // Past tag_ttl, an unchanged tag is renewed by a HEAD, without a download.
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let url = s.node.url("/v2/test/app/manifests/1");
    let g = request("GET", &url, &[accept]).await;
    assert_eq!(g.status, StatusCode::OK);
    let m = s.image.manifest.clone();
    wait_keys(&s.node, &m, 2).await;
    let g = request("GET", &url, &[accept]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        s.front
            .count(|m, p| m == "HEAD" && p.contains("/manifests/1"))
            >= 1
    );
    assert_eq!(
        manifest_gets(&s),
        gets + 1,
        "the new Accept fetched once, then renewed by HEAD"
    );
    s.front.state.down.store(true, Ordering::SeqCst);
    let g = request("GET", &url, &[accept]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        g.header("cache-status").contains("stale"),
        "{}",
        g.header("cache-status")
    );
    assert_eq!(
        g.header("docker-content-digest"),
        format!("sha256:{}", s.image.manifest)
    );
    let out = s.tmp.path().join("out2");
    pull(&s.node, &out).await.unwrap();
    same_blobs(&s.image, &out);
    // What was never stored is a 504, quickly.
    let g = get(&s.node.url("/v2/test/other/manifests/1")).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
}

/// dockerd and containerd resolve a tag with a HEAD alone, then ask for the manifest by digest: the
/// HEAD stores the tag's manifest, so that the tag still resolves once the registry is out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_resolved_by_head_alone_resolves_offline() {
    let Some(s) = site("tag_ttl = \"0s\"").await else {
        return;
    };
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let tag = s.node.url("/v2/test/app/manifests/1");
    let digest = format!("sha256:{}", s.image.manifest);
    let h = request("HEAD", &tag, &[accept]).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.header("docker-content-digest"), digest);
    let by_digest = s.node.url(&format!("/v2/test/app/manifests/{digest}"));
    assert_eq!(
        request("GET", &by_digest, &[accept]).await.status,
        StatusCode::OK
    );
    let manifest_gets = s
        .front
        .count(|m, p| m == "GET" && p.contains("/manifests/"));
    assert_eq!(
        manifest_gets, 1,
        "the HEAD's fetch served the GET by digest"
    );
    s.front.state.down.store(true, Ordering::SeqCst);
    for method in ["HEAD", "GET"] {
        let g = request(method, &tag, &[accept]).await;
        assert_eq!(g.status, StatusCode::OK, "{method} of the tag offline");
        assert_eq!(g.header("docker-content-digest"), digest, "{method}");
    }
}

/// A layer shared by two images crosses the uplink once; a tag pushed again is seen once `tag_ttl` has
/// passed (the HEAD names another digest: the new manifest is fetched).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_layer_crosses_once_and_a_moved_tag_is_followed() {
    let Some(s) = site("tag_ttl = \"0s\"").await else {
        return;
    };
    pull(&s.node, &s.tmp.path().join("out-first"))
        .await
        .unwrap();
    assert_eq!(s.front.blob_gets(), 3);
    // Another image with the same big layer (same files, same tar) and a small layer of its own.
    let big: &[(&str, bytes::Bytes)] = &[("payload.bin", random_bytes(1 << 20, 7))];
    let own: &[(&str, bytes::Bytes)] = &[("other.txt", bytes::Bytes::from_static(b"other\n"))];
    let dir = s.tmp.path().join("other");
    common::registry::oci_image(&dir, "1", &[big, own]);
    let reg_port = s.front.upstream_port();
    for dst in ["test/other:1", "test/app:1"] {
        let o = copy(
            &format!("oci:{}:1", dir.display()),
            &format!("docker://127.0.0.1:{reg_port}/{dst}"),
        )
        .await;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let other = pushed_image(reg_port, "test/other", "1").await;
    assert_eq!(
        other.layers[0], s.image.layers[0],
        "the big layer is shared"
    );
    let o = copy(
        &format!("docker://{}/test/other:1", s.node.addr),
        &format!("oci:{}:1", s.tmp.path().join("out-other").display()),
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        s.front.blob_gets(),
        5,
        "its config and small layer; the big one was stored"
    );
    // test/app:1 now names the other image: a pull gets it, its blobs all stored already.
    let out = s.tmp.path().join("out-app");
    pull(&s.node, &out).await.unwrap();
    same_blobs(&other, &out);
    assert_eq!(s.front.blob_gets(), 5, "nothing more crossed");
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let g = request("GET", &s.node.url("/v2/test/app/manifests/1"), &[accept]).await;
    assert_eq!(
        g.header("docker-content-digest"),
        format!("sha256:{}", other.manifest)
    );
}

/// A prefetch job with `images`: the image's manifest, config and layers are its files, staged ahead
/// of need; a pull afterwards asks the registry for no blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefetch_job_stages_an_image() {
    let Some(s) = site("").await else { return };
    let body = serde_json::json!({"images": [format!("{}/test/app:1", s.front.addr)], "pin": true});
    let g = admin_request(
        "POST",
        &s.node.url("/v1/admin/prefetch"),
        body.to_string().into(),
    )
    .await;
    assert_eq!(
        g.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&g.body)
    );
    let id = g.json()["id"].as_str().unwrap().to_string();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let job = loop {
        let g = get(&s.node.url(&format!("/v1/admin/prefetch/{id}"))).await;
        let job = g.json();
        if job["state"] != "running" {
            break job;
        }
        assert!(
            std::time::Instant::now() < end,
            "the job did not end: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    let files: Vec<String> = job["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["sha256"].as_str().unwrap_or("").to_string())
        .collect();
    let mut want = vec![s.image.manifest.clone(), s.image.config.clone()];
    want.extend(s.image.layers.iter().cloned());
    for hex in &want {
        assert!(
            files.iter().any(|f| f.contains(hex.as_str())),
            "{hex} not in {files:?}"
        );
        assert!(s.node.blobs().contains(hex), "{hex} not stored");
    }
    assert_eq!(s.front.blob_gets(), 3);
    pull(&s.node, &s.tmp.path().join("out")).await.unwrap();
    assert_eq!(s.front.blob_gets(), 3, "the pull asked for no blob");
    for bad in ["elsewhere.example/test/app:1", "test/App:1"] {
        let body = serde_json::json!({"images": [bad]});
        let g = admin_request(
            "POST",
            &s.node.url("/v1/admin/prefetch"),
            body.to_string().into(),
        )
        .await;
        assert_eq!(g.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// A multi-platform index: a prefetch with `platforms` stages the index and the asked platform's
/// manifest, config and layers only; the admin listing names both platforms.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_is_staged_for_the_platforms_asked() {
    let Some(s) = site("").await else { return };
    let dir = s.tmp.path().join("multi");
    let (_, amd, arm) = oci_index(&dir, "2");
    let o = skopeo(
        [
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &format!("oci:{}:2", dir.display()),
            &format!(
                "docker://127.0.0.1:{}/test/multi:2",
                s.front.upstream_port()
            ),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let body = serde_json::json!({
        "images": [format!("local/test/multi:2")],
        "platforms": ["linux/arm64"],
    });
    let g = admin_request(
        "POST",
        &s.node.url("/v1/admin/prefetch"),
        body.to_string().into(),
    )
    .await;
    assert_eq!(
        g.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&g.body)
    );
    let id = g.json()["id"].as_str().unwrap().to_string();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let job = loop {
        let job = get(&s.node.url(&format!("/v1/admin/prefetch/{id}")))
            .await
            .json();
        if job["state"] != "running" {
            break job;
        }
        assert!(
            std::time::Instant::now() < end,
            "the job did not end: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    // The index, the arm64 manifest, its config, the shared layer and its own layer.
    assert_eq!(job["files"].as_array().unwrap().len(), 5, "{job}");
    // skopeo pushed the configs as they were (the layers it compressed).
    assert!(s.node.blobs().contains(&arm.config));
    assert!(
        !s.node.blobs().contains(&amd.config),
        "the amd64 image was not staged"
    );
    let images = get(&s.node.url("/v1/admin/images")).await.json();
    let multi = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["repository"] == "test/multi")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        multi["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"]),
        "{images}"
    );
    assert_eq!(multi["tag"], "2");
}

/// A registry that answers a tag with other bytes than its `Docker-Content-Digest` names: the manifest
/// is never delivered whole, nor stored under the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_manifest_by_tag_is_refused() {
    let Some(s) = site("").await else { return };
    s.front.state.tamper_manifests.store(true, Ordering::SeqCst);
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let url = s.node.url("/v2/test/app/manifests/1");
    for _ in 0..2 {
        // A connection closed before any status line (the request panics) delivers nothing either.
        let url = url.clone();
        let first = tokio::spawn(async move { request("GET", &url, &[accept]).await });
        if let Ok(g) = first.await {
            assert!(
                g.aborted || g.status != StatusCode::OK,
                "a tampered manifest came through whole"
            );
        }
    }
    let out = s.tmp.path().join("out");
    assert!(
        pull(&s.node, &out).await.is_err(),
        "skopeo pulled a tampered manifest"
    );
    let images = get(&s.node.url("/v1/admin/images")).await.json();
    assert_eq!(
        images,
        serde_json::json!([]),
        "nothing stored under the tag"
    );
}
