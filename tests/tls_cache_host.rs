//! The cache-host form over TLS (SPEC 3, "HTTPS payloads"): a Delivery Optimization agent keeps an https
//! URL's scheme when it swaps in the cache host, so `https://<gateway>/<path>?cacheHostOrigin=<host>`
//! reaches the TLS listener, which asks the origin over https (whatever `origin_scheme` says) and keys
//! the object as the plain listener does. Uses curl (`--cacert`, `--resolve` for the gateway's name):
//! skipped with a SKIPPED line where it is not installed, unless `CISTERN_REQUIRE_CURL` is set.

mod common;

use std::sync::atomic::Ordering;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_host_form_over_tls_asks_its_origin_over_https() {
    if !have("curl", "CISTERN_REQUIRE_CURL") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let origin_pki = TestCa::new("origin CA");
    let (c, k) = origin_pki.issue(&["origin.test"]);
    let origin = Origin::start_tls(tls_acceptor(&c, &k)).await;
    let body = random_bytes(200_000, 7);
    let b = Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/filestreamingservice/files/fw.bin", body.clone(), b);
    std::fs::write(dir.join("origin-ca.pem"), origin_pki.pem()).unwrap();
    // The gateway's certificate, from the site's CA (under IoT Edge: the workload API's, edge CA).
    let site = TestCa::new("site CA");
    let (gc, gk) = site.issue(&["gw.test"]);
    std::fs::write(dir.join("gw.pem"), gc).unwrap();
    std::fs::write(dir.join("gw.key"), gk).unwrap();
    let (site_ca, _) = site.write(dir, "site-ca");
    let mut cfg = config(dir, &origin, "");
    cfg.server.tls_listen = "127.0.0.1:0".into();
    cfg.server.tls_cert = Some(dir.join("gw.pem"));
    cfg.server.tls_key = Some(dir.join("gw.key"));
    cfg.upstream.allowed_origins = vec!["origin.test".into()];
    cfg.upstream.ca_file = Some(dir.join("origin-ca.pem"));
    cfg.upstream.connect_to = vec![("origin.test".into(), origin.addr)];
    let node = Node::start_with(cfg).await;
    let tls_port = node.gw.as_ref().unwrap().tls_addr.unwrap().port();
    let path = "/filestreamingservice/files/fw.bin?P1=a&cacheHostOrigin=origin.test";
    let curl = |out: &str| {
        let mut c = tokio::process::Command::new("curl");
        c.args(["-sS", "--max-time", "20", "-D", "-", "-o"])
            .arg(dir.join(out))
            .arg("--cacert")
            .arg(&site_ca)
            .arg("--resolve")
            .arg(format!("gw.test:{tls_port}:127.0.0.1"))
            .arg(format!("https://gw.test:{tls_port}{path}"));
        c
    };
    let first = curl("a").output().await.unwrap();
    let heads = String::from_utf8_lossy(&first.stdout).to_ascii_lowercase();
    assert!(first.status.success(), "{heads}");
    assert!(heads.starts_with("http/1.1 200"), "{heads}");
    assert_eq!(std::fs::read(dir.join("a")).unwrap(), body);
    assert_eq!(
        origin.tls_connections.load(Ordering::Relaxed),
        1,
        "asked over https"
    );
    let second = curl("b").output().await.unwrap();
    let heads = String::from_utf8_lossy(&second.stdout).to_ascii_lowercase();
    assert!(heads.contains("cache-status: cistern; hit"), "{heads}");
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), body);
    // The same URL on the plain listener is the same object.
    let plain = get(&node.url(path)).await;
    assert_eq!(plain.header("cache-status"), "cistern; hit");
    assert_eq!(origin.gets("/filestreamingservice/files/fw.bin"), 1);
}
