//! `cistern doctor` (SPEC 1): what a site engineer would otherwise check by hand, one line per check with
//! a verdict and, when it fails, what to do about it.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use crate::config::{Config, Upstream};
use crate::fetch::upstream::connect;

/// What a check found: a warning is worth acting on but does not stop the node from working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
pub struct Check {
    pub verdict: Verdict,
    pub what: String,
    pub detail: String,
    /// What to do when it failed or warned.
    pub fix: String,
}

impl Check {
    pub fn failed(&self) -> bool {
        self.verdict == Verdict::Fail
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, detail, fix) = (&self.what, &self.detail, &self.fix);
        match self.verdict {
            Verdict::Ok => write!(f, "ok    {what}: {detail}"),
            Verdict::Warn => write!(f, "WARN  {what}: {detail} -> {fix}"),
            Verdict::Fail => write!(f, "FAIL  {what}: {detail} -> {fix}"),
        }
    }
}

fn check(verdict: Verdict, what: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        verdict,
        what: what.into(),
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn pass(what: &str, detail: impl Into<String>) -> Check {
    check(Verdict::Ok, what, detail, "")
}

fn fail(what: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    check(Verdict::Fail, what, detail, fix)
}

/// Runs every check for `cfg`.
pub async fn run(cfg: &Config) -> Vec<Check> {
    let mut out = vec![pass("config", "valid")];
    out.push(store_check(cfg));
    let timeout = cfg.upstream.connect_timeout.0.min(Duration::from_secs(10));
    for p in &cfg.upstream.parents {
        out.extend(parent_checks(cfg, p, timeout).await);
    }
    if !cfg.upstream.proxy.is_empty() {
        out.push(tcp_check("proxy", &cfg.upstream.proxy, timeout).await);
    }
    if cfg.upstream.parents.is_empty() || cfg.upstream.allow_direct {
        for o in &cfg.origins {
            out.push(tcp_check(&format!("origin {}", o.name), &o.url, timeout).await);
        }
    }
    out.push(listener_check(&cfg.server.listen, timeout).await);
    out.push(admin_check(cfg));
    out
}

/// Without a token the admin API answers loopback clients only, with no secret: fine on a node that
/// listens on loopback alone; a warning on one that listens beyond it (SPEC 6).
fn admin_check(cfg: &Config) -> Check {
    match cfg.admin_token() {
        Ok(Some(_)) => return pass("admin", "an admin token is set"),
        Ok(None) => {}
        Err(e) => {
            return fail(
                "admin",
                e.to_string(),
                "make server.admin_token_file readable by cistern",
            )
        }
    }
    let s = &cfg.server;
    let beyond: Vec<&str> = [s.listen.as_str(), s.tls_listen.as_str()]
        .into_iter()
        .filter(|l| !l.is_empty() && !loopback_listen(l))
        .collect();
    if beyond.is_empty() {
        return pass("admin", "no admin token; the listeners are loopback only");
    }
    check(
        Verdict::Warn,
        "admin",
        format!(
            "no admin token while listening on {}: the admin API answers loopback clients only, and \
             anything running on this machine may stage, sideload and purge",
            beyond.join(" and ")
        ),
        "set server.admin_token_file (CISTERN_SERVER__ADMIN_TOKEN_FILE) to a file holding a long \
         random token, and give it to the CLI with --token-file",
    )
}

/// Whether a listen address is a loopback one.
fn loopback_listen(addr: &str) -> bool {
    match addr.parse::<SocketAddr>() {
        Ok(a) => match a.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
            v4 => v4.is_loopback(),
        },
        Err(_) => addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

fn store_check(cfg: &Config) -> Check {
    let dir = &cfg.store.dir;
    // A check changes nothing: a store directory that does not exist yet is left to `serve`, which
    // creates it; what must hold then is that its nearest existing parent is writable.
    let Some(existing) = dir.ancestors().find(|p| p.is_dir()) else {
        return fail(
            "store",
            format!("{}: no part of the path exists", dir.display()),
            "set store.dir to a path on a mounted volume",
        );
    };
    let probe = existing.join(format!(".cistern-doctor-probe-{}", std::process::id()));
    let written =
        std::fs::write(&probe, b"probe").and_then(|_| std::fs::File::open(&probe)?.sync_all());
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        return fail(
            "store",
            format!("{} is not writable: {e}", existing.display()),
            "give the cistern user write access or set store.dir",
        );
    }
    let budget = crate::store::free_bytes(existing).unwrap_or(0);
    let min_free = cfg.store.min_free.0;
    if budget < min_free {
        return fail(
            "store",
            format!(
                "{} has {} MiB free, below min_free {} MiB",
                existing.display(),
                budget >> 20,
                min_free >> 20
            ),
            "free disk space, or lower store.min_free",
        );
    }
    let state = if existing == dir.as_path() {
        "writable".to_string()
    } else {
        format!(
            "not created yet ({} is writable; serve creates it)",
            existing.display()
        )
    };
    pass(
        "store",
        format!(
            "{} {state}, {} MiB free (min_free {} MiB)",
            dir.display(),
            budget >> 20,
            min_free >> 20
        ),
    )
}

async fn tcp_check(what: &str, url: &str, timeout: Duration) -> Check {
    let Ok(u) = url.parse::<Uri>() else {
        return fail(
            what,
            format!("`{url}` is not a URL"),
            "fix the URL in the config",
        );
    };
    let (host, port) = host_port(&u);
    match resolve_and_connect(&host, port, timeout).await {
        Ok(addr) => pass(what, format!("{host}:{port} reachable at {addr}")),
        Err(e) => fail(
            what,
            format!("{host}:{port}: {e}"),
            "check DNS, routes and firewalls between this gateway and it",
        ),
    }
}

/// The host (without IPv6 brackets) and port to connect to for a URL.
fn host_port(u: &Uri) -> (String, u16) {
    let host = u
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    (host, crate::fetch::upstream::port_of(u))
}

async fn resolve_and_connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| "DNS lookup timed out".to_string())?
            .map_err(|e| format!("DNS lookup failed: {e}"))?
            .collect();
    let mut last = "DNS returned no address".to_string();
    for a in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => return Ok(a),
            Ok(Err(e)) => last = format!("TCP connect to {a} failed: {e}"),
            Err(_) => last = format!("TCP connect to {a} timed out"),
        }
    }
    Err(last)
}

