//! `cistern health` (SPEC 1): the container's probe (`HEALTHCHECK` in the Dockerfile). It asks
//! `/healthz` of the plain listener of the config `serve` would read (else of the TLS listener) and
//! says in one line what answered or why nothing did. Blocking and standard library only: a probe runs
//! every few seconds beside the gateway and should cost next to nothing. Calls only `config`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;

/// The whole probe's bound: connect, request and status line (SPEC 1: "within 2 s").
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The listener the probe asks.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// What the config says, for the messages.
    pub listen: String,
    /// Where to connect, in order: a wildcard listen address is reached over loopback.
    pub connect: Vec<SocketAddr>,
    pub tls: bool,
}

impl Target {
    /// The plain listener when there is one, else the TLS one.
    pub fn of(cfg: &Config) -> Result<Target, String> {
        let (listen, tls) = if !cfg.server.listen.is_empty() {
            (&cfg.server.listen, false)
        } else if !cfg.server.tls_listen.is_empty() {
            (&cfg.server.tls_listen, true)
        } else {
            return Err(
                "server.listen and server.tls_listen are both off: nothing to probe".into(),
            );
        };
        let addr: SocketAddr = listen
            .parse()
            .map_err(|_| format!("`{listen}` is not an address:port"))?;
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port());
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port());
        let connect = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => vec![v4],
            // `[::]` is dual-stack unless the host sets bindv6only, and containers often have no
            // IPv6 loopback at all: IPv4 first, then ::1.
            IpAddr::V6(ip) if ip.is_unspecified() => vec![v4, v6],
            _ => vec![addr],
        };
        Ok(Target {
            listen: listen.clone(),
            connect,
            tls,
        })
    }

    fn url(&self, addr: SocketAddr) -> String {
        format!(
            "{}://{addr}/healthz",
            if self.tls { "https" } else { "http" }
        )
    }
}

/// Asks `/healthz`; `Ok` holds the line to print, `Err` the one line saying why it failed.
pub fn probe(cfg: &Config) -> Result<String, String> {
    let target = Target::of(cfg)?;
    let deadline = Instant::now() + TIMEOUT;
    let mut why = String::new();
    for addr in &target.connect {
        let url = target.url(*addr);
        match ask(*addr, target.tls, deadline) {
            Ok(200) => return Ok(format!("healthy: {url} answered 200")),
            Ok(403) if !cfg.server.allowed_clients.is_empty() => {
                return Err(format!(
                    "{url} answered 403: server.allowed_clients must include {} for the probe",
                    addr.ip()
                ))
            }
            Ok(status) => return Err(format!("{url} answered {status}, not 200")),
            Err(e) => why = format!("{url}: {e}"),
        }
    }
    let hint = match cfg.server.listen.is_empty() {
        false => format!(
            "is `cistern serve` running with server.listen = {}?",
            target.listen
        ),
        true => format!(
            "is `cistern serve` running with server.tls_listen = {}?",
            target.listen
        ),
    };
    Err(format!("{why}; {hint}"))
}

/// Time left before `deadline`, as a socket timeout (which must not be zero).
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d < Duration::from_millis(1) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {}s", TIMEOUT.as_secs()),
        ));
    }
    Ok(d)
}

/// One `GET /healthz`; the status code of the answer.
fn ask(addr: SocketAddr, tls: bool, deadline: Instant) -> Result<u16, String> {
    let say = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("no answer within {}s", TIMEOUT.as_secs())
        }
        _ => e.to_string(),
    };
    let tcp = TcpStream::connect_timeout(&addr, left(deadline).map_err(say)?).map_err(say)?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cistern-health\r\nConnection: close\r\n\r\n"
    );
    let head = if tls {
        let conn = rustls::ClientConnection::new(tls_config()?, server_name(addr))
            .map_err(|e| e.to_string())?;
        exchange(rustls::StreamOwned::new(conn, tcp), &request, deadline)
    } else {
        exchange(tcp, &request, deadline)
    }
    .map_err(say)?;
    status_of(&head).ok_or_else(|| {
        let line = head.lines().next().unwrap_or("").chars().take(80);
        format!("not an HTTP answer: `{}`", line.collect::<String>())
    })
}

/// Socket timeouts on the stream a [`exchange`] works on, set before each step.
trait Timed: Read + Write {
    fn bound(&self, d: Duration) -> std::io::Result<()>;
}

impl Timed for TcpStream {
    fn bound(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Timed for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn bound(&self, d: Duration) -> std::io::Result<()> {
        self.sock.bound(d)
    }
}

/// Sends the request and reads up to the end of the status line (at most 1 KiB): the rest of the
/// answer does not matter, and a listener that trickles cannot hold the probe past `deadline`.
fn exchange(mut s: impl Timed, request: &str, deadline: Instant) -> std::io::Result<String> {
    s.bound(left(deadline)?)?;
    s.write_all(request.as_bytes())?;
    s.flush()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        s.bound(left(deadline)?)?;
        match s.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    if head.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `HTTP/1.1 200 OK` -> 200.
fn status_of(head: &str) -> Option<u16> {
    let mut parts = head.lines().next()?.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn server_name(addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(addr.ip().into())
}

/// The probe asks this process's own listener over loopback and sends nothing secret: what it checks
/// is that the gateway answers, not who it is. The certificate (often issued by the IoT Edge workload
/// API for the gateway's host name, never for 127.0.0.1) is therefore not verified; the handshake's
/// signatures still are.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(listen: &str, tls_listen: &str) -> Config {
        let mut c = Config::default();
        c.server.listen = listen.into();
        c.server.tls_listen = tls_listen.into();
        c
    }

    #[test]
    fn a_wildcard_listener_is_probed_over_loopback() {
        let t = Target::of(&cfg("0.0.0.0:8080", "")).unwrap();
        assert_eq!(t.connect, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert!(!t.tls);
        let t = Target::of(&cfg("[::]:8080", "")).unwrap();
        assert_eq!(
            t.connect,
            vec![
                "127.0.0.1:8080".parse().unwrap(),
                "[::1]:8080".parse().unwrap()
            ]
        );
        let t = Target::of(&cfg("10.0.0.5:80", "")).unwrap();
        assert_eq!(t.connect, vec!["10.0.0.5:80".parse().unwrap()]);
    }

    #[test]
    fn the_tls_listener_only_without_a_plain_one() {
        let t = Target::of(&cfg("", "0.0.0.0:8443")).unwrap();
        assert!(t.tls);
        assert_eq!(t.connect, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert!(
            !Target::of(&cfg("0.0.0.0:8080", "0.0.0.0:8443"))
                .unwrap()
                .tls
        );
        let e = Target::of(&cfg("", "")).unwrap_err();
        assert!(e.contains("both off"), "{e}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_of("HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status_of("SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(status_of(""), None);
    }
}
