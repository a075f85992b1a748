//! What a request inside an intercepted CONNECT tunnel stands for (SPEC 3, "HTTPS payloads"): the
//! forward-proxy request for `https://<tunnel host><path>`, and no other host. The listener tags each
//! request of a tunnel with `Inside`; `intercept.rs` opens the tunnels.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri};
use hyper::body::Incoming;

use super::error::ApiError;
use crate::fetch::policy::normalise_host;

/// The host a tunnel was opened to: lower-case, no trailing dot, no brackets around an IPv6 literal
/// (as SNI and certificates name it).
pub fn tunnel_host(host: &str) -> String {
    normalise_host(host.trim_matches(['[', ']']))
}

/// Put in each request of an intercepted tunnel: the host it was opened to.
#[derive(Clone, Debug)]
pub struct Inside(Arc<String>);

impl Inside {
    /// A tunnel opened to `host` (as `tunnel_host` writes it).
    pub fn to(host: String) -> Inside {
        Inside(Arc::new(host))
    }
}

impl Inside {
    /// Makes a request inside the tunnel the forward-proxy request for `https://<host><path>`. The
    /// tunnel's host is the only one it can reach: an absolute-form target must name it, and a
    /// CONNECT inside is refused.
    pub fn rewrite(&self, req: &mut Request<Incoming>) -> Result<(), ApiError> {
        *req.uri_mut() = inner_uri(req.method(), req.uri(), &self.0)?;
        Ok(())
    }
}

/// The URL a request inside a tunnel to `host` stands for.
pub fn inner_uri(method: &Method, uri: &Uri, host: &str) -> Result<Uri, ApiError> {
    let bad = |d: &str| ApiError::bad_request("bad-url", d.to_string());
    if method == Method::CONNECT {
        return Err(bad("CONNECT inside an intercepted tunnel"));
    }
    if let Some(a) = uri.authority() {
        let port_ok = a.port_u16().is_none_or(|p| p == 443);
        if tunnel_host(a.host()) != host || !port_ok || uri.scheme() != Some(&Scheme::HTTPS) {
            return Err(bad(
                "a request inside a tunnel must be for the tunnel's host",
            ));
        }
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !pq.as_str().starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    let authority: Authority = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]").parse(),
        Err(_) => host.parse(),
    }
    .map_err(|_| bad("the tunnel's host cannot be a URL's"))?;
    Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| bad("the request target cannot be forwarded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_inside_name_the_tunnel_host_only() {
        let get = Method::GET;
        let u = |s: &str| s.parse::<Uri>().unwrap();
        let ok = inner_uri(&get, &u("/fw.bin?sig=S"), "origin.test").unwrap();
        assert_eq!(ok.to_string(), "https://origin.test/fw.bin?sig=S");
        let ok = inner_uri(&get, &u("https://Origin.Test:443/a"), "origin.test").unwrap();
        assert_eq!(ok.to_string(), "https://origin.test/a");
        assert_eq!(
            inner_uri(&get, &u("/a"), "::1").unwrap().to_string(),
            "https://[::1]/a"
        );
        for bad in [
            "https://other.test/a",
            "http://origin.test/a",
            "https://origin.test:8443/a",
        ] {
            assert!(inner_uri(&get, &u(bad), "origin.test").is_err(), "{bad}");
        }
        assert!(inner_uri(&Method::CONNECT, &u("origin.test:443"), "origin.test").is_err());
        assert!(inner_uri(&get, &u("*"), "origin.test").is_err());
    }
}
