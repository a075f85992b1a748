//! The configuration tree's unit tests: defaults, unknown keys, environment overrides, validation.

use super::*;

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    Config::from_toml_str(text, "test.toml", &vars)
}

#[test]
fn defaults_are_valid() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:8080");
    assert_eq!(c.store.min_free, ByteSize(1 << 30));
    assert_eq!(c.upstream.retries, 5);
}

#[test]
fn unknown_key_is_named() {
    let e = load("[store]\nmax_sise = \"1GiB\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_sise"), "{e}");
    assert!(e.contains("test.toml"), "{e}");
}

#[test]
fn env_wins_over_file() {
    let c = load(
        "[store]\nmax_size = \"1GiB\"\n",
        &[
            ("CISTERN_STORE__MAX_SIZE", "2GiB"),
            ("CISTERN_UPSTREAM__ALLOWED_ORIGINS", "a.example, b.example"),
            ("CISTERN_UPSTREAM__RETRIES", "2"),
            ("CISTERN_SERVER__ALLOW_CONNECT", "true"),
        ],
    )
    .unwrap();
    assert_eq!(c.store.max_size, ByteSize(2 << 30));
    assert_eq!(c.upstream.allowed_origins, vec!["a.example", "b.example"]);
    assert_eq!(c.upstream.retries, 2);
    assert!(c.server.allow_connect);
}

#[test]
fn env_lists_may_be_written_as_in_the_file() {
    let c = load(
        "",
        &[(
            "CISTERN_UPSTREAM__ALLOWED_ORIGINS",
            r#"["a.example", "b.example:8080"]"#,
        )],
    )
    .unwrap();
    assert_eq!(
        c.upstream.allowed_origins,
        vec!["a.example", "b.example:8080"]
    );
    let e = load("", &[("CISTERN_UPSTREAM__ALLOWED_ORIGINS", "[a.example")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CISTERN_UPSTREAM__ALLOWED_ORIGINS") && e.contains("not a list"),
        "{e}"
    );
    let e = load("", &[("CISTERN_UPSTREAM__ALLOWED_ORIGINS", "[1, 2]")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a list of strings"), "{e}");
}

#[test]
fn env_named_origins() {
    let c = load(
        "",
        &[
            (
                "CISTERN_ORIGINS__DEB_MIRROR__URL",
                "http://deb.example/debian",
            ),
            ("CISTERN_ORIGINS__DEB_MIRROR__IMMUTABLE", "true"),
        ],
    )
    .unwrap();
    assert_eq!(c.origins.len(), 1);
    assert_eq!(c.origins[0].name, "deb_mirror");
    assert!(c.origins[0].immutable);
}

#[test]
fn env_typo_is_an_error() {
    let e = load("", &[("CISTERN_STORE__MAXSIZE", "1")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("CISTERN_STORE__MAXSIZE"), "{e}");
}

#[test]
fn bad_values_are_named() {
    assert!(load("[node]\nid = \"gw 1\"\n", &[])
        .unwrap_err()
        .to_string()
        .contains("node.id"));
    assert!(load("[server]\nlisten = \"nowhere\"\n", &[])
        .unwrap_err()
        .to_string()
        .contains("server.listen"));
    let e = load("[[origins]]\nname = \"Bad\"\nurl = \"http://x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("origins.name"), "{e}");
    let e = load("[store]\nmax_size = \"lots\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lots"), "{e}");
    let e = load("[status]\nmax_report = \"100\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("status.max_report"), "{e}");
    let e = load("[status]\nmax_store = \"16MiB\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("status.max_store") && e.contains("dedup"), "{e}");
    let c = load(
        "[status]\nmax_store = \"16KiB\"\nmax_report = \"1KiB\"\ndedup_entries = 10\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.status.max_store, ByteSize(16 << 10));
}

#[test]
fn secrets_are_redacted() {
    let c = load("[server]\nadmin_token = \"hunter2\"\n", &[]).unwrap();
    let t = c.redacted_toml();
    assert!(!t.contains("hunter2"));
    assert!(t.contains("<redacted>"));
}

#[test]
fn keys_per_object_are_bounded_by_default_and_settable() {
    assert_eq!(load("", &[]).unwrap().store.max_keys_per_object, 10_000);
    let c = load("", &[("CISTERN_STORE__MAX_KEYS_PER_OBJECT", "500")]).unwrap();
    assert_eq!(c.store.max_keys_per_object, 500);
    let e = load("[store]\nmax_keys_per_object = 0\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("store.max_keys_per_object"), "{e}");
}

#[test]
fn registries_are_checked() {
    let c = load(
        "[[registries]]\nname = \"mcr\"\nurl = \"https://mcr.microsoft.com\"\n\n[[registries]]\nname = \"local\"\nurl = \"http://127.0.0.1:5000\"\nusername = \"u\"\npassword_file = \"/run/secrets/p\"\ntag_ttl = \"30s\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.registries.len(), 2);
    assert_eq!(
        c.registries[0].tag_ttl.0,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(
        c.registries[1].tag_ttl.0,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        c.registries[1].password_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/p"))
    );
    for (bad, key) in [
        (
            "name = \"MCR\"\nurl = \"https://m.example\"",
            "registries.name",
        ),
        (
            "name = \"m\"\nurl = \"ftp://m.example\"",
            "registries.m.url",
        ),
        (
            "name = \"m\"\nurl = \"https://m.example\"\npassword_file = \"/p\"",
            "registries.m.password_file",
        ),
        (
            "name = \"m\"\nurl = \"https://m.example\"\ntagttl = \"1s\"",
            "tagttl",
        ),
    ] {
        let e = load(&format!("[[registries]]\n{bad}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn uplink_and_peers_are_checked() {
    let c = load(
        "[uplink]\nmax_rate = \"8MiB\"\nwindows = [\"Mon-Fri 22:00-06:00\"]\ntimezone = \"Europe/Berlin\"\n",
        &[("CISTERN_PEERS__MEMBERS", "http://a:8080, http://b:8080")],
    )
    .unwrap();
    assert_eq!(c.uplink.max_rate, ByteSize(8 << 20));
    assert_eq!(c.uplink.parsed_windows().len(), 1);
    assert_eq!(c.peers.members.len(), 2);
    for (text, key) in [
        ("[uplink]\ntimezone = \"Mars/Olympus\"\n", "uplink.timezone"),
        (
            "[uplink]\nwindows = [\"Mon 25:00-01:00\"]\n",
            "uplink.windows",
        ),
        ("[peers]\nmembers = [\"gw-a:8080\"]\n", "peers.members"),
        ("[peers]\ndns = \"peers.site\"\n", "peers.dns"),
        ("[peers]\nself = \"nope\"\n", "peers.self"),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.starts_with(key), "{text}: {e}");
    }
}
