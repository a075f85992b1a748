//! Interception (SPEC 3, "HTTPS payloads"): `curl https://origin.test/...` through cistern as its proxy,
//! trusting the site CA as a user would (`--cacert`). The origin speaks TLS with a certificate of a test
//! CA that cistern trusts through `upstream.ca_file`; cistern resolves the test names to it through
//! `upstream.connect_to` (as curl's `--connect-to` would). Uses curl: skipped with a SKIPPED line where
//! it is not installed, unless `CISTERN_REQUIRE_CURL` is set.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An origin speaking TLS (and plain HTTP) as origin.test, and a node intercepting `*.test`.
struct Site {
    origin: Origin,
    node: Node,
    /// The site CA's certificate, as devices install it.
    site_ca: PathBuf,
    site_ca_pem: String,
    /// The origin's CA (what a client that is tunnelled, not intercepted, trusts).
    origin_ca: PathBuf,
    dir: PathBuf,
}

async fn site(tune: impl FnOnce(&mut cistern::config::Config)) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let origin_pki = TestCa::new("origin CA");
    let (c, k) = origin_pki.issue(&["origin.test", "plain.tunnel"]);
    let origin = Origin::start_tls(tls_acceptor(&c, &k)).await;
    let origin_ca = dir.join("origin-ca.pem");
    std::fs::write(&origin_ca, origin_pki.pem()).unwrap();
    let site_pki = TestCa::new("site CA");
    let (site_ca, site_key) = site_pki.write(&dir, "site-ca");
    let mut cfg = config(&dir, &origin, "");
    let s = &mut cfg.server;
    s.allow_connect = true;
    s.intercept = true;
    s.intercept_ca_cert = Some(site_ca.to_path_buf());
    s.intercept_ca_key = Some(site_key.to_path_buf());
    s.intercept_hosts = vec!["*.test".into()];
    let u = &mut cfg.upstream;
    u.allowed_origins = ["origin.test", "plain.tunnel", "badcert.test"]
        .map(String::from)
        .to_vec();
    u.ca_file = Some(origin_ca.to_path_buf());
    u.connect_to = ["origin.test", "plain.tunnel", "badcert.test"]
        .map(|h| (h.to_string(), origin.addr))
        .to_vec();
    tune(&mut cfg);
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    Site {
        origin,
        node,
        site_ca,
        site_ca_pem: site_pki.pem(),
        origin_ca,
        dir,
    }
}

/// Whether curl is here (else the test prints SKIPPED and passes, unless curl is required).
fn have_curl() -> bool {
    have("curl", "CISTERN_REQUIRE_CURL")
}

/// What curl saw: the CONNECT answer's status, the response's status, its header lines, the body.
struct Curl {
    connect: u16,
    status: u16,
    headers: String,
    body: Vec<u8>,
    ok: bool,
}

impl Curl {
    fn header(&self, name: &str) -> String {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers
            .lines()
            .rfind(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
            .unwrap_or_default()
    }
}

/// `curl --proxy http://<node> --cacert <ca> <args> <url>`, the body to a file of the site's dir.
async fn curl(site: &Site, ca: &std::path::Path, url: &str, args: &[&str]) -> Curl {
    let out = site.dir.join(format!("out-{}", rand_name()));
    let heads = site.dir.join(format!("heads-{}", rand_name()));
    let r = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy"])
        .arg(format!("http://{}", site.node.addr))
        .arg("--cacert")
        .arg(ca)
        .arg("-D")
        .arg(&heads)
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_connect} %{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .await
        .unwrap();
    let w = String::from_utf8_lossy(&r.stdout).to_string();
    let mut codes = w.split_whitespace().map(|c| c.parse().unwrap_or(0));
    Curl {
        connect: codes.next().unwrap_or(0),
        status: codes.next().unwrap_or(0),
        headers: std::fs::read_to_string(&heads).unwrap_or_default(),
        body: std::fs::read(&out).unwrap_or_default(),
        ok: r.status.success(),
    }
}

/// A payload its origin says may be reused for an hour.
fn max_age() -> Behaviour {
    Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    }
}

