//! Admin authentication (SPEC 6). With a token: `Authorization: Bearer <token>` (the scheme name in any
//! case), compared in constant time; else 401 with `WWW-Authenticate: Bearer`. Without a token, only a
//! request that no web page open in a browser on the gateway could make: from a loopback client, naming
//! a loopback `Host` (a DNS-rebinding page names its own host), with no `Origin` but a loopback one (a
//! cross-site request carries its page's), and, when it changes state, a `Content-Type` that a page
//! cannot send without a CORS preflight, which cistern never answers: `application/json`, and for the
//! sideload (raw object bytes) `application/octet-stream` too. Refusals are 403 naming what is wrong.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

use super::ApiError;

/// Whether `req` may use the admin API (`token`: the configured one); the refusal otherwise.
pub fn authorize<B>(
    token: Option<&str>,
    req: &Request<B>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    match token {
        Some(token) => bearer(token, req.headers()),
        None => loopback_only(req, peer),
    }
}

fn bearer(token: &str, h: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let given = h
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong admin token",
    ))
}

/// Adds `WWW-Authenticate: Bearer` to a 401.
pub fn challenge(mut r: http::Response<super::Body>) -> http::Response<super::Body> {
    if r.status() == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    r
}

const SET_A_TOKEN: &str = "or set server.admin_token";

fn refuse(code: &'static str, detail: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, detail)
}

