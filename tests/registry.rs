//! Container images through cistern (SPEC 9) against a real registry (Debian's `docker-registry`) and a
//! real client (`skopeo`): pulled twice, the second pull asks the registry for no blob; a registry that
//! lies about a blob's bytes; a chain of two nodes; the registry stopped (offline pull, tags stale).

mod common;

use std::sync::atomic::Ordering;

use common::registry::{copy, programs_present, small_image, DistRegistry, Front, Image};
use common::*;
use http::StatusCode;

/// The registry with one image pushed as `test/app:1`, the front every pull goes through, and a
/// cistern node with that registry (named `local`) and `extra` config.
struct Site {
    image: Image,
    front: Front,
    node: Node,
    _reg: DistRegistry,
    tmp: tempfile::TempDir,
}

async fn site(extra: &str) -> Option<Site> {
    if !programs_present() {
        return None;
    }
    let reg = DistRegistry::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = small_image(&tmp.path().join("src"), "1", 7);
    let pushed = copy(
        &format!("oci:{}:1", src.dir.display()),
        &format!("docker://127.0.0.1:{}/test/app:1", reg.port),
    )
    .await;
    assert!(
        pushed.status.success(),
        "push: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    // The registry holds what skopeo pushed (it compresses the layers): its digests are the image's.
    let image = pushed_image(reg.port, "test/app", "1").await;
    let front = Front::start(reg.port).await;
    let node = registry_node(&front, extra).await;
    Some(Site {
        image,
        front,
        node,
        _reg: reg,
        tmp,
    })
}

/// The digests of an image as the registry at `port` holds it.
async fn pushed_image(port: u16, repo: &str, tag: &str) -> Image {
    let url = format!("http://127.0.0.1:{port}/v2/{repo}/manifests/{tag}");
    let g = request(
        "GET",
        &url,
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await;
    assert_eq!(g.status, StatusCode::OK);
    let hex = |v: &serde_json::Value| {
        v.as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };
    let m = g.json();
    let size = g.body.len() as u64
        + m["config"]["size"].as_u64().unwrap()
        + m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>();
    Image {
        dir: std::path::PathBuf::new(),
        size,
        manifest: sha256_hex(&g.body),
        config: hex(&m["config"]["digest"]),
        sizes: m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .collect(),
        layers: m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| hex(&l["digest"]))
            .collect(),
    }
}

async fn registry_node(front: &Front, extra: &str) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nid = \"top\"\n[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n\
         [upstream]\nallowed_origins = []\nconnect_timeout = \"2s\"\nidle_timeout = \"2s\"\nretries = 2\n\
         [[registries]]\nname = \"local\"\nurl = \"http://{}\"\n{extra}\n",
        tmp.path().join("data").display(),
        front.addr
    );
    let cfg = cistern::config::Config::from_toml_str(&text, "test", &[]).unwrap();
    let mut n = Node::start_with(cfg).await;
    n.keep(tmp);
    n
}

/// Pulls `test/app:1` through `node` into a new OCI layout; the layer files it wrote.
async fn pull(node: &Node, out: &std::path::Path) -> Result<(), String> {
    let o = copy(
        &format!("docker://{}/test/app:1", node.addr),
        &format!("oci:{}:1", out.display()),
    )
    .await;
    match o.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&o.stderr).to_string()),
    }
}

/// Waits until the object `hex` is stored under `n` keys (the tag's answers are committed).
async fn wait_keys(node: &Node, hex: &str, n: usize) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let g = get(&node.url("/v1/admin/content")).await;
        let body = String::from_utf8_lossy(&g.body).to_string();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let list = v
            .as_array()
            .or_else(|| v["objects"].as_array())
            .cloned()
            .unwrap_or_default();
        let keys = list
            .iter()
            .find(|o| o["digest"].as_str().is_some_and(|d| d.ends_with(hex)))
            .and_then(|o| o["keys"].as_array().map(|k| k.len()))
            .unwrap_or(0);
        if keys >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "{hex} not stored under {n} keys: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn same_blobs(image: &Image, out: &std::path::Path) {
    for hex in image.layers.iter().chain([&image.config, &image.manifest]) {
        let got = std::fs::read(out.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(sha256_hex(&got), *hex);
    }
}

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

