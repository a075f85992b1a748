//! A real delta downloader through cistern: `zckdl` (Debian's `zchunk`) updates a zchunk file from its
//! previous version, asking only for the chunks that changed, several ranges per request, and needs
//! `multipart/byteranges` answers for them (SPEC 4 "Ranges"). Cold cache and warm cache.
//!
//! Needs `zck` and `zckdl` (`apt-get install zchunk`); says SKIPPED without them, unless
//! `CISTERN_REQUIRE_ZCHUNK` is set (`.ci/run` installs the package and sets it).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// None (and a SKIPPED line) when the zchunk tools are missing and not required.
fn tools() -> Option<()> {
    let found = ["zck", "zckdl"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found {
        return Some(());
    }
    assert!(
        std::env::var_os("CISTERN_REQUIRE_ZCHUNK").is_none(),
        "zck/zckdl are not installed (apt-get install zchunk)"
    );
    eprintln!("SKIPPED: zck/zckdl are not installed (apt-get install zchunk)");
    None
}

/// A text of numbered lines (about 1.2 MB), with the lines in `changed` altered: two versions of one
/// file that share most of their chunks.
fn text(changed: &[usize]) -> String {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf",
    ];
    let mut seed = 7u64;
    let mut out = String::new();
    for i in 0..15_000 {
        out.push_str(&format!("{i:06}"));
        for _ in 0..10 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push(' ');
            out.push_str(words[(seed >> 33) as usize % words.len()]);
            out.push_str(&format!("{:x}", seed >> 52));
        }
        if changed.contains(&i) {
            out.push_str(" changed in the new version");
        }
        out.push('\n');
    }
    out
}

/// `zck` of a text, as bytes.
fn zchunk(dir: &Path, name: &str, content: &str) -> Bytes {
    let txt = dir.join(format!("{name}.txt"));
    std::fs::write(&txt, content).unwrap();
    let out = dir.join(format!("{name}.zck"));
    let st = std::process::Command::new("zck")
        .arg("-o")
        .arg(&out)
        .arg(&txt)
        .status()
        .unwrap();
    assert!(st.success(), "zck failed");
    Bytes::from(std::fs::read(out).unwrap())
}

/// Runs `zckdl -s <old> <url>` in a fresh directory; gives the downloaded file and zckdl's output.
async fn zckdl(work: &Path, run: &str, old: &Path, url: &str) -> (Bytes, String) {
    let dir = work.join(run);
    std::fs::create_dir_all(&dir).unwrap();
    let child = tokio::process::Command::new("zckdl")
        .current_dir(&dir)
        .args(["-v", "--fail-no-ranges", "-s"])
        .arg(old)
        .arg(url)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("zckdl took more than 60 s")
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "zckdl failed:\n{log}");
    let file = PathBuf::from(url.rsplit('/').next().unwrap());
    (Bytes::from(std::fs::read(dir.join(file)).unwrap()), log)
}

/// The byte count zckdl reports for what it downloaded.
fn downloaded(log: &str) -> usize {
    log.lines()
        .find_map(|l| {
            l.strip_prefix("Downloaded ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no byte count in:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zckdl_fetches_only_the_changed_chunks_through_cistern() {
    if tools().is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let old = zchunk(work.path(), "old", &text(&[]));
    let new = zchunk(
        work.path(),
        "new",
        &text(&[100, 2000, 7000, 7001, 11000, 14500]),
    );
    let old_path = work.path().join("old.zck");
    let origin = Origin::start().await;
    let b = Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    origin.put("/update/new.zck", new.clone(), b);
    let node = Node::start(&origin, "").await;
    let url = node.url("/o/t/update/new.zck");

    for run in ["cold", "warm"] {
        let (got, log) = zckdl(work.path(), run, &old_path, &url).await;
        assert_eq!(sha256_hex(&got), sha256_hex(&new), "{run}: wrong file");
        // The changed chunks came in multipart/byteranges answers, and they are a small part of the
        // file (zckdl fails with --fail-no-ranges where ranges are refused).
        assert!(
            log.contains("multipart"),
            "{run}: no multipart answer:\n{log}"
        );
        let n = downloaded(&log);
        eprintln!("zckdl, {run} cache: {n} of {} bytes downloaded", new.len());
        assert!(
            n < new.len() / 4,
            "{run}: {n} of {} bytes downloaded",
            new.len()
        );
        eventually(10, "the file stored", || node.blobs().len() == 1).await;
    }
    // One fill of the whole file from the origin, whatever the clients asked.
    assert_eq!(origin.gets("/update/new.zck"), 1);
    assert!(old.len() > 100_000);
}
