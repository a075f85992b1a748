//! Request smuggling into an upstream connection, as a device on the LAN would try it (issue: one device
//! poisoning the cache for all): a GET or HEAD that announces a body, and body framing fields on
//! requests that have none. Seen from both sides: what the client gets, and the raw bytes the origin
//! receives; then against a real nginx (the version Debian ships discards an announced GET body from the
//! next request on a pooled connection), alone and through a parent.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An origin that records each request as it received it (head, then a body read by its
/// Content-Length) and answers `ok` on a connection it then closes.
async fn recording_origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let addr = raw_origin(move |mut s, head| {
        let seen = s2.clone();
        async move {
            let lower = head.to_lowercase();
            let len: usize = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            // The head may hold the start of the body already.
            let had = head.find("\r\n\r\n").map_or(0, |i| head.len() - i - 4);
            let mut body = vec![0u8; len.saturating_sub(had)];
            let read = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut body)).await;
            assert!(matches!(read, Ok(Ok(_))), "the announced body never came");
            seen.lock()
                .unwrap()
                .push(format!("{head}{}", String::from_utf8_lossy(&body)));
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    (addr, seen)
}

fn framing_fields(request: &str) -> Vec<String> {
    request
        .lines()
        .map(|l| l.to_lowercase())
        .filter(|l| {
            l.starts_with("content-length:")
                || l.starts_with("transfer-encoding:")
                || l.starts_with("expect:")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_or_head_that_announces_a_body_is_refused_before_anything_goes_upstream() {
    let (addr, seen) = recording_origin().await;
    let (node, _good) = node_for(addr).await;
    let upstream = format!("http://{addr}/fw/a.swu");
    let forms = [
        "GET /o/t/fw/a.swu HTTP/1.1\r\nHost: gw\r\n".to_string(),
        format!("GET {upstream} HTTP/1.1\r\nHost: {addr}\r\n"),
        format!("GET /fw/a.swu?cacheHostOrigin={addr} HTTP/1.1\r\nHost: gw\r\n"),
        "HEAD /o/t/fw/a.swu HTTP/1.1\r\nHost: gw\r\n".to_string(),
    ];
    let framings = [
        "Content-Length: 40\r\n\r\n",
        "Content-Length: 5, 5\r\n\r\n",
        "Expect: 100-continue\r\nContent-Length: 40\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for form in &forms {
        for framing in framings {
            let (status, body) =
                raw_exchange(node.addr, format!("{form}{framing}").as_bytes()).await;
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 400, "{form}{framing} answered {status} {body}");
            // hyper itself refuses a list of lengths, with no body.
            if !form.starts_with("HEAD") && !framing.contains(", ") {
                assert!(body.contains("body-not-allowed"), "{form}{framing}: {body}");
            }
        }
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "the origin was asked: {:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_upstream_with_framing_only_for_the_body_they_carry() {
    let (addr, seen) = recording_origin().await;
    let (node, _good) = node_for(addr).await;
    // No body, but framing fields a request without a body may carry: none of them goes upstream.
    for (i, extra) in ["Content-Length: 0\r\n", "Expect: 100-continue\r\n"]
        .iter()
        .enumerate()
    {
        let req = format!("GET /o/t/nobody-{i} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
        let (status, body) = raw_exchange(node.addr, req.as_bytes()).await;
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]), "{req}");
    }
    // A method that carries a body: framed by what cistern sends, the client's Expect not passed on.
    let req = "POST /o/t/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\
               Expect: 100-continue\r\n\r\nhello";
    let (status, _) = raw_exchange(node.addr, req.as_bytes()).await;
    assert_eq!(status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for r in &seen[..2] {
        assert_eq!(
            framing_fields(r),
            Vec::<String>::new(),
            "went upstream: {r}"
        );
    }
    assert_eq!(
        framing_fields(&seen[2]),
        ["content-length: 5"],
        "{}",
        seen[2]
    );
    assert!(seen[2].ends_with("\r\n\r\nhello"), "{}", seen[2]);
}

/// A real nginx on loopback serving `www` (its access log: one `$request $status` line per request).
struct Nginx {
    child: std::process::Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// None (and a SKIPPED line) where nginx is not installed, unless `CISTERN_REQUIRE_NGINX` is set
    /// (`.ci/run` installs it and sets it: there the test must run).
    fn start(port: u16, files: &[(&str, &[u8])]) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CISTERN_REQUIRE_NGINX").is_none(),
                "nginx is not installed (apt-get install nginx)"
            );
            eprintln!("SKIPPED: nginx is not installed (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for (path, body) in files {
            let p = dir.path().join("www").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let user = if nix_root() { "user root;" } else { "" };
        let conf = format!(
            "{user}\nworker_processes 1;\nmaster_process off;\ndaemon off;\n\
             error_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
             http {{\n log_format line '$request $status';\n access_log {d}/access.log line;\n\
             client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;\n\
             uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n\
             server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Some(Nginx { child, dir, port })
    }

    async fn ready(&self) {
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("nginx did not listen on {}", self.port);
    }

    /// The request lines nginx logged.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The gateway devices talk to, with its immutable named origin `t` at `http://127.0.0.1:<port>`: alone, or a
/// child whose parent is the one that asks the origin.
async fn gateway(port: u16, chain: bool) -> Vec<Node> {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.origins[0].url = format!("http://127.0.0.1:{port}");
    // Immutable: a poisoned mapping would never go stale (nor be revalidated away).
    cfg.origins[0].immutable = true;
    cfg.upstream.allowed_origins = vec![format!("127.0.0.1:{port}")];
    let mut top = Node::start_with(cfg.clone()).await;
    top.keep(tmp);
    if !chain {
        return vec![top];
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut child_cfg = config(tmp.path(), &origin, "");
    child_cfg.node.id = "test-child".into();
    child_cfg.origins = cfg.origins.clone();
    child_cfg.upstream.allowed_origins = cfg.upstream.allowed_origins.clone();
    child_cfg.upstream.parents = vec![format!("http://{}", top.addr)];
    let mut child = Node::start_with(child_cfg).await;
    child.keep(tmp);
    vec![child, top]
}

/// The attacker's second request: a header whose value is a request line of its choosing.
const SMUGGLED: &str = "GET /evil.bin HTTP/1.1";

fn second_request() -> String {
    format!("GET /o/t/fw/b.swu HTTP/1.1\r\nHost: gw\r\nX-Pad: {SMUGGLED}\r\n\r\n")
}

/// Where the smuggled request line starts in the bytes the origin receives for the attacker's second
/// request: found by sending it once, through gateways alike, to an origin that records raw bytes on
/// the same port nginx will use.
async fn smuggle_offset(port: u16, chain: bool) -> usize {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        s2.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).to_string());
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
            .await;
    });
    let nodes = gateway(port, chain).await;
    let (status, _) = raw_exchange(nodes[0].addr, second_request().as_bytes()).await;
    assert_eq!(status, 200);
    task.await.unwrap();
    let head = seen.lock().unwrap()[0].clone();
    head.find(SMUGGLED)
        .expect("the padding header went upstream")
}

/// The attack of the review, step by step; then what the victim gets and what nginx logged.
async fn smuggling_against_nginx(chain: bool) {
    let port = free_port();
    let offset = smuggle_offset(port, chain).await;
    let (a, b, evil) = (
        random_bytes(3000, 1),
        random_bytes(4000, 2),
        random_bytes(5000, 3),
    );
    let files: [(&str, &[u8]); 3] = [("fw/a.swu", &a), ("fw/b.swu", &b), ("evil.bin", &evil)];
    let Some(nginx) = Nginx::start(port, &files) else {
        return;
    };
    nginx.ready().await;
    let nodes = gateway(port, chain).await;
    let gw = nodes[0].addr;
    // 1. A GET that announces a body it never sends, sized to swallow the next request on the pooled
    //    upstream connection up to the smuggled request line.
    let first =
        format!("GET /o/t/fw/a.swu HTTP/1.1\r\nHost: gw\r\nContent-Length: {offset}\r\n\r\n");
    // (Refused with 400 by the gateway: the tests above. What matters here is what follows.)
    let _ = raw_exchange(gw, first.as_bytes()).await;
    // 2. The attacker's request for the victim's file, carrying the smuggled request line.
    let _ = raw_exchange(gw, second_request().as_bytes()).await;
    // 3. A device asks for the file, twice (the second a hit).
    for _ in 0..2 {
        let g = get(&nodes[0].url("/o/t/fw/b.swu")).await;
        assert_eq!(g.status, 200);
        assert!(
            g.body == b,
            "the device got other bytes than fw/b.swu ({} bytes)",
            g.body.len()
        );
    }
    let logged = nginx.requests();
    assert!(!logged.is_empty(), "nginx logged nothing");
    for line in &logged {
        assert!(
            line.starts_with("GET /fw/b.swu HTTP/1.1 ")
                || line.starts_with("GET /fw/a.swu HTTP/1.1 "),
            "nginx logged a request no client made: {line:?} (all: {logged:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggled_request_never_reaches_nginx_nor_poisons_a_key() {
    smuggling_against_nginx(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggled_request_never_reaches_nginx_through_a_parent() {
    smuggling_against_nginx(true).await;
}
