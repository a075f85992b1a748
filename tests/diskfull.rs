//! A full disk in the middle of a fill (SPEC 4): the store on a small tmpfs, filled by another file
//! while an object arrives. Every client gets the right bytes (never the zeros of a hole in the fill
//! file) and nothing is stored. Needs root to mount; skipped with a message where mounting is refused.

mod common;

use std::path::{Path, PathBuf};

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes a junk file until the filesystem is full (or `max` bytes).
fn fill_disk(path: PathBuf, max: usize) -> usize {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![7u8; 1 << 20];
    let mut n = 0;
    while n < max {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let _ = f.flush();
    n
}

/// A node storing on `fs`, fills bounded together by `filling` MiB.
async fn node_on(fs: &Tmpfs, origin: &Origin, filling: u64) -> Node {
    let mut cfg = config(fs.path(), origin, "");
    cfg.store.min_free = cistern::config::ByteSize(0);
    // The default bound on reservations, half the store (32 MiB here), would refuse the fills here.
    cfg.store.max_filling = cistern::config::ByteSize(filling << 20);
    Node::start_with(cfg).await
}

/// Fills `/big.bin` (40 MiB at 20 MiB/s) through a node on a 64 MiB tmpfs, and writes a junk file
/// until the disk is full once 12 MiB have arrived. Returns what the client got and the junk's size.
async fn fill_then_flood(chunked: bool) -> (Got, usize, Node, bytes::Bytes, Tmpfs) {
    let fs = Tmpfs::mount("64m").expect("mounted");
    let origin = Origin::start().await;
    let body = random_bytes(40 << 20, 51);
    origin.put(
        "/big.bin",
        body.clone(),
        Behaviour {
            chunked,
            rate: Some(20 << 20),
            cache_control: Some("max-age=600".into()),
            ..Default::default()
        },
    );
    let node = node_on(&fs, &origin, 48).await;
    let url = node.url("/o/t/big.bin");
    let client = tokio::spawn(async move { get(&url).await });
    let end = Instant::now() + Duration::from_secs(20);
    while origin.bytes_sent.load(Ordering::Relaxed) < 12 << 20 {
        assert!(Instant::now() < end, "the transfer did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let junk = fs.path().join("junk");
    let filled = tokio::task::spawn_blocking(move || fill_disk(junk, 64 << 20))
        .await
        .unwrap();
    let g = client.await.unwrap();
    (g, filled, node, body, fs)
}

fn can_mount() -> bool {
    Tmpfs::mount("1m").is_some()
}

/// Room for an announced length is taken on the filesystem when the fill starts: another file
/// cannot take it, and the clients get every right byte. (Before, the junk took it, the fill hit ENOSPC at
/// 12 MiB and its clients were served the zeros of the mapped file's hole.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_for_an_announced_length_is_held_against_other_files() {
    if !can_mount() {
        return;
    }
    let (g, filled, node, body, _fs) = fill_then_flood(false).await;
    assert!(
        filled < 24 << 20,
        "the junk took the fill's room: {filled} bytes"
    );
    assert!(!g.aborted && g.body == body, "the client got wrong bytes");
    // The junk leaves no room for the object's `.meta`, so its commit may fail: nothing partial, then.
    let whole = sha256_hex(&body);
    assert!(node.blobs().iter().all(|b| *b == whole));
}

/// A body of unknown length has no room taken ahead: the full disk stops the storing half-way, the
/// client still gets every right byte, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_under_an_unknown_length_gives_the_right_bytes_and_stores_nothing() {
    if !can_mount() {
        return;
    }
    let (g, filled, node, body, _fs) = fill_then_flood(true).await;
    assert!(filled > 0);
    assert_eq!(g.body.len(), body.len(), "aborted: {}", g.aborted);
    assert!(g.body == body, "the client got wrong bytes");
    assert!(
        node.blobs().is_empty(),
        "a fill that ran out of room was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_for_an_announced_length_streams_it_through() {
    let Some(fs) = Tmpfs::mount("64m") else {
        return;
    };
    let origin = Origin::start().await;
    let body = random_bytes(20 << 20, 52);
    origin.put("/sized.bin", body.clone(), Behaviour::default());
    let node = node_on(&fs, &origin, 48).await;
    // With 52 MiB of junk beside it, no room for the 20 MiB object can be had: it is passed through
    // whole, unstored.
    let junk = fs.path().join("junk");
    tokio::task::spawn_blocking(move || fill_disk(junk, 52 << 20))
        .await
        .unwrap();
    let g = get(&node.url("/o/t/sized.bin")).await;
    assert!(!g.aborted);
    assert!(g.body == body);
    assert!(node.blobs().is_empty());
}

/// Regression: room a fill had already taken on the filesystem was counted twice (out of the free
/// space, and again as a reservation), so a second fill that fits was refused. On 64 MiB: 30 MiB being
/// filled leaves 34 MiB, and a 25 MiB object fits beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_a_fill_took_is_not_counted_twice() {
    let Some(fs) = Tmpfs::mount("64m") else {
        return;
    };
    let origin = Origin::start().await;
    let slow = Behaviour {
        rate: Some(10 << 20),
        ..Default::default()
    };
    origin.put("/first.bin", random_bytes(30 << 20, 53), slow);
    let body = random_bytes(25 << 20, 54);
    origin.put("/second.bin", body.clone(), Behaviour::default());
    let node = node_on(&fs, &origin, 60).await;
    let first = node.url("/o/t/first.bin");
    let filling = tokio::spawn(async move { get(&first).await });
    eventually(10, "the first fill", || {
        origin.bytes_sent.load(Ordering::Relaxed) > 1 << 20
    })
    .await;
    let g = get(&node.url("/o/t/second.bin")).await;
    assert!(g.body == body);
    assert_eq!(g.header("cache-status"), "cistern; fwd=uri-miss; stored");
    assert_eq!(filling.await.unwrap().status, 200);
}
