//! The command line as a user meets it: check-config, doctor, --version, usage errors, import/verify.

mod common;

use std::process::Command;

use common::*;

fn cistern(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
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
    let conf_s = conf.to_str().unwrap().to_string();
    let c2 = conf_s.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || cistern(&["doctor", "--config", &c2]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("a cistern answers /healthz"), "{out}");
    // Checking changes nothing: the store directory is not created by doctor.
    assert!(out.contains("not created yet"), "{out}");
    assert!(!t.path().join("data").exists());
    write("\"http://127.0.0.1:1\"");
    let (code, out, _) =
        tokio::task::spawn_blocking(move || cistern(&["doctor", "--config", &conf_s]))
            .await
            .unwrap();
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
    let (f, c) = (
        file.to_str().unwrap().to_string(),
        conf.to_str().unwrap().to_string(),
    );
    let (code, _, err) =
        tokio::task::spawn_blocking(move || cistern(&["import", &f, "--config", &c]))
            .await
            .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("--server"), "{err}");

    let (f, s, t) = (
        file.to_str().unwrap().to_string(),
        server.clone(),
        token.to_str().unwrap().to_string(),
    );
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        cistern(&["import", &f, "--pin", "--server", &s, "--token-file", &t])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&sha256_hex(&body)));
    assert!(node.blobs().contains(&sha256_hex(&body)));

    let manifest = tmp.path().join("m.json");
    let m = serde_json::json!({"files": [{"filename": "staged.swu", "sizeInBytes": staged.len(),
        "hashes": {"sha256": sha256_hex(&staged)}}]});
    std::fs::write(&manifest, m.to_string()).unwrap();
    let (mf, s, t) = (
        manifest.to_str().unwrap().to_string(),
        server.clone(),
        token.to_str().unwrap().to_string(),
    );
    let base = format!("{}/fw", origin.url());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        cistern(&[
            "prefetch",
            &mf,
            "--base-url",
            &base,
            "--server",
            &s,
            "--token-file",
            &t,
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stored"), "{out}");
    assert!(node.blobs().contains(&sha256_hex(&staged)));

    let s = server.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["verify", "--server", &s])
            .env("CISTERN_TOKEN", "t0ken")
            .output()
            .map(|o| {
                (
                    o.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&o.stdout).to_string(),
                    String::new(),
                )
            })
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 objects checked, 0 bad"), "{out}");

    // A wrong token is one clear line, even when the gateway refuses before the upload is through.
    let big = tmp.path().join("big.swu");
    std::fs::write(&big, random_bytes(16 << 20, 45)).unwrap();
    let (f, s) = (big.to_str().unwrap().to_string(), server.clone());
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["import", &f, "--server", &s])
            .env("CISTERN_TOKEN", "wrong")
            .output()
            .map(|o| {
                (
                    o.status.code().unwrap_or(-1),
                    String::new(),
                    String::from_utf8_lossy(&o.stderr).to_string(),
                )
            })
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("admin token"), "{err}");

    // Importing what is already stored is answered at once; the upload still ends cleanly.
    for _ in 0..2 {
        let (f, s, t) = (
            big.to_str().unwrap().to_string(),
            server.clone(),
            token.to_str().unwrap().to_string(),
        );
        let (code, _, err) = tokio::task::spawn_blocking(move || {
            cistern(&["import", &f, "--server", &s, "--token-file", &t])
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{err}");
    }
}
