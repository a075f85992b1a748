//! TLS material from the IoT Edge workload API (SPEC 8): under IoT Edge, with TLS on and no certificate
//! files configured, the server certificate (common name `IOTEDGE_GATEWAYHOSTNAME`, the name children
//! use) and the trust bundle come from the workload API, and the certificate is renewed before it
//! expires. The API is HTTP over the unix socket that `IOTEDGE_WORKLOADURI` names (or plain HTTP).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

const API: &str = "api-version=2019-01-30";
/// Lifetime asked for each server certificate.
const LIFETIME: Duration = Duration::from_secs(30 * 86400);

/// The workload API as the IoT Edge runtime describes it in the module's environment.
#[derive(Clone, Debug)]
pub struct Workload {
    pub uri: String,
    pub module_id: String,
    pub generation_id: String,
    pub gateway_host: String,
}

impl Workload {
    /// The workload API from `IOTEDGE_*`, when this process runs as an IoT Edge module.
    pub fn from_env() -> Option<Workload> {
        let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        Some(Workload {
            uri: v("IOTEDGE_WORKLOADURI")?,
            module_id: v("IOTEDGE_MODULEID")?,
            generation_id: v("IOTEDGE_MODULEGENERATIONID")?,
            gateway_host: v("IOTEDGE_GATEWAYHOSTNAME")
                .or_else(|| v("HOSTNAME"))
                .unwrap_or_else(|| "localhost".into()),
        })
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, String> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "workload")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = if let Some(sock) = self.uri.strip_prefix("unix://") {
            let s = tokio::net::UnixStream::connect(sock)
                .await
                .map_err(|e| format!("workload API {sock}: {e}"))?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            tx.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let u: http::Uri = self
                .uri
                .parse()
                .map_err(|_| format!("IOTEDGE_WORKLOADURI `{}` is not a URI", self.uri))?;
            let addr = format!(
                "{}:{}",
                u.host().unwrap_or("localhost"),
                u.port_u16().unwrap_or(80)
            );
            let s = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("workload API {addr}: {e}"))?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            tx.send_request(req).await.map_err(|e| e.to_string())?
        };
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "workload API {path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Ok(body)
    }

    /// The trust bundle (PEM): the edge CA that children trust their parent through.
    pub async fn trust_bundle(&self) -> Result<String, String> {
        #[derive(Deserialize)]
        struct Bundle {
            certificate: String,
        }
        let raw = self
            .call(http::Method::GET, &format!("/trust-bundle?{API}"), None)
            .await?;
        let b: Bundle =
            serde_json::from_slice(&raw).map_err(|e| format!("workload API trust bundle: {e}"))?;
        Ok(b.certificate)
    }

    /// A fresh server certificate for `gateway_host`, and when it expires.
    pub async fn server_cert(&self) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
        #[derive(Deserialize)]
        struct Key {
            bytes: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Issued {
            certificate: String,
            private_key: Key,
            expiration: Option<String>,
        }
        let expiry = SystemTime::now() + LIFETIME;
        let body = serde_json::json!({
            "commonName": self.gateway_host,
            "expiration": humantime::format_rfc3339_seconds(expiry).to_string(),
        });
        let path = format!(
            "/modules/{}/genid/{}/certificate/server?{API}",
            self.module_id, self.generation_id
        );
        let raw = self
            .call(http::Method::POST, &path, Some(body.to_string()))
            .await?;
        let issued: Issued =
            serde_json::from_slice(&raw).map_err(|e| format!("workload API certificate: {e}"))?;
        let expires = issued
            .expiration
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339_weak(e).ok())
            .unwrap_or(expiry);
        Ok((
            certified(&issued.certificate, &issued.private_key.bytes)?,
            expires,
        ))
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("workload certificate: {e}"))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("workload private key: {e}"))?
        .ok_or("workload API returned no private key")?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("workload private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

/// Serves the current certificate; the renewal task swaps it.
#[derive(Debug)]
pub struct Renewing {
    current: super::tls::CurrentCert,
}

impl ResolvesServerCert for Renewing {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.get())
    }
}

/// Fetches the first certificate, then renews it at 80% of its lifetime for as long as the process runs.
pub async fn renewing_resolver(w: Workload) -> Result<Arc<Renewing>, String> {
    let (cert, expires) = w.server_cert().await?;
    let r = Arc::new(Renewing {
        current: super::tls::CurrentCert::new(cert),
    });
    let handle = r.clone();
    tokio::spawn(async move {
        let mut expires = expires;
        loop {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep((left * 4 / 5).max(Duration::from_secs(60))).await;
            match w.server_cert().await {
                Ok((c, e)) => {
                    handle.current.set(c);
                    expires = e;
                    tracing::info!("server certificate renewed from the IoT Edge workload API");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "server certificate renewal failed; retrying in a minute");
                    expires = SystemTime::now() + Duration::from_secs(75);
                }
            }
        }
    });
    Ok(r)
}

/// A TLS acceptor that presents the workload API's certificate.
pub fn acceptor(resolver: Arc<Renewing>) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
