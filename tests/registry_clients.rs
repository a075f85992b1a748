//! Container runtimes pulling through cistern (SPEC 9): containerd, with a `hosts.toml` that names cistern
//! as the mirror of the registry, pulls twice (two daemons with empty stores): the second pull asks the
//! registry for no blob. skopeo and podman: tests/registry.rs, tests/registry_auth.rs.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::*;

/// Whether this process runs as root (containerd and dockerd need it).
fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// A containerd daemon of its own: root, state and socket under `dir`, no CRI plugin; killed when
/// dropped.
struct Containerd {
    child: Child,
    socket: std::path::PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let conf = dir.join("config.toml");
        let text = "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
        std::fs::write(&conf, text).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&conf)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Containerd { child, socket };
        let end = Instant::now() + Duration::from_secs(20);
        while d.ctr(&["version"]).is_err() {
            assert!(Instant::now() < end, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    /// `ctr` against this daemon; its stdout, or its stderr as the error.
    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        match o.status.success() {
            true => Ok(String::from_utf8_lossy(&o.stdout).to_string()),
            false => Err(String::from_utf8_lossy(&o.stderr).to_string()),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ctr image pull` of an image on the registry behind the front, whose `hosts.toml` names cistern as
/// its mirror (cistern picks the registry by containerd's `?ns=`); twice, each into an empty daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_through_a_hosts_toml_mirror() {
    if !common::have("containerd", "CISTERN_REQUIRE_CONTAINERD") {
        return;
    }
    if !root() {
        assert!(
            std::env::var_os("CISTERN_REQUIRE_CONTAINERD").is_none(),
            "containerd needs root"
        );
        eprintln!("SKIPPED: containerd needs root");
        return;
    }
    let Some(s) = site("").await else { return };
    let upstream = s.front.addr.to_string();
    let hosts = s.tmp.path().join("certs.d");
    let text = format!(
        "server = \"http://{upstream}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        s.node.addr
    );
    // A host with a port: `host:port` (Linux) or `host_port` (where a colon cannot be in a name).
    for dir in [upstream.clone(), upstream.replace(':', "_")] {
        std::fs::create_dir_all(hosts.join(&dir)).unwrap();
        std::fs::write(hosts.join(&dir).join("hosts.toml"), &text).unwrap();
    }
    let image = format!("{upstream}/test/app:1");
    for i in 0..2 {
        let dir = s.tmp.path().join(format!("containerd{i}"));
        let (hosts, name) = (hosts.clone(), image.clone());
        let pulled = tokio::task::spawn_blocking(move || {
            let d = Containerd::start(&dir);
            let hosts = hosts.to_string_lossy().to_string();
            let args = [
                "images",
                "pull",
                "--snapshotter",
                "native",
                "--hosts-dir",
                &hosts,
                &name,
            ];
            let pulled = d.ctr(&args);
            let listed = d.ctr(&["images", "ls", "-q"]);
            (pulled, listed)
        })
        .await
        .unwrap();
        let (pulled, listed) = pulled;
        pulled.unwrap_or_else(|e| panic!("ctr images pull: {e}"));
        assert!(listed.unwrap().contains(&image));
        let asked_cistern = s.front.count(|_, p| p.contains("ns="));
        assert_eq!(asked_cistern, 0, "cistern's ns= never reaches the registry");
    }
    assert_eq!(
        s.front.blob_gets(),
        3,
        "each blob crossed the uplink once: {:?}",
        s.front.state.log.lock().unwrap()
    );
    let direct = s
        .front
        .count(|m, p| m == "GET" && p.contains("/manifests/sha256:"));
    assert!(direct <= 1, "containerd went to the registry directly");
}
