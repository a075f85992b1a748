//! The IoT Edge module's files (`iotedge-module/`) against the image and the config: the manifests are
//! valid JSON whose createOptions mount a named volume at the image's /data and bind its ports, whose
//! environment `cistern check-config` accepts; module.json gives only flags as build options. The image
//! itself is built and run by `iotedge-module/image-test.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("iotedge-module")
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(module_dir().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        match line.trim_end().strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                if !cur.trim().is_empty() {
                    out.push(cur.split_whitespace().collect::<Vec<_>>().join(" "));
                }
                cur.clear();
            }
        }
    }
    out
}

/// `KEY=VALUE` pairs of the runtime stage's ENV instructions.
fn image_env() -> Vec<(String, String)> {
    dockerfile()
        .iter()
        .filter_map(|i| i.strip_prefix("ENV "))
        .flat_map(|rest| {
            rest.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn module_json_gives_the_context_as_contextpath_and_only_flags_as_build_options() {
    let m = json(&module_dir().join("module.json"));
    let image = &m["image"];
    assert_eq!(image["contextPath"], "..");
    let opts: Vec<&str> = image["buildOptions"]
        .as_array()
        .expect("buildOptions is a list")
        .iter()
        .map(|v| v.as_str().expect("buildOptions are strings"))
        .collect();
    // Each option is a flag, or the value of the flag before it (`--build-arg`, `X=1`); a bare path
    // would be a second build context, which the IoT Edge tooling refuses.
    for (i, o) in opts.iter().enumerate() {
        let after_flag = i > 0 && opts[i - 1].starts_with('-') && !opts[i - 1].contains('=');
        assert!(
            o.starts_with('-') || after_flag,
            "buildOptions: `{o}` is not a flag"
        );
        assert!(
            *o != "-f" && *o != "--file",
            "the Dockerfile is given by platforms"
        );
    }
    for (platform, file) in image["tag"]["platforms"].as_object().unwrap() {
        let f = module_dir().join(file.as_str().unwrap());
        assert!(f.is_file(), "{platform}: {} missing", f.display());
    }
}

#[test]
fn the_dockerfile_runs_as_10001_with_a_probe_and_a_data_volume() {
    let d = dockerfile();
    let has = |want: &str| d.iter().any(|i| i == want);
    assert!(has("USER 10001:10001"), "{d:#?}");
    assert!(has("VOLUME /data"));
    assert!(has(
        r#"HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["/usr/local/bin/cistern", "health"]"#
    ));
    assert!(d.iter().any(|i| i.contains("chown 10001:10001 /data")));
    assert!(d
        .iter()
        .any(|i| i.starts_with("LABEL org.opencontainers.image.")));
    // The stage a prebuilt binary replaces (`--build-context build=DIR`), and the path it provides.
    assert!(d.iter().any(|i| i.ends_with(" AS build")));
    assert!(has(
        "COPY --from=build /src/target/release/cistern /usr/local/bin/cistern"
    ));
    let env = image_env();
    assert!(env.contains(&("CISTERN_STORE__DIR".into(), "/data".into())));
    let ignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"))
            .expect("a .dockerignore at the context's root");
    assert!(ignore.lines().any(|l| l == "*" || l.starts_with("target")));
}

#[test]
fn deployment_manifests_mount_a_named_volume_and_configure_cistern_by_spec_names() {
    let exposed: Vec<String> = dockerfile()
        .iter()
        .filter_map(|i| i.strip_prefix("EXPOSE "))
        .flat_map(|p| p.split(' ').map(|p| format!("{p}/tcp")).collect::<Vec<_>>())
        .collect();
    let empty = tempfile::NamedTempFile::new().unwrap();
    for name in [
        "deployment.top-gateway.json",
        "deployment.child-gateway.json",
    ] {
        let doc = json(&module_dir().join(name));
        let m = &doc["modulesContent"]["$edgeAgent"]["properties.desired.modules.cistern"];
        assert_eq!(m["restartPolicy"], "always", "{name}");
        let raw = m["settings"]["createOptions"].as_str().unwrap();
        // Longer values must be split into createOptions01... by the tooling.
        assert!(
            raw.len() <= 512,
            "{name}: createOptions is {} chars",
            raw.len()
        );
        let co: serde_json::Value =
            serde_json::from_str(raw).unwrap_or_else(|e| panic!("{name}: createOptions: {e}"));
        let host = &co["HostConfig"];
        let mounts = host["Mounts"].as_array().cloned().unwrap_or_default();
        assert!(
            mounts
                .iter()
                .any(|m| m["Type"] == "volume" && m["Target"] == "/data" && m["Source"] != ""),
            "{name}: no named volume at /data: {co}"
        );
        let binds = host["Binds"].as_array().cloned().unwrap_or_default();
        assert!(binds
            .iter()
            .all(|b| !b.as_str().unwrap_or("").ends_with(":/data")));
        let ports = host["PortBindings"].as_object().unwrap();
        assert!(ports.contains_key("8080/tcp"), "{name}");
        for p in ports.keys() {
            assert!(
                exposed.contains(p),
                "{name}: binds {p}, which the image does not expose"
            );
        }
        // What the module gets: the image's ENV, then the manifest's, read as `serve` reads them.
        let mut env = image_env();
        for (k, v) in m["env"].as_object().unwrap() {
            assert!(
                k.starts_with("CISTERN_"),
                "{name}: {k} is not a cistern setting"
            );
            env.push((k.clone(), v["value"].as_str().unwrap().to_string()));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .arg("check-config")
            .arg(empty.path())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // Set by the IoT Edge runtime: the TLS listener's certificate comes from it.
            .env(
                "IOTEDGE_WORKLOADURI",
                "unix:///var/run/iotedge/workload.sock",
            )
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(stdout.contains("dir = \"/data\""), "{name}: {stdout}");
    }
}
