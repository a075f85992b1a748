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
