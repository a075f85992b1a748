//! The command line as a user meets it: check-config, doctor, --version, usage errors, import/verify.

mod common;

use std::process::Command;

use common::*;

fn cistern(args: &[&str]) -> (i32, String, String) {
    cistern_env(args, &[])
}

fn cistern_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `cistern_env` on a blocking thread, for tests whose gateway runs on the test's runtime.
async fn cistern_bg(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cistern_env(&args, &env)
    })
    .await
    .unwrap()
}

#[test]
fn check_config_names_the_bad_key_and_redacts_secrets() {
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "[store]\nmax_sise = \"1GiB\"\n").unwrap();
    let (code, _, err) = cistern(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("max_sise") && err.contains("bad.toml"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    let good = t.path().join("good.toml");
    std::fs::write(
        &good,
        "[server]\nadmin_token = \"s3cret\"\n[store]\nmax_size = \"20GiB\"\n",
    )
    .unwrap();
    let (code, out, _) = cistern(&["check-config", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("max_size = \"20GiB\""), "{out}");
    assert!(!out.contains("s3cret"));
}

#[test]
fn check_config_defaults_prints_the_reference() {
    let (code, out, _) = cistern(&["check-config", "--defaults"]);
    assert_eq!(code, 0);
    for part in [
        "[node]",
        "[server]",
        "[store]",
        "[upstream]",
        "# [[origins]]",
        "[status]",
        "[log]",
    ] {
        assert!(out.contains(part), "no {part} in: {out}");
    }
    assert!(out.contains("CISTERN_<SECTION>__<KEY>"), "{out}");
    // What it prints is a config that checks.
    let t = tempfile::tempdir().unwrap();
    let reference = t.path().join("reference.toml");
    std::fs::write(&reference, &out).unwrap();
    let (code, _, err) = cistern(&["check-config", reference.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // A file and --defaults together are a usage error.
    let (code, _, _) = cistern(&["check-config", "--defaults", reference.to_str().unwrap()]);
    assert_eq!(code, 2);
}

#[test]
fn check_config_without_a_file_checks_what_serve_reads() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    std::fs::write(&conf, "[store]\nmax_size = \"7GiB\"\n").unwrap();
    let (code, out, err) = cistern_env(
        &["check-config"],
        &[
            ("CISTERN_CONFIG", conf.to_str().unwrap()),
            ("CISTERN_STORE__MIN_FREE", "3GiB"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_size = \"7GiB\""), "{out}");
    assert!(out.contains("min_free = \"3GiB\""), "{out}");
}

#[test]
fn version_help_and_usage_errors() {
    let (code, out, _) = cistern(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("cistern "));
    let (code, out, _) = cistern(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--config"));
    let (code, _, _) = cistern(&["serve", "--no-such-flag"]);
    assert_eq!(code, 2);
}

#[test]
fn import_then_verify_finds_corruption() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[store]\ndir = \"{}\"\nmin_free = \"0\"\n",
            t.path().join("data").display()
        ),
    )
    .unwrap();
    let file = t.path().join("fw.swu");
    let body = random_bytes(10_000, 41);
    std::fs::write(&file, &body).unwrap();
    let hex = sha256_hex(&body);
    let (code, _, err) = cistern(&[
        "import",
        file.to_str().unwrap(),
        "--sha256",
        &"0".repeat(64),
        "--config",
        conf.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing stored"), "{err}");
    let (code, out, _) = cistern(&[
        "import",
        file.to_str().unwrap(),
        "--sha256",
        &hex,
        "--pin",
        "--config",
        conf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains(&hex));
    let (code, out, _) = cistern(&["verify", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let blob = t
        .path()
        .join("data")
        .join("sha256")
        .join(&hex[..2])
        .join(&hex);
    std::fs::write(&blob, b"flipped bits").unwrap();
    let (code, out, _) = cistern(&["verify", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("BAD"), "{out}");
    let (code, _, _) = cistern(&["verify", "--repair", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(!blob.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_parents_and_says_what_to_do() {
    let origin = Origin::start().await;
    let parent = Node::start(&origin, "").await;
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    let write = |parents: &str| {
        std::fs::write(
            &conf,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n[upstream]\nparents = [{parents}]\nconnect_timeout = \"2s\"\n",
                t.path().join("data").display()
            ),
        )
        .unwrap();
    };
    write(&format!("\"http://{}\"", parent.addr));
    let conf_s = conf.to_str().unwrap();
    let (code, out, _) = cistern_bg(&["doctor", "--config", conf_s], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("a cistern answers /healthz"), "{out}");
    // Checking changes nothing: the store directory is not created by doctor.
    assert!(out.contains("not created yet"), "{out}");
    assert!(!t.path().join("data").exists());
    write("\"http://127.0.0.1:1\"");
    let (code, out, _) = cistern_bg(&["doctor", "--config", conf_s], &[]).await;
    assert_eq!(code, 1, "{out}");
    let line = out.lines().find(|l| l.starts_with("FAIL")).unwrap();
    assert!(line.contains("parent") && line.contains("->"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_prefetch_and_verify_through_a_running_gateway() {
    let origin = Origin::start().await;
    let staged = random_bytes(200_000, 43);
    origin.put("/fw/staged.swu", staged.clone(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &origin, "");
    cfg.server.admin_token = "t0ken".into();
    let node = Node::start_with(cfg).await;
    let token = tmp.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let server = format!("http://{}", node.addr);

    // The store is held by the running gateway: direct mode says so and points at --server.
    let conf = tmp.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[store]\ndir = \"{}\"\nmin_free = \"0\"\n",
            node.data().display()
        ),
    )
    .unwrap();
    let file = tmp.path().join("usb.swu");
    let body = random_bytes(50_000, 44);
    std::fs::write(&file, &body).unwrap();
    let (f, t) = (file.to_str().unwrap(), token.to_str().unwrap());
    let (code, _, err) = cistern_bg(&["import", f, "--config", conf.to_str().unwrap()], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--server"), "{err}");

    let (code, out, err) = cistern_bg(
        &["import", f, "--pin", "--server", &server, "--token-file", t],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&sha256_hex(&body)));
    assert!(node.blobs().contains(&sha256_hex(&body)));

    let manifest = tmp.path().join("m.json");
    let m = serde_json::json!({"files": [{"filename": "staged.swu", "sizeInBytes": staged.len(),
        "hashes": {"sha256": sha256_hex(&staged)}}]});
    std::fs::write(&manifest, m.to_string()).unwrap();
    let base = format!("{}/fw", origin.url());
    let (code, out, err) = cistern_bg(
        &[
            "prefetch",
            manifest.to_str().unwrap(),
            "--base-url",
            &base,
            "--server",
            &server,
            "--token-file",
            t,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stored"), "{out}");
    assert!(node.blobs().contains(&sha256_hex(&staged)));

    let (code, out, _) = cistern_bg(
        &["verify", "--server", &server],
        &[("CISTERN_TOKEN", "t0ken")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 objects checked, 0 bad"), "{out}");

    // A wrong token is one clear line, even when the gateway refuses before the upload is through.
    let big = tmp.path().join("big.swu");
    std::fs::write(&big, random_bytes(16 << 20, 45)).unwrap();
    let big = big.to_str().unwrap();
    let (code, _, err) = cistern_bg(
        &["import", big, "--server", &server],
        &[("CISTERN_TOKEN", "wrong")],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("admin token"), "{err}");

    // Importing what is already stored is answered at once; the upload still ends cleanly.
    for _ in 0..2 {
        let (code, _, err) = cistern_bg(
            &["import", big, "--server", &server, "--token-file", t],
            &[],
        )
        .await;
        assert_eq!(code, 0, "{err}");
    }
}

/// A listener that accepts nothing (the kernel completes the handshake) and never answers.
fn mute_listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_for_a_running_node_and_says_why_not_otherwise() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    // A wildcard listen address is probed over loopback (the node listens on 127.0.0.1 only).
    let write = |listen: &str| {
        std::fs::write(&conf, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
    };
    write(&format!("0.0.0.0:{}", node.addr.port()));
    let c = conf.to_str().unwrap();
    let (code, out, err) = cistern_bg(&["health", "--config", c], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("answered 200"), "{out}");

    // Closed port: exit 1, one line naming the address and what to check.
    let closed = free_port();
    write(&format!("0.0.0.0:{closed}"));
    let (code, _, err) = cistern_bg(&["health", "--config", c], &[]).await;
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(&format!("127.0.0.1:{closed}")) && err.contains("cistern serve"),
        "{err}"
    );

    // The environment wins over the file, as for `serve`.
    let listen = node.addr.to_string();
    let env = [("CISTERN_SERVER__LISTEN", listen.as_str())];
    let (code, _, err) = cistern_bg(&["health", "--config", c], &env).await;
    assert_eq!(code, 0, "{err}");

    // Something that accepts and never answers: bounded by the probe's 2 s, not by the caller.
    let mute = mute_listener();
    write(&mute.local_addr().unwrap().to_string());
    let started = std::time::Instant::now();
    let (code, _, err) = cistern_bg(&["health", "--config", c], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no answer within 2s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));

    // Nothing to probe is a config problem, said as such.
    write("");
    let (code, _, err) = cistern_bg(&["health", "--config", c], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("both off"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_the_tls_listener_when_there_is_no_plain_one() {
    let origin = Origin::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["gateway.example".into()]).unwrap();
    let (cert, key) = (
        certs.path().join("server.pem"),
        certs.path().join("server.key"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &origin, "");
    cfg.server.tls_listen = "127.0.0.1:0".into();
    cfg.server.tls_cert = Some(cert.clone());
    cfg.server.tls_key = Some(key.clone());
    let node = Node::start_with(cfg).await;
    let tls = node.gw.as_ref().unwrap().tls_addr.unwrap().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let env = [
        ("CISTERN_SERVER__LISTEN", ""),
        ("CISTERN_SERVER__TLS_LISTEN", tls.as_str()),
        ("CISTERN_SERVER__TLS_CERT", cert.as_str()),
        ("CISTERN_SERVER__TLS_KEY", key.as_str()),
    ];
    let conf = dir.path().join("c.toml");
    std::fs::write(&conf, "").unwrap();
    let (code, out, err) = cistern_bg(&["health", "--config", conf.to_str().unwrap()], &env).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("https://{tls}/healthz answered 200")),
        "{out}"
    );
}

/// Runs `serve` on `dir` as it would run in the image: as a user that does not own the directory
/// (uid 65534 when the tests run as root, else this user with the directory made read-only).
#[test]
fn a_store_dir_not_writable_is_one_line_naming_the_uid_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let conf = t.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n",
            data.display()
        ),
    )
    .unwrap();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(t.path(), 0o755);
    mode(&conf, 0o644);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cistern"));
    cmd.args(["serve", "--config"]).arg(&conf);
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = if unsafe { libc::geteuid() } == 0 {
        // root ignores modes: run as nobody, which does not own `data` (root's, 0755), as the
        // image's user does not own a bind-mounted host directory.
        cmd.uid(65534).gid(65534);
        (65534, 65534)
    } else {
        mode(&data, 0o555);
        unsafe { (libc::geteuid(), libc::getegid()) }
    };
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    let want = format!(
        "store.dir {} is not writable by uid {uid} (gid {gid}): chown -R {uid}:{gid}",
        data.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("named volume"), "{err}");
}

#[test]
fn logs_carry_no_colour_codes_without_a_terminal() {
    use std::io::BufRead;
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n",
            t.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--config"])
        .arg(&conf)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("cistern serving")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("cistern serving")),
        "serve did not log its start within 20 s: {lines:?}"
    );
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "colour codes in a pipe: {l:?}");
    }
}

/// Without an admin token the CLI works through a gateway on loopback: its Host is the loopback
/// address it was given, and its requests carry the content types the admin API then wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_through_a_gateway_without_a_token_on_loopback() {
    let origin = Origin::start().await;
    let staged = random_bytes(30_000, 46);
    origin.put("/fw/staged.swu", staged.clone(), Behaviour::default());
    let node = Node::start(&origin, "").await;
    let server = format!("http://127.0.0.1:{}", node.addr.port());
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("usb.swu");
    let body = random_bytes(20_000, 47);
    std::fs::write(&file, &body).unwrap();
    let f = file.to_str().unwrap();
    let (code, _, err) = cistern_bg(&["import", f, "--pin", "--server", &server], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(node.blobs().contains(&sha256_hex(&body)));
    let manifest = tmp.path().join("m.json");
    let m = serde_json::json!({"files": [{"url": format!("{}/fw/staged.swu", origin.url()),
        "sha256": sha256_hex(&staged)}]});
    std::fs::write(&manifest, m.to_string()).unwrap();
    let m = manifest.to_str().unwrap();
    let (code, out, err) = cistern_bg(&["prefetch", m, "--server", &server], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cistern_bg(&["verify", "--server", &server], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 objects checked, 0 bad"), "{out}");
}

#[test]
fn doctor_warns_when_no_admin_token_guards_a_node_listening_beyond_loopback() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("c.toml");
    let data = t.path().join("data");
    let write = |listen: &str, token: &str| {
        let text = format!(
            "[server]\nlisten = \"{listen}\"\nadmin_token = \"{token}\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n",
            data.display()
        );
        std::fs::write(&conf, text).unwrap();
    };
    let c = conf.to_str().unwrap();
    write(&format!("0.0.0.0:{}", free_port()), "");
    let (code, out, _) = cistern(&["doctor", "--config", c]);
    assert_eq!(code, 0, "a warning is not a failure: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("WARN  admin"))
        .unwrap_or_default();
    assert!(line.contains("admin_token") && line.contains("->"), "{out}");
    write(&format!("0.0.0.0:{}", free_port()), "s3cret");
    let (_, out, _) = cistern(&["doctor", "--config", c]);
    assert!(out.contains("ok    admin: an admin token is set"), "{out}");
    write(&format!("127.0.0.1:{}", free_port()), "");
    let (_, out, _) = cistern(&["doctor", "--config", c]);
    assert!(out.contains("ok    admin: no admin token"), "{out}");
}
