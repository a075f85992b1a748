//! Cache keys of URLs (SPEC 3): host (lower-case, no trailing dot), port unless the scheme's default,
//! path, and query without the SAS parameters when it holds `sig`, so that one payload behind different
//! SAS tokens is one object. The scheme is not part of the key.

use http::uri::Scheme;
use http::Uri;

use super::policy::normalise_host;

/// The name of one `name=value` query parameter.
pub fn param_name(p: &str) -> &str {
    p.split_once('=').map(|(k, _)| k).unwrap_or(p)
}

/// The cache key of `url`.
pub fn cache_key(url: &Uri, strip: &[String]) -> String {
    let host = normalise_host(url.host().unwrap_or_default());
    let default = if url.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let mut key = host;
    if let Some(p) = url.port_u16().filter(|p| *p != default) {
        key.push(':');
        key.push_str(&p.to_string());
    }
    key.push_str(url.path());
    if let Some(q) = url.query() {
        let has_sig = q.split('&').any(|p| param_name(p) == "sig");
        let kept: Vec<&str> = q
            .split('&')
            .filter(|p| !(has_sig && strip.iter().any(|s| s == param_name(p))))
            .collect();
        if !kept.is_empty() {
            key.push('?');
            key.push_str(&kept.join("&"));
        }
    }
    key
}