fn loopback_only<B>(req: &Request<B>, peer: SocketAddr) -> Result<(), ApiError> {
    if !canonical(peer.ip()).is_loopback() {
        return Err(refuse(
            "admin-loopback-only",
            "no admin token is configured: the admin API answers loopback clients only".into(),
        ));
    }
    let h = req.headers();
    let hosts: Vec<&str> = h
        .get_all(http::header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .chain(req.uri().authority().map(|a| a.as_str()))
        .collect();
    if hosts.is_empty() || !hosts.iter().all(|v| loopback_authority(v)) {
        return Err(refuse(
            "admin-host-not-loopback",
            format!(
                "no admin token is configured: the request must name a loopback Host (localhost, \
                 127.0.0.1 or [::1]), not `{}`; {SET_A_TOKEN}",
                shown(hosts.first().copied().unwrap_or(""))
            ),
        ));
    }
    for v in h.get_all(http::header::ORIGIN) {
        let v = v.to_str().unwrap_or("");
        if !loopback_origin(v) {
            return Err(refuse(
                "admin-origin-not-loopback",
                format!(
                    "no admin token is configured: a request from the web page of `{}` is refused; \
                     {SET_A_TOKEN}",
                    shown(v)
                ),
            ));
        }
    }
    content_type(req.method(), req.uri().path(), h)
}

/// State-changing requests need a content type that no page can send cross-site without a preflight.
fn content_type(method: &Method, path: &str, h: &HeaderMap) -> Result<(), ApiError> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    let sideload = method == Method::PUT && path.starts_with("/v1/admin/content/sha256/");
    let mut types = h.get_all(http::header::CONTENT_TYPE).iter();
    let media = match (types.next(), types.next()) {
        (Some(v), None) => v.to_str().ok().map(media_type),
        _ => None,
    };
    let ok = match media.as_deref() {
        Some("application/json") => true,
        Some("application/octet-stream") => sideload,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = if sideload {
        "application/octet-stream (or application/json)"
    } else {
        "application/json"
    };
    Err(refuse(
        "admin-content-type",
        format!(
            "no admin token is configured: {method} needs Content-Type: {want}, which a web page \
             cannot send without asking first; {SET_A_TOKEN}"
        ),
    ))
}

/// The media type of a Content-Type value, lower-cased, without its parameters.
fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A header value as it may be quoted in an answer: printable ASCII, at most 100 characters.
fn shown(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect()
}

/// `Origin: http(s)://<loopback host>[:port]`. `null` (a sandboxed or file page) is not loopback.
fn loopback_origin(v: &str) -> bool {
    let lower = v.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    rest.is_some_and(loopback_authority)
}

/// `host[:port]` naming this machine's loopback: `localhost`, `127.0.0.0/8` or `[::1]`, in any case,
/// with or without a trailing dot. Not `*.localhost`: no client of cistern needs it.
fn loopback_authority(v: &str) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, after)) => (inside, after),
            None => return false,
        }
    } else {
        match v.find(':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, ""),
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    if !port_ok {
        return false;
    }
    if v.starts_with('[') {
        return host
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|a| canonical(IpAddr::V6(a)).is_loopback());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(method: &str, path: &str, headers: &[(&str, &str)]) -> Result<(), &'static str> {
        let mut r = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        authorize(None, &r.body(()).unwrap(), peer).map_err(|e| e.code)
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "localhost.:80",
            "127.0.0.1",
            "127.1.2.3:8080",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(loopback_authority(h), "{h}");
        }
        for h in [
            "",
            "rebind.evil.example",
            "rebind.evil.example:8080",
            "localhost.evil.example",
            "evil.localhost",
            "localhost:",
            "localhost:80:80",
            "localhost:8o",
            "127.0.0.1.evil.example",
            "10.0.0.1:8080",
            "0.0.0.0",
            "[::]",
            "[::1",
            "[::1]x",
            "::1",
        ] {
            assert!(!loopback_authority(h), "{h}");
        }
    }

    #[test]
    fn loopback_origins() {
        for o in [
            "http://localhost:3000",
            "https://localhost",
            "http://127.0.0.1:8080",
            "HTTP://[::1]:8080",
        ] {
            assert!(loopback_origin(o), "{o}");
        }
        for o in [
            "null",
            "http://evil.example",
            "http://localhost/",
            "http://localhost.evil.example",
            "file://",
            "ftp://localhost",
            "",
        ] {
            assert!(!loopback_origin(o), "{o}");
        }
    }

    #[test]
    fn what_a_web_page_can_send_is_refused() {
        let json = ("content-type", "application/json; charset=utf-8");
        let host = ("host", "127.0.0.1:8080");
        assert_eq!(ask("GET", "/v1/admin/content", &[host]), Ok(()));
        assert_eq!(
            ask(
                "GET",
                "/v1/admin/content",
                &[("host", "rebind.evil.example")]
            ),
            Err("admin-host-not-loopback")
        );
        assert_eq!(
            ask("GET", "/v1/admin/content", &[]),
            Err("admin-host-not-loopback")
        );
        let evil = ("origin", "http://evil.example");
        assert_eq!(
            ask("POST", "/v1/admin/prefetch", &[host, evil, json]),
            Err("admin-origin-not-loopback")
        );
        assert_eq!(
            ask(
                "POST",
                "/v1/admin/prefetch",
                &[host, ("origin", "null"), json]
            ),
            Err("admin-origin-not-loopback")
        );
        let local = ("origin", "http://localhost:8080");
        assert_eq!(
            ask("POST", "/v1/admin/prefetch", &[host, local, json]),
            Ok(())
        );
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
        ] {
            assert_eq!(
                ask("POST", "/v1/admin/prefetch", &[host, ("content-type", ct)]),
                Err("admin-content-type"),
                "{ct}"
            );
        }
        assert_eq!(
            ask("POST", "/v1/admin/relay/retry", &[host]),
            Err("admin-content-type")
        );
        assert_eq!(ask("DELETE", "/v1/admin/pins/00", &[host, json]), Ok(()));
        let sideload = format!("/v1/admin/content/sha256/{}", "0".repeat(64));
        let octets = ("content-type", "application/octet-stream");
        assert_eq!(ask("PUT", &sideload, &[host, octets]), Ok(()));
        assert_eq!(ask("PUT", &sideload, &[host, json]), Ok(()));
        assert_eq!(
            ask("PUT", &sideload, &[host, ("content-type", "text/plain")]),
            Err("admin-content-type")
        );
    }

    #[test]
    fn a_token_is_a_bearer_token_in_any_case_and_nothing_else() {
        let mut h = HeaderMap::new();
        assert!(bearer("s3cret", &h).is_err());
        for (v, ok) in [
            ("Bearer s3cret", true),
            ("bearer s3cret", true),
            ("BEARER s3cret", true),
            ("Bearer wrong", false),
            ("Basic s3cret", false),
            ("Bearer", false),
        ] {
            h.insert(http::header::AUTHORIZATION, HeaderValue::from_static(v));
            assert_eq!(bearer("s3cret", &h).is_ok(), ok, "{v}");
        }
    }
}
