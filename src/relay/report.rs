//! One device status report (SPEC 5): parsed from cistern's shape or the Device Update agent's twin
//! shape, normalised to cistern's shape (which is what is stored, shown and relayed), unknown fields kept.

use serde_json::{Map, Value};
use sha2::Digest as _;

/// The Device Update agent's states, by number (SPEC 5).
const STATES: &[(i64, &str)] = &[
    (-1, "None"),
    (0, "Idle"),
    (1, "DownloadStarted"),
    (2, "DownloadSucceeded"),
    (3, "InstallStarted"),
    (4, "InstallSucceeded"),
    (5, "ApplyStarted"),
    (6, "DeploymentInProgress"),
    (7, "BackupStarted"),
    (8, "BackupSucceeded"),
    (9, "RestoreStarted"),
    (255, "Failed"),
];

pub const FAILED: &str = "Failed";

/// A report that cannot be accepted, naming the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct BadReport {
    pub field: String,
    pub msg: String,
}

fn bad(field: &str, msg: impl Into<String>) -> BadReport {
    BadReport {
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// A normalised report: the JSON object to store and relay, plus the fields the relay needs.
#[derive(Debug, Clone)]
pub struct Report {
    pub device_id: String,
    pub report_id: String,
    pub json: Map<String, Value>,
}

fn state_name(v: &Value, field: &str) -> Result<String, BadReport> {
    match v {
        Value::Number(n) => {
            let n = n
                .as_i64()
                .ok_or_else(|| bad(field, "not an integer state"))?;
            STATES
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, s)| s.to_string())
                .ok_or_else(|| bad(field, format!("unknown state number {n}")))
        }
        Value::String(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return state_name(&Value::from(n), field);
            }
            STATES
                .iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(s))
                .map(|(_, s)| s.to_string())
                .ok_or_else(|| bad(field, format!("unknown state `{s}`")))
        }
        _ => Err(bad(field, "must be a state name or number")),
    }
}

/// Extended result codes come as an integer (agent 1.0), a hex string (agent 1.1), or a list of
/// either (the first is taken).
fn extended_code(v: &Value, field: &str) -> Result<Option<i64>, BadReport> {
    Ok(match v {
        Value::Null => None,
        Value::Number(n) => Some(n.as_i64().ok_or_else(|| bad(field, "not an integer"))?),
        Value::String(s) => {
            let first = s.split(',').next().unwrap_or("").trim();
            if first.is_empty() {
                None
            } else {
                let hex = first.trim_start_matches("0x").trim_start_matches("0X");
                Some(
                    i64::from_str_radix(hex, 16)
                        .map_err(|_| bad(field, format!("`{s}` is not a hex code")))?,
                )
            }
        }
        Value::Array(a) => match a.first() {
            Some(x) => extended_code(x, field)?,
            None => None,
        },
        _ => return Err(bad(field, "must be an integer or a hex string")),
    })
}

fn update_id(v: &Value) -> Value {
    match v {
        // `installedUpdateId` is a JSON string holding the update id (an object). Only an object is
        // taken out of it: a string holding any other JSON stays as it is, so that parsing a
        // normalised report again (at the next hop) changes nothing.
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(id @ Value::Object(_)) => id,
            _ => Value::String(s.clone()),
        },
        other => other.clone(),
    }
}

