//! Container runtimes pulling through cistern (SPEC 9): containerd, with a `hosts.toml` that names cistern
//! as the mirror of the registry, and dockerd, with cistern in its `registry-mirrors`, each pull twice
//! (two daemons with empty stores): the second pull asks the registry for no blob. skopeo and podman:
//! tests/registry.rs, tests/registry_auth.rs.

mod common;

use std::path::{Path, PathBuf};
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
    socket: PathBuf,
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

/// A dockerd of its own on the given containerd: data root, exec root, socket, `daemon.json` and the
/// client's config under `dir`; no networking (no bridge, no iptables), vfs storage; stopped when
/// dropped (it runs no container, and its containerd is the test's).
struct Dockerd {
    child: Child,
    dir: PathBuf,
}

impl Dockerd {
    /// With `daemon` as its `daemon.json`; Err with the end of its log when it does not come up.
    fn start(
        dir: &Path,
        containerd: &Containerd,
        daemon: &serde_json::Value,
    ) -> Result<Dockerd, String> {
        std::fs::create_dir_all(dir).unwrap();
        let mut daemon = daemon.clone();
        // Its identity key, which it writes to /etc/docker by default.
        daemon["deprecated-key-path"] = dir.join("key.json").to_string_lossy().into();
        std::fs::write(dir.join("daemon.json"), daemon.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new(dockerd())
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--containerd")
            .arg(&containerd.socket)
            .arg("-H")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--storage-driver=vfs"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("dockerd: {e}"))?;
        let mut d = Dockerd {
            child,
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        while d.docker(&["version"]).is_err() {
            let exited = d.child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > end {
                let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.is_empty())
                    .unwrap_or("no log");
                return Err(format!("dockerd did not start: {last}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }

    /// `docker` against this daemon; its stdout, or its stderr as the error.
    fn docker(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new("docker")
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        match o.status.success() {
            true => Ok(String::from_utf8_lossy(&o.stdout).to_string()),
            false => Err(String::from_utf8_lossy(&o.stderr).to_string()),
        }
    }
}

impl Drop for Dockerd {
    /// SIGTERM first: dockerd bind-mounts its data root on itself at start and unmounts it as it
    /// stops, which a kill would leave behind (and the temporary directory with it).
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which it stays until waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(data) =
            std::ffi::CString::new(self.dir.join("data").as_os_str().as_encoded_bytes())
        {
            // Killed mid-way: detach what it left (EINVAL when nothing is mounted there).
            // SAFETY: a NUL-terminated path that lives across the call.
            unsafe { libc::umount2(data.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Whether dockerd can run here; else why not (printed as SKIPPED, or a failure where
/// `CISTERN_REQUIRE_DOCKERD` says it must run).
fn dockerd_here() -> bool {
    const REQUIRE: &str = "CISTERN_REQUIRE_DOCKERD";
    if !common::have("containerd", REQUIRE) {
        return false;
    }
    let installed = [dockerd(), "docker"]
        .iter()
        .all(|p| Command::new(p).arg("--version").output().is_ok());
    let why = match (installed, root()) {
        (true, true) => return true,
        (false, _) => "dockerd is not installed (apt-get install docker.io)",
        (true, false) => "dockerd needs root",
    };
    assert!(std::env::var_os(REQUIRE).is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    false
}

/// dockerd, by its name where `/usr/sbin` is on the `PATH`, else where Debian installs it.
fn dockerd() -> &'static str {
    match Command::new("dockerd").arg("--version").output() {
        Ok(_) => "dockerd",
        Err(_) => "/usr/sbin/dockerd",
    }
}

/// Each image asked, and its ID or why it could not be pulled.
type Pulled = Vec<(String, Result<String, String>)>;

/// Pulls each of `images` into a new dockerd (on a new containerd) under `dir`. Err: the daemon did
/// not start (why).
fn docker_pulls(
    dir: &Path,
    daemon: &serde_json::Value,
    images: &[String],
) -> Result<Pulled, String> {
    let c = Containerd::start(&dir.join("containerd"));
    let d = Dockerd::start(&dir.join("dockerd"), &c, daemon)?;
    let id = |image: &str| {
        d.docker(&["pull", image])?;
        d.docker(&["image", "inspect", "--format", "{{.Id}}", image])
    };
    Ok(images.iter().map(|i| (i.clone(), id(i))).collect())
}

/// `docker pull` of a Docker Hub name (`app:1`, which dockerd asks its mirror for as
/// `/v2/library/app/manifests/1`, without `ns`) through `registry-mirrors` naming cistern, whose first
/// registry is the test's; twice, each into an empty daemon; the second daemon also pulls the image by
/// cistern's address and the registry's name (`<cistern>/local/test/app:1`, as for any registry other
/// than Docker Hub). dockerd asks the registry nothing itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dockerd_pulls_through_registry_mirrors() {
    if !dockerd_here() {
        return;
    }
    let Some(s) = site("").await else { return };
    // Docker Hub's official images are `library/<name>`: the same image, under that name.
    let port = s.front.upstream_port();
    let pushed = copy(
        &format!("docker://127.0.0.1:{port}/test/app:1"),
        &format!("docker://127.0.0.1:{port}/library/app:1"),
    )
    .await;
    let err = String::from_utf8_lossy(&pushed.stderr);
    assert!(pushed.status.success(), "{err}");
    // As README "container images" shows it.
    let daemon = serde_json::json!({
        "registry-mirrors": [format!("http://{}", s.node.addr)],
        "insecure-registries": [s.node.addr.to_string()],
    });
    let hub = "app:1".to_string();
    let named = format!("{}/local/test/app:1", s.node.addr);
    for (i, images) in [vec![hub.clone()], vec![hub, named]]
        .into_iter()
        .enumerate()
    {
        let dir = s.tmp.path().join(format!("docker{i}"));
        let daemon = daemon.clone();
        let pulled = tokio::task::spawn_blocking(move || docker_pulls(&dir, &daemon, &images));
        let pulled = match pulled.await.unwrap() {
            Ok(p) => p,
            Err(why) => {
                let required = std::env::var_os("CISTERN_REQUIRE_DOCKERD").is_some();
                assert!(!required, "{why}");
                eprintln!("SKIPPED: {why}");
                return;
            }
        };
        for (image, id) in pulled {
            let id = id.unwrap_or_else(|e| panic!("docker pull {image}: {e}"));
            // An image's ID is its config's digest.
            assert_eq!(id.trim(), format!("sha256:{}", s.image.config), "{image}");
        }
    }
    let log = s.front.state.log.lock().unwrap().clone();
    assert_eq!(
        s.front.blob_gets(),
        3,
        "each blob crossed the uplink once: {log:?}"
    );
    // The registry out of reach: a third daemon pulls what cistern holds (dockerd resolved the tag
    // by HEAD alone, which stored it).
    s.front
        .state
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = s.tmp.path().join("docker-offline");
    let offline =
        tokio::task::spawn_blocking(move || docker_pulls(&dir, &daemon, &["app:1".into()]));
    let pulled = offline.await.unwrap().unwrap_or_else(|why| panic!("{why}"));
    for (image, id) in pulled {
        let id = id.unwrap_or_else(|e| panic!("docker pull {image} offline: {e}"));
        assert_eq!(id.trim(), format!("sha256:{}", s.image.config), "{image}");
    }
    let asked = |p: &str| {
        ["/v2/library/app/", "/v2/test/app/"]
            .iter()
            .any(|r| p.starts_with(r))
    };
    assert!(
        log.iter().all(|(_, p)| p == "/v2/" || asked(p)),
        "cistern asked the first registry for what dockerd asked: {log:?}"
    );
}