async fn parent_checks(cfg: &Config, parent: &str, timeout: Duration) -> Vec<Check> {
    let what = format!("parent {parent}");
    let Ok(u) = parent.parse::<Uri>() else {
        return vec![fail(&what, "not a URL", "fix upstream.parents")];
    };
    let (host, port) = host_port(&u);
    let addr = match resolve_and_connect(&host, port, timeout).await {
        Ok(a) => a,
        Err(e) => {
            return vec![fail(
                &what,
                e,
                "check that the parent gateway runs and that this network reaches it",
            )]
        }
    };
    let mut out = vec![pass(&what, format!("DNS and TCP ok ({addr})"))];
    if u.scheme_str() == Some("https") {
        out.push(tls_check(cfg, &what, &host, addr, timeout).await);
    }
    out.push(http_check(cfg, &what, &u, timeout).await);
    out
}

async fn tls_check(
    cfg: &Config,
    what: &str,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Check {
    let u = &cfg.upstream;
    let tls = match connect::tls_config(trust(u)) {
        Ok(t) => t,
        Err(e) => return fail(what, e, "fix upstream.ca_file / client_cert / client_key"),
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_string()) else {
        return fail(
            what,
            format!("`{host}` is not a valid TLS name"),
            "use the parent's DNS name or IP",
        );
    };
    let connector = connect::stream_connector(tls);
    let hs = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, hs).await {
        Err(_) => fail(what, "TLS handshake timed out", "check that the parent serves TLS on this port"),
        Ok(Err(e)) => fail(
            what,
            format!("TLS handshake failed: {e}"),
            "trust the parent's CA with upstream.ca_file (the IoT Edge root CA), and check the name it is reached by",
        ),
        Ok(Ok(stream)) => {
            let (_, conn) = stream.get_ref();
            let detail = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| describe_cert(c.as_ref()))
                .unwrap_or_else(|| "certificate accepted".into());
            pass(&format!("{what} TLS"), detail)
        }
    }
}