/// Parses one report at `at` (its index in the request, for error messages).
pub fn parse(v: Value, at: usize) -> Result<Report, BadReport> {
    let field = |f: &str| format!("reports[{at}].{f}");
    let Value::Object(mut obj) = v else {
        return Err(bad(&format!("reports[{at}]"), "must be a JSON object"));
    };
    let agent = obj.get("agent").cloned();
    if let Some(Value::Object(agent)) = &agent {
        // serde_json's maps are sorted: this is the JSON with sorted keys and no whitespace.
        let canonical = serde_json::to_string(&obj).unwrap_or_default();
        // The agent's twin shape: map its members unless cistern's own are present already.
        let lir = agent
            .get("lastInstallResult")
            .cloned()
            .unwrap_or(Value::Null);
        let set = |obj: &mut Map<String, Value>, k: &str, v: Option<Value>| {
            if let Some(v) = v.filter(|v| !v.is_null()) {
                obj.entry(k.to_string()).or_insert(v);
            }
        };
        set(&mut obj, "state", agent.get("state").cloned());
        set(&mut obj, "resultCode", lir.get("resultCode").cloned());
        set(
            &mut obj,
            "extendedResultCode",
            lir.get("extendedResultCodes")
                .or_else(|| lir.get("extendedResultCode"))
                .cloned(),
        );
        set(&mut obj, "resultDetails", lir.get("resultDetails").cloned());
        set(
            &mut obj,
            "workflowId",
            agent.get("workflow").and_then(|w| w.get("id")).cloned(),
        );
        set(
            &mut obj,
            "updateId",
            agent.get("installedUpdateId").cloned(),
        );
        if !obj.contains_key("reportId") {
            obj.insert(
                "reportId".into(),
                Value::String(hex::encode(sha2::Sha256::digest(canonical.as_bytes()))),
            );
        }
    }
    let device_id = match obj.get("deviceId") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(bad(&field("deviceId"), "must be a non-empty string")),
        None => return Err(bad(&field("deviceId"), "missing")),
    };
    let report_id = match obj.get("reportId") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(bad(&field("reportId"), "must be a non-empty string")),
        None => return Err(bad(&field("reportId"), "missing")),
    };
    let state = match obj.get("state") {
        Some(v) => state_name(v, &field("state"))?,
        None => return Err(bad(&field("state"), "missing")),
    };
    obj.insert("reportId".into(), Value::String(report_id.clone()));
    obj.insert("state".into(), Value::String(state));
    if let Some(v) = obj.get("extendedResultCode").cloned() {
        let code = extended_code(&v, &field("extendedResultCode"))?;
        obj.insert(
            "extendedResultCode".into(),
            code.map(Value::from).unwrap_or(Value::Null),
        );
    }
    if let Some(v) = obj.get("resultCode") {
        if !v.is_null() && !v.is_i64() {
            return Err(bad(&field("resultCode"), "must be an integer"));
        }
    }
    if let Some(v) = obj.get("updateId").cloned() {
        obj.insert("updateId".into(), update_id(&v));
    }
    match obj.get("via") {
        None => {
            obj.insert("via".into(), Value::Array(Vec::new()));
        }
        Some(Value::Array(_)) => {}
        Some(_) => return Err(bad(&field("via"), "must be an array")),
    }
    Ok(Report {
        device_id,
        report_id,
        json: obj,
    })
}

/// The members a relay adds on the way, which are not part of what was reported: `via`, which every
/// hop extends, and `receivedAt`, which the first node stamps (two gateways that both got the report
/// stamp it differently).
const RELAY_FIELDS: [&str; 2] = ["via", "receivedAt"];

/// What tells a retry from a different report under the same (deviceId, reportId): the first 128 bits
/// of the SHA-256 of the normalised report as canonical JSON (object keys sorted at every level, no
/// whitespace), without the relay's own members (`RELAY_FIELDS`). A device's retry, a child's retried
/// batch and a report reaching this node by two paths all get the same digest; any other change to
/// the report gives another. 128 bits: the one who posts a report first does not choose the content
/// of the real one that follows, so matching it takes a second preimage (2^128 work), and it is what
/// the dedup records keep per report, on disk and in memory.
pub fn digest(json: &Map<String, Value>) -> u128 {
    let mut h = Hashing(sha2::Sha256::new());
    object(
        json.iter()
            .filter(|(k, _)| !RELAY_FIELDS.contains(&k.as_str())),
        &mut h,
    );
    let full = h.0.finalize();
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    u128::from_be_bytes(d)
}

