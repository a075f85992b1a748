//! The upstream HTTP client: connection reuse per upstream, rustls with the system roots plus
//! `upstream.ca_file`, connect timeout, the address check after DNS (the resolver hands the connector only
//! the addresses it checked, so cistern connects to exactly what it checked), and redirects followed here
//! with every target checked again (SPEC 2).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::uplink::{Metered, Uplink};
use http::{HeaderMap, Method, Response, Uri};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use self::parent::{parent_target, Parent, PullToken};
use self::proxy::ProxyClients;
use self::redirect::{is_redirect, origin_of, CREDENTIALS};
use super::error::FetchError;
use super::policy::OriginPolicy;
pub use super::policy::{host_of, port_of};
use crate::store::Digest;
pub use connect::{empty_body, ReqBody};
pub use director::{Ask, Director, Hop, Outcome, ParentHealth};
pub use peer::{PeerAnswer, CISTERN_PEER};
pub use redirect::{on_origin_of, resolve_location};

pub mod connect;
pub mod director;
pub mod dns;
mod health;
mod parent;
mod peer;
pub mod peers;
mod proxy;
mod redirect;
pub mod registry;
pub mod rendezvous;

const MAX_REDIRECTS: usize = 5;

/// Raised by the resolver when DNS gave only refused addresses; found again in the client's error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to addresses cistern may not connect to")]
struct AddrRefused(String);

