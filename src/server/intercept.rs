//! Interception (SPEC 3, "HTTPS payloads"): a CONNECT to port 443 of an allowed origin (of
//! `server.intercept_hosts` when set) is answered 200 and cistern completes the TLS handshake itself,
//! with the leaf certificate `mint` makes for the CONNECT host. An SNI name that is not the CONNECT host
//! gets no certificate: the handshake fails with an alert. Inside, HTTP/1.1 with keep-alive (ALPN
//! `http/1.1`) on the same connection code as the listeners (their header, idle and stall bounds),
//! each request made the forward-proxy request for `https://<host><path>`, so that it is served,
//! keyed and verified exactly as that one. The handshake counts against `server.max_connections` (the
//! tunnel keeps its connection's place) and must end within the listeners' header timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::body::{empty, Body};
use super::error::ApiError;
use super::listener::{self, ConnHold, HEADER_TIMEOUT};
use super::mint::Minter;
pub use super::tunnel::{inner_uri, tunnel_host, Inside};
use super::App;
use crate::fetch::policy::{normalise_host, OriginPolicy};

/// What interception needs: the CA that signs, and which hosts it takes.
pub struct Interception {
    minter: Arc<Minter>,
    /// `server.intercept_hosts`; None: every allowed origin.
    hosts: Option<OriginPolicy>,
}

impl Interception {
    pub fn new(minter: Minter, hosts: &[String]) -> Interception {
        Interception {
            minter: Arc::new(minter),
            hosts: (!hosts.is_empty()).then(|| OriginPolicy::new(hosts, &[])),
        }
    }

    /// Whether a CONNECT to `host` (port 443, already allowed) is terminated here.
    pub fn takes(&self, host: &str) -> bool {
        self.hosts
            .as_ref()
            .is_none_or(|p| p.host_allowed(host, 443))
    }

    /// The TLS server side of one tunnel to `host`: its certificate for that name only.
    fn server_config(&self, host: &str) -> Result<rustls::ServerConfig, rustls::Error> {
        let resolver = TunnelCert {
            minter: self.minter.clone(),
            host: host.to_string(),
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.minter.provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

/// Answers an intercepted CONNECT: 200, then (in a task that keeps the connection's hold) the TLS
/// handshake and the requests inside.
pub fn terminate(
    app: Arc<App>,
    icp: Arc<Interception>,
    req: Request<Incoming>,
    authority: &Authority,
    peer: SocketAddr,
) -> Response<Body> {
    let host = tunnel_host(authority.host());
    let cfg = match icp.server_config(&host) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("TLS for {host}: {e}"),
            )
            .into_response()
        }
    };
    let Some(hold) = req.extensions().get::<ConnHold>().cloned() else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no connection",
        )
        .into_response();
    };
    tokio::spawn(async move {
        let up = match hyper::upgrade::on(req).await {
            Ok(up) => up,
            Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        // A client that never finishes its handshake is dropped as one that never sends its head.
        let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(TokioIo::new(up)))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return tracing::debug!(client = %peer.ip(), %host, error = %e, "intercepted TLS handshake failed")
            }
            Err(_) => {
                return tracing::debug!(client = %peer.ip(), %host, "intercepted TLS handshake timed out")
            }
        };
        let inside = Inside::to(host);
        listener::tunnelled(app, TokioIo::new(tls), peer, hold, inside).await;
    });
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::OK;
    r
}

/// Whether the SNI name a client sent may be answered for a tunnel to `host` (no SNI: the CONNECT
/// host is meant; an address literal is never sent as SNI).
pub fn sni_matches(sni: Option<&str>, host: &str) -> bool {
    sni.is_none_or(|s| normalise_host(s) == host)
}

/// The certificate of one tunnel: the CONNECT host's, and only for that SNI name.
#[derive(Debug)]
struct TunnelCert {
    minter: Arc<Minter>,
    host: String,
}

impl ResolvesServerCert for TunnelCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !sni_matches(hello.server_name(), &self.host) {
            tracing::info!(connect = %self.host, sni = ?hello.server_name(), "refused: the TLS name is not the CONNECT host");
            return None;
        }
        match self.minter.leaf(&self.host) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(host = %self.host, error = %e, "cannot make a certificate");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_must_be_the_connect_host() {
        assert!(sni_matches(None, "origin.test"));
        assert!(sni_matches(Some("ORIGIN.test."), "origin.test"));
        assert!(!sni_matches(Some("other.test"), "origin.test"));
        assert_eq!(tunnel_host("[::1]"), "::1");
    }
}
