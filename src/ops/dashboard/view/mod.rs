//! What the dashboard shows, as one [`View`] made from what `store`, `fetch`, `server` and `relay`
//! expose. The page's template renders it, and `/dashboard/state.json` serves it for the page to refresh
//! itself: every figure is formatted here, once, so the template and the page's script only place text.
//! The uplink budget and the prefetch jobs are in `uplink.rs`, the stored images in `images.rs`.

mod images;
mod uplink;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::Value;

use super::super::Ops;
use crate::server::ImageEntry;
pub use images::ImageRow;
pub use uplink::{JobRow, UplinkView};

/// Stored objects listed at most (the most recently used first).
const OBJECTS_SHOWN: usize = 50;
/// Prefetch jobs listed at most (the newest first).
const JOBS_SHOWN: usize = 20;

/// Everything on the page.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub node: String,
    /// When this view was made (RFC 3339, UTC).
    pub generated_at: String,
    pub store: StoreView,
    pub traffic: TrafficView,
    /// The uplink budget (SPEC 4): caps, rates by class, windows.
    pub uplink: UplinkView,
    pub transfers: Vec<TransferRow>,
    pub objects: Vec<ObjectRow>,
    /// "50 of 812" when the list is cut.
    pub objects_shown: String,
    pub parents: Vec<ParentRow>,
    /// The site's peers (SPEC 10); empty without `[peers]`.
    pub peers: Vec<PeerRow>,
    pub prefetch: Vec<JobRow>,
    /// The stored images (SPEC 9), as `GET /v1/admin/images` lists them.
    pub images: Vec<ImageRow>,
    /// "3", or "the first 50 of 72" when the list is cut.
    pub images_shown: String,
    pub deployments: DeploymentsView,
    pub relay: RelayView,
}

/// A progress bar: `value` of `max` (None: the end is unknown), with the text beside it.
#[derive(Serialize)]
pub struct Bar {
    pub value: u64,
    pub max: Option<u64>,
    pub text: String,
}

