//! Operations endpoints (SPEC 7): `/healthz`, `/readyz`, `/summary`, `/metrics` and the dashboard at `/`.
//! Reads the counters that `server`, `fetch` and `store` expose; nothing calls into this module except
//! through the [`OwnEndpoints`] hook it is wired in with.

pub mod cli;
pub mod doctor;
pub mod health;
mod metrics;
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
            "/metrics" => {
                let accept = req.headers().get(http::header::ACCEPT);
                let accept = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
                let (ct, body) = metrics::scrape(self, accept);
                text(StatusCode::OK, ct, body)
            }
            "/" => text(StatusCode::OK, "text/html; charset=utf-8", self.dashboard()),
            _ => return None,
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

    pub fn dashboard(&self) -> String {
        let u = self.store.usage();
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut o = String::new();
        let _ = write!(
            o,
            "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>cistern {id}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>\
             <h1>cistern &mdash; {id}</h1><h2>Store</h2><p>{objects} objects, {used} MiB used, {free} MiB free (min_free {minfree} MiB{cap})</p>",
            id = esc(&self.node_id),
            objects = u.objects,
            used = u.bytes >> 20,
            free = u.free >> 20,
            minfree = u.min_free >> 20,
            cap = if u.max_size > 0 { format!(", max_size {} MiB", u.max_size >> 20) } else { String::new() },
        );
        let _ = write!(o, "<h2>Transfers in flight</h2><table><tr><th>key</th><th>progress</th><th>clients</th></tr>");
        for t in self.fetcher.in_flight() {
            let progress = match t.size {
                Some(s) if s > 0 => format!(
                    "{} / {} MiB ({}%)",
                    t.bytes >> 20,
                    s >> 20,
                    t.bytes * 100 / s
                ),
                _ => format!("{} MiB", t.bytes >> 20),
            };
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{progress}</td><td>{}</td></tr>",
                esc(&t.key),
                t.clients
            );
        }
        let _ = write!(o, "</table><h2>Cached objects</h2><table><tr><th>sha256</th><th>size</th><th>hits</th><th>pinned</th><th>keys</th></tr>");
        for obj in self.store.list().into_iter().take(200) {
            let _ = write!(
                o,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                &obj.digest.hex()[..16],
                obj.size,
                obj.hits,
                if obj.pinned { "yes" } else { "" },
                esc(&obj.keys.join(" "))
            );
        }
        let parents = self.fetcher.parents_health();
        if !parents.is_empty() {
            let _ = write!(o, "</table><h2>Parents</h2><table><tr><th>parent</th><th>state</th><th>last error</th></tr>");
            for p in parents {
                let _ = write!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&p.url),
                    if p.healthy { "up" } else { "skipped" },
                    esc(p.last_error.as_deref().unwrap_or(""))
                );
            }
        }
        let _ = write!(o, "</table><h2>Deployments</h2><table><tr><th>update</th><th>workflow</th><th>devices</th><th>states</th><th>failed devices</th></tr>");
        for d in self
            .relay
            .deployments()
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let failed: Vec<String> = d["failed"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .map(|x| {
                            format!(
                                "{} {} {}",
                                x["deviceId"].as_str().unwrap_or(""),
                                x["extendedResultCode"].as_str().unwrap_or(""),
                                x["explanation"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d["updateId"].to_string()),
                esc(&d["workflowId"].to_string()),
                d["devices"],
                esc(&d["states"].to_string()),
                esc(&failed.join("; "))
            );
        }
        let _ = write!(
            o,
            "</table><h2>Status relay</h2><p>set aside (refused by the next hop): {}</p><pre>{}</pre>",
            self.relay.set_aside_count(),
            esc(&self.relay.status().to_string())
        );
        let s = self.summary();
        let _ = write!(
            o,
            "</table><h2>Traffic</h2><pre>{}</pre></body></html>",
            esc(&s.to_string())
        );
        o
    }
}
