//! The one place that builds client TLS for cistern's outgoing connections (SPEC 2 `[upstream]`): the
//! rustls client config (the system roots, else the webpki roots, plus `upstream.ca_file`; the client
//! certificate for mTLS to a parent when set) and the hyper connectors over it (TCP, TLS when the URL is
//! https, HTTP/1.1). Used by the upstream client and its proxies, the relay's forwarder, `doctor` and the
//! CLI's remote client; what differs between them (the CLI trusts the `--ca-file` it is given and has no
//! client certificate nor connect timeout; the upstream client resolves through the address check) is a
//! parameter here, not another builder. Imports nothing of `upstream`'s other files.
//!
//! (`ops::health`'s probe of this process's own loopback listener is deliberately not built here: it
//! verifies no certificate, and that must not be a setting of upstream TLS.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::fetch::uplink::gather::Gathering;

/// The body of an upstream request: empty for cistern's own requests, a client's streamed body for
/// the other methods it passes through.
pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

pub fn empty_body() -> ReqBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// TCP (read in gathered bursts: `uplink::gather`), then TLS when the URL is https; names resolved
/// by `R`.
pub type Https<R = GaiResolver> = hyper_rustls::HttpsConnector<Gathering<HttpConnector<R>>>;

/// Where a connection's certificates come from: `upstream.ca_file`, `upstream.client_cert` and
/// `upstream.client_key` (None: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Trust<'a> {
    pub ca_file: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
}

/// An HTTPS-or-HTTP connector resolving with the system resolver.
pub fn connector(tls: rustls::ClientConfig, connect_timeout: Option<Duration>) -> Https {
    connector_with(HttpConnector::new(), tls, connect_timeout, false)
}

/// `connector`, its sockets' kernel receive buffer bounded to `recv` bytes (None: autotuned).
pub fn connector_bounded(
    tls: rustls::ClientConfig,
    connect_timeout: Option<Duration>,
    recv: Option<usize>,
) -> Https {
    let mut http = HttpConnector::new();
    http.set_recv_buffer_size(recv);
    connector_with(http, tls, connect_timeout, false)
}

/// An HTTPS-or-HTTP connector over a given TCP connector (e.g. one with a checking resolver), its
/// connections reading bodies in gathered bursts when `gather` (`uplink::gather`). Gathering is for
/// origins, not parents nor site peers: a parent forwards what it gets as it gets it, and a child that
/// waited for half a MiB of it added that wait at every level of a chain (measured: the last client of
/// a three-level chain 15 ms later than with the origin's connections alone gathering).
pub fn connector_with<R>(
    mut http: HttpConnector<R>,
    tls: rustls::ClientConfig,
    connect_timeout: Option<Duration>,
    gather: bool,
) -> Https<R> {
    http.enforce_http(false);
    http.set_connect_timeout(connect_timeout);
    http.set_nodelay(true);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(Gathering::new(http, gather))
}

/// A client with hyper's defaults over `connector(tls, connect_timeout)`: for cistern's own small
/// requests (the relay's batches, doctor's probes, the CLI).
pub fn simple_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Option<Duration>,
) -> Client<Https, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build(connector(tls, connect_timeout))
}

/// TLS over a stream already open (a CONNECT tunnel, doctor's handshake check).
pub fn stream_connector(tls: rustls::ClientConfig) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

/// The client TLS config for upstream connections.
pub fn tls_config(trust: Trust<'_>) -> Result<rustls::ClientConfig, String> {
    let Trust {
        ca_file,
        client_cert,
        client_key,
    } = trust;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(ca_file) = ca_file {
        let err =
            |e: &dyn std::fmt::Display| format!("upstream.ca_file {}: {e}", ca_file.display());
        let pem = std::fs::read(ca_file).map_err(|e| err(&e))?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let Some(client_cert) = client_cert else {
        return Ok(builder.with_no_client_auth());
    };
    let cert_err =
        |e: &dyn std::fmt::Display| format!("upstream.client_cert {}: {e}", client_cert.display());
    let pem = std::fs::read(client_cert).map_err(|e| cert_err(&e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(&e))?;
    let Some(client_key) = client_key else {
        return Err("upstream.client_cert needs upstream.client_key".into());
    };
    let key_err =
        |e: &dyn std::fmt::Display| format!("upstream.client_key {}: {e}", client_key.display());
    let pem = std::fs::read(client_key).map_err(|e| key_err(&e))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| key_err(&e))?
        .ok_or_else(|| key_err(&"no private key in the file"))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("upstream.client_cert: {e}"))
}
