//! The relay and the fetch path share one director: a parent one of them found down is skipped by the
//! other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{NextHop, Relay, Sent};
use crate::fetch::policy::OriginPolicy;
use crate::fetch::upstream::{connect, ClientConfig, UpstreamClient};
use crate::fetch::{Ask, Director, Hop};

/// A fake parent counting connections: `answer` true answers 202 to anything, false closes at once.
async fn fake_parent(answer: bool) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            s.fetch_add(1, Ordering::SeqCst);
            if !answer {
                continue;
            }
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let ok =
                    b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let _ = c.write_all(ok).await;
            });
        }
    });
    (url, seen)
}

/// A director over `parents`, with the fetch path's client and a relay holding one queued report.
async fn wired(
    parents: &[String],
    dir: &std::path::Path,
) -> (Arc<Director>, UpstreamClient, Relay) {
    let d = Arc::new(Director::new(parents, false).unwrap());
    let policy = Arc::new(OriginPolicy::new(&["origin.test".to_string()], &[]));
    let cfg = ClientConfig {
        connect_timeout: std::time::Duration::from_secs(2),
        idle_timeout: std::time::Duration::from_secs(2),
        ca_file: None,
        proxy: String::new(),
        client_cert: None,
        client_key: None,
        connect_to: Vec::new(),
        recv_buffer: None,
        peer_source: None,
    };
    let client = UpstreamClient::new(&cfg, policy, d.clone()).unwrap();
    let rc = crate::relay::tests::cfg();
    let relay = Relay::open(dir, rc, Some(NextHop::Parents(d.clone()))).unwrap();
    (d, client, relay)
}

async fn fill(client: &UpstreamClient) -> http::StatusCode {
    let url: Uri = "http://origin.test/fw.bin".parse().unwrap();
    let r = client
        .fetch(Method::GET, Some(&url), None, &HeaderMap::new())
        .await;
    r.unwrap().status()
}

async fn deliver(relay: &Relay) -> bool {
    let client = connect::simple_client(connect::tls_config(Default::default()).unwrap(), None);
    let hop = relay.inner.next_hop.clone().unwrap();
    let body = Bytes::from_static(br#"[{"reportId":"1","deviceId":"d","state":1}]"#);
    matches!(relay.send(&client, &hop, body).await, Sent::Delivered)
}

#[tokio::test]
async fn a_parent_a_fill_found_down_is_skipped_by_the_relay() {
    let (down, down_seen) = fake_parent(false).await;
    let (up, up_seen) = fake_parent(true).await;
    let t = tempfile::tempdir().unwrap();
    let (d, client, relay) = wired(&[down.clone(), up], t.path()).await;
    assert_eq!(
        fill(&client).await,
        202,
        "the fill went on to the second parent"
    );
    assert_eq!(down_seen.load(Ordering::SeqCst), 1);
    assert!(
        !d.health()[0].healthy,
        "the fill did not mark the parent down"
    );
    assert!(deliver(&relay).await);
    assert_eq!(
        down_seen.load(Ordering::SeqCst),
        1,
        "the relay asked a skipped parent"
    );
    assert_eq!(up_seen.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_parent_the_relay_found_down_is_skipped_by_fills() {
    let (down, down_seen) = fake_parent(false).await;
    let (up, up_seen) = fake_parent(true).await;
    let t = tempfile::tempdir().unwrap();
    let (d, client, relay) = wired(&[down.clone(), up], t.path()).await;
    assert!(
        deliver(&relay).await,
        "the relay did not go on to the second parent"
    );
    assert_eq!(down_seen.load(Ordering::SeqCst), 1);
    let first: Hop = Hop::Parent(down.parse().unwrap());
    assert!(!d.hops(Ask::Status).contains(&first));
    assert_eq!(fill(&client).await, 202);
    assert_eq!(
        down_seen.load(Ordering::SeqCst),
        1,
        "a fill asked a skipped parent"
    );
    assert_eq!(up_seen.load(Ordering::SeqCst), 2);
}