/// The certificate's names and expiry, for the engineer reading the report.
fn describe_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            names.push(n.to_string());
        }
    }
    if names.is_empty() {
        names.push(cert.subject().to_string());
    }
    let left = cert.validity().time_to_expiration().map(|d| d.whole_days());
    let expiry = match left {
        Some(days) => format!("expires {} (in {days} days)", cert.validity().not_after),
        None => format!("EXPIRED {}", cert.validity().not_after),
    };
    Some(format!(
        "chain trusted; names {}; {expiry}",
        names.join(", ")
    ))
}

async fn http_check(cfg: &Config, what: &str, parent: &Uri, timeout: Duration) -> Check {
    let u = &cfg.upstream;
    let tls = match connect::tls_config(trust(u)) {
        Ok(t) => t,
        Err(e) => return fail(what, e, "fix the TLS settings"),
    };
    let client = connect::simple_client(tls, Some(timeout));
    let Ok(url) = Uri::builder()
        .scheme(parent.scheme_str().unwrap_or("http"))
        .authority(parent.authority().map(|a| a.as_str()).unwrap_or(""))
        .path_and_query("/healthz")
        .build()
    else {
        return fail(
            what,
            "cannot build its /healthz URL",
            "fix upstream.parents",
        );
    };
    let req = match http::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new())) {
        Ok(r) => r,
        Err(e) => return fail(what, e.to_string(), "fix upstream.parents"),
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => {
            pass(&format!("{what} HTTP"), "a cistern answers /healthz")
        }
        Ok(Ok(r)) => fail(
            &format!("{what} HTTP"),
            format!("/healthz answered {}", r.status()),
            "check that the parent runs cistern on this port",
        ),
        Ok(Err(e)) => fail(
            &format!("{what} HTTP"),
            e.to_string(),
            "check the parent's address and scheme",
        ),
        Err(_) => fail(
            &format!("{what} HTTP"),
            "no answer",
            "check that the parent runs cistern",
        ),
    }
}

async fn listener_check(listen: &str, timeout: Duration) -> Check {
    if listen.is_empty() {
        return pass("listener", "server.listen is off");
    }
    match tokio::net::TcpListener::bind(listen).await {
        Ok(_) => pass("listener", format!("{listen} can be bound")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let port = listen.rsplit(':').next().unwrap_or("8080");
            let probe = format!("127.0.0.1:{port}");
            let answered = async {
                let mut s = tokio::net::TcpStream::connect(&probe).await.ok()?;
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: doctor\r\nConnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.ok()?;
                String::from_utf8_lossy(&buf)
                    .starts_with("HTTP/1.1 200")
                    .then_some(())
            };
            match tokio::time::timeout(timeout, answered).await {
                Ok(Some(())) => pass(
                    "listener",
                    format!("{listen} is bound by a running cistern"),
                ),
                _ => fail(
                    "listener",
                    format!("{listen} is in use by another program"),
                    "stop it or change server.listen",
                ),
            }
        }
        Err(e) => fail(
            "listener",
            format!("cannot bind {listen}: {e}"),
            "run with the right permissions or change server.listen",
        ),
    }
}

/// The upstream trust the gateway itself uses.
fn trust(u: &Upstream) -> connect::Trust<'_> {
    connect::Trust {
        ca_file: u.ca_file.as_deref(),
        client_cert: u.client_cert.as_deref(),
        client_key: u.client_key.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_admin_token_on_a_node_listening_beyond_loopback_is_a_warning() {
        let mut cfg = Config::default();
        let verdict = |cfg: &Config| admin_check(cfg).verdict;
        cfg.server.listen = "0.0.0.0:8080".into();
        assert_eq!(verdict(&cfg), Verdict::Warn);
        cfg.server.listen = "127.0.0.1:8080".into();
        assert_eq!(verdict(&cfg), Verdict::Ok);
        cfg.server.tls_listen = "[::]:8443".into();
        assert_eq!(verdict(&cfg), Verdict::Warn);
        assert!(admin_check(&cfg).to_string().starts_with("WARN  admin: "));
        cfg.server.tls_listen = "[::1]:8443".into();
        assert_eq!(verdict(&cfg), Verdict::Ok);
        cfg.server.listen = "localhost:8080".into();
        assert_eq!(verdict(&cfg), Verdict::Ok);
        cfg.server.listen = "10.1.2.3:8080".into();
        assert_eq!(verdict(&cfg), Verdict::Warn);
        cfg.server.admin_token = "s3cret".into();
        assert_eq!(verdict(&cfg), Verdict::Ok);
    }
}
