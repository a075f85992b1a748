//! Parent gateways (SPEC 3): a child sends every miss to its first healthy parent, URL forms in
//! forward-proxy (absolute) form so that the parent needs no named origins of its own. A parent that
//! cannot be connected to, times out or answers 503 is skipped for 30 s; 502/504 are about the object or
//! the parent's own upstream, so the next parent is tried without marking this one down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::connect::ReqBody;
use super::proxy::{Inner, ProxyConnector};
use crate::fetch::policy::host_of;
use crate::fetch::FetchError;

/// How long a parent that failed to connect, timed out or answered 503 is skipped.
pub const SKIP_FOR: Duration = Duration::from_secs(30);

/// One parent gateway and what this node knows of its health.
pub struct Parent {
    pub url: Uri,
    /// Sends absolute-form requests to the parent (URL forms).
    proxied: Client<ProxyConnector, ReqBody>,
    /// Sends origin-form requests to the parent (its own endpoints, content by digest).
    direct: Client<Inner, ReqBody>,
    health: Mutex<Health>,
}

#[derive(Default, Clone)]
struct Health {
    down_until: Option<Instant>,
    last_error: Option<String>,
    last_ok: Option<Instant>,
}

/// A parent's health as ops shows it.
#[derive(Serialize, Debug, Clone)]
pub struct ParentHealth {
    pub url: String,
    pub healthy: bool,
    pub last_error: Option<String>,
    pub seconds_since_ok: Option<u64>,
}

impl Parent {
    pub fn new(url: Uri, connector: Inner) -> Parent {
        let proxied = Client::builder(TokioExecutor::new())
            .http1_title_case_headers(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(ProxyConnector::new(connector.clone(), url.clone()));
        let direct = Client::builder(TokioExecutor::new())
            .http1_title_case_headers(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Parent {
            url,
            proxied,
            direct,
            health: Mutex::new(Health::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn healthy(&self) -> bool {
        self.health().down_until.is_none_or(|t| Instant::now() >= t)
    }

    pub fn mark_down(&self, why: String) {
        tracing::warn!(parent = %host_of(&self.url), error = %why, "parent skipped for 30 s");
        let mut h = self.health();
        h.down_until = Some(Instant::now() + SKIP_FOR);
        h.last_error = Some(why);
    }

    pub fn mark_ok(&self) {
        let mut h = self.health();
        h.down_until = None;
        h.last_ok = Some(Instant::now());
    }

    pub fn report(&self) -> ParentHealth {
        let h = self.health().clone();
        ParentHealth {
            url: self.url.to_string(),
            healthy: self.healthy(),
            last_error: h.last_error,
            seconds_since_ok: h.last_ok.map(|t| t.elapsed().as_secs()),
        }
    }

    /// The URL of this parent's own path (`/v1/content/sha256/<hex>`, `/v1/status`).
    pub fn own_url(&self, path: &str) -> Option<Uri> {
        Uri::builder()
            .scheme(self.url.scheme()?.clone())
            .authority(self.url.authority()?.clone())
            .path_and_query(path)
            .build()
            .ok()
    }

    /// Sends a request: absolute-form when `url` is an origin URL, origin-form to the parent's own paths.
    pub async fn request(
        &self,
        method: Method,
        url: Uri,
        own_path: bool,
        headers: &HeaderMap,
        body: ReqBody,
        timeout: Duration,
    ) -> Result<Response<Incoming>, FetchError> {
        let req = crate::fetch::headers::upstream_request(method, url, headers, body)
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        let fut = if own_path {
            self.direct.request(req)
        } else {
            self.proxied.request(req)
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(FetchError::Timeout(host_of(&self.url))),
            Ok(Err(e)) => {
                let mut detail = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    detail = format!("{detail}: {s}");
                    src = s.source();
                }
                Err(FetchError::Unreachable(format!(
                    "parent {}: {detail}",
                    host_of(&self.url)
                )))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }
}
