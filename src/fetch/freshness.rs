//! RFC 9111 freshness of a response: whether it may be stored (§3), and its freshness lifetime (§4.2.1,
//! heuristic §4.2.2), turned into the `KeyMeta` the store keeps per key.

use std::time::SystemTime;

use http::HeaderMap;

use crate::store::{now_ms, KeyMeta};

/// Heuristic freshness is 10% of the time since Last-Modified (RFC 9111 §4.2.2), at most this.
const HEURISTIC_CAP_SECS: u64 = 24 * 3600;

fn directives(h: &HeaderMap) -> Vec<(String, Option<String>)> {
    h.get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            let d = d.trim();
            match d.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_string()),
                ),
                None => (d.to_ascii_lowercase(), None),
            }
        })
        .collect()
}

/// `no-store` or `private` responses are passed through, not stored (SPEC 4).
pub fn storable(h: &HeaderMap) -> bool {
    !directives(h)
        .iter()
        .any(|(k, _)| k == "no-store" || k == "private")
}

/// Whether a request asks the cache to revalidate (`no-cache`, `max-age=0`), as apt does.
pub fn request_wants_revalidation(h: &HeaderMap) -> bool {
    directives(h)
        .iter()
        .any(|(k, v)| k == "no-cache" || (k == "max-age" && v.as_deref() == Some("0")))
        || h.get(http::header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("no-cache"))
}

fn date(h: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(h.get(name)?.to_str().ok()?).ok()
}

/// The freshness lifetime in seconds of a response, from its headers.
pub fn lifetime(h: &HeaderMap) -> u64 {
    let ds = directives(h);
    if ds.iter().any(|(k, _)| k == "no-cache") {
        return 0;
    }
    for wanted in ["s-maxage", "max-age"] {
        if let Some((_, Some(v))) = ds.iter().find(|(k, _)| k == wanted) {
            return v.parse().unwrap_or(0);
        }
    }
    let served = date(h, http::header::DATE).unwrap_or_else(SystemTime::now);
    if h.contains_key(http::header::EXPIRES) {
        // An invalid Expires means "already expired" (RFC 9111 §5.3).
        return date(h, http::header::EXPIRES)
            .and_then(|e| e.duration_since(served).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
    }
    if let Some(lm) = date(h, http::header::LAST_MODIFIED) {
        if let Ok(age) = served.duration_since(lm) {
            return (age.as_secs() / 10).min(HEURISTIC_CAP_SECS);
        }
    }
    0
}

/// The key metadata for a response: validators and, unless the mapping is immutable, its lifetime.
pub fn key_meta(h: &HeaderMap, immutable: bool) -> KeyMeta {
    let s =
        |n: http::header::HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    KeyMeta {
        fetched_at: now_ms(),
        fresh_for: if immutable { None } else { Some(lifetime(h)) },
        etag: s(http::header::ETAG),
        last_modified: s(http::header::LAST_MODIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn lifetimes() {
        assert_eq!(
            lifetime(&h(&[("cache-control", "public, max-age=300")])),
            300
        );
        assert_eq!(
            lifetime(&h(&[("cache-control", "max-age=300, s-maxage=60")])),
            60
        );
        assert_eq!(
            lifetime(&h(&[("cache-control", "no-cache, max-age=300")])),
            0
        );
        assert_eq!(
            lifetime(&h(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:59:37 GMT")
            ])),
            600
        );
        assert_eq!(lifetime(&h(&[("expires", "0")])), 0);
        assert_eq!(
            lifetime(&h(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("last-modified", "Sun, 06 Nov 1994 07:49:37 GMT")
            ])),
            360
        );
        assert_eq!(lifetime(&HeaderMap::new()), 0);
    }

    #[test]
    fn storability_and_requests() {
        assert!(!storable(&h(&[("cache-control", "private")])));
        assert!(!storable(&h(&[("cache-control", "no-store")])));
        assert!(storable(&h(&[("cache-control", "max-age=5")])));
        assert!(request_wants_revalidation(&h(&[(
            "cache-control",
            "max-age=0"
        )])));
        assert!(request_wants_revalidation(&h(&[("pragma", "no-cache")])));
        assert!(!request_wants_revalidation(&h(&[(
            "cache-control",
            "max-age=60"
        )])));
    }
}
