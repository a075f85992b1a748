//! The configuration (src/config, SPEC 2): any TOML file with any `CISTERN_*` overrides loads or is
//! refused with one line naming what is wrong, without panicking; a loaded config, printed the way
//! `check-config` prints it, loads again as the same config; sizes and durations read back as
//! themselves, and a size written as a plain number is that many bytes.
#![no_main]

use cistern::config::{ByteSize, Config, Span};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The file, then after a NUL the environment: one `KEY=VALUE` per line, `CISTERN_` added to keys
    // that lack it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let k = if k.starts_with("CISTERN_") {
                k.to_string()
            } else {
                format!("CISTERN_{k}")
            };
            (k, v.to_string())
        })
        .collect();
    for (_, v) in &vars {
        check_size(v);
        check_span(v);
    }
    match Config::from_toml_str(file, "fuzz.toml", &vars) {
        Ok(cfg) => check_round_trip(&cfg),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.contains('\n'),
                "an error of more than one line: {msg:?}"
            );
        }
    }
});

fn check_round_trip(cfg: &Config) {
    let printed = toml::to_string(cfg).expect("a loaded config that cannot be printed");
    let again = Config::from_toml_str(&printed, "printed.toml", &[])
        .unwrap_or_else(|e| panic!("the printed config does not load: {e}\n{printed}"));
    assert_eq!(toml::to_string(&again).unwrap(), printed);
    let _ = cfg.redacted_toml();
}

fn check_size(v: &str) {
    let Ok(s) = ByteSize::parse(v) else {
        return;
    };
    assert_eq!(ByteSize::parse(&s.to_string()), Ok(s), "{v:?} -> {s}");
    let t = v.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = t.parse::<u64>() {
            assert_eq!(s.0, n, "{v:?} is {n} bytes");
        }
    }
}

fn check_span(v: &str) {
    let Ok(s) = Span::parse(v) else {
        return;
    };
    assert_eq!(Span::parse(&s.to_string()), Ok(s), "{v:?} -> {s}");
}
