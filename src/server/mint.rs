//! The certificates of interception (SPEC 3, "HTTPS payloads"): the site CA of
//! `server.intercept_ca_cert`/`intercept_ca_key`, loaded and checked once at start (a key file readable by
//! group or others, a key that does not match the certificate, a certificate that is not a CA: `serve`
//! refuses to start, naming the file), and the per-host leaf certificates it signs: ECDSA P-256, valid 7
//! days, made once per host and kept in a bounded in-memory cache, made again a day before they expire.
//! The chain sent holds the CA certificate when it is an intermediate (a client trusts its root only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// How long a leaf is valid.
const LEAF_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A leaf with less than this left is made again.
const RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Backdating of a leaf's start, for clients whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Hosts whose leaf is kept; beyond it the least recently used is dropped (and made again if asked).
pub const MAX_LEAVES: usize = 1024;

/// Why the site CA cannot be used; each message names the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "server.intercept_ca_key {0}: readable by group or others (mode {1:o}); `chmod 600` it"
    )]
    KeyExposed(String, u32),
    #[error("{key} {path}: {msg}")]
    File {
        key: &'static str,
        path: String,
        msg: String,
    },
}

fn file_error(key: &'static str, path: &str, msg: impl std::fmt::Display) -> CaError {
    CaError::File {
        key,
        path: path.to_string(),
        msg: msg.to_string(),
    }
}

/// The site CA and the leaves it has signed.
pub struct Minter {
    /// The CA as rcgen's issuer (its name and key identifier, taken from the certificate file).
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// The CA certificate as its file holds it, sent after the leaf when it is an intermediate.
    chain_tail: Option<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<Leaves>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Minter")
    }
}

/// The leaf cache: by host, with when each expires and when it was last used.
#[derive(Default)]
struct Leaves {
    by_host: HashMap<String, Leaf>,
    /// Bumped at each use: the smallest `used` is the least recently used.
    clock: u64,
}

struct Leaf {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    used: u64,
}

impl Minter {
    /// Loads and checks the CA from its two PEM files.
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Minter, CaError> {
        let (cert, key) = (&*cert.to_string_lossy(), &*key.to_string_lossy());
        check_key_mode(key)?;
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| file_error("server.intercept_ca_cert", cert, e))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| file_error("server.intercept_ca_key", key, e))?;
        Minter::from_pem(&cert_pem, &key_pem, (cert, key))
    }

    /// The CA from PEM text; `names` are the files, for the messages.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        (cert, key): (&str, &str),
    ) -> Result<Minter, CaError> {
        let bad_cert = |m: &dyn std::fmt::Display| file_error("server.intercept_ca_cert", cert, m);
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| bad_cert(&"no certificate in the file"))?
            .map_err(|e| bad_cert(&e))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(&e))?;
        if !x509.is_ca() {
            return Err(bad_cert(&"not a CA certificate (basicConstraints CA:TRUE)"));
        }
        let intermediate = x509.subject().as_raw() != x509.issuer().as_raw();
        let issuer_key = KeyPair::from_pem(key_pem).map_err(|e| {
            file_error(
                "server.intercept_ca_key",
                key,
                format!("{e} (a PKCS#8 \"PRIVATE KEY\" is needed; `openssl pkcs8 -topk8 -nocrypt` converts one)"),
            )
        })?;
        if issuer_key.public_key_der() != x509.public_key().raw {
            return Err(file_error(
                "server.intercept_ca_key",
                key,
                format!("does not match the certificate {cert}"),
            ));
        }
        let params = CertificateParams::from_ca_cert_der(&der).map_err(|e| bad_cert(&e))?;
        let issuer = params.self_signed(&issuer_key).map_err(|e| bad_cert(&e))?;
        Ok(Minter {
            issuer,
            issuer_key,
            chain_tail: intermediate.then(|| der.clone()),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Mutex::default(),
        })
    }

    /// The crypto provider the leaves are loaded with (the tunnels' TLS uses the same).
    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// The leaf for `host` (a DNS name or an address literal), from the cache or made now.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, String> {
        self.leaf_at(host, SystemTime::now())
    }

    /// The leaf for `host` as of `now`.
    fn leaf_at(&self, host: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, String> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        leaves.clock += 1;
        let clock = leaves.clock;
        if let Some(l) = leaves.by_host.get_mut(host) {
            if l.not_after.duration_since(now).unwrap_or_default() > RENEW_BEFORE {
                l.used = clock;
                return Ok(l.key.clone());
            }
        }
        // Made under the lock: one leaf per host however many handshakes ask at once.
        let (key, not_after) = self.make(host, now)?;
        if leaves.by_host.len() >= MAX_LEAVES && !leaves.by_host.contains_key(host) {
            let oldest = leaves
                .by_host
                .iter()
                .min_by_key(|(_, l)| l.used)
                .map(|(h, _)| h.clone());
            if let Some(h) = oldest {
                leaves.by_host.remove(&h);
            }
        }
        let leaf = Leaf {
            key: key.clone(),
            not_after,
            used: clock,
        };
        leaves.by_host.insert(host.to_string(), leaf);
        Ok(key)
    }

    /// Hosts whose leaf is cached now.
    pub fn cached(&self) -> usize {
        let leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        leaves.by_host.len()
    }

    /// Makes and signs a leaf for `host`, valid from an hour ago for 7 days.
    fn make(&self, host: &str, now: SystemTime) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
        let mut params = leaf_params(host)?;
        let not_after = now + LEAF_LIFE;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.issuer_key)
            .map_err(|e| format!("signing a certificate for {host}: {e}"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain_tail.iter().cloned());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| e.to_string())?;
        Ok((Arc::new(CertifiedKey::new(chain, signing)), not_after))
    }
}

