//! The site CA of interception as an operator meets it: `cistern ca init` makes one, `serve` starts
//! with it, refuses it (exit 1, one line naming the file) when its key is readable by others, and the
//! secrets of intercepted requests stay out of the log. Uses curl for the intercepted request: that
//! part is skipped (SKIPPED) where curl is not installed, unless `CISTERN_REQUIRE_CURL` is set.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn ca_init(out: &std::path::Path) {
    let r = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["ca", "init", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(said.contains("update-ca-certificates"), "{said}");
}

fn config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let conf = dir.join("cistern.toml");
    let ca = dir.join("ca");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nallow_connect = true\nintercept = true\n\
             intercept_ca_cert = \"{c}\"\nintercept_ca_key = \"{k}\"\n\
             [store]\ndir = \"{d}\"\nmin_free = \"0\"\n\
             [upstream]\nallowed_origins = [\"127.0.0.1\"]\nconnect_timeout = \"1s\"\nretries = 0\n\
             [log]\nlevel = \"debug\"\n",
            c = ca.join("ca.pem").display(),
            k = ca.join("ca.key").display(),
            d = dir.join("data").display(),
        ),
    )
    .unwrap();
    conf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_key_readable_by_others_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    ca_init(&tmp.path().join("ca"));
    let conf = config(tmp.path(), free_port());
    let key = tmp.path().join("ca").join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("serve started with a CA key readable by others");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = child.wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("readable by group or others"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_of_intercepted_requests_stay_out_of_the_log() {
    if !have("curl", "CISTERN_REQUIRE_CURL") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    ca_init(&tmp.path().join("ca"));
    let port = free_port();
    let conf = config(tmp.path(), port);
    let log = tmp.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < end, "cistern did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing listens on 127.0.0.1:443 here: the request inside fails upstream, and is logged.
    let r = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--proxy")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--cacert")
        .arg(tmp.path().join("ca").join("ca.pem"))
        .args(["-H", "Authorization: Bearer auth-SECRET-1"])
        .args(["-H", "Cookie: session=cookie-SECRET-2"])
        .arg("https://127.0.0.1/fw.bin?sv=1&sig=sig-SECRET-3")
        .output()
        .await
        .unwrap();
    let code = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(code.starts_with('5'), "the request inside got {code}");
    let end = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap();
        if t.contains("fw.bin") || Instant::now() > end {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains("127.0.0.1/fw.bin"), "no request line: {text}");
    for secret in ["auth-SECRET-1", "cookie-SECRET-2", "sig-SECRET-3"] {
        assert!(!text.contains(secret), "{secret} in the log:\n{text}");
    }
}