/// Feeds what is written into a SHA-256.
struct Hashing(sha2::Sha256);

impl std::io::Write for Hashing {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `v` as canonical JSON. Its depth is bounded by the parser's (128 levels).
fn canonical(v: &Value, out: &mut Hashing) {
    match v {
        Value::Object(m) => object(m.iter(), out),
        Value::Array(a) => {
            out.0.update(b"[");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.0.update(b",");
                }
                canonical(x, out);
            }
            out.0.update(b"]");
        }
        // Strings and numbers as serde_json writes them (it cannot fail on a `Value`).
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// An object's members as canonical JSON, sorted by key whatever the map's own order (serde_json's
/// `preserve_order` feature, if any crate ever turns it on, would keep the sender's order).
fn object<'a>(members: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Hashing) {
    let mut members: Vec<_> = members.collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    out.0.update(b"{");
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.0.update(b",");
        }
        let _ = serde_json::to_writer(&mut *out, k);
        out.0.update(b":");
        canonical(v, out);
    }
    out.0.update(b"}");
}

/// Parses a request body: one report or an array of them. Nothing is accepted if any is bad.
pub fn parse_body(body: &[u8]) -> Result<Vec<Report>, BadReport> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad("body", format!("malformed JSON: {e}")))?;
    match v {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse(v, i))
            .collect(),
        one => Ok(vec![parse(one, 0)?]),
    }
}

/// The agent's extended result code as its 8-digit hex.
pub fn hex_code(code: i64) -> String {
    format!("{:08X}", code as u32)
}

