//! The connections to a parent gateway (SPEC 3): URL forms go in forward-proxy (absolute) form so that
//! the parent needs no named origins of its own; the parent's own paths (content by digest) in origin
//! form. Which parent is asked, and whether it is up, is the director's (`director`).

use std::time::Duration;

use http::{HeaderMap, Method, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::super::error::FetchError;
use super::connect::ReqBody;
use super::proxy::{Inner, ProxyConnector};
use crate::fetch::policy::host_of;

/// The connections to one parent gateway (its health is the director's).
pub struct Parent {
    pub url: Uri,
    /// Sends absolute-form requests to the parent (URL forms).
    proxied: Client<ProxyConnector, ReqBody>,
    /// Sends origin-form requests to the parent (its own endpoints, content by digest).
    direct: Client<Inner, ReqBody>,
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
        }
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
