//! Raw origins for hostile-upstream tests: a listener that hands each connection's first request head
//! and its socket to a closure, and a node whose origin `t` is such a listener; and a raw client, for
//! what a gateway sends byte for byte.

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Sends raw bytes on a new connection and reads one response: (status, body). A connection closed
/// before a whole response gives status 0.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (u16, Vec<u8>) {
    let (head, body) = raw_response(addr, bytes).await;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body)
}

/// Sends raw bytes on a new connection and reads one response: (its head as it came, CRLFs and
/// header case kept; its body). A connection closed before a whole head gives an empty head and
/// what came.
pub async fn raw_response(addr: SocketAddr, bytes: &[u8]) -> (String, Vec<u8>) {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                // An interim response (100 Continue) is skipped.
                if buf.starts_with(b"HTTP/1.1 1") {
                    buf.drain(..i + 4);
                    continue;
                }
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return (String::new(), buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len: usize = head
            .to_lowercase()
            .lines()
            .filter(|_| !bytes.starts_with(b"HEAD "))
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        (head, buf[head_end..].to_vec())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .expect("the gateway answered within 10 s")
}
