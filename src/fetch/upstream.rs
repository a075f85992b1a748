//! The upstream HTTP client: connection reuse per upstream, rustls with the system roots plus
//! `upstream.ca_file`, connect timeout, the address check after DNS (the resolver hands the connector only
//! the addresses it checked, so cistern connects to exactly what it checked), and redirects followed here
//! with every target checked again (SPEC 2).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::policy::OriginPolicy;
use super::FetchError;

const MAX_REDIRECTS: usize = 5;

/// Raised by the resolver when DNS gave only refused addresses; found again in the client's error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to addresses cistern may not connect to")]
struct AddrRefused(String);

/// A DNS resolver that drops every address the policy refuses.
#[derive(Clone)]
struct CheckedResolver {
    policy: Arc<OriginPolicy>,
}

impl tower_service::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| policy.addr_allowed(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(AddrRefused(host)) as Self::Error);
            }
            Ok(allowed.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>;

/// Client settings from `[upstream]`.
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub ca_file: String,
}

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, Empty<Bytes>>,
    policy: Arc<OriginPolicy>,
    /// Bound on the wait for response headers (connect + first byte).
    head_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(cfg: &ClientConfig, policy: Arc<OriginPolicy>) -> Result<UpstreamClient, String> {
        let mut http = HttpConnector::new_with_resolver(CheckedResolver {
            policy: policy.clone(),
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let tls = tls_config(&cfg.ca_file)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(https);
        Ok(UpstreamClient {
            client,
            policy,
            head_timeout: cfg.connect_timeout + cfg.idle_timeout,
        })
    }

    pub fn policy(&self) -> &OriginPolicy {
        &self.policy
    }

    /// Checks a URL against the host patterns and, for an address literal, the address rules.
    pub fn check(&self, url: &Uri) -> Result<(), FetchError> {
        let host = url.host().unwrap_or_default();
        let port = port_of(url);
        if !self.policy.host_allowed(host, port) {
            return Err(FetchError::NotAllowed(format!("{host}:{port}")));
        }
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            if !self.policy.addr_allowed(ip) {
                return Err(FetchError::AddressRefused(host.to_string()));
            }
        }
        Ok(())
    }

    /// Sends a request, following redirects (each target checked); returns the final URL and response.
    pub async fn send(
        &self,
        method: Method,
        url: Uri,
        headers: &HeaderMap,
    ) -> Result<(Uri, Response<Incoming>), FetchError> {
        let mut url = url;
        self.check(&url)?;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder().method(method.clone()).uri(url.clone());
            if let Some(h) = req.headers_mut() {
                h.extend(headers.clone());
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| FetchError::Internal(e.to_string()))?;
            let resp = match tokio::time::timeout(self.head_timeout, self.client.request(req)).await
            {
                Err(_) => return Err(FetchError::Timeout(host_of(&url))),
                Ok(Err(e)) => return Err(classify(&url, &e)),
                Ok(Ok(r)) => r,
            };
            if !is_redirect(resp.status()) {
                return Ok((url, resp));
            }
            let Some(next) = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
            else {
                return Ok((url, resp));
            };
            let next = resolve_location(&url, next).ok_or_else(|| {
                FetchError::RedirectNotAllowed(format!(
                    "unusable redirect target from {}",
                    host_of(&url)
                ))
            })?;
            if let Err(e) = self.check(&next) {
                return Err(FetchError::RedirectNotAllowed(e.to_string()));
            }
            tracing::debug!(from = %host_of(&url), to = %host_of(&next), "following redirect");
            url = next;
        }
        Err(FetchError::RedirectNotAllowed(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

pub fn port_of(u: &Uri) -> u16 {
    u.port_u16().unwrap_or(if u.scheme_str() == Some("https") {
        443
    } else {
        80
    })
}

/// The host (and port) of a URL, for logs and errors: never the query, which may hold a SAS `sig`.
pub fn host_of(u: &Uri) -> String {
    u.authority().map(|a| a.to_string()).unwrap_or_default()
}

/// A redirect target: an absolute URL, or a path on the same origin. Built from parsed parts.
fn resolve_location(base: &Uri, loc: &str) -> Option<Uri> {
    if let Ok(u) = loc.parse::<Uri>() {
        if u.scheme().is_some() {
            return matches!(u.scheme_str(), Some("http" | "https"))
                .then_some(u)
                .filter(|u| u.host().is_some());
        }
    }
    if loc.starts_with("//") {
        return format!("{}:{loc}", base.scheme_str()?).parse().ok();
    }
    let path = if loc.starts_with('/') {
        loc.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{loc}")
    };
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(path)
        .build()
        .ok()
}

fn classify(url: &Uri, e: &hyper_util::client::legacy::Error) -> FetchError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<AddrRefused>() {
            return FetchError::AddressRefused(r.0.clone());
        }
        src = s.source();
    }
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail = format!("{detail}: {s}");
        src = s.source();
    }
    FetchError::Unreachable(format!("{}: {detail}", host_of(url)))
}

fn tls_config(ca_file: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if !ca_file.is_empty() {
        let pem = std::fs::read(ca_file).map_err(|e| format!("upstream.ca_file {ca_file}: {e}"))?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| format!("upstream.ca_file {ca_file}: {e}"))?;
            roots
                .add(c)
                .map_err(|e| format!("upstream.ca_file {ca_file}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets() {
        let base: Uri = "http://a.example/x/y/file?sig=1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "http://b.example/z")
                .unwrap()
                .to_string(),
            "http://b.example/z"
        );
        assert_eq!(
            resolve_location(&base, "/abs?q=1").unwrap().to_string(),
            "http://a.example/abs?q=1"
        );
        assert_eq!(
            resolve_location(&base, "rel").unwrap().to_string(),
            "http://a.example/x/y/rel"
        );
        assert_eq!(
            resolve_location(&base, "//c.example/p")
                .unwrap()
                .to_string(),
            "http://c.example/p"
        );
        assert!(resolve_location(&base, "ftp://x/y").is_none());
    }
}
