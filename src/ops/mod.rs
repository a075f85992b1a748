//! Operations endpoints (SPEC 7): `/healthz`, `/readyz`, `/summary`, `/metrics` and the dashboard at `/`.
//! Reads the counters that `server`, `fetch` and `store` expose; nothing calls into this module except
//! through the [`OwnEndpoints`] hook it is wired in with.

pub mod cli;
pub mod dashboard;
pub mod doctor;
pub mod remote;

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::fetch::Fetcher;
use crate::relay::Relay;
use crate::server::body::full;
use crate::server::{Body, OwnEndpoints, ServerStats};
use crate::store::Store;

pub struct Ops {
    pub node_id: String,
    pub store: Store,
    pub fetcher: Fetcher,
    pub server: Arc<ServerStats>,
    pub relay: Relay,
    /// The dashboard's samples of these counters over the last hours, for its plots.
    pub samples: dashboard::samples::Samples,
}

fn text(status: StatusCode, ct: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

impl OwnEndpoints for Ops {
    fn handle(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        Some(match req.uri().path() {
            "/healthz" => text(
                StatusCode::OK,
                "application/json",
                "{\"status\":\"ok\"}".into(),
            ),
            "/readyz" => text(
                StatusCode::OK,
                "application/json",
                "{\"status\":\"ready\"}".into(),
            ),
            "/summary" => text(
                StatusCode::OK,
                "application/json",
                self.summary().to_string(),
            ),
            "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            path => return dashboard::handle(self, path),
        })
    }
}

impl Ops {
    /// The Connected Cache style summary; `eggressBytes` is the spelling its own tools read.
    pub fn summary(&self) -> serde_json::Value {
        let hit = self.server.hit_bytes.load(Ordering::Relaxed);
        let miss = self.server.miss_bytes.load(Ordering::Relaxed);
        let egress = hit + miss;
        let ratio = if egress == 0 {
            0.0
        } else {
            hit as f64 / egress as f64
        };
        serde_json::json!({
            "hitBytes": hit, "missBytes": miss, "egressBytes": egress, "eggressBytes": egress,
            "hitRatioBytes": ratio,
        })
    }

    pub fn metrics(&self) -> String {
        let mut o = String::new();
        let f = self.fetcher.stats();
        let r = self.relay.stats();
        let u = self.store.usage();
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(o, "# TYPE cistern_requests_total counter");
        let reqs = self
            .server
            .requests
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut reqs: Vec<_> = reqs
            .into_iter()
            .flat_map(|(form, per)| per.into_iter().map(move |(cache, n)| ((form, cache), n)))
            .collect();
        reqs.sort();
        for ((form, cache), n) in reqs {
            let cache = cache.replace('"', "'");
            let _ = writeln!(
                o,
                "cistern_requests_total{{form=\"{form}\",cache_status=\"{cache}\"}} {n}"
            );
        }
        let counters = [
            (
                "cistern_hit_bytes_total",
                "Body bytes served from the store.",
                ld(&self.server.hit_bytes),
            ),
            (
                "cistern_miss_bytes_total",
                "Body bytes served from upstream transfers.",
                ld(&self.server.miss_bytes),
            ),
            (
                "cistern_upstream_bytes_total",
                "Bytes fetched from upstream.",
                ld(&f.bytes_fetched),
            ),
            (
                "cistern_upstream_fetches_total",
                "Upstream transfers started.",
                ld(&f.transfers),
            ),
            (
                "cistern_collapsed_total",
                "Clients that joined a transfer in flight.",
                ld(&f.collapsed),
            ),
            (
                "cistern_digest_mismatches_total",
                "Payloads that failed verification.",
                ld(&f.digest_mismatches),
            ),
            (
                "cistern_resumes_total",
                "Broken transfers resumed or restarted.",
                ld(&f.resumes),
            ),
            (
                "cistern_revalidations_total",
                "Conditional requests for stale objects.",
                ld(&f.revalidations),
            ),
            (
                "cistern_stale_served_total",
                "Stale copies served because upstream failed.",
                ld(&f.stale_served),
            ),
            (
                "cistern_evictions_total",
                "Objects evicted for room.",
                ld(&self.store.stats().evictions),
            ),
            (
                "cistern_connections_total",
                "Client connections accepted.",
                ld(&self.server.connections),
            ),
            (
                "cistern_status_accepted_total",
                "Status reports accepted.",
                ld(&r.accepted),
            ),
            (
                "cistern_status_duplicates_total",
                "Status reports dropped as already accepted.",
                ld(&r.duplicates),
            ),
            (
                "cistern_status_forwarded_total",
                "Status reports delivered to the next hop.",
                ld(&r.forwarded),
            ),
            (
                "cistern_status_relay_errors_total",
                "Failed forwarding attempts.",
                ld(&r.errors),
            ),
        ];
        let gauges = [
            ("cistern_store_bytes", "Bytes of stored objects.", u.bytes),
            ("cistern_store_objects", "Stored objects.", u.objects),
            (
                "cistern_store_free_bytes",
                "Free bytes on the store's filesystem.",
                u.free,
            ),
            (
                "cistern_transfers_in_flight",
                "Upstream transfers in progress.",
                self.fetcher.in_flight().len() as u64,
            ),
            (
                "cistern_status_queue_depth",
                "Status reports not yet delivered.",
                self.relay.queue_depth(),
            ),
            (
                "cistern_status_oldest_undelivered_seconds",
                "Age of the oldest undelivered status report.",
                self.relay.oldest_age_secs().unwrap_or(0),
            ),
            (
                "cistern_status_set_aside",
                "Status reports the next hop refused for good, set aside.",
                self.relay.set_aside_count(),
            ),
        ];
        for (kind, list) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
            for (name, help, v) in list {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        let _ = writeln!(o, "# TYPE cistern_upstream_errors_total counter");
        for (kind, v) in [
            ("unreachable", ld(&f.errors_unreachable)),
            ("timeout", ld(&f.errors_timeout)),
            ("status", ld(&f.errors_status)),
            ("broken", ld(&f.errors_broken)),
        ] {
            let _ = writeln!(o, "cistern_upstream_errors_total{{kind=\"{kind}\"}} {v}");
        }
        let _ = writeln!(o, "# TYPE cistern_parent_up gauge");
        for p in self.fetcher.parents_health() {
            let _ = writeln!(
                o,
                "cistern_parent_up{{parent=\"{}\"}} {}",
                p.url,
                u8::from(p.healthy)
            );
        }
        o
    }
}
