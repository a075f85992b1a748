//! The real binary killed with SIGKILL in the middle of a transfer, then restarted on the same
//! store: nothing partial is served or kept, and the object is fetched and stored again. And
//! SIGTERM as soon as the node is ready is a graceful stop.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

async fn spawn(conf: &std::path::Path, port: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--config"])
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    // Connectable is not enough: the listener is bound before the store is recovered.
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
        || get(&format!("http://127.0.0.1:{port}/readyz")).await.status != 200
    {
        assert!(Instant::now() < end, "cistern did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// `<dir>/cistern.toml`: a store in `<dir>/data` and the origin as `/o/t/`, on a free port.
fn config(dir: &std::path::Path, origin: &Origin) -> (std::path::PathBuf, u16) {
    let port = free_port();
    let conf = dir.join("cistern.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n[upstream]\nallowed_origins = []\n[[origins]]\nname = \"t\"\nurl = \"{}\"\n[log]\nlevel = \"warn\"\n",
            dir.join("data").display(),
            origin.url()
        ),
    )
    .unwrap();
    (conf, port)
}

/// SIGTERM, which flushes the index: what was written before is in it for sure.
fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status} on SIGTERM");
}

fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transfer_leaves_nothing_partial() {
    let origin = Origin::start().await;
    let body = random_bytes(4 << 20, 21);
    origin.put(
        "/fw.bin",
        body.clone(),
        Behaviour {
            rate: Some(2 << 20),
            cache_control: Some("max-age=3600".into()),
            ..Default::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = config(tmp.path(), &origin);
    let child = spawn(&conf, port).await;
    let url = format!("http://127.0.0.1:{port}/o/t/fw.bin");
    let client = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(10, "transfer under way", || {
        origin.bytes_sent.load(Ordering::Relaxed) > 512 << 10
    })
    .await;
    let tmpdir = tmp.path().join("data").join("tmp");
    assert_eq!(
        std::fs::read_dir(&tmpdir).unwrap().count(),
        1,
        "the fill's temp file"
    );
    kill9(child);
    let g = client.await.unwrap();
    assert!(
        g.aborted || g.body.len() < body.len(),
        "a killed transfer looked complete"
    );

    let child = spawn(&conf, port).await;
    assert_eq!(
        std::fs::read_dir(&tmpdir).unwrap().count(),
        0,
        "orphan temp file survived the restart"
    );
    let g = get(&url).await;
    assert_eq!(g.body, body);
    let hex = sha256_hex(&body);
    let blob = tmp
        .path()
        .join("data")
        .join("sha256")
        .join(&hex[..2])
        .join(&hex);
    eventually(10, "object stored after restart", || blob.exists()).await;
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    let g = get(&url).await;
    assert_eq!(g.header("cache-status"), "cistern; hit");
    // SIGTERM: graceful stop, exit 0.
    stop(child);
}

/// SIGTERM as soon as `/readyz` answers is a graceful stop (exit 0), not the signal's default
/// action: the handler is in place before the node is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_ready_is_a_graceful_stop() {
    let origin = Origin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (conf, port) = config(tmp.path(), &origin);
    for _ in 0..10 {
        stop(spawn(&conf, port).await);
    }
}