/// A DNS resolver that drops every address the policy refuses.
#[derive(Clone)]
struct CheckedResolver {
    policy: Arc<OriginPolicy>,
    /// Names resolved by the embedding program (`upstream.connect_to`): taken as checked.
    connect_to: Arc<Vec<(String, SocketAddr)>>,
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
        let given: Vec<SocketAddr> = self
            .connect_to
            .iter()
            .filter(|(h, _)| h.eq_ignore_ascii_case(name.as_str()))
            .map(|(_, a)| *a)
            .collect();
        Box::pin(async move {
            if !given.is_empty() {
                return Ok(given.into_iter());
            }
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

type Connector = connect::Https<CheckedResolver>;

/// Client settings from `[upstream]` (the parents and `allow_direct` are the director's).
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// `upstream.proxy`, or empty.
    pub proxy: String,
    /// Client certificate and key (PEM) for mTLS to parents.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// `upstream.connect_to`: names the embedding program resolves itself.
    pub connect_to: Vec<(String, SocketAddr)>,
    /// The kernel receive buffer of upstream sockets; None: autotuned. Set when the uplink is capped,
    /// so that what a held-back transfer leaves unread stops the sender soon (SPEC 4).
    pub recv_buffer: Option<usize>,
    /// The address connections to the site's peers leave from (this node's listen address, when it
    /// names one), so that a peer tells who asked it.
    pub peer_source: Option<IpAddr>,
}

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, ReqBody>,
    policy: Arc<OriginPolicy>,
    /// Bound on the wait for response headers (connect + first byte).
    head_timeout: Duration,
    /// Which hop to ask, and their health (shared with the relay).
    director: Arc<Director>,
    /// The connections to each of the director's parents, by URL.
    parents: Arc<HashMap<Uri, Arc<Parent>>>,
    /// The connections to the site's peers, by URL, made as members appear.
    peer_links: Arc<peer::Links>,
    /// What a peer's connections are made with (TLS, connect timeout, source address).
    peer_connector: proxy::Inner,
    /// Set with `upstream.proxy`: origin traffic goes through the site's proxy.
    proxy: Option<ProxyClients>,
    /// The container registries' credentials and tokens (SPEC 9); empty without `[[registries]]`.
    registries: Arc<registry::RegistryAuth>,
    /// The node's uplink budget: every response body read from upstream is metered by it.
    uplink: Arc<Uplink>,
    /// `server.pull_token`, presented to the `/v2/` of the parents and peers (SPEC 9).
    pull_token: PullToken,
}

/// What came of asking one parent.
enum Attempt {
    /// An answer to pass on.
    Answer(Response<Metered>),
    /// 502, 503 or 504: the next hop is tried; passed on when this was the last.
    Retry(Response<Metered>),
    /// No answer: the next hop is tried.
    Failed(FetchError),
}

impl UpstreamClient {
    pub fn new(
        cfg: &ClientConfig,
        policy: Arc<OriginPolicy>,
        director: Arc<Director>,
    ) -> Result<UpstreamClient, String> {
        let resolver = CheckedResolver {
            policy: policy.clone(),
            connect_to: Arc::new(cfg.connect_to.clone()),
        };
        let tls = connect::tls_config(connect::Trust {
            ca_file: cfg.ca_file.as_deref(),
            client_cert: cfg.client_cert.as_deref(),
            client_key: cfg.client_key.as_deref(),
        })?;
        let timeout = Some(cfg.connect_timeout);
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.set_recv_buffer_size(cfg.recv_buffer);
        let https = connect::connector_with(http, tls.clone(), timeout, true);
        // Title case upstream (here, to parents and through proxies) is enough: field names are
        // case-insensitive (RFC 9110 §5.1) and servers look them up so; only devices need SPEC 3's
        // canonical case, which the server side gives (server::case).
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .http1_title_case_headers(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32);
        if let Some(n) = cfg.recv_buffer {
            // Capped: hyper's own read-ahead kept as small as the kernel's.
            builder.http1_max_buf_size(n.max(8192));
        }
        let client = builder.build(https);
        // A parent was named by the operator: its address needs no allowlist check.
        let parents = director
            .parent_urls()
            .into_iter()
            .map(|u| {
                (
                    u.clone(),
                    Arc::new(Parent::new(
                        u,
                        connect::connector_bounded(tls.clone(), timeout, cfg.recv_buffer),
                    )),
                )
            })
            .collect();
        let mut from = HttpConnector::new();
        from.set_local_address(cfg.peer_source);
        let peer_connector = connect::connector_with(from, tls.clone(), timeout, false);
        let proxy = match cfg.proxy.as_str() {
            "" => None,
            p => {
                let uri: Uri = p
                    .parse()
                    .map_err(|_| format!("upstream.proxy: `{p}` is not a URL"))?;
                Some(ProxyClients::new(uri, tls, cfg.connect_timeout))
            }
        };
        Ok(UpstreamClient {
            client,
            policy,
            head_timeout: cfg.connect_timeout + cfg.idle_timeout,
            director,
            parents: Arc::new(parents),
            peer_links: Arc::default(),
            peer_connector,
            proxy,
            registries: Arc::default(),
            uplink: Arc::new(Uplink::new(&crate::config::Uplink::default())),
            pull_token: PullToken::default(),
        })
    }

    /// The client with the container registries' credentials (SPEC 9).
    pub fn with_registries(mut self, creds: Vec<registry::RegistryCred>) -> UpstreamClient {
        self.registries = Arc::new(registry::RegistryAuth::new(creds));
        self
    }

    /// The client with the node's uplink budget (SPEC 4); without one, nothing is capped.
    pub fn with_uplink(mut self, uplink: Arc<Uplink>) -> UpstreamClient {
        self.uplink = uplink;
        self
    }

    /// The client presenting `server.pull_token` to the parents' and peers' `/v2/` (SPEC 9): every
    /// request for a path there carries it, whatever asked (a client's pull, a tag's revalidation, a
    /// prefetch job's manifests and blobs, a job resumed after a restart).
    pub fn with_pull_token(mut self, token: Option<&str>) -> Result<UpstreamClient, String> {
        self.pull_token = PullToken::new(token)?;
        Ok(self)
    }

    pub fn uplink(&self) -> &Arc<Uplink> {
        &self.uplink
    }

    pub fn policy(&self) -> &OriginPolicy {
        &self.policy
    }

    /// The director this client asks (the relay's forwarder asks the same one).
    pub fn director(&self) -> &Arc<Director> {
        &self.director
    }

    pub fn parents_health(&self) -> Vec<ParentHealth> {
        self.director.health()
    }

