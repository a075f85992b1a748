//! The connections to a parent gateway (SPEC 3): URL forms go in forward-proxy (absolute) form so that
//! the parent needs no named origins of its own; the parent's own paths (content by digest, its
//! registry API) in origin form, those under `/v2/` with this node's `server.pull_token` (SPEC 9).
//! Which parent is asked, and whether it is up, is the director's (`director`).

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::super::error::FetchError;
use super::connect::ReqBody;
use super::proxy::{Inner, ProxyConnector};
use crate::fetch::policy::host_of;
use crate::store::Digest;

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

/// The URL of a parent's own path (`/v1/content/sha256/<hex>`).
pub fn own_url(parent: &Uri, path: &str) -> Option<Uri> {
    Uri::builder()
        .scheme(parent.scheme()?.clone())
        .authority(parent.authority()?.clone())
        .path_and_query(path)
        .build()
        .ok()
}

/// What a parent at `at` is asked for: the origin URL in absolute form, or (for a digest alone) its
/// own content-addressed path; None when its URL cannot carry that path.
pub fn parent_target(
    at: &Uri,
    url: Option<&Uri>,
    digest: Option<Digest>,
) -> Result<Option<(Uri, bool)>, FetchError> {
    match (url, digest) {
        (Some(u), _) if u.scheme().is_none() => {
            let path = u.path_and_query().map_or("/", |p| p.as_str());
            Ok(own_url(at, path).map(|u| (u, true)))
        }
        (Some(u), _) => Ok(Some((u.clone(), false))),
        (None, Some(d)) => Ok(own_url(at, &format!("/v1/content/sha256/{d}")).map(|u| (u, true))),
        (None, None) => Err(FetchError::NotFound(
            "nothing to ask the parents for".into(),
        )),
    }
}

/// `server.pull_token` as this node presents it to another cistern's `/v2/` (a parent's, or a site
/// peer's): `Authorization: Bearer <token>`, so that a site sets one token for every level of its chain
/// (README). Added here, on the way out, rather than to the target's request fields: those are the
/// client's, and an answer to a request with credentials is not stored (RFC 9111 §3.5).
#[derive(Clone, Default)]
pub struct PullToken(Option<HeaderValue>);

impl PullToken {
    /// None: no token is presented.
    pub fn new(token: Option<&str>) -> Result<PullToken, String> {
        let Some(token) = token else {
            return Ok(PullToken(None));
        };
        let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "server.pull_token: not usable in an HTTP header".to_string())?;
        // Never logged.
        v.set_sensitive(true);
        Ok(PullToken(Some(v)))
    }

    /// The fields of a request for `target` on a parent or peer: with the token when it is a path of
    /// that node's own registry API (`own`: origin form), else as given.
    pub fn on<'h>(&self, target: &Uri, own: bool, headers: &'h HeaderMap) -> Cow<'h, HeaderMap> {
        match &self.0 {
            Some(v) if own && target.path().starts_with("/v2/") => {
                let mut h = headers.clone();
                h.insert(http::header::AUTHORIZATION, v.clone());
                Cow::Owned(h)
            }
            _ => Cow::Borrowed(headers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pull_token_goes_to_registry_paths_only() {
        let t = PullToken::new(Some("pt-1")).unwrap();
        let h = HeaderMap::new();
        let v2: Uri = "http://p:8080/v2/app/blobs/sha256:00".parse().unwrap();
        let content: Uri = "http://p:8080/v1/content/sha256/00".parse().unwrap();
        let auth = |h: &HeaderMap| h.get(http::header::AUTHORIZATION).cloned();
        assert_eq!(auth(&t.on(&v2, true, &h)).unwrap(), "Bearer pt-1");
        assert!(auth(&t.on(&content, true, &h)).is_none());
        let origin: Uri = "http://o.example.net/v2/x".parse().unwrap();
        assert!(
            auth(&t.on(&origin, false, &h)).is_none(),
            "never to an origin"
        );
        assert!(auth(&PullToken::default().on(&v2, true, &h)).is_none());
        assert!(PullToken::new(Some("a\nb")).is_err());
    }
}
