//! Cache keys of URLs (SPEC 3): host (lower-case, no trailing dot), port unless the scheme's default,
//! path, and query without the SAS parameters when it holds `sig`, so that one payload behind different
//! SAS tokens is one object. The scheme is not part of the key.
//!
//! When the SAS parameters are stripped, the parameters left are also put in order (by name; repeats
//! of one name keep their order, and empty ones are dropped): a SAS URL is minted per client, and the
//! same blob asked with its parameters in another order must be one object. A query without `sig` is
//! kept exactly as sent, since the order of its parameters may mean something to its origin.

use http::uri::Scheme;
use http::Uri;

use http::HeaderMap;

use super::freshness;
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
        let query = key_query(q, strip);
        if !query.is_empty() {
            key.push('?');
            key.push_str(&query);
        }
    }
    key
}

/// The query as it counts in a key: as sent, or, when it holds a SAS token (`sig`), without the
/// `strip` parameters and the rest in order of name.
fn key_query(q: &str, strip: &[String]) -> String {
    if !q.split('&').any(|p| param_name(p) == "sig") {
        return q.to_string();
    }
    let mut kept: Vec<&str> = q
        .split('&')
        .filter(|p| !p.is_empty() && !strip.iter().any(|s| s == param_name(p)))
        .collect();
    // Stable: repeats of one name keep their relative order.
    kept.sort_by_key(|p| param_name(p));
    kept.join("&")
}

/// The index key of one variant of a key's response (RFC 9111 §4.1): the key and the request fields the
/// response varies on, with their values.
pub fn variant_key(key: &str, vary: &[(String, Option<String>)]) -> String {
    let mut k = key.to_string();
    for (n, v) in vary {
        k.push('\u{1f}');
        k.push_str(n);
        if let Some(v) = v {
            k.push('=');
            k.push_str(v);
        }
    }
    k
}

/// The request's values for the fields a stored response varies on.
pub(crate) fn vary_for(
    stored: &[(String, Option<String>)],
    req: &HeaderMap,
) -> Vec<(String, Option<String>)> {
    let names: Vec<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    let mut fake = HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&names.join(", ")) {
        fake.insert(http::header::VARY, v);
    }
    freshness::vary_of(&fake, req).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(url: &str) -> String {
        let strip = crate::config::Upstream::default().strip_query;
        cache_key(&url.parse().unwrap(), &strip)
    }

    #[test]
    fn sas_keys_do_not_depend_on_the_order_of_the_parameters() {
        let a = key("http://x.blob.core.windows.net/c/fw.bin?b=2&sv=1&a=1&sig=S1&se=9");
        let b = key("http://x.blob.core.windows.net/c/fw.bin?sig=S2&a=1&se=8&b=2&sv=3");
        assert_eq!(a, "x.blob.core.windows.net/c/fw.bin?a=1&b=2");
        assert_eq!(a, b);
        // Repeats of one name keep their order; empty parameters are dropped.
        assert_eq!(key("http://h/p?x=2&&a=0&x=1&sig=S"), "h/p?a=0&x=2&x=1");
    }

    #[test]
    fn a_query_without_a_sas_token_is_kept_as_sent() {
        assert_eq!(key("http://h/p?b=2&a=1&se=1"), "h/p?b=2&a=1&se=1");
        assert_eq!(key("http://h/p?sig=S&sv=1"), "h/p");
    }
}