/// A server certificate's parameters for `host`: its one name (a DNS name or an address), server
/// authentication only, the CA's key identifier as authority key identifier.
pub fn leaf_params(host: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(vec![host.to_string()])
        .map_err(|e| format!("`{host}` cannot be named in a certificate: {e}"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let serial: [u8; 16] = rand::random();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial[..]));
    Ok(params)
}

/// A private key that group or others may read is refused: whoever reads it can impersonate every
/// host to every device that trusts the CA.
fn check_key_mode(key: &str) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(key).map_err(|e| file_error("server.intercept_ca_key", key, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        return Err(CaError::KeyExposed(key.to_string(), mode));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test CA");
        let c = p.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    #[test]
    fn leaves_are_cached_bounded_and_name_their_host() {
        let (c, k) = ca();
        let m = Minter::from_pem(&c, &k, ("ca.pem", "ca.key")).unwrap();
        let a = m.leaf("a.example").unwrap();
        assert!(Arc::ptr_eq(&a, &m.leaf("a.example").unwrap()));
        assert_eq!(a.cert.len(), 1, "a root is not sent");
        let (_, x) = x509_parser::parse_x509_certificate(&a.cert[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"a.example\")]"
        );
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life, (LEAF_LIFE + BACKDATE).as_secs() as i64);
        m.leaf("127.0.0.2").unwrap();
        for i in 0..MAX_LEAVES + 5 {
            m.leaf(&format!("h{i}.example")).unwrap();
        }
        assert_eq!(m.cached(), MAX_LEAVES);
    }

    #[test]
    fn a_leaf_is_made_again_a_day_before_it_expires() {
        let (c, k) = ca();
        let m = Minter::from_pem(&c, &k, ("ca.pem", "ca.key")).unwrap();
        let now = SystemTime::now();
        let a = m.leaf_at("a.example", now).unwrap();
        let later = now + LEAF_LIFE - RENEW_BEFORE - Duration::from_secs(60);
        assert!(Arc::ptr_eq(&a, &m.leaf_at("a.example", later).unwrap()));
        let renewed = m
            .leaf_at("a.example", later + Duration::from_secs(120))
            .unwrap();
        assert!(
            !Arc::ptr_eq(&a, &renewed),
            "a leaf with less than a day left was kept"
        );
        assert_eq!(m.cached(), 1);
    }

    #[test]
    fn a_key_of_another_certificate_or_a_leaf_is_refused() {
        let (c, _) = ca();
        let (_, k2) = ca();
        let e = Minter::from_pem(&c, &k2, ("ca.pem", "ca.key"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not match"), "{e}");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = leaf_params("x.example").unwrap().self_signed(&key).unwrap();
        let e = Minter::from_pem(&leaf.pem(), &key.serialize_pem(), ("l.pem", "l.key"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a CA"), "{e}");
    }
}
