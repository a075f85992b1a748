//! The real binary on a store of its own: started and waited for until ready, killed with SIGKILL.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Starts `cistern serve --config <conf>` and waits until it answers `/readyz` on `port`.
pub async fn start_binary(conf: &std::path::Path, port: u16) -> Child {
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
pub fn binary_config(dir: &std::path::Path, origin: &Origin) -> (std::path::PathBuf, u16) {
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

/// SIGKILL, and the process reaped.
pub fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Whether `program` runs here. Where it does not, the caller skips what needs it, with a SKIPPED line,
/// unless `require` (a `CISTERN_REQUIRE_*` variable, which CI sets) says it must be there: then it fails.
pub fn have(program: &str, require: &str) -> bool {
    let here = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    if !here {
        assert!(
            std::env::var_os(require).is_none(),
            "{program} is not installed (apt-get install {program})"
        );
        eprintln!("SKIPPED: {program} is not installed (apt-get install {program})");
    }
    here
}