fn rand_name() -> String {
    format!("{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_payload_is_fetched_once_and_then_a_hit() {
    if !have_curl() {
        return;
    }
    let s = site(|_| {}).await;
    let body = random_bytes(300_000, 1);
    s.origin.put("/fw.bin", body.clone(), max_age());
    let url = "https://origin.test/fw.bin";
    let first = curl(&s, &s.site_ca, url, &[]).await;
    assert!(first.ok, "{}", first.headers);
    assert_eq!((first.connect, first.status), (200, 200));
    assert_eq!(first.body, body);
    assert_eq!(
        first.header("cache-status"),
        "cistern; fwd=uri-miss; stored"
    );
    let second = curl(&s, &s.site_ca, url, &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, body);
    assert_eq!(second.header("cache-status"), "cistern; hit");
    assert_eq!(s.origin.gets("/fw.bin"), 1);
    // A range, and a resume of a partial download, through the tunnel.
    let r = curl(&s, &s.site_ca, url, &["-r", "1000-1999"]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, body[1000..2000]);
    let part = s.dir.join("resume.bin");
    std::fs::write(&part, &body[..123_457]).unwrap();
    let resumed = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-C", "-", "--proxy"])
        .arg(format!("http://{}", s.node.addr))
        .arg("--cacert")
        .arg(&s.site_ca)
        .arg("-o")
        .arg(&part)
        .arg(url)
        .status()
        .await
        .unwrap();
    assert!(resumed.success());
    assert_eq!(std::fs::read(&part).unwrap(), body);
    assert_eq!(
        s.origin.gets("/fw.bin"),
        1,
        "every answer came from the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_share_one_tunnel_and_secrets_stay_out_of_the_key() {
    if !have_curl() {
        return;
    }
    let s = site(|_| {}).await;
    let body = random_bytes(10_000, 2);
    s.origin.put("/c/fw.bin", body.clone(), max_age());
    // Two SAS tokens for one blob: one object; curl keeps its tunnel for the second request.
    let a = "https://origin.test/c/fw.bin?sv=1&sig=AAA";
    let b = "https://origin.test/c/fw.bin?sv=1&sig=BBB";
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy"])
        .arg(format!("http://{}", s.node.addr))
        .arg("--cacert")
        .arg(&s.site_ca)
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{num_connects} %{http_code}\\n"])
        .args([a, b])
        .output()
        .await
        .unwrap();
    let w = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        w, "1 200\n0 200\n",
        "one connection, kept alive inside the tunnel"
    );
    assert_eq!(s.origin.gets("/c/fw.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_not_allowed_or_not_intercepted_and_bad_certificates() {
    if !have_curl() {
        return;
    }
    let s = site(|_| {}).await;
    let body = random_bytes(5_000, 3);
    s.origin.put("/t.bin", body.clone(), max_age());
    // Not an allowed origin: 403 to the CONNECT, no tunnel.
    let r = curl(&s, &s.site_ca, "https://nope.example/t.bin", &[]).await;
    assert_eq!(r.connect, 403);
    assert!(!r.ok);
    // Allowed but outside intercept_hosts: tunnelled to the origin, whose own certificate the client
    // sees; nothing cached.
    for _ in 0..2 {
        let r = curl(&s, &s.origin_ca, "https://plain.tunnel/t.bin", &[]).await;
        assert_eq!((r.connect, r.status), (200, 200));
        assert_eq!(r.body, body);
        assert_eq!(r.header("cache-status"), "");
    }
    assert_eq!(s.origin.gets("/t.bin"), 2);
    assert!(s.node.blobs().is_empty());
    // An origin whose certificate does not verify (it names origin.test, not badcert.test): 502
    // upstream-tls inside the tunnel, and nothing asked of it.
    let r = curl(&s, &s.site_ca, "https://badcert.test/t.bin", &[]).await;
    assert_eq!(
        (r.connect, r.status),
        (200, 502),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["error"], "upstream-tls", "{e}");
    assert_eq!(s.origin.gets("/t.bin"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_payload_over_http_and_https_is_one_object() {
    if !have_curl() {
        return;
    }
    let s = site(|_| {}).await;
    let body = random_bytes(50_000, 4);
    s.origin.put("/same.bin", body.clone(), max_age());
    let plain = proxy_get(s.node.addr, "http://origin.test/same.bin", &[]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body, body);
    let r = curl(&s, &s.site_ca, "https://origin.test/same.bin", &[]).await;
    assert_eq!(r.body, body);
    assert_eq!(r.header("cache-status"), "cistern; hit");
    assert_eq!(s.origin.gets("/same.bin"), 1);
    assert_eq!(s.node.blobs(), vec![sha256_hex(&body)]);
}

/// Opens a CONNECT tunnel to `host:443` through `proxy` and reads the 200.
async fn tunnel(proxy: SocketAddr, host: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_name_other_than_the_connect_host_is_refused() {
    let s = site(|_| {}).await;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(trusting(&s.site_ca_pem)));
    let name = |n: &str| rustls::pki_types::ServerName::try_from(n.to_string()).unwrap();
    let sock = tunnel(s.node.addr, "origin.test").await;
    // Refused by cistern (an alert), not by this client's own check of a certificate it was given.
    let refused = tls.connect(name("plain.tunnel"), sock).await;
    let e = match refused {
        Ok(_) => panic!("a certificate was given for another name"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("received fatal alert"), "{e}");
    let sock = tunnel(s.node.addr, "origin.test").await;
    let ok = tls.connect(name("origin.test"), sock).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
}

/// A client that opens a tunnel and never starts its handshake keeps a connection's place only
/// until the header timeout (30 s): with `max_connections = 1`, the next client waits, then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_never_finished_holds_its_place_until_the_header_timeout() {
    let s = site(|c| c.server.max_connections = 1).await;
    let silent = tunnel(s.node.addr, "origin.test").await;
    let started = Instant::now();
    let probe = tokio::time::timeout(Duration::from_secs(3), get(&s.node.url("/healthz"))).await;
    assert!(
        probe.is_err(),
        "the tunnel did not count against max_connections"
    );
    let g = tokio::time::timeout(Duration::from_secs(45), get(&s.node.url("/healthz")))
        .await
        .expect("the silent tunnel was never dropped");
    assert_eq!(g.status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(25),
        "dropped after {waited:?}"
    );
    drop(silent);
}

/// Under IoT Edge the site CA can be an intermediate of a chain the devices already trust: the leaf
/// goes out with it, and a client that trusts only the root accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_ca_goes_out_with_its_leaves() {
    if !have_curl() {
        return;
    }
    let root = TestCa::new("edge root CA");
    let inter = root.intermediate("cistern interception CA");
    let mut files = None;
    let s = site(|c| {
        let dir = c.store.dir.parent().unwrap().to_path_buf();
        let (ic, ik) = inter.write(&dir, "intermediate");
        std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
        c.server.intercept_ca_cert = Some(ic.to_path_buf());
        c.server.intercept_ca_key = Some(ik.to_path_buf());
        files = Some(dir.join("root.pem"));
    })
    .await;
    let body = random_bytes(1000, 9);
    s.origin.put("/i.bin", body.clone(), max_age());
    let r = curl(&s, &files.unwrap(), "https://origin.test/i.bin", &[]).await;
    assert!(r.ok, "curl refused the chain");
    assert_eq!(r.body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wget_through_interception_with_the_site_ca() {
    if !have("wget", "CISTERN_REQUIRE_WGET") {
        return;
    }
    let s = site(|_| {}).await;
    let body = random_bytes(100_000, 11);
    s.origin.put("/w.bin", body.clone(), max_age());
    for out in ["w1", "w2"] {
        let r = tokio::process::Command::new("wget")
            .env("https_proxy", format!("http://{}", s.node.addr))
            .args(["-q", "--timeout=20", "--tries=1", "--ca-certificate"])
            .arg(&s.site_ca)
            .arg("-O")
            .arg(s.dir.join(out))
            .arg("https://origin.test/w.bin")
            .status()
            .await
            .unwrap();
        assert!(r.success());
        assert_eq!(std::fs::read(s.dir.join(out)).unwrap(), body);
    }
    assert_eq!(s.origin.gets("/w.bin"), 1);
}

/// apt over an https source, with `Acquire::https::Proxy` and the site CA: a flat repository of one
/// package on the TLS origin; the package downloaded twice is fetched from the origin once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_over_an_https_source_through_interception() {
    if !have("apt-get", "CISTERN_REQUIRE_APT") {
        return;
    }
    let s = site(|_| {}).await;
    let deb = random_bytes(40_000, 12);
    let packages = format!(
        "Package: cistern-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.net>\n\
         Filename: ./cistern-test_1.0_all.deb\nSize: {}\nSHA256: {}\nDescription: test\n\n",
        deb.len(),
        sha256_hex(&deb)
    );
    let release = format!(
        "Date: {}\nSHA256:\n {} {} Packages\n",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        sha256_hex(packages.as_bytes()),
        packages.len()
    );
    let meta = Behaviour {
        cache_control: Some("max-age=60".into()),
        ..Default::default()
    };
    // apt asks for the files of a flat repository `./` as `<base>/./<file>`.
    s.origin
        .put("/repo/./Release", release.into(), meta.clone());
    s.origin.put("/repo/./Packages", packages.into(), meta);
    s.origin
        .put("/repo/./cistern-test_1.0_all.deb", deb.clone(), max_age());
    let root = s.dir.join("apt");
    for d in [
        "lists/partial",
        "archives/partial",
        "etc/preferences.d",
        "out",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("status"), "").unwrap();
    let sources = root.join("sources.list");
    std::fs::write(&sources, "deb [trusted=yes] https://origin.test/repo ./\n").unwrap();
    let r = |d: &str| root.join(d).display().to_string();
    let opts = [
        format!("Acquire::https::Proxy=http://{}", s.node.addr),
        format!("Acquire::https::CaInfo={}", s.site_ca.display()),
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "Dir::Etc::sourceparts=-".into(),
        format!("Dir::Etc::preferencesparts={}", r("etc/preferences.d")),
        format!("Dir::State::lists={}", r("lists")),
        format!("Dir::State::status={}", r("status")),
        format!("Dir::Cache={}", r("cache")),
        "Debug::NoLocking=1".into(),
        "APT::Sandbox::User=root".into(),
        "Acquire::Languages=none".into(),
    ];
    let apt = |args: &[&str]| {
        let mut c = tokio::process::Command::new("apt-get");
        c.current_dir(root.join("out"));
        for o in &opts {
            c.arg("-o").arg(o);
        }
        c.args(["-q", "-y"]).args(args);
        c
    };
    let up = apt(&["update"]).output().await.unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let file = root.join("out").join("cistern-test_1.0_all.deb");
    for _ in 0..2 {
        let _ = std::fs::remove_file(&file);
        let d = apt(&["download", "cistern-test"]).output().await.unwrap();
        assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
        assert_eq!(std::fs::read(&file).unwrap(), deb);
    }
    assert_eq!(s.origin.gets("/repo/./cistern-test_1.0_all.deb"), 1);
}