/// Every file under `dir`, as text (lossy), for secrets that must not be there.
fn all_text(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&all_text(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_tokens_are_fetched_once_per_scope_and_basic_is_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let creds = format!("username = \"user\"\npassword_file = \"{}\"", pw.display());
    let Some(s) = site(&creds).await else { return };
    s.front.state.bearer.store(true, Ordering::SeqCst);
    for i in 0..2 {
        let out = s.tmp.path().join(format!("out{i}"));
        pull(&s.node, &out).await.unwrap();
        same_blobs(&s.image, &out);
    }
    assert_eq!(
        s.front.state.tokens.load(Ordering::SeqCst),
        1,
        "one token, reused"
    );
    assert_eq!(s.front.blob_gets(), 3);
    // Basic: the credentials go with the request the registry challenged.
    s.front.state.bearer.store(false, Ordering::SeqCst);
    s.front.state.basic.store(true, Ordering::SeqCst);
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let basic_before = s.front.count(|_, _| true);
    let g = request("GET", &s.node.url("/v2/test/app/manifests/1"), &accept).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        s.front.count(|_, _| true) > basic_before,
        "asked the registry (a new Accept)"
    );
    let text = all_text(&s.node.dir);
    assert!(
        !text.contains("secret") && !text.contains("tok-4711") && !text.contains("dXNlcjpzZWNyZXQ")
    );
    // Without credentials, the registry's refusal goes back to the client.
    let anon = registry_node(&s.front, "").await;
    let g = request("GET", &anon.url("/v2/test/app/manifests/1"), &accept).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
}

/// `podman pull` of an image whose registry is only reachable through its `registries.conf` mirror,
/// cistern; twice, into two empty image stores: the second pull asks the registry for no blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_pulls_through_a_registries_conf_mirror() {
    let podman = std::path::Path::new("/usr/bin/podman");
    let rootful = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !podman.exists() || !rootful {
        assert!(
            std::env::var_os("CISTERN_REQUIRE_PODMAN").is_none(),
            "podman (rootful) is not available"
        );
        eprintln!("SKIPPED: podman is not installed or this is not root (apt-get install podman)");
        return;
    }
    let Some(s) = site("").await else { return };
    let conf = s.tmp.path().join("registries.conf");
    let text = format!(
        "[[registry]]\nlocation = \"registry.invalid\"\n[[registry.mirror]]\nlocation = \"{}/local\"\ninsecure = true\n",
        s.node.addr
    );
    std::fs::write(&conf, text).unwrap();
    for i in 0..2 {
        let root = s.tmp.path().join(format!("podman{i}"));
        let conf = conf.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("/usr/bin/podman")
                .env("CONTAINERS_REGISTRIES_CONF", &conf)
                .arg("--root")
                .arg(root.join("root"))
                .arg("--runroot")
                .arg(root.join("run"))
                .args([
                    "--storage-driver",
                    "vfs",
                    "pull",
                    "-q",
                    "registry.invalid/test/app:1",
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "podman pull: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
}

/// `server.pull_token`: without it a client gets a 401 naming this node's token endpoint, which hands
/// the token back for Basic credentials whose password is the token (how `docker login` and `podman
/// login` work); `skopeo --src-creds` pulls with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_token_asks_for_a_login() {
    let Some(s) = site("").await else { return };
    let mut cfg = s.node.cfg.clone();
    cfg.server.pull_token = "pt-1234".into();
    cfg.store.dir = s.tmp.path().join("locked");
    let locked = Node::start_with(cfg).await;
    let g = get(&locked.url("/v2/")).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    let realm = format!("http://{}/v2/token", locked.addr);
    assert_eq!(
        g.header("www-authenticate"),
        format!("Bearer realm=\"{realm}\",service=\"cistern\"")
    );
    // "anyone:pt-1234"
    let basic = ("authorization", "Basic YW55b25lOnB0LTEyMzQ=");
    let g = request("GET", &realm, &[basic]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.json()["token"], "pt-1234");
    let g = request(
        "GET",
        &realm,
        &[("authorization", "Basic YW55b25lOnB0LTEyMzU=")],
    )
    .await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    let g = request(
        "GET",
        &locked.url("/v2/"),
        &[("authorization", "Bearer pt-1234")],
    )
    .await;
    assert_eq!(g.status, StatusCode::OK);
    let src = format!("docker://{}/test/app:1", locked.addr);
    let out = s.tmp.path().join("denied");
    let o = copy(&src, &format!("oci:{}:1", out.display())).await;
    assert!(!o.status.success(), "pulled without the token");
    assert_eq!(
        s.front.count(|_, _| true),
        0,
        "nothing reached the registry"
    );
    let out = s.tmp.path().join("allowed");
    let args = [
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "anyone:pt-1234",
        &src,
        &format!("oci:{}:1", out.display()),
    ];
    let o = common::registry::skopeo(args.iter().map(|a| a.to_string()).collect()).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_blobs(&s.image, &out);
}
