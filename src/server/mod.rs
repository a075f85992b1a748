//! The device-facing side: listeners, the connection limit, access control, routing of the SPEC 3 forms
//! and the admin API. Calls `fetch` for objects and `store` for admin operations; cistern's own
//! read-only endpoints (health, metrics, dashboard) are handed in as [`OwnEndpoints`] by whoever wires
//! the process together, so this module does not depend on `ops`.

mod admin;
pub mod body;
mod case;
mod connect;
pub mod edge;
pub mod error;
mod guard;
pub mod intercept;
mod listener;
mod metered;
pub mod mint;
pub mod multipart;
pub mod range;
mod registry;
mod respond;
pub mod route;
mod stall;
mod status;
mod tls;
pub mod tunnel;
mod zerocopy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

pub use body::Body;
pub use error::ApiError;
use http_body_util::BodyExt as _;
pub use listener::{serve, Listeners};
pub use metered::Outcome;
use metered::{FormLabel, Metered, RequestLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
pub use registry::images::{list as stored_images, ImageEntry};
pub use tls::tls_acceptor;

use crate::config::Config;
use crate::fetch::freshness::RequestCc;
use crate::fetch::{Fetcher, Joined, Lookup, Target};
use crate::store::Store;
use respond::Ask;
use route::{FormKind, Route, Router};

/// How soon a fill must reach a range's first byte for the range to be served from it (SPEC 4).
const AHEAD: std::time::Duration = std::time::Duration::from_secs(2);

/// Endpoints served by another module (ops) under cistern's own paths.
pub trait OwnEndpoints: Send + Sync {
    /// Answers the request, or None when the path is not one of these endpoints. A future, so that
    /// an endpoint may read files (the dashboard's list of images) without blocking a runtime thread.
    fn handle<'a>(&'a self, req: &'a Request<Incoming>) -> OwnAnswer<'a>;
}

/// What [`OwnEndpoints::handle`] gives.
pub type OwnAnswer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Response<Body>>> + Send + 'a>>;

/// Counters other modules read (ops renders them).
pub struct ServerStats {
    /// Requests by form, then by what the request did (`Outcome`).
    pub requests: Mutex<HashMap<&'static str, HashMap<String, u64>>>,
    /// The same, as a metric family.
    pub requests_total: Family<RequestLabels, Counter>,
    /// Request duration and time to the first body byte, by form.
    pub duration: Family<FormLabel, Histogram, fn() -> Histogram>,
    pub ttfb: Family<FormLabel, Histogram, fn() -> Histogram>,
    /// Body bytes sent from the store.
    pub hit_bytes: AtomicU64,
    /// Body bytes sent from upstream transfers.
    pub miss_bytes: AtomicU64,
    pub connections: AtomicU64,
}

/// Seconds, from 1 ms to about 4 minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

impl Default for ServerStats {
    fn default() -> ServerStats {
        ServerStats {
            requests: Mutex::default(),
            requests_total: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            ttfb: Family::new_with_constructor(seconds_histogram),
            hit_bytes: AtomicU64::new(0),
            miss_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }
}

/// What every request handler shares.
pub struct App {
    pub cfg: Arc<Config>,
    pub fetcher: Fetcher,
    pub store: Store,
    pub relay: crate::relay::Relay,
    pub admin_token: Option<String>,
    /// `server.pull_token`: when set, `/v2/` needs it (SPEC 9).
    pub pull_token: Option<String>,
    pub own: Option<Arc<dyn OwnEndpoints>>,
    pub stats: Arc<ServerStats>,
    pub ready: AtomicBool,
    /// `server.intercept`: the CA and hosts of interception; None when off.
    pub intercept: Option<Arc<intercept::Interception>>,
}

impl App {
    /// Handles one request: access control, loop detection, routing, then the form's handler.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let span = tracing::info_span!("request", %method, client = %peer.ip());
        let (resp, form, key) =
            tracing::Instrument::instrument(self.clone().dispatch(req, peer), span.clone()).await;
        let status = resp.status().as_u16();
        let cache = resp
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let outcome = resp.extensions().get::<Outcome>().copied();
        let outcome = outcome.unwrap_or(match (form, status) {
            (None, _) => Outcome::Own,
            (Some(_), 400..) => Outcome::Error,
            (Some(_), _) => Outcome::Bypass,
        });
        let form = form.map(|f| f.as_str()).unwrap_or("own");
        if form != "own" {
            self.count_request(form, outcome);
        }
        let record = metered::Record {
            stats: self.stats.clone(),
            span,
            form,
            outcome,
            key,
            status,
            cache,
            started,
        };
        let length = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A HEAD or a 304 announces a length it never sends.
        let length = length.filter(|_| method != Method::HEAD && status != 304);
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, Metered::new(body, record, length).boxed())
    }

    fn count_request(&self, form: &'static str, outcome: Outcome) {
        let labels = RequestLabels {
            form,
            cache_status: outcome,
        };
        self.stats.requests_total.get_or_create(&labels).inc();
        let mut m = self
            .stats
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(form)
            .or_default()
            .entry(outcome.as_str().to_string())
            .or_default() += 1;
    }

    async fn dispatch(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Body>, Option<FormKind>, Option<String>) {
        let ip = guard::canonical(peer.ip());
        let allowed = &self.cfg.server.allowed_clients;
        if !allowed.is_empty() && !allowed.iter().any(|n| n.contains(&ip)) {
            let e = ApiError::new(
                StatusCode::FORBIDDEN,
                "client-not-allowed",
                format!("{ip} is not in server.allowed_clients"),
            );
            return (e.into_response(), None, None);
        }
        if let Some(e) = body_not_allowed(&req) {
            return (e.into_response(), None, None);
        }
        if via_has(req.headers(), &self.cfg.node.id) {
            let e = ApiError::new(
                StatusCode::LOOP_DETECTED,
                "loop-detected",
                format!("the request already passed through {}", self.cfg.node.id),
            );
            return (e.into_response(), None, None);
        }
        if req
            .headers()
            .contains_key(crate::fetch::upstream::CISTERN_PEER)
        {
            self.fetcher.served_peer(ip);
        }
        let arrival = req.extensions().get::<listener::Arrival>().cloned();
        if let Some(listener::Arrival::Tunnel(inside)) = &arrival {
            if let Err(e) = inside.rewrite(&mut req) {
                return (e.into_response(), None, None);
            }
        }
        // The cache-host form over TLS asks its origin over https (SPEC 3, "HTTPS payloads").
        let origin_scheme = match arrival {
            Some(listener::Arrival::Tls) => "https",
            _ => &self.cfg.upstream.origin_scheme,
        };
        let router = Router {
            origins: &self.cfg.origins,
            origin_scheme,
            strip_query: &self.cfg.upstream.strip_query,
        };
        let route = match router.route(req.method(), req.uri()) {
            Ok(r) => r,
            Err(e) => return (e.into_response(), None, None),
        };
        match route {
            Route::Connect { authority } => (
                connect::tunnel(self.clone(), req, authority, peer).await,
                None,
                None,
            ),
            Route::Own => (self.own(req, peer).await, None, None),
            Route::Registry => {
                let (r, key) = self.registry(req).await;
                (r, Some(FormKind::Registry), key)
            }
            Route::Content { digest } => {
                let t = Target {
                    key: format!("sha256/{digest}"),
                    url: self.fetcher.staged_url(&digest),
                    digest: Some(digest),
                    immutable: true,
                    no_store: false,
                    headers: std::mem::take(req.headers_mut()),
                };
                let key = t.key.clone();
                (
                    self.object(req, t, FormKind::Content).await,
                    Some(FormKind::Content),
                    Some(key),
                )
            }
            Route::Url {
                kind,
                url,
                key,
                immutable,
            } => {
                if let Err(e) = self.fetcher.check(&url) {
                    return (error::fetch_error_response(e), Some(kind), Some(key));
                }
                // A URL a staged manifest named: its digest is known, its mapping never goes stale.
                let staged = self.fetcher.staged_digest(&key);
                let t = Target {
                    key: key.clone(),
                    url: Some(url),
                    digest: staged,
                    immutable: immutable || staged.is_some(),
                    no_store: RequestCc::parse(req.headers()).no_store,
                    // Moved, not copied: from here on the request's fields are the target's.
                    headers: std::mem::take(req.headers_mut()),
                };
                (self.object(req, t, kind).await, Some(kind), Some(key))
            }
        }
    }

    /// The data plane: GET and HEAD on one of the object forms.
    async fn object(&self, req: Request<Incoming>, t: Target, kind: FormKind) -> Response<Body> {
        let m = req.method();
        let passes_methods = matches!(kind, FormKind::ForwardProxy | FormKind::Named);
        if m != Method::GET && m != Method::HEAD && passes_methods {
            return self.forward(req, t).await;
        }
        if m != Method::GET && m != Method::HEAD {
            let mut r = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                format!("{m} is not served here; use GET or HEAD"),
            )
            .into_response();
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let head = m == Method::HEAD;
        let ask = Ask::from_headers(&t.headers, head, self.cfg.server.max_ranges);
        let cc = RequestCc::parse(&t.headers);
        // A range of an object that was not stored last time (too big, no room, not cacheable) goes
        // upstream as a range instead of refetching the object from its first byte (SPEC 4).
        let unstored_range = !head && ask.ranged() && self.fetcher.recently_unstored(&t.key);
        if unstored_range {
            return self.bypass(m.clone(), &t).await;
        }
        if head {
            // A HEAD on a miss goes upstream as a HEAD and starts no download (SPEC 3).
            // A URL holds a digest only once it answered it (its key maps to it: SPEC 6).
            if !self.fetcher.holds(&t) && !cc.only_if_cached {
                return self.bypass(Method::HEAD, &t).await;
            }
        }
        match self.fetcher.get(&t, &cc).await {
            Ok(Lookup::Hit { hit, meta, how }) => respond::hit(hit, meta, how, &ask),
            Ok(Lookup::Pass) => self.bypass(m.clone(), &t).await,
            Ok(Lookup::Flight {
                flight,
                joined,
                reader,
            }) => {
                let h = match flight.head().await {
                    Ok(h) => h,
                    Err(crate::fetch::End::Failed(e)) => return error::fetch_error_response(e),
                    Err(_) => {
                        return error::fetch_error_response(crate::fetch::FetchError::Internal(
                            "transfer ended oddly".into(),
                        ))
                    }
                };
                // A collapsed client whose request the response does not suit (private, another
                // variant) makes its own request; so does an open range of an object passed through
                // whose size is unknown, and a set of ranges of an object passed through (neither
                // can be answered from the stream, which keeps no bytes behind it: SPEC 4).
                let unsuited = joined != Joined::Leader && !h.shareable_with(&t.headers);
                let open_range = !h.storing
                    && (!ask.set.is_empty()
                        || (h.size.is_none() && ask.range.is_some_and(|r| r.bounded().is_none())));
                // A range the fill will not reach in about 2 s goes upstream as a range of its own
                // (streamed, not stored) while the fill goes on (SPEC 4, "Resume").
                let far_ahead = !head
                    && h.status == StatusCode::OK
                    && ask
                        .range
                        .and_then(|r| r.first_byte(h.size))
                        .is_some_and(|at| !flight.reaches_within(at, AHEAD));
                if unsuited || open_range || far_ahead {
                    drop(reader);
                    return self.bypass(m.clone(), &t).await;
                }
                respond::flight(flight, joined, h, reader, &ask).await
            }
            Err(e) => error::fetch_error_response(e),
        }
    }

    /// Another method on the forward-proxy or named-origin form: passed through with its body (SPEC 3).
    async fn forward(&self, req: Request<Incoming>, t: Target) -> Response<Body> {
        use http_body_util::BodyExt;
        let method = req.method().clone();
        let body = req.into_body().boxed();
        let strip = &self.cfg.upstream.strip_query;
        match self.fetcher.forward(method, &t, strip, body).await {
            Ok(r) => respond::pass(r, "cistern; fwd=bypass"),
            Err(e) => error::fetch_error_response(e),
        }
    }

    /// Passes a request through uncached, its answer labelled `fwd=bypass`.
    async fn bypass(&self, method: Method, t: &Target) -> Response<Body> {
        match self.fetcher.pass_through(method, t).await {
            Ok(r) => respond::pass(r, "cistern; fwd=bypass"),
            Err(e) => error::fetch_error_response(e),
        }
    }

    async fn own(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path.starts_with("/v1/admin/") {
            let token = self.admin_token.as_deref();
            if let Err(e) = guard::authorize(token, &req, peer) {
                return guard::challenge(e.into_response());
            }
            return admin::handle(self, req).await;
        }
        if path == "/readyz" && !self.ready.load(Ordering::Relaxed) {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "the store is still being recovered",
            )
            .into_response();
        }
        let req = match status::handle(&self.relay, req).await {
            Ok(r) => return r,
            Err(req) => req,
        };
        if let Some(own) = &self.own {
            if let Some(r) = own.handle(&req).await {
                return r;
            }
        }
        ApiError::not_found(format!("nothing is served at {path}")).into_response()
    }
}

/// A GET or HEAD that carries a body (RFC 9110 §9.3.1: it has no defined meaning) is refused: its framing
/// is what a request smuggled into an upstream connection rides on, and no client cistern serves sends one.
/// `Content-Length: 0` is no body.
fn body_not_allowed(req: &Request<Incoming>) -> Option<ApiError> {
    use hyper::body::Body as _;
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD);
    let framed = req.headers().contains_key(http::header::TRANSFER_ENCODING);
    if !bodiless || (req.body().is_end_stream() && !framed) {
        return None;
    }
    Some(ApiError::bad_request(
        "body-not-allowed",
        format!("a {} request must not carry a body", req.method()),
    ))
}

/// Whether a Via header names `id` as a received-by (exact token match: `gw-1` is not `gw-10`).
fn via_has(h: &http::HeaderMap, id: &str) -> bool {
    h.get_all(http::header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|hop| hop.split_whitespace().nth(1) == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_matches_exact_tokens() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::VIA,
            "1.1 gw-10, 1.0 fred (comment)".parse().unwrap(),
        );
        assert!(!via_has(&h, "gw-1"));
        assert!(via_has(&h, "gw-10"));
        assert!(via_has(&h, "fred"));
    }
}
