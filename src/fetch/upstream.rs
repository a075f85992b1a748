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
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::parents::{Parent, ParentHealth};
use super::policy::OriginPolicy;
pub use super::policy::{host_of, port_of};
use super::proxy::ProxyClients;
use super::FetchError;
use crate::store::Digest;

const MAX_REDIRECTS: usize = 5;

/// The body of an upstream request: empty for cistern's own requests, a client's streamed body for
/// the other methods it passes through.
pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

pub fn empty_body() -> ReqBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

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
    /// Parent gateways, in order of preference.
    pub parents: Vec<String>,
    /// With parents: may this node go to the origin when every parent fails?
    pub allow_direct: bool,
    /// `upstream.proxy`, or empty.
    pub proxy: String,
    /// Client certificate and key (PEM) for mTLS to parents.
    pub client_cert: String,
    pub client_key: String,
}

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, ReqBody>,
    policy: Arc<OriginPolicy>,
    /// Bound on the wait for response headers (connect + first byte).
    head_timeout: Duration,
    parents: Vec<Arc<Parent>>,
    allow_direct: bool,
    /// Set with `upstream.proxy`: origin traffic goes through the site's proxy.
    proxy: Option<ProxyClients>,
}

impl UpstreamClient {
    pub fn new(cfg: &ClientConfig, policy: Arc<OriginPolicy>) -> Result<UpstreamClient, String> {
        let mut http = HttpConnector::new_with_resolver(CheckedResolver {
            policy: policy.clone(),
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let tls = tls_config(&cfg.ca_file, &cfg.client_cert, &cfg.client_key)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // Title case upstream (here, to parents and through proxies) is enough: field names are
        // case-insensitive (RFC 9110 §5.1) and servers look them up so; only devices need SPEC 3's
        // canonical case, which the server side gives (server::case).
        let client = Client::builder(TokioExecutor::new())
            .http1_title_case_headers(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(https);
        let mut parents = Vec::new();
        for p in &cfg.parents {
            let url: Uri = p
                .parse()
                .map_err(|_| format!("upstream.parents: `{p}` is not a URL"))?;
            // The parent was named by the operator: its address needs no allowlist check.
            let mut plain = HttpConnector::new();
            plain.enforce_http(false);
            plain.set_connect_timeout(Some(cfg.connect_timeout));
            plain.set_nodelay(true);
            let conn = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(plain);
            parents.push(Arc::new(Parent::new(url, conn)));
        }
        Ok(UpstreamClient {
            client,
            policy,
            head_timeout: cfg.connect_timeout + cfg.idle_timeout,
            parents,
            allow_direct: cfg.allow_direct,
            proxy: match cfg.proxy.as_str() {
                "" => None,
                p => {
                    let uri: Uri = p
                        .parse()
                        .map_err(|_| format!("upstream.proxy: `{p}` is not a URL"))?;
                    Some(ProxyClients::new(uri, tls, cfg.connect_timeout))
                }
            },
        })
    }

    pub fn policy(&self) -> &OriginPolicy {
        &self.policy
    }

    pub fn parents_health(&self) -> Vec<ParentHealth> {
        self.parents.iter().map(|p| p.report()).collect()
    }

    pub fn has_parents(&self) -> bool {
        !self.parents.is_empty()
    }

    /// Sends a request for an object along the chain (SPEC 3): to the first healthy parent (an origin URL
    /// in forward-proxy form; a digest as `/v1/content/sha256/<hex>`), the next one on a connection error,
    /// a timeout, 502, 503 or 504, and to the origin itself only without parents or with `allow_direct`.
    pub async fn fetch(
        &self,
        method: Method,
        url: Option<&Uri>,
        digest: Option<Digest>,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, FetchError> {
        if self.parents.is_empty() {
            let Some(u) = url else {
                return Err(FetchError::NotFound(
                    "the object is not stored and no upstream knows it".into(),
                ));
            };
            return self.send(method, u.clone(), headers).await.map(|(_, r)| r);
        }
        if let Some(u) = url {
            // Never an open proxy, not even towards a parent.
            self.host_check(u)?;
        }
        let mut order: Vec<&Arc<Parent>> = self.parents.iter().filter(|p| p.healthy()).collect();
        if order.is_empty() {
            // Every parent is being skipped: try them anyway rather than fail without asking.
            order = self.parents.iter().collect();
        }
        let mut last = FetchError::Unreachable("no parent answered".into());
        let n = order.len();
        for (i, p) in order.into_iter().enumerate() {
            let (target, own) = match (url, digest) {
                (Some(u), _) => (u.clone(), false),
                (None, Some(d)) => match p.own_url(&format!("/v1/content/sha256/{d}")) {
                    Some(u) => (u, true),
                    None => continue,
                },
                (None, None) => {
                    return Err(FetchError::NotFound(
                        "nothing to ask the parents for".into(),
                    ))
                }
            };
            match p
                .request(
                    method.clone(),
                    target,
                    own,
                    headers,
                    empty_body(),
                    self.head_timeout,
                )
                .await
            {
                Ok(r) if matches!(r.status().as_u16(), 502..=504) => {
                    if r.status().as_u16() == 503 {
                        p.mark_down(format!("answered {}", r.status()));
                    }
                    let last_chance = i + 1 == n && !(self.allow_direct && url.is_some());
                    if last_chance {
                        return Ok(r);
                    }
                    last = FetchError::Unreachable(format!(
                        "parent {} answered {}",
                        host_of(&p.url),
                        r.status()
                    ));
                }
                Ok(r) => {
                    p.mark_ok();
                    return Ok(r);
                }
                Err(
                    e @ (FetchError::Unreachable(_)
                    | FetchError::Timeout(_)
                    | FetchError::BadResponse(_)),
                ) => {
                    p.mark_down(e.to_string());
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        if let (true, Some(u)) = (self.allow_direct, url) {
            tracing::warn!(
                "every parent failed; going to the origin directly (upstream.allow_direct)"
            );
            return self.send(method, u.clone(), headers).await.map(|(_, r)| r);
        }
        Err(last)
    }

    /// The host-pattern check alone (towards a parent, which resolves and connects itself).
    fn host_check(&self, url: &Uri) -> Result<(), FetchError> {
        let (host, port) = (url.host().unwrap_or_default(), port_of(url));
        if !self.policy.host_allowed(host, port) {
            return Err(FetchError::NotAllowed(format!("{host}:{port}")));
        }
        Ok(())
    }

    /// Checks a URL against the host patterns and, for an address literal, the address rules.
    pub fn check(&self, url: &Uri) -> Result<(), FetchError> {
        let host = url.host().unwrap_or_default();
        let port = port_of(url);
        if !self.policy.host_allowed(host, port) {
            return Err(FetchError::NotAllowed(format!("{host}:{port}")));
        }
        // Through a proxy, the proxy resolves and connects: the address check is its own (SPEC 2).
        if let (None, Ok(ip)) = (&self.proxy, host.trim_matches(['[', ']']).parse::<IpAddr>()) {
            if !self.policy.literal_allowed(ip, port) {
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
        let mut headers = std::borrow::Cow::Borrowed(headers);
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .send_once(method.clone(), &url, &headers, empty_body())
                .await?;
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
            if origin_of(&next) != origin_of(&url) {
                // Credentials are for the origin they were given to, never for where it points.
                for name in &CREDENTIALS {
                    if headers.contains_key(name) {
                        headers.to_mut().remove(name);
                    }
                }
            }
            url = next;
        }
        Err(FetchError::RedirectNotAllowed(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// One request, no redirect followed.
    async fn send_once(
        &self,
        method: Method,
        url: &Uri,
        headers: &HeaderMap,
        body: ReqBody,
    ) -> Result<Response<Incoming>, FetchError> {
        let req = super::headers::upstream_request(method, url.clone(), headers, body)
            .map_err(|e| FetchError::Internal(e.to_string()))?;
        let fut = match &self.proxy {
            None => self.client.request(req),
            Some(p) if url.scheme_str() == Some("https") => p.https.request(req),
            Some(p) => p.http.request(req),
        };
        match tokio::time::timeout(self.head_timeout, fut).await {
            Err(_) => Err(FetchError::Timeout(host_of(url))),
            Ok(Err(e)) => Err(classify(url, &e)),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Passes a request of another method (with its body) to the first healthy parent, or to the
    /// origin: once, since a streamed body cannot be sent again; redirects go back to the client.
    pub async fn forward(
        &self,
        method: Method,
        url: &Uri,
        headers: &HeaderMap,
        body: ReqBody,
    ) -> Result<Response<Incoming>, FetchError> {
        self.host_check(url)?;
        let parent = self
            .parents
            .iter()
            .find(|p| p.healthy())
            .or(self.parents.first());
        match parent {
            Some(p) => {
                p.request(method, url.clone(), false, headers, body, self.head_timeout)
                    .await
            }
            None => {
                self.check(url)?;
                self.send_once(method, url, headers, body).await
            }
        }
    }
}

/// Request fields that carry credentials: dropped when a redirect leaves the origin (as browsers and
/// curl do).
const CREDENTIALS: [http::header::HeaderName; 2] =
    [http::header::AUTHORIZATION, http::header::COOKIE];

/// Scheme, host and port: what RFC 6454 calls the origin.
fn origin_of(u: &Uri) -> (Option<&str>, Option<&str>, Option<u16>) {
    let port = u.port_u16().or(match u.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    (u.scheme_str(), u.host(), port)
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// A redirect target: an absolute URL, or a path on the same origin. Built from parsed parts.
pub fn resolve_location(base: &Uri, loc: &str) -> Option<Uri> {
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
    let mut unreadable = false;
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<AddrRefused>() {
            return FetchError::AddressRefused(r.0.clone());
        }
        // A head too large, a bad status line, bad fields: the upstream answered, but not in HTTP.
        unreadable |= s
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_parse());
        src = s.source();
    }
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail = format!("{detail}: {s}");
        src = s.source();
    }
    let detail = format!("{}: {detail}", host_of(url));
    match unreadable {
        true => FetchError::BadResponse(detail),
        false => FetchError::Unreachable(detail),
    }
}

pub fn tls_config(
    ca_file: &str,
    client_cert: &str,
    client_key: &str,
) -> Result<rustls::ClientConfig, String> {
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
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    if client_cert.is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let pem = std::fs::read(client_cert)
        .map_err(|e| format!("upstream.client_cert {client_cert}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("upstream.client_cert {client_cert}: {e}"))?;
    let pem =
        std::fs::read(client_key).map_err(|e| format!("upstream.client_key {client_key}: {e}"))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("upstream.client_key {client_key}: {e}"))?
        .ok_or_else(|| format!("upstream.client_key {client_key}: no private key in the file"))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("upstream.client_cert: {e}"))
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