    pub fn has_parents(&self) -> bool {
        self.director.has_parents()
    }

    /// Sends a request for an object along the chain (SPEC 3), without peers: `fetch_keyed` with no key.
    pub async fn fetch(
        &self,
        method: Method,
        url: Option<&Uri>,
        digest: Option<Digest>,
        headers: &HeaderMap,
    ) -> Result<Response<Metered>, FetchError> {
        self.fetch_keyed(method, url, digest, None, headers).await
    }

    /// Sends a request for an object along the chain (SPEC 3): to the hops the director gives in order
    /// (the owner among the site's peers when it is another member, SPEC 10; the first healthy parent,
    /// with an origin URL in forward-proxy form and a digest as `/v1/content/sha256/<hex>`; the next
    /// one on a connection error, a timeout, 502, 503 or 504), and to the origin itself only without
    /// parents or with `allow_direct`. `key` is the cache key, which names the owner when no digest
    /// does; a request carrying `Cistern-Peer` is never sent to a peer. A peer's answer carries
    /// [`PeerAnswer`] in its extensions (not to be stored here: the owner stores it).
    pub async fn fetch_keyed(
        &self,
        method: Method,
        url: Option<&Uri>,
        digest: Option<Digest>,
        key: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Response<Metered>, FetchError> {
        // A URL with neither scheme nor host names a path of the parent's own (`/v2/...`).
        let origin = url.filter(|u| u.scheme().is_some());
        let peering = self.director.peers().is_some();
        if let (true, Some(u)) = (self.director.has_parents() || peering, origin) {
            // Never an open proxy, not even towards a parent or a peer.
            self.host_check(u)?;
        }
        let (owner_key, sent) = peer::owner_key(peering, digest, key, headers);
        let hops = self.director.hops(Ask::Object {
            origin: origin.is_some(),
            peer: owner_key.as_deref(),
        });
        let mut last = match self.director.has_parents() {
            true => FetchError::Unreachable("no parent answered".into()),
            false => {
                FetchError::NotFound("the object is not stored and no upstream knows it".into())
            }
        };
        let n = hops.len();
        for (i, hop) in hops.iter().enumerate() {
            let (Hop::Parent(at) | Hop::Peer(at)) = hop else {
                let Some(u) = origin else { break };
                if self.director.has_parents() {
                    tracing::warn!(
                        "every parent failed; going to the origin directly (upstream.allow_direct)"
                    );
                }
                return self
                    .send(method, u.clone(), &sent.onward)
                    .await
                    .map(|(_, r)| r);
            };
            let Some((target, own)) = parent_target(at, url, digest)? else {
                continue;
            };
            let h = sent.for_hop(hop);
            let req = (method.clone(), target, own, h.as_ref(), empty_body());
            match self.ask_parent(hop, req).await? {
                Attempt::Answer(r) => return Ok(peer::mark(hop, r)),
                Attempt::Retry(r) if i + 1 == n => return Ok(peer::mark(hop, r)),
                Attempt::Retry(r) => {
                    let host = host_of(at);
                    last = FetchError::Unreachable(format!("{host} answered {}", r.status()));
                }
                Attempt::Failed(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends one request to a parent and records the outcome with the director. Errors other than
    /// no answer (e.g. a request that cannot be built) end the search.
    async fn ask_parent(
        &self,
        hop: &Hop,
        (method, target, own, headers, body): (Method, Uri, bool, &HeaderMap, ReqBody),
    ) -> Result<Attempt, FetchError> {
        let Some(p) = self.link(hop) else {
            return Ok(Attempt::Failed(FetchError::Internal(
                "no such parent".into(),
            )));
        };
        let headers = self.pull_token.on(&target, own, headers);
        let sent = p
            .request(method, target, own, &headers, body, self.head_timeout)
            .await;
        match sent {
            Ok(r) => {
                // A peer's bytes stay on the site's network: only the owner's uplink counts them.
                let r = match hop {
                    Hop::Peer(_) => Metered::local(r),
                    _ => Metered::new(r, &self.uplink),
                };
                self.director.record(hop, Outcome::Answered(r.status()));
                match r.status().as_u16() {
                    502..=504 => Ok(Attempt::Retry(r)),
                    _ => Ok(Attempt::Answer(r)),
                }
            }
            Err(
                e @ (FetchError::Unreachable(_)
                | FetchError::Timeout(_)
                | FetchError::BadResponse(_)),
            ) => {
                self.director.record(hop, Outcome::Failed(e.to_string()));
                Ok(Attempt::Failed(e))
            }
            Err(e) => Err(e),
        }
    }

    /// The connections to the parent or peer a hop names.
    fn link(&self, hop: &Hop) -> Option<Arc<Parent>> {
        match hop {
            Hop::Parent(u) => self.parents.get(u).cloned(),
            Hop::Peer(u) => Some(self.peer_links.get(u, &self.peer_connector)),
            Hop::Origin => None,
        }
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
        // A path of a parent's own registry API (a child staging images): it only goes to a parent.
        if url.scheme().is_none() && url.path().starts_with("/v2/") && self.director.has_parents() {
            return Ok(());
        }
        let host = url.host().unwrap_or_default();
        let port = port_of(url);
        if !self.policy.host_allowed(host, port) {
            return Err(FetchError::NotAllowed(format!("{host}:{port}")));
        }
        self.check_address(url)
    }

    /// The address rules alone, for an address literal (SPEC 2): for where a registry points (its
    /// blob storage, its token service), which needs no host pattern of its own.
    fn check_address(&self, url: &Uri) -> Result<(), FetchError> {
        let host = url.host().unwrap_or_default();
        let port = port_of(url);
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
    ) -> Result<(Uri, Response<Metered>), FetchError> {
        let mut url = url;
        self.check(&url)?;
        // A registry's redirect to its blob storage needs no allowlist entry of its own (SPEC 9).
        let registry = self.registries.registry_of(&url).is_some();
        let mut headers = std::borrow::Cow::Borrowed(headers);
        for _ in 0..=MAX_REDIRECTS {
            let resp = self.send_signed(method.clone(), &url, &headers).await?;
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
            let checked = match registry {
                true => self.check_address(&next),
                false => self.check(&next),
            };
            if let Err(e) = checked {
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
    ) -> Result<Response<Metered>, FetchError> {
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
            Ok(Ok(r)) => Ok(Metered::new(r, &self.uplink)),
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
    ) -> Result<Response<Metered>, FetchError> {
        self.host_check(url)?;
        let first = self
            .director
            .hops(Ask::Object {
                origin: true,
                peer: None,
            })
            .into_iter()
            .next();
        match first {
            Some(hop @ (Hop::Parent(_) | Hop::Peer(_))) => {
                let req = (method, url.clone(), false, headers, body);
                match self.ask_parent(&hop, req).await? {
                    Attempt::Answer(r) | Attempt::Retry(r) => Ok(r),
                    Attempt::Failed(e) => Err(e),
                }
            }
            Some(Hop::Origin) | None => {
                self.check(url)?;
                self.send_once(method, url, headers, body).await
            }
        }
    }
}

fn classify(url: &Uri, e: &hyper_util::client::legacy::Error) -> FetchError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut unreadable = false;
    let mut tls = None;
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<AddrRefused>() {
            return FetchError::AddressRefused(r.0.clone());
        }
        tls = tls.or_else(|| tls_failure(s));
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
    if let Some(why) = tls {
        return FetchError::UpstreamTls(format!("{}: {why}", host_of(url)));
    }
    let detail = format!("{}: {detail}", host_of(url));
    match unreadable {
        true => FetchError::BadResponse(detail),
        false => FetchError::Unreachable(detail),
    }
}

/// A TLS failure (the handshake with the upstream: a certificate that does not verify, an alert) in
/// an error chain. rustls' errors reach hyper inside `io::Error`s (hyper-rustls wraps tokio-rustls'
/// in another), whose `source()` skips what they wrap.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut e = e;
    for _ in 0..4 {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        e = inner;
    }
    None
}
