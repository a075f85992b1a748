//! Raw origins for hostile-upstream tests: a listener that hands each connection's first request head
//! and its socket to a closure, and a node whose origin `t` is such a listener.

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::*;

/// An origin that reads each request head and hands the socket and the head to `answer`.
pub async fn raw_origin<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        for _ in 0..50 {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answer(s, String::from_utf8_lossy(&head).to_string()).await
            });
        }
    });
    addr
}

/// A node whose origin `t` is the raw origin at `addr` (retries 1, so that failures come quickly).
pub async fn node_for(addr: SocketAddr) -> (Node, Origin) {
    let good = Origin::start().await;
    good.put("/ok.bin", random_bytes(100_000, 80), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &good, "");
    cfg.upstream.retries = 1;
    cfg.origins[0].url = format!("http://{addr}");
    cfg.upstream.allowed_origins.push(addr.to_string());
    let mut o = cfg.origins[0].clone();
    o.name = "good".into();
    o.url = good.url();
    cfg.origins.push(o);
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    (node, good)
}
