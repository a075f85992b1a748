//! Operations endpoints (SPEC 7): `/healthz`, `/readyz`, `/summary`, `/metrics`, `/v1/peers` (SPEC 10)
//! and the dashboard at `/`.
//! Reads the counters that `server`, `fetch` and `store` expose; nothing calls into this module except
//! through the [`OwnEndpoints`] hook it is wired in with.

pub mod ca;
pub mod dashboard;
pub mod doctor;
pub mod health;
mod metrics;
mod peers;
pub mod remote;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::fetch::Fetcher;
use crate::relay::Relay;
use crate::server::body::full;
use crate::server::{Body, OwnAnswer, OwnEndpoints, ServerStats};
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
    fn handle<'a>(&'a self, req: &'a Request<Incoming>) -> OwnAnswer<'a> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Box::pin(std::future::ready(None));
        }
        let answer = match req.uri().path() {
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
            "/v1/uplink" => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&self.fetcher.uplink().status()).unwrap_or_default(),
            ),
            "/v1/peers" => text(
                StatusCode::OK,
                "application/json",
                peers::json(self).to_string(),
            ),
            "/metrics" => {
                let accept = req.headers().get(http::header::ACCEPT);
                let accept = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
                let (ct, body) = metrics::scrape(self, accept);
                text(StatusCode::OK, ct, body)
            }
            // The dashboard reads the stored manifests (its table of images): a future of its own.
            path => return Box::pin(dashboard::handle(self, path)),
        };
        Box::pin(std::future::ready(Some(answer)))
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
}
