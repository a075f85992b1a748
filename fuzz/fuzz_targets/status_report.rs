//! Status reports (src/relay/report.rs, SPEC 5), in both shapes it accepts: any body is accepted or
//! refused naming a field, without panicking; an accepted report is normalised (its ids non-empty
//! strings, its state a name, its codes integers, `via` a list), and a normalised report, which is
//! what a parent receives, parses again to itself, with the digest that tells a retry from another
//! report unchanged by what the hop added (`via`, `receivedAt`).
#![no_main]

use cistern::relay::report::{digest, explain, hex_code, parse, parse_body};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const STATES: [&str; 12] = [
    "None",
    "Idle",
    "DownloadStarted",
    "DownloadSucceeded",
    "InstallStarted",
    "InstallSucceeded",
    "ApplyStarted",
    "DeploymentInProgress",
    "BackupStarted",
    "BackupSucceeded",
    "RestoreStarted",
    "Failed",
];

fuzz_target!(|data: &[u8]| {
    let reports = match parse_body(data) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.field.is_empty());
            return;
        }
    };
    for (i, r) in reports.into_iter().enumerate() {
        let j = &r.json;
        assert!(!r.device_id.is_empty() && !r.report_id.is_empty());
        assert_eq!(j["deviceId"], Value::String(r.device_id.clone()));
        assert_eq!(j["reportId"], Value::String(r.report_id.clone()));
        let state = j["state"].as_str().expect("a state that is not a name");
        assert!(STATES.contains(&state), "state {state:?}");
        assert!(j["via"].is_array());
        if let Some(code) = j.get("extendedResultCode") {
            assert!(code.is_null() || code.is_i64(), "extendedResultCode {code}");
            if let Some(c) = code.as_i64() {
                assert_eq!(hex_code(c).len(), 8);
                let _ = explain(c);
            }
        }
        if let Some(code) = j.get("resultCode") {
            assert!(code.is_null() || code.is_i64(), "resultCode {code}");
        }
        let again = parse(Value::Object(j.clone()), i).expect("a normalised report is refused");
        assert_eq!(
            &again.json, j,
            "a normalised report changed when parsed again"
        );
        assert_eq!(again.report_id, r.report_id);
        assert_eq!(again.device_id, r.device_id);
        // As a parent receives it: a retried batch is a duplicate there, not a conflict.
        let mut relayed = j.clone();
        if let Some(Value::Array(via)) = relayed.get_mut("via") {
            via.push(Value::String("leaf".into()));
        }
        relayed.insert("receivedAt".into(), "2026-01-01T00:00:00Z".into());
        let relayed = parse(Value::Object(relayed), i).expect("a relayed report is refused");
        assert_eq!(digest(&relayed.json), digest(j), "relaying changed the digest");
    }
});
