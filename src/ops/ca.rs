//! `cistern ca init --out DIR`: a site CA for interception (SPEC 3, "HTTPS payloads") on a site without
//! a PKI of its own: `ca.pem` and `ca.key` (mode 0600), ECDSA P-256, valid 10 years, allowed to sign
//! server certificates only (path length 0). An existing key is never overwritten.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};

/// How long the CA is valid.
const CA_LIFE: Duration = Duration::from_secs(10 * 365 * 24 * 3600 + 2 * 24 * 3600);

/// The files `init` wrote.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA named `name` in `out` (created if needed).
pub fn init(out: &Path, name: &str) -> Result<CaFiles, String> {
    let at = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    std::fs::create_dir_all(out).map_err(|e| at(out, &e))?;
    let (cert, key) = (out.join("ca.pem"), out.join("ca.key"));
    if key.exists() {
        return Err(format!(
            "{}: already exists; a CA key is never overwritten (remove it first, or choose another --out)",
            key.display()
        ));
    }
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + CA_LIFE).into();
    let serial: [u8; 16] = rand::random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial[..]));
    let ca = p.self_signed(&pair).map_err(|e| e.to_string())?;
    // The key is created with its mode: never readable by others, not even for a moment.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .map_err(|e| at(&key, &e))?;
    f.write_all(pair.serialize_pem().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| at(&key, &e))?;
    std::fs::write(&cert, ca.pem()).map_err(|e| at(&cert, &e))?;
    Ok(CaFiles { cert, key })
}

/// What to tell the operator once the CA is made: the config keys, and how a Debian device trusts it.
pub fn next_steps(f: &CaFiles) -> String {
    let (c, k) = (f.cert.display(), f.key.display());
    format!(
        "wrote {c} (the CA certificate) and {k} (its key, mode 0600: keep it secret)\n\
         \n\
         cistern config:\n\
         [server]\n\
         allow_connect = true\n\
         intercept = true\n\
         intercept_ca_cert = \"{c}\"\n\
         intercept_ca_key = \"{k}\"\n\
         \n\
         On each Debian or Ubuntu device, trust the CA:\n\
         \x20 sudo cp ca.pem /usr/local/share/ca-certificates/cistern-site-ca.crt\n\
         \x20 sudo update-ca-certificates\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_ca_with_a_private_key_and_never_overwrites_it() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = init(&tmp.path().join("ca"), "test site").unwrap();
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read(&f.cert).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x.is_ca());
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
        assert!(init(&tmp.path().join("ca"), "again").is_err());
    }
}
