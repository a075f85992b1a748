//! A bounded load test: 200 hostile connections (slowloris heads and bodies, oversized heads, garbage,
//! idle sockets) run beside 50 normal downloads against the real binary. Every download completes with
//! the right bytes, and the gateway's peak anonymous memory stays under 64 MiB.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOSTILE: usize = 200;
const DOWNLOADS: usize = 50;
const OBJECTS: usize = 10;
const MEMORY_BOUND_KIB: u64 = 64 << 10;

fn rss_anon_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One hostile connection of kind `k`, for as long as `until` allows.
async fn hostile(addr: std::net::SocketAddr, k: usize, until: Instant) {
    while Instant::now() < until {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let left = until.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, attack(&mut s, k)).await;
    }
}

async fn attack(s: &mut TcpStream, k: usize) -> std::io::Result<()> {
    match k % 5 {
        // Slowloris head: a byte of a header field every 200 ms.
        0 => {
            s.write_all(b"GET /o/t/obj0 HTTP/1.1\r\nhost: gw\r\nx-slow: ")
                .await?;
            loop {
                s.write_all(b"a").await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Slowloris body: a status post announcing 1 MiB, sent a byte at a time (each byte its own
        // read on the gateway: a body kept as the slices read would pin a buffer per byte).
        1 => {
            let head = "POST /v1/status HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n\r\n[";
            s.write_all(head.as_bytes()).await?;
            loop {
                s.write_all(b" ").await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Oversized heads, again and again.
        2 => {
            let big = format!(
                "GET /o/t/obj1 HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n",
                "b".repeat(200 << 10)
            );
            s.write_all(big.as_bytes()).await?;
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
        // Garbage.
        3 => {
            let junk: Vec<u8> = (0..8192u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
                .collect();
            s.write_all(&junk).await?;
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
        // Idle: connected, silent.
        _ => {
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_beside_downloads_stay_bounded() {
    let origin = Origin::start().await;
    let bodies: Vec<_> = (0..OBJECTS)
        .map(|i| random_bytes(4 << 20, 90 + i as u64))
        .collect();
    for (i, b) in bodies.iter().enumerate() {
        let behaviour = Behaviour {
            rate: Some(40 << 20),
            ..Default::default()
        };
        origin.put(&format!("/obj{i}"), b.clone(), behaviour);
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = tmp.path().join("gw.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n\
             [upstream]\nallowed_origins = [\"127.0.0.1:{o}\"]\n[[origins]]\nname = \"t\"\n\
             url = \"http://127.0.0.1:{o}\"\n[log]\nlevel = \"error\"\n",
            tmp.path().join("data").display(),
            o = origin.addr.port()
        ),
    )
    .unwrap();
    let mut child = spawn_cistern(&conf, "");
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}");
    let ready = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err()
        || get(&format!("{base}/readyz")).await.status != 200
    {
        assert!(Instant::now() < ready, "cistern not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = rss_anon_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(20);
    let attackers: Vec<_> = (0..HOSTILE)
        .map(|k| tokio::spawn(hostile(addr, k, until)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let downloads: Vec<_> = (0..DOWNLOADS)
        .map(|i| {
            let url = format!("{base}/o/t/obj{}", i % OBJECTS);
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for (i, d) in downloads.into_iter().enumerate() {
        let g = d.await.unwrap();
        assert_eq!(g.status, 200, "download {i}");
        assert!(!g.aborted, "download {i} aborted");
        assert!(g.body == bodies[i % OBJECTS], "download {i}: wrong bytes");
    }
    let took = started.elapsed();
    assert!(
        Instant::now() < until,
        "the downloads outlasted the attack: {took:?}"
    );
    for a in attackers {
        let _ = a.await;
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = child.kill();
    let _ = child.wait();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "{DOWNLOADS} downloads in {:.2} s beside {HOSTILE} hostile connections; peak RssAnon {:.1} MiB",
        took.as_secs_f64(),
        peak as f64 / 1024.0
    );
    assert!(peak > 0, "no memory sample");
    assert!(peak < MEMORY_BOUND_KIB, "peak anonymous memory {peak} KiB");
}
