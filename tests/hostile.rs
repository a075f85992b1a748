//! Hostile clients and hostile upstreams over real sockets: credentials that must not follow a redirect
//! to another origin, CONNECT tunnels that must stay inside `server.max_connections`, close when idle
//! and close at shutdown.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A redirect to another origin drops Authorization and Cookie; one on the same origin keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_follow_a_redirect_to_another_origin() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    b.put("/x.bin", random_bytes(1000, 70), Behaviour::default());
    a.put("/y.bin", random_bytes(1000, 71), Behaviour::default());
    a.redirect("/away", &format!("{}/x.bin", b.url()));
    a.redirect("/home", "/y.bin");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &a, "");
    cfg.upstream
        .allowed_origins
        .push(format!("127.0.0.1:{}", b.addr.port()));
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    let creds = [
        ("authorization", "Bearer s3cret"),
        ("cookie", "session=s3cret"),
    ];
    for path in ["/away", "/home"] {
        let g = request("GET", &node.url(&format!("/o/t{path}")), &creds).await;
        assert_eq!(g.status, 200, "{path}");
    }
    let asked = |o: &Origin, p: &str| o.requests(p).into_iter().map(|(_, h)| h);
    for h in asked(&a, "/away")
        .chain(asked(&a, "/home"))
        .chain(asked(&a, "/y.bin"))
    {
        assert!(h.contains_key("authorization") && h.contains_key("cookie"));
    }
    let to_b: Vec<_> = asked(&b, "/x.bin").collect();
    assert!(!to_b.is_empty(), "the redirect was not followed");
    for h in to_b {
        assert!(
            !h.contains_key("authorization"),
            "Authorization sent to another origin"
        );
        assert!(!h.contains_key("cookie"), "Cookie sent to another origin");
    }
}

/// An echo server on port 443 of a loopback address of its own (root can bind it), as a tunnel's far end.
async fn tls_port_echo() -> Option<std::net::SocketAddr> {
    let l = match tokio::net::TcpListener::bind("127.0.0.7:443").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED: cannot bind 127.0.0.7:443 ({e}); CONNECT tests need root");
            return None;
        }
    };
    let addr = l.local_addr().ok()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Some(addr)
}

/// Opens a tunnel through the node and checks that it carries bytes.
async fn open_tunnel(node: &Node) -> TcpStream {
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let req = "CONNECT 127.0.0.7:443 HTTP/1.1\r\nhost: 127.0.0.7:443\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 256];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    s
}

/// Waits up to `secs` for the far side to close `s`; true when it did.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(secs), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn connect_node(max_connections: usize, idle_secs: u64) -> Option<Node> {
    tls_port_echo().await?;
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.allow_connect = true;
    cfg.server.max_connections = max_connections;
    cfg.upstream.idle_timeout = cistern::config::Span::secs(idle_secs);
    cfg.upstream.allowed_origins.push("127.0.0.7:443".into());
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    Some(node)
}

/// Tunnels hold their place under `server.max_connections`, close when idle and at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_are_bounded_closed_when_idle_and_at_shutdown() {
    let Some(mut node) = connect_node(2, 2).await else {
        return;
    };
    // Two tunnels fill the two places: a third client is not served until one closes.
    let t1 = open_tunnel(&node).await;
    let mut t2 = open_tunnel(&node).await;
    let url = node.url("/healthz");
    let blocked = tokio::time::timeout(Duration::from_millis(800), get(&url)).await;
    assert!(
        blocked.is_err(),
        "a third connection was served beside two tunnels"
    );
    drop(t1);
    let served = tokio::time::timeout(Duration::from_secs(5), get(&url)).await;
    assert!(
        served.is_ok_and(|g| g.status == 200),
        "no place freed by a closed tunnel"
    );
    // Kept busy, a tunnel lives past the idle timeout; left quiet, it is closed.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        t2.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        t2.read_exact(&mut pong).await.unwrap();
    }
    assert!(
        closed_within(&mut t2, 6).await,
        "an idle tunnel stayed open"
    );
    // At shutdown, an open tunnel is closed at once (before its idle timeout), and the drain waits
    // for it.
    let mut t3 = open_tunnel(&node).await;
    let stopping = std::time::Instant::now();
    node.stop().await;
    let took = stopping.elapsed();
    assert!(
        closed_within(&mut t3, 1).await,
        "a tunnel outlived the gateway"
    );
    assert!(
        took < Duration::from_millis(1500),
        "the tunnel was left to idle out: {took:?}"
    );
}

/// Writes `bytes` on a new connection and reads what comes back until the gateway closes it (or 5 s).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).to_string()
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Oversized and malformed heads get 4xx (or a close), never reach the origin, and the gateway
/// serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_heads_are_refused() {
    let origin = Origin::start().await;
    origin.put("/f.bin", random_bytes(1000, 72), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let big = format!(
        "GET /o/t/f.bin HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let many = format!(
        "GET /o/t/f.bin HTTP/1.1\r\nhost: gw\r\n{}\r\n",
        (0..500)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    let long_line = format!(
        "GET /o/t/{} HTTP/1.1\r\nhost: gw\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let cases: [(&str, &[u8]); 5] = [
        ("a 100 KiB field", big.as_bytes()),
        ("500 fields", many.as_bytes()),
        ("a 100 KiB request line", long_line.as_bytes()),
        (
            "obs-fold",
            b"GET /o/t/f.bin HTTP/1.1\r\nhost: gw\r\nx-a: 1\r\n folded\r\n\r\n",
        ),
        (
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let resp = exchange(node.addr, bytes).await;
        let status = status_of(&resp);
        assert!(
            status == 0 || (400..500).contains(&status),
            "{what}: answered {status}"
        );
    }
    assert_eq!(
        origin.gets("/f.bin"),
        0,
        "a refused head reached the origin"
    );
    assert_eq!(get(&node.url("/o/t/f.bin")).await.status, 200);
}

/// Request smuggling attempts (Content-Length with Transfer-Encoding, two Content-Lengths, a bare-LF
/// head): whatever the gateway answers, the origin never sees the smuggled request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_the_origin() {
    let origin = Origin::start().await;
    origin.put("/sink", random_bytes(10, 73), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let o = format!("http://127.0.0.1:{}", origin.addr.port());
    let smuggled = format!("GET {o}/smuggled HTTP/1.1\r\nhost: x\r\n\r\n");
    let attempts = [
        format!(
            "POST {o}/sink HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST {o}/sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST {o}/sink HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
        format!(
            "POST {o}/sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST {o}/sink HTTP/1.1\nhost: x\ncontent-length: {}\n\n{smuggled}",
            smuggled.len()
        ),
    ];
    for a in &attempts {
        let _ = exchange(node.addr, a.as_bytes()).await;
    }
    // The client may pipeline the smuggled GET itself: then the gateway forwards it as a request of
    // its own, with its Via. A request the origin parsed out of a forwarded body would have none.
    let seen: Vec<_> = origin
        .requests("/smuggled")
        .into_iter()
        .chain(origin.requests("/sink"))
        .collect();
    for (m, h) in seen {
        let via = h.get("via").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(
            via.contains("test-node"),
            "{m} reached the origin without passing the gateway"
        );
        assert!(
            !(h.contains_key("content-length") && h.contains_key("transfer-encoding")),
            "both framings forwarded"
        );
    }
}
