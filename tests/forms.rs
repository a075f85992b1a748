//! The request forms and who may use them, against a real loopback origin: the URL forms sharing one
//! object, the allowlist and the client access list, HEAD and other methods, what passes through
//! unstored (private, Authorization, upstream errors), redirects, and Via loops.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allowlist_get_403_and_no_connection() {
    let origin = Origin::start().await;
    origin.put("/a.bin", random_bytes(10, 10), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/a.bin?cacheHostOrigin=evil.example.com")).await;
    assert_eq!(g.status, 403);
    assert_eq!(g.json()["error"], "origin-not-allowed");
    // `localhost` on the origin's port: allowed by no pattern.
    let g = proxy_get(
        node.addr,
        &format!("http://localhost:{}/a.bin", origin.addr.port()),
        &[],
    )
    .await;
    assert_eq!(g.status, 403);
    // Allowed as a host pattern, but it resolves to loopback, which no pattern names literally.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.upstream
        .allowed_origins
        .push(format!("localhost:{}", origin.addr.port()));
    cfg.origins.clear();
    cfg.upstream
        .allowed_origins
        .retain(|p| p.starts_with("localhost"));
    let n2 = Node::start_with(cfg).await;
    let g = proxy_get(
        n2.addr,
        &format!("http://localhost:{}/a.bin", origin.addr.port()),
        &[],
    )
    .await;
    assert_eq!(g.status, 403, "{:?}", g.body);
    assert_eq!(g.json()["error"], "address-not-allowed");
    assert_eq!(origin.gets("/a.bin"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_loopback_address_lets_only_its_own_port_through_never_a_name() {
    let origin = Origin::start().await;
    origin.put("/a.bin", random_bytes(10, 13), Behaviour::default());
    // A loopback-only service on the gateway, and a wildcard that a hostile or rebinding DNS could
    // point at loopback (`localhost` is under `*.localhost` and resolves to 127.0.0.1).
    let secret = Origin::start().await;
    secret.put("/s", "LOOPBACK-ONLY-SECRET".into(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    let port = secret.addr.port();
    cfg.upstream
        .allowed_origins
        .push(format!("*.localhost:{port}"));
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    // The named origin, 127.0.0.1 on its own port, works.
    assert_eq!(get(&node.url("/o/t/a.bin")).await.status, 200);
    // 127.0.0.1 is named, but by another pattern and port: not through a name.
    for url in [
        format!("http://localhost:{port}/s"),
        format!("http://LocalHost:{port}/s"),
    ] {
        let g = proxy_get(node.addr, &url, &[]).await;
        assert_eq!(g.status, 403, "{url}: {:?}", g.body);
        assert_eq!(g.json()["error"], "address-not-allowed");
    }
    let g = get(&node.url(&format!("/s?cacheHostOrigin=localhost:{port}"))).await;
    assert_eq!(g.status, 403, "{:?}", g.body);
    assert_eq!(secret.gets("/s"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_url_forms_share_one_object() {
    let origin = Origin::start().await;
    let body = random_bytes(50_000, 11);
    origin.put(
        "/c/fw.bin",
        body.clone(),
        Behaviour {
            cache_control: Some("max-age=3600".into()),
            ..Default::default()
        },
    );
    let node = Node::start(&origin, "").await;
    let host = format!("127.0.0.1:{}", origin.addr.port());
    let a = proxy_get(
        node.addr,
        &format!("http://{host}/c/fw.bin?sv=1&sig=SECRET1"),
        &[],
    )
    .await;
    assert_eq!(a.body, body);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    let b = get(&node.url(&format!("/c/fw.bin?sv=1&sig=OTHER&cacheHostOrigin={host}"))).await;
    assert_eq!(b.body, body);
    assert_eq!(b.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/c/fw.bin"), 1);
}

/// The same blob behind two SAS URLs whose other parameters come in another order is one object:
/// the parameters left once the SAS ones are stripped form the key in order of name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sas_url_is_one_object_whatever_the_order_of_its_parameters() {
    let origin = Origin::start().await;
    let body = random_bytes(20_000, 13);
    let b = Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/c/sas.bin", body.clone(), b);
    let node = Node::start(&origin, "").await;
    let host = format!("127.0.0.1:{}", origin.addr.port());
    let first = format!("http://{host}/c/sas.bin?part=2&sv=1&file=fw&se=9&sig=ONE");
    let a = proxy_get(node.addr, &first, &[]).await;
    assert_eq!(a.body, body);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    let second = format!("http://{host}/c/sas.bin?sig=TWO&file=fw&sv=2&part=2&se=8");
    let b = proxy_get(node.addr, &second, &[]).await;
    assert_eq!(b.body, body);
    assert_eq!(b.header("cache-status"), "cistern; hit");
    let third = format!("/c/sas.bin?se=7&part=2&sig=THREE&file=fw&cacheHostOrigin={host}");
    let c = get(&node.url(&third)).await;
    assert_eq!(c.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/c/sas.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_miss_starts_no_download_and_other_methods_on_content_get_405() {
    let origin = Origin::start().await;
    origin.put("/h.bin", random_bytes(1000, 12), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let g = request("HEAD", &node.url("/o/t/h.bin"), &[]).await;
    assert_eq!(g.status, 200);
    assert_eq!(origin.gets("/h.bin"), 0);
    assert_eq!(origin.requests("/h.bin")[0].0, "HEAD");
    assert!(node.blobs().is_empty());
    // The named-origin form passes other methods through (SPEC 3); the content form does not.
    let g = request(
        "POST",
        &node.url(&format!("/v1/content/sha256/{}", "a".repeat(64))),
        &[],
    )
    .await;
    assert_eq!(g.status, 405);
    assert_eq!(g.header("allow"), "GET, HEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_authorized_responses_are_passed_through_not_stored() {
    let origin = Origin::start().await;
    let body = random_bytes(1000, 13);
    origin.put(
        "/p.bin",
        body.clone(),
        Behaviour {
            cache_control: Some("private".into()),
            ..Default::default()
        },
    );
    origin.put("/auth.bin", body.clone(), Behaviour::default());
    let node = Node::start(&origin, "").await;
    assert_eq!(get(&node.url("/o/t/p.bin")).await.body, body);
    assert_eq!(get(&node.url("/o/t/p.bin")).await.body, body);
    assert_eq!(origin.gets("/p.bin"), 2);
    let g = request(
        "GET",
        &node.url("/o/t/auth.bin"),
        &[("authorization", "Bearer x")],
    )
    .await;
    assert_eq!(g.body, body);
    assert_eq!(g.header("cache-status"), "cistern; fwd=bypass");
    assert!(node.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_and_are_not_stored() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/missing.bin")).await;
    assert_eq!(g.status, 404);
    assert_eq!(&g.body[..], b"no such file");
    assert!(node.blobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_loops_get_508_and_junk_gets_json_errors() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    let g = request(
        "GET",
        &node.url("/o/t/x"),
        &[("via", "1.1 other, 1.1 test-node")],
    )
    .await;
    assert_eq!(g.status, 508);
    let g = request("GET", &node.url("/o/t/x"), &[("via", "1.1 test-node-2")]).await;
    assert_ne!(g.status, 508);
    let g = get(&node.url("/o/t/../etc/passwd")).await;
    assert_eq!(g.status, 400);
    assert!(g.json()["error"].is_string());
    let g = get(&node.url("/nothing-here")).await;
    assert_eq!(g.status, 404);
    assert_eq!(g.header("content-type"), "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_and_checked() {
    let origin = Origin::start().await;
    let body = random_bytes(40_000, 17);
    origin.put(
        "/real.bin",
        body.clone(),
        Behaviour {
            cache_control: Some("max-age=60".into()),
            ..Default::default()
        },
    );
    origin.redirect("/moved.bin", "/real.bin");
    origin.redirect("/away.bin", "http://169.254.169.254/latest/meta-data");
    let node = Node::start(&origin, "").await;
    let g = get(&node.url("/o/t/moved.bin")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, body);
    eventually(5, "stored", || node.blobs().len() == 1).await;
    // Stored under the original key: the next ask is a hit.
    assert_eq!(
        get(&node.url("/o/t/moved.bin"))
            .await
            .header("cache-status"),
        "cistern; hit"
    );
    let g = get(&node.url("/o/t/away.bin")).await;
    assert_eq!(g.status, 502);
    assert_eq!(g.json()["error"], "redirect-not-allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allowed_clients_and_admin_without_token_are_refused() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.allowed_clients = vec!["10.0.0.0/8".parse().unwrap()];
    let fenced = Node::start_with(cfg).await;
    let g = get(&fenced.url("/healthz")).await;
    assert_eq!(g.status, 403);
    assert_eq!(g.json()["error"], "client-not-allowed");

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.admin_token = "s3cret".into();
    let node = Node::start_with(cfg).await;
    let g = get(&node.url("/v1/admin/content")).await;
    assert_eq!(g.status, 401);
    assert_eq!(g.header("www-authenticate"), "Bearer");
    let g = request(
        "GET",
        &node.url("/v1/admin/content"),
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(g.status, 401);
    let g = request(
        "GET",
        &node.url("/v1/admin/content"),
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(g.status, 200);
}

/// Without a token, the admin API refuses what a web page open in a browser on the gateway can send:
/// a DNS-rebound name as Host, a foreign Origin, a CORS-simple content type (SPEC 6). A loopback client
/// naming a loopback Host, with JSON (or octet-stream for a sideload), is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_without_token_refuses_cross_site_and_rebound_requests() {
    let origin = Origin::start().await;
    origin.put("/fw.swu", random_bytes(1000, 11), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let port = node.addr.port();
    let content = node.url("/v1/admin/content");
    let prefetch = node.url("/v1/admin/prefetch");
    let manifest = serde_json::json!({"files": [{"url": format!("{}/fw.swu", origin.url()),
        "sha256": sha256_hex(&random_bytes(1000, 11))}]})
    .to_string();
    let json = ("content-type", "application/json; charset=utf-8");
    let rebound = format!("rebind.evil.example:{port}");
    let g = request("GET", &content, &[("host", &rebound)]).await;
    assert_eq!(g.status, 403);
    assert_eq!(g.json()["error"], "admin-host-not-loopback");
    let post = |headers: Vec<(&'static str, String)>| {
        let (prefetch, manifest) = (prefetch.clone(), manifest.clone());
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request_body("POST", &prefetch, &h, manifest.into()).await
        }
    };
    let refusals = [
        (
            vec![("content-type", "text/plain".to_string())],
            "admin-content-type",
        ),
        (
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            "admin-content-type",
        ),
        (vec![], "admin-content-type"),
        (
            vec![
                ("origin", "http://evil.example".into()),
                (json.0, json.1.into()),
            ],
            "admin-origin-not-loopback",
        ),
        (
            vec![("origin", "null".into()), (json.0, json.1.into())],
            "admin-origin-not-loopback",
        ),
        (
            vec![("host", rebound.clone()), (json.0, json.1.into())],
            "admin-host-not-loopback",
        ),
    ];
    for (headers, code) in refusals {
        let what = format!("{headers:?}");
        let g = post(headers).await;
        assert_eq!(g.status, 403, "{what}");
        assert_eq!(g.json()["error"], code, "{what}");
        assert!(g.json()["detail"].as_str().unwrap().contains("admin_token"));
    }
    assert_eq!(origin.gets("/fw.swu"), 0, "a refused prefetch ran");
    // The same from a loopback page, or from curl / the CLI, is served.
    let local = format!("http://localhost:{port}");
    let g = post(vec![
        ("host", format!("LOCALHOST.:{port}")),
        ("origin", local),
        (json.0, json.1.into()),
    ])
    .await;
    assert_eq!(g.status, 202, "{:?}", g.body);
    let g = request("GET", &content, &[("host", &format!("[::1]:{port}"))]).await;
    assert_eq!(g.status, 200);
    // The sideload takes its raw bytes as application/octet-stream, never as a CORS-simple type.
    let body = random_bytes(500, 12);
    let put = node.url(&format!("/v1/admin/content/sha256/{}", sha256_hex(&body)));
    let text = [("content-type", "text/plain")];
    assert_eq!(
        request_body("PUT", &put, &text, body.clone()).await.status,
        403
    );
    // (The prefetch accepted above may have stored its own file by now: only the sideload counts.)
    assert!(
        !node.blobs().contains(&sha256_hex(&body)),
        "a refused sideload was stored"
    );
    let octets = [("content-type", "application/octet-stream")];
    assert_eq!(
        request_body("PUT", &put, &octets, body.clone())
            .await
            .status,
        201
    );
    assert!(node.blobs().contains(&sha256_hex(&body)));
}
