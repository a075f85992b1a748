//! Nested gateways: a child sends misses to its parent in forward-proxy form; one origin transfer for a
//! whole chain; failover to the next parent; content by digest through the chain; loops get 508.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_makes_one_origin_transfer() {
    let origin = Origin::start().await;
    let body = random_bytes(3 << 20, 31);
    let b = Behaviour {
        rate: Some(16 << 20),
        cache_control: Some("max-age=600".into()),
        ..Default::default()
    };
    origin.put("/fw.bin", body.clone(), b);
    let (top, child) = top_and_child(&origin, "TOP").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = child.url("/o/t/fw.bin");
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.body, body);
        statuses.push(g.header("cache-status"));
    }
    assert_eq!(origin.gets("/fw.bin"), 1);
    // The parent saw the child's Via and an absolute-form request for the origin URL.
    let via = origin.requests("/fw.bin")[0]
        .1
        .get("via")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(via.contains("child") && via.contains("test-node"), "{via}");
    assert!(
        statuses
            .iter()
            .any(|s| s == "cistern; fwd=uri-miss; stored, cistern; fwd=uri-miss; stored"),
        "{statuses:?}"
    );
    eventually(5, "stored at both levels", || {
        top.blobs().len() == 1 && child.blobs().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_parent_is_skipped() {
    let origin = Origin::start().await;
    let body = random_bytes(100_000, 32);
    origin.put("/a.bin", body.clone(), Behaviour::default());
    let (_top, child) = top_and_child(&origin, "http://127.0.0.1:1,TOP").await;
    let g = get(&child.url("/o/t/a.bin")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, body);
    let health = child.gw.as_ref().unwrap().fetcher.parents_health();
    assert!(!health[0].healthy);
    assert!(health[1].healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_by_digest_comes_down_the_chain() {
    let origin = Origin::start().await;
    let (top, child) = top_and_child(&origin, "TOP").await;
    let body = random_bytes(64_000, 33);
    let hex = sha256_hex(&body);
    let put = admin_request(
        "PUT",
        &top.url(&format!("/v1/admin/content/sha256/{hex}")),
        body.clone(),
    )
    .await;
    assert_eq!(put.status, 201);
    let g = get(&child.url(&format!("/v1/content/sha256/{hex}"))).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, body);
    eventually(5, "stored at the child", || {
        child.blobs() == vec![hex.clone()]
    })
    .await;
    let missing = get(&child.url(&format!("/v1/content/sha256/{}", "1".repeat(64)))).await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_through_the_chain_gets_508() {
    let origin = Origin::start().await;
    let (top, child) = top_and_child(&origin, "TOP").await;
    // A request that already passed through the child comes back to it through the parent.
    let g = request("GET", &top.url("/o/t/x.bin"), &[("via", "1.1 child")]).await;
    assert_ne!(g.status, 508);
    let g = request("GET", &child.url("/o/t/x.bin"), &[("via", "1.1 child")]).await;
    assert_eq!(g.status, 508);
}

/// A node with a TLS listener (certificate for 127.0.0.1) in front of `origin`: the node, its TLS
/// address and the certificate's PEM file (kept in the returned directory).
async fn tls_node(
    origin: &Origin,
) -> (
    Node,
    std::net::SocketAddr,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let certs = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (
        certs.path().join("server.pem"),
        certs.path().join("server.key"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();

    let top_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(top_dir.path(), origin, "");
    cfg.server.tls_listen = "127.0.0.1:0".into();
    cfg.server.tls_cert = Some(cert.clone());
    cfg.server.tls_key = Some(key.clone());
    let top = Node::start_with(cfg).await;
    let tls_addr = top.gw.as_ref().unwrap().tls_addr.unwrap();
    let mut top = top;
    top.keep(top_dir);
    (top, tls_addr, cert, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_reaches_its_parent_over_tls() {
    let origin = Origin::start().await;
    let body = random_bytes(500_000, 34);
    origin.put("/tls.bin", body.clone(), Behaviour::default());
    let (top, tls_addr, cert, _certs) = tls_node(&origin).await;

    let child_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(child_dir.path(), &origin, "");
    cfg.node.id = "child".into();
    cfg.upstream.parents = vec![format!("https://127.0.0.1:{}", tls_addr.port())];
    cfg.upstream.ca_file = Some(cert.clone());
    let child = Node::start_with(cfg).await;
    let g = get(&child.url("/o/t/tls.bin")).await;
    assert_eq!(g.status, 200, "{:?}", g.body);
    assert_eq!(g.body, body);
    eventually(5, "stored at the top", || top.blobs().len() == 1).await;

    // Without the edge CA the child must refuse the parent's certificate.
    let other_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(other_dir.path(), &origin, "");
    cfg.node.id = "untrusting".into();
    cfg.upstream.parents = vec![format!("https://127.0.0.1:{}", tls_addr.port())];
    let untrusting = Node::start_with(cfg).await;
    let g = get(&untrusting.url("/o/t/tls.bin")).await;
    assert_eq!(g.status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_reached_through_the_site_proxy() {
    let origin = Origin::start().await;
    let body = random_bytes(80_000, 35);
    origin.put("/p.bin", body.clone(), Behaviour::default());
    // Another cistern plays the site's HTTP proxy (it accepts absolute-form requests).
    let proxy = Node::start(&origin, "").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &origin, "");
    cfg.node.id = "behind-proxy".into();
    cfg.upstream.proxy = format!("http://{}", proxy.addr);
    let node = Node::start_with(cfg).await;
    let g = get(&node.url("/o/t/p.bin")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, body);
    let via = origin.requests("/p.bin")[0]
        .1
        .get("via")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        via.contains("behind-proxy") && via.contains("test-node"),
        "{via}"
    );
    // The host-pattern check still applies before anything reaches the proxy.
    let g = get(&node.url("/x?cacheHostOrigin=evil.example.com")).await;
    assert_eq!(g.status, 403);
}

/// A site proxy that only tunnels: it answers `CONNECT host:port` with 200 and splices bytes. It records
/// the targets it was asked for.
async fn connect_proxy() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                log.lock().unwrap().push(line.clone());
                let Some(target) = line
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                else {
                    let _ = client.write_all(b"HTTP/1.1 405 Only CONNECT\r\n\r\n").await;
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_are_reached_through_a_connect_tunnel_of_the_site_proxy() {
    let origin = Origin::start().await;
    let body = random_bytes(300_000, 36);
    origin.put("/s.bin", body.clone(), Behaviour::default());
    // The https origin: a node's TLS listener, which serves the plain origin as named origin `t`.
    let (_https, tls_addr, cert, _certs) = tls_node(&origin).await;
    let (proxy, seen) = connect_proxy().await;
    let node_with = |ca: Option<&std::path::Path>| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), &origin, "");
        cfg.node.id = "behind-proxy".into();
        cfg.origins[0].url = format!("https://127.0.0.1:{}/o/t", tls_addr.port());
        cfg.upstream.allowed_origins = vec![format!("127.0.0.1:{}", tls_addr.port())];
        cfg.upstream.proxy = format!("http://{proxy}");
        cfg.upstream.ca_file = ca.map(|c| c.to_path_buf());
        (cfg, dir)
    };
    let (cfg, dir) = node_with(Some(&cert));
    let mut node = Node::start_with(cfg).await;
    node.keep(dir);
    let g = get(&node.url("/o/t/s.bin")).await;
    assert_eq!(g.status, 200, "{:?}", g.body);
    assert_eq!(g.body, body);
    assert_eq!(
        seen.lock().unwrap().first().map(String::as_str),
        Some(format!("CONNECT 127.0.0.1:{} HTTP/1.1", tls_addr.port()).as_str()),
        "the origin was not reached through a tunnel"
    );
    assert_eq!(origin.gets("/s.bin"), 1);

    // TLS runs end to end inside the tunnel: without the origin's CA the certificate is refused.
    origin.put("/u.bin", random_bytes(1000, 37), Behaviour::default());
    let (cfg, dir) = node_with(None);
    let mut untrusting = Node::start_with(cfg).await;
    untrusting.keep(dir);
    let g = get(&untrusting.url("/o/t/u.bin")).await;
    // An upstream certificate that does not verify: 502 upstream-tls (SPEC 3, "HTTPS payloads").
    assert_eq!(g.status, 502, "{:?}", g.body);
    assert_eq!(g.json()["error"], "upstream-tls");
    let msg = g.json()["detail"].as_str().unwrap_or("").to_lowercase();
    assert!(msg.contains("certificate"), "{msg}");
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the second node did not use the tunnel"
    );
    assert_eq!(origin.gets("/u.bin"), 0);
}

/// A TLS client that trusts only the certificate in `pem`: Ok when the node presents it.
async fn tls_connect(
    addr: std::net::SocketAddr,
    pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(c?).map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// A renewed certificate is served without a restart; a connection opened before keeps its session;
/// a broken new file is refused and the old certificate kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_tls_certificate_is_picked_up_without_a_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let (_top, tls_addr, cert, certs) = tls_node(&origin).await;
    let key = certs.path().join("server.key");
    let old = std::fs::read_to_string(&cert).unwrap();
    let mut open = tls_connect(tls_addr, &old)
        .await
        .expect("the first certificate");
    // A half-written renewal: logged, the old certificate kept.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        tls_connect(tls_addr, &old).await.is_ok(),
        "a broken file replaced the certificate"
    );
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let new = ck.cert.pem();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(&cert, &new).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while tls_connect(tls_addr, &new).await.is_err() {
        assert!(
            std::time::Instant::now() < end,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tls_connect(tls_addr, &old).await.is_err(),
        "the old certificate is still served"
    );
    open.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut resp)).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}
