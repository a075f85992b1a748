//! Downstream TLS: the acceptor, with `client_ca` for mTLS, and a server certificate that follows its
//! files. A renewed `server.tls_cert`/`tls_key` is picked up without a restart (checked every
//! `CHECK_EVERY`); connections already open keep their session; a new pair that does not load (a
//! half-written file, a key that does not match) is logged and the old certificate kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// How often the certificate files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Builds the TLS acceptor from PEM files; with `client_ca`, clients must present a certificate it
/// signed (mTLS). The certificate is reloaded when its files change, for as long as the acceptor lives.
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(Reloading::load(cert, key, provider.clone())?);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if let Some(client_ca) = client_ca {
        let ca =
            |e: &dyn std::fmt::Display| format!("server.client_ca {}: {e}", client_ca.display());
        let pem = std::fs::read(client_ca).map_err(|e| ca(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c.map_err(|e| ca(&e))?).map_err(|e| ca(&e))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca(&e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder.with_cert_resolver(resolver.clone());
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(watch(Arc::downgrade(&resolver)));
    }
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The certificate in use and where it came from.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: CurrentCert,
    /// Modification times and sizes of the two files when `current` was loaded.
    stamp: RwLock<Stamp>,
}

type Stamp = [Option<(SystemTime, u64)>; 2];

impl Reloading {
    fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Reloading, String> {
        let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
        let stamp = stamp_of(&cert, &key);
        let ck = certified_key(&cert, &key, &provider)?;
        Ok(Reloading {
            cert,
            key,
            provider,
            current: CurrentCert::new(Arc::new(ck)),
            stamp: RwLock::new(stamp),
        })
    }

    /// Loads the files again when they changed since the last load (or the last failed attempt).
    fn check(&self) {
        let now = stamp_of(&self.cert, &self.key);
        if *self.stamp.read().unwrap_or_else(|p| p.into_inner()) == now {
            return;
        }
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
        match certified_key(&self.cert, &self.key, &self.provider) {
            Ok(ck) => {
                self.current.set(Arc::new(ck));
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "the new TLS certificate does not load; keeping the old one")
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.get())
    }
}

/// The certificate a resolver serves, swapped whole when it is renewed (by file or by the IoT Edge
/// workload API); handshakes in progress keep the one they took.
#[derive(Debug)]
pub struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    pub fn new(c: Arc<CertifiedKey>) -> CurrentCert {
        CurrentCert(RwLock::new(c))
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, c: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = c;
    }
}

/// Looks at the files every `CHECK_EVERY` until the acceptor is gone.
async fn watch(resolver: std::sync::Weak<Reloading>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(r) = resolver.upgrade() else {
            return;
        };
        // Reading and parsing two small files: off the runtime's threads all the same.
        let _ = tokio::task::spawn_blocking(move || r.check()).await;
    }
}

fn stamp_of(cert: &std::path::Path, key: &std::path::Path) -> Stamp {
    let one = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    [one(cert), one(key)]
}

/// Reads a certificate chain and its private key, and checks that they belong together.
fn certified_key(
    cert: &std::path::Path,
    key: &std::path::Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let (c, k) = (cert.display(), key.display());
    let pem = std::fs::read(cert).map_err(|e| format!("server.tls_cert {c}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server.tls_cert {c}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("server.tls_cert {c}: no certificate in the file"));
    }
    let pem = std::fs::read(key).map_err(|e| format!("server.tls_key {k}: {e}"))?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("server.tls_key {k}: {e}"))?
        .ok_or_else(|| format!("server.tls_key {k}: no private key in the file"))?;
    CertifiedKey::from_der(certs, key_der, provider)
        .map_err(|e| format!("server.tls_cert/tls_key {c}, {k}: {e}"))
}
