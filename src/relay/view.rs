//! Reading the subtree back (SPEC 5): latest report per device, a device's history, deployments with
//! their failed devices and what their codes mean, and the relay's own state.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::report::{explain, hex_code, FAILED};
use super::Relay;

/// Set-aside reports `/v1/relay` lists at most (`setAsideCount` counts them all).
const SET_ASIDE_SHOWN: usize = 100;

fn parse(raw: Vec<Vec<u8>>) -> Vec<Value> {
    raw.iter()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .collect()
}

impl Relay {
    /// The latest report of every device: the last history entry of each.
    fn latest(&self) -> Vec<Value> {
        match self.db().latest() {
            Ok(v) => parse(v),
            Err(e) => {
                tracing::error!(error = %e, "status relay: cannot read the history");
                Vec::new()
            }
        }
    }

    /// `GET /v1/devices`: the latest report of every device in this node's subtree.
    pub fn devices(&self) -> Value {
        Value::Array(self.latest())
    }

    /// `GET /v1/devices/<id>`: that device's history, oldest first; None for an unknown device.
    pub fn device(&self, id: &str) -> Option<Value> {
        let h = match self.db().history(id) {
            Ok(v) => parse(v),
            Err(e) => {
                tracing::error!(error = %e, "status relay: cannot read the history");
                Vec::new()
            }
        };
        (!h.is_empty()).then_some(Value::Array(h))
    }

    /// `GET /v1/deployments`: per update and workflow, devices per state and the failed devices.
    pub fn deployments(&self) -> Value {
        #[derive(Default)]
        struct Dep {
            update: Value,
            workflow: Value,
            states: BTreeMap<String, u64>,
            failed: Vec<Value>,
        }
        let mut deps: BTreeMap<(String, String), Dep> = BTreeMap::new();
        for r in self.latest() {
            let update = r.get("updateId").cloned().unwrap_or(Value::Null);
            let workflow = r.get("workflowId").cloned().unwrap_or(Value::Null);
            let d = deps
                .entry((update.to_string(), workflow.to_string()))
                .or_default();
            d.update = update;
            d.workflow = workflow;
            let state = r
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("None")
                .to_string();
            *d.states.entry(state.clone()).or_default() += 1;
            if state == FAILED {
                let code = r.get("extendedResultCode").and_then(Value::as_i64);
                d.failed.push(json!({
                    "deviceId": r.get("deviceId"),
                    "resultCode": r.get("resultCode"),
                    "extendedResultCode": code.map(hex_code),
                    "resultDetails": r.get("resultDetails"),
                    "explanation": code.and_then(explain),
                    "timestamp": r.get("timestamp"),
                }));
            }
        }
        Value::Array(
            deps.into_values()
                .map(|d| {
                    let devices: u64 = d.states.values().sum();
                    json!({"updateId": d.update, "workflowId": d.workflow, "devices": devices,
                           "states": d.states, "failed": d.failed})
                })
                .collect(),
        )
    }

    /// The oldest set-aside reports (`SET_ASIDE_SHOWN` at most), each with the refusal that set it
    /// aside: deviceId, reportId, at, hop, status, answer.
    pub fn set_aside(&self) -> Vec<Value> {
        match self.db().set_aside(SET_ASIDE_SHOWN) {
            Ok(v) => parse(v),
            Err(e) => {
                tracing::error!(error = %e, "status relay: cannot read the set-aside reports");
                Vec::new()
            }
        }
    }

    /// The newest reports accepted as conflicts (`db::CONFLICTS_KEPT` at most), newest first:
    /// deviceId, reportId, at.
    pub fn recent_conflicts(&self) -> Vec<Value> {
        match self.db().conflicts() {
            Ok(v) => parse(v),
            Err(e) => {
                tracing::error!(error = %e, "status relay: cannot read the conflicts");
                Vec::new()
            }
        }
    }

    /// How many reports are set aside.
    pub fn set_aside_count(&self) -> u64 {
        self.mem().aside_len
    }

    /// `GET /v1/relay`: queue depth, oldest undelivered age, last success and last error, the
    /// set-aside reports, the conflicts (how many since the store was created, and the newest), and
    /// what the store holds against its bound.
    pub fn status(&self) -> Value {
        let s = &self.inner.stats;
        let last_ok = s.last_success_ms.load(Ordering::Relaxed);
        let hop = match &self.inner.next_hop {
            None => Value::Null,
            Some(super::NextHop::Url { url, .. }) => Value::String(url.to_string()),
            Some(super::NextHop::Parents(d)) => Value::Array(
                d.parent_urls()
                    .iter()
                    .map(|u| Value::String(u.to_string()))
                    .collect(),
            ),
        };
        let (queue_bytes, store_bytes, devices, entries) = {
            let m = self.mem();
            let h = &m.history;
            (m.queue_bytes, m.store_bytes(), h.devices(), h.entries())
        };
        json!({
            "nextHop": hop,
            "queueDepth": self.queue_depth(),
            "queueBytes": queue_bytes,
            "setAsideCount": self.set_aside_count(),
            "setAside": self.set_aside(),
            "storeBytes": store_bytes,
            "maxStore": self.cfg().max_store,
            "historyDevices": devices,
            "historyReports": entries,
            "oldestUndeliveredSeconds": self.oldest_age_secs(),
            "lastSuccess": (last_ok > 0).then(|| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(last_ok)).to_string()),
            "lastError": s.last_error.lock().map(|e| e.clone()).unwrap_or(None),
            "accepted": s.accepted.load(Ordering::Relaxed),
            "duplicates": s.duplicates.load(Ordering::Relaxed),
            "forwarded": s.forwarded.load(Ordering::Relaxed),
            "errors": s.errors.load(Ordering::Relaxed),
            "setAsideTotal": s.set_aside.load(Ordering::Relaxed),
            "conflicts": self.conflicts_total(),
            "recentConflicts": self.recent_conflicts(),
        })
    }
}
