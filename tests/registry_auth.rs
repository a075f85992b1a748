//! Container image logins (SPEC 9), against a real registry behind a front that asks for tokens or
//! Basic credentials: cistern's bearer tokens fetched once per scope and reused, Basic answered, no
//! secret on disk; `server.pull_token` for clients (`skopeo --src-creds`); and `podman pull` through a
//! `registries.conf` mirror.

mod common;

use std::sync::atomic::Ordering;

use common::registry::*;
use common::upstream_auth::{auth_site, RegistryAuth};
use common::*;
use http::StatusCode;

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

/// Two pulls through cistern with the registry's credentials; each blob crossed the uplink once; the
/// password (and the Basic value made of it) nowhere in the store.
async fn pulls_twice_with_credentials(s: &Site) {
    for i in 0..2 {
        let out = s.tmp.path().join(format!("out{i}"));
        pull(&s.node, &out).await.unwrap();
        same_blobs(&s.image, &out);
    }
    assert_eq!(s.front.blob_gets(), 3, "each blob crossed the uplink once");
    let text = all_text(&s.node.dir);
    assert!(!text.contains("secret") && !text.contains("dXNlcjpzZWNyZXQ"));
}

/// `docker-registry` asking for Basic credentials from its htpasswd file: cistern answers with the
/// registry's `username` and `password_file`; without them the registry's 401 goes to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_registry_with_htpasswd() {
    let Some((s, _)) = auth_site(RegistryAuth::Htpasswd, true).await else {
        return;
    };
    pulls_twice_with_credentials(&s).await;
    let anon = registry_node(&s.front, "").await;
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let g = request("GET", &anon.url("/v2/test/app/manifests/1"), &accept).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    let layer = &s.image.layers[0];
    let g = get(&anon.url(&format!("/v2/test/app/blobs/sha256:{layer}"))).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
}

/// `docker-registry` with its `token` auth: cistern asks the token service named in the challenge with
/// the registry's credentials, and reuses the token: one per scope for two pulls; the token is not on
/// disk either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_registry_with_token_auth() {
    let Some((s, Some(tokens))) = auth_site(RegistryAuth::Token, true).await else {
        return;
    };
    pulls_twice_with_credentials(&s).await;
    let issued = tokens.issued.lock().unwrap().clone();
    let want = std::collections::HashMap::from([("repository:test/app:pull".to_string(), 1)]);
    assert_eq!(issued, want, "one token for the repository, reused");
    let jwt = tokens.last.lock().unwrap().clone();
    assert!(!jwt.is_empty() && !all_text(&s.node.dir).contains(&jwt));
    // Without credentials, the token service refuses and the registry's 401 goes to the client.
    let anon = registry_node_allowing(&s.front, &[tokens.addr.to_string()], "").await;
    let g = get(&anon.url(&format!("/v2/test/app/blobs/sha256:{}", s.image.config))).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    assert_eq!(tokens.total(), 1, "the refused asks got no token");
}