/// What cistern knows of an extended result code (SPEC 5).
pub fn explain(code: i64) -> Option<String> {
    let c = code as u32;
    let facility = c >> 16;
    match (facility, c) {
        (_, 0xD0D0_2002) => Some("download made no progress".into()),
        (_, 0xD0D0_3805) => Some("no network".into()),
        (0xD019, _) => Some(format!("HTTP {} from the download source", c & 0xFFFF)),
        (0xC0D0, _) if c & 0xFF00 == 0 => Some(format!("curl error {}", c & 0xFF)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cistern_shape() {
        let r = parse(json!({"reportId": "r1", "deviceId": "d1", "state": 255, "extendedResultCode": 0, "x": 1}), 0).unwrap();
        assert_eq!(r.json["state"], "Failed");
        assert_eq!(r.json["x"], 1);
        assert_eq!(r.json["via"], json!([]));
    }

    #[test]
    fn agent_shape() {
        let r = parse(
            json!({"deviceId": "d2", "agent": {"state": 255, "workflow": {"id": "wf"},
                "installedUpdateId": "{\"provider\":\"Contoso\",\"name\":\"Sensor\",\"version\":\"1.2.0\"}",
                "lastInstallResult": {"resultCode": 0, "extendedResultCodes": "D0190193", "resultDetails": "oops"}}}),
            0,
        )
        .unwrap();
        assert_eq!(r.json["state"], "Failed");
        assert_eq!(r.json["workflowId"], "wf");
        assert_eq!(r.json["updateId"]["version"], "1.2.0");
        assert_eq!(r.json["extendedResultCode"], 0xD0190193u32 as i64);
        assert_eq!(r.report_id.len(), 64);
        // The same report again gets the same id: a retry is a duplicate.
        let again = parse(
            json!({"deviceId": "d2", "agent": {"state": 255, "workflow": {"id": "wf"},
                "installedUpdateId": "{\"provider\":\"Contoso\",\"name\":\"Sensor\",\"version\":\"1.2.0\"}",
                "lastInstallResult": {"resultCode": 0, "extendedResultCodes": "D0190193", "resultDetails": "oops"}}}),
            0,
        )
        .unwrap();
        assert_eq!(again.report_id, r.report_id);
        // Parsing a normalised report again changes nothing (what a parent receives).
        let relayed = parse(Value::Object(r.json.clone()), 0).unwrap();
        assert_eq!(relayed.json, r.json);
    }

    #[test]
    fn update_ids_parse_again_to_themselves() {
        // Found by replaying an input through the status_report fuzz target's property: a string
        // holding JSON that is not an object (`"\"1\""`) was decoded once per hop, so the report a
        // parent received changed again (`"1"`, then `1`).
        let r = parse(
            json!({"reportId": "r", "deviceId": "d", "state": 1, "updateId": "\"1\""}),
            0,
        )
        .unwrap();
        assert_eq!(r.json["updateId"], "\"1\"");
        let relayed = parse(Value::Object(r.json.clone()), 0).unwrap();
        assert_eq!(relayed.json, r.json);
    }

    #[test]
    fn the_digest_ignores_what_hops_add_and_sees_everything_else() {
        let r = parse(
            json!({"reportId": "r", "deviceId": "d", "state": 2, "x": {"b": 1, "a": [1, "2"]}}),
            0,
        )
        .unwrap();
        let d = digest(&r.json);
        // What a parent receives: this node in `via`, the time it was received.
        let mut relayed = r.json.clone();
        relayed.insert("via".into(), json!(["leaf", "mid"]));
        relayed.insert("receivedAt".into(), json!("2026-01-01T00:00:00Z"));
        assert_eq!(digest(&parse(Value::Object(relayed), 0).unwrap().json), d);
        // The state as a name is the same report; any other difference is another one.
        let named = parse(
            json!({"reportId": "r", "deviceId": "d", "state": "DownloadSucceeded", "x": {"a": [1, "2"], "b": 1}}),
            0,
        )
        .unwrap();
        assert_eq!(digest(&named.json), d);
        for other in [
            json!({"reportId": "r", "deviceId": "d", "state": 255, "x": {"b": 1, "a": [1, "2"]}}),
            json!({"reportId": "r", "deviceId": "d", "state": 2, "x": {"b": 1, "a": [1, 2]}}),
            json!({"reportId": "r", "deviceId": "d", "state": 2, "x": {"b": 1, "a": [1, "2"]}, "y": null}),
            json!({"reportId": "r", "deviceId": "e", "state": 2, "x": {"b": 1, "a": [1, "2"]}}),
        ] {
            assert_ne!(digest(&parse(other.clone(), 0).unwrap().json), d, "{other}");
        }
        // The canonical text is serde_json's own with sorted keys (what the agent shape's ids use).
        let mut text = r.json.clone();
        text.remove("via");
        let mut h = Hashing(sha2::Sha256::new());
        canonical(&Value::Object(text.clone()), &mut h);
        let sha = sha2::Sha256::digest(serde_json::to_vec(&text).unwrap());
        assert_eq!(h.0.finalize(), sha);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            parse(json!({"reportId": "r", "state": 1}), 0)
                .unwrap_err()
                .field,
            "reports[0].deviceId"
        );
        assert_eq!(
            parse(json!({"deviceId": "d", "state": 1}), 2)
                .unwrap_err()
                .field,
            "reports[2].reportId"
        );
        assert!(parse(json!({"deviceId": "d", "reportId": "r", "state": 42}), 0).is_err());
        assert!(parse_body(b"{nope").is_err());
    }

    #[test]
    fn explanations() {
        assert_eq!(
            explain(0xD0190193u32 as i64).unwrap(),
            "HTTP 403 from the download source"
        );
        assert_eq!(
            explain(0xD0D02002u32 as i64).unwrap(),
            "download made no progress"
        );
        assert_eq!(explain(0xC0D00007u32 as i64).unwrap(), "curl error 7");
        assert_eq!(explain(0x12345678), None);
        assert_eq!(hex_code(0xD0190193u32 as i64), "D0190193");
    }
}