#[derive(Serialize)]
pub struct StoreView {
    pub objects: u64,
    pub used: String,
    pub budget: String,
    pub free: String,
    pub bar: Bar,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficView {
    pub served: String,
    pub from_store: String,
    pub fetched: String,
    pub hit_ratio: String,
}

#[derive(Serialize)]
pub struct TransferRow {
    pub key: String,
    pub clients: usize,
    pub progress: Bar,
}

#[derive(Serialize)]
pub struct ObjectRow {
    pub sha256: String,
    pub size: String,
    pub hits: u64,
    pub keys: String,
    pub pinned: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRow {
    pub url: String,
    pub state: &'static str,
    pub last_ok: String,
    pub last_error: String,
}

/// A member of the site's peers.
#[derive(Serialize)]
pub struct PeerRow {
    pub url: String,
    /// "this node", "up" or "down".
    pub state: &'static str,
    /// How long it has been in that state.
    pub since: String,
    /// Requests sent to it: "12 ok, 1 failed".
    pub sent: String,
    pub served: u64,
}

/// The deployments table: one row per update and workflow, one column per state any device is in.
#[derive(Serialize)]
pub struct DeploymentsView {
    /// The state columns, in name order.
    pub states: Vec<String>,
    pub rows: Vec<DeploymentRow>,
    pub failed: Vec<FailedRow>,
}

#[derive(Serialize)]
pub struct DeploymentRow {
    pub update: String,
    pub workflow: String,
    pub devices: u64,
    /// Devices per state, with every column of [`DeploymentsView::states`] present.
    pub states: BTreeMap<String, u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedRow {
    pub update: String,
    pub device_id: String,
    pub result_code: String,
    pub extended_result_code: String,
    pub explanation: String,
    pub result_details: String,
    pub timestamp: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayView {
    pub next_hop: String,
    pub depth: u64,
    pub oldest: String,
    pub last_success: String,
    pub last_error: String,
    pub set_aside_count: u64,
    pub set_aside: Vec<SetAsideRow>,
    /// Reports accepted under a (deviceId, reportId) already accepted with other content.
    pub conflicts: u64,
    pub recent_conflicts: Vec<ConflictRow>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRow {
    pub device_id: String,
    pub report_id: String,
    pub at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SetAsideRow {
    pub device_id: String,
    pub report_id: String,
    pub at: String,
    pub hop: String,
    pub status: String,
    pub answer: String,
}

impl View {
    /// The view of `ops` now, with `images` (what `server::stored_images` lists).
    pub fn of(ops: &Ops, images: Vec<ImageEntry>) -> View {
        let (objects, objects_shown) = objects(ops);
        let (images, images_shown) = images::images(images);
        let up = ops.fetcher.uplink().status();
        View {
            node: ops.node_id.clone(),
            generated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            store: store(ops),
            traffic: traffic(ops),
            uplink: uplink::uplink(&up),
            transfers: transfers(ops),
            objects,
            objects_shown,
            parents: parents(ops),
            peers: peers(ops),
            prefetch: ops
                .fetcher
                .prefetch_jobs(JOBS_SHOWN)
                .into_iter()
                .map(|j| uplink::job(j, &up))
                .collect(),
            images,
            images_shown,
            deployments: deployments(&ops.relay.deployments()),
            relay: relay(&ops.relay.status()),
        }
    }
}

fn store(ops: &Ops) -> StoreView {
    let u = ops.store.usage();
    let budget = u.may_use();
    StoreView {
        objects: u.objects,
        used: bytes(u.bytes),
        budget: bytes(budget),
        free: bytes(u.free),
        bar: Bar {
            value: u.bytes,
            max: Some(budget),
            text: format!(
                "{} of {} ({})",
                bytes(u.bytes),
                bytes(budget),
                percent(u.bytes, budget)
            ),
        },
    }
}

fn traffic(ops: &Ops) -> TrafficView {
    let hit = ops.server.hit_bytes.load(Ordering::Relaxed);
    let miss = ops.server.miss_bytes.load(Ordering::Relaxed);
    let fetched = ops.fetcher.stats().bytes_fetched.load(Ordering::Relaxed);
    TrafficView {
        served: bytes(hit + miss),
        from_store: bytes(hit),
        fetched: bytes(fetched),
        hit_ratio: percent(hit, hit + miss),
    }
}

fn transfers(ops: &Ops) -> Vec<TransferRow> {
    let mut list = ops.fetcher.in_flight();
    list.sort_by(|a, b| a.key.cmp(&b.key));
    list.into_iter()
        .map(|t| TransferRow {
            key: t.key,
            clients: t.clients,
            progress: progress(t.bytes, t.size),
        })
        .collect()
}

fn objects(ops: &Ops) -> (Vec<ObjectRow>, String) {
    let all = ops.store.list();
    let shown = if all.len() > OBJECTS_SHOWN {
        format!("the {OBJECTS_SHOWN} most recently used of {}", all.len())
    } else {
        format!("{}", all.len())
    };
    let rows = all
        .into_iter()
        .take(OBJECTS_SHOWN)
        .map(|o| ObjectRow {
            sha256: o.digest.hex(),
            size: bytes(o.size),
            hits: o.hits,
            keys: o.keys.join(" "),
            pinned: if o.pinned { "pinned" } else { "" },
        })
        .collect();
    (rows, shown)
}

fn parents(ops: &Ops) -> Vec<ParentRow> {
    ops.fetcher
        .parents_health()
        .into_iter()
        .map(|p| ParentRow {
            url: p.url,
            state: if p.healthy { "up" } else { "skipped" },
            last_ok: p
                .seconds_since_ok
                .map(|s| format!("{} ago", age(s)))
                .unwrap_or_else(|| "never".into()),
            last_error: p.last_error.unwrap_or_default(),
        })
        .collect()
}

fn peers(ops: &Ops) -> Vec<PeerRow> {
    let Some(p) = ops.fetcher.peers() else {
        return Vec::new();
    };
    let now = crate::store::now_ms() / 1000;
    p.status()
        .into_iter()
        .map(|m| PeerRow {
            url: m.url,
            state: match (m.is_self, m.up) {
                (true, _) => "this node",
                (false, true) => "up",
                (false, false) => "down",
            },
            since: age(now.saturating_sub(m.since)),
            sent: format!(
                "{} ok, {} 5xx, {} failed",
                m.sent_ok, m.sent_5xx, m.sent_failed
            ),
            served: m.served,
        })
        .collect()
}

/// The rows of `GET /v1/deployments`, laid out as a table.
fn deployments(v: &Value) -> DeploymentsView {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let states: BTreeSet<String> = list
        .iter()
        .filter_map(|d| d.get("states").and_then(Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for d in list {
        let update = update_name(d.get("updateId"));
        let counts = d.get("states").and_then(Value::as_object);
        rows.push(DeploymentRow {
            update: update.clone(),
            workflow: text(d.get("workflowId")),
            devices: d.get("devices").and_then(Value::as_u64).unwrap_or(0),
            states: states
                .iter()
                .map(|s| {
                    let n = counts.and_then(|m| m.get(s)).and_then(Value::as_u64);
                    (s.clone(), n.unwrap_or(0))
                })
                .collect(),
        });
        for f in d
            .get("failed")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            failed.push(FailedRow {
                update: update.clone(),
                device_id: text(f.get("deviceId")),
                result_code: text(f.get("resultCode")),
                extended_result_code: text(f.get("extendedResultCode")),
                explanation: text(f.get("explanation")),
                result_details: text(f.get("resultDetails")),
                timestamp: text(f.get("timestamp")),
            });
        }
    }
    DeploymentsView {
        states: states.into_iter().collect(),
        rows,
        failed,
    }
}

/// The fields of `GET /v1/relay` the page shows.
fn relay(v: &Value) -> RelayView {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let hop = match v.get("nextHop") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| text(Some(x)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(Value::Null) | None => "none (reports are kept here)".into(),
        other => text(other),
    };
    let set_aside = v
        .get("setAside")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| SetAsideRow {
            device_id: text(r.get("deviceId")),
            report_id: text(r.get("reportId")),
            at: text(r.get("at")),
            hop: text(r.get("hop")),
            status: text(r.get("status")),
            answer: text(r.get("answer")),
        })
        .collect();
    let recent_conflicts = v
        .get("recentConflicts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| ConflictRow {
            device_id: text(r.get("deviceId")),
            report_id: text(r.get("reportId")),
            at: text(r.get("at")),
        })
        .collect();
    RelayView {
        next_hop: hop,
        depth: n("queueDepth"),
        oldest: match v.get("oldestUndeliveredSeconds").and_then(Value::as_u64) {
            Some(s) => age(s),
            None => "none waiting".into(),
        },
        last_success: text(v.get("lastSuccess")),
        last_error: text(v.get("lastError")),
        set_aside_count: n("setAsideCount"),
        set_aside,
        conflicts: n("conflicts"),
        recent_conflicts,
    }
}

/// `{"provider": "Contoso", "name": "Sensor", "version": "1.2.0"}` as "Contoso/Sensor 1.2.0".
fn update_name(v: Option<&Value>) -> String {
    match v {
        Some(Value::Object(m)) => {
            let f = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?");
            format!("{}/{} {}", f("provider"), f("name"), f("version"))
        }
        Some(Value::Null) | None => "(no update id)".into(),
        other => text(other),
    }
}

/// A JSON value as a person reads it: strings without quotes, nothing for null.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn progress(done: u64, size: Option<u64>) -> Bar {
    let size = size.filter(|s| *s > 0);
    Bar {
        value: done,
        max: size,
        text: match size {
            Some(s) => format!("{} of {} ({})", bytes(done), bytes(s), percent(done, s)),
            None => format!("{} so far", bytes(done)),
        },
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "n/a".into();
    }
    format!("{:.1} %", part as f64 * 100.0 / whole as f64)
}

/// Bytes in binary units, three significant figures: "812 B", "4.50 MiB", "19.7 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ if v < 10.0 => format!("{v:.2} {}", UNITS[unit]),
        _ if v < 100.0 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.0} {}", UNITS[unit]),
    }
}

/// A duration in seconds as "42 s", "3 min 5 s", "2 h 10 min".
fn age(s: u64) -> String {
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_read_as_a_person_says_them() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(4_718_592), "4.50 MiB");
        assert_eq!(bytes(21_152_000_000), "19.7 GiB");
        assert_eq!(age(185), "3 min 5 s");
    }

    #[test]
    fn deployments_have_one_column_per_state_and_their_failed_devices() {
        let v = json!([
            {"updateId": {"provider": "Contoso", "name": "Sensor", "version": "1.2.0"},
             "workflowId": "wf-1", "devices": 3, "states": {"DownloadStarted": 2, "Failed": 1},
             "failed": [{"deviceId": "dev-9", "resultCode": 0, "extendedResultCode": "D0190193",
                         "explanation": "HTTP 403 from the download source", "resultDetails": "",
                         "timestamp": null}]},
            {"updateId": null, "workflowId": null, "devices": 1, "states": {"Idle": 1},
             "failed": []}
        ]);
        let d = deployments(&v);
        assert_eq!(d.states, vec!["DownloadStarted", "Failed", "Idle"]);
        assert_eq!(d.rows[0].update, "Contoso/Sensor 1.2.0");
        assert_eq!(d.rows[0].states["Idle"], 0);
        assert_eq!(d.rows[0].states["DownloadStarted"], 2);
        assert_eq!(d.rows[1].states["Idle"], 1);
        assert_eq!(d.failed.len(), 1);
        assert_eq!(d.failed[0].extended_result_code, "D0190193");
        assert_eq!(d.failed[0].result_code, "0");
        assert_eq!(d.failed[0].explanation, "HTTP 403 from the download source");
    }
}
