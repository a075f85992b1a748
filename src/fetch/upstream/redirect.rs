//! Redirects (SPEC 2): cistern follows an origin's redirects itself; where a `Location` points, and
//! which request fields do not follow it.

use http::{StatusCode, Uri};

/// Request fields that carry credentials: dropped when a redirect leaves the origin (as browsers and
/// curl do).
pub(super) const CREDENTIALS: [http::header::HeaderName; 2] =
    [http::header::AUTHORIZATION, http::header::COOKIE];

/// Scheme, host and port: what RFC 6454 calls the origin.
pub(super) fn origin_of(u: &Uri) -> (Option<&str>, Option<&str>, Option<u16>) {
    let port = u.port_u16().or(match u.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    (u.scheme_str(), u.host(), port)
}

pub(super) fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// A redirect target: an absolute URL, or a path on the same origin. Built from parsed parts.
pub fn resolve_location(base: &Uri, loc: &str) -> Option<Uri> {
    if let Ok(u) = loc.parse::<Uri>() {
        if u.scheme().is_some() {
            return matches!(u.scheme_str(), Some("http" | "https"))
                .then_some(u)
                .filter(|u| u.host().is_some());
        }
    }
    if loc.starts_with("//") {
        return format!("{}:{loc}", base.scheme_str()?).parse().ok();
    }
    let path = if loc.starts_with('/') {
        loc.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{loc}")
    };
    on_origin_of(base, path)
}

/// `path_and_query` on the origin (scheme and authority) of `base`; None when `base` has none or
/// the path is not one a URL can carry.
pub fn on_origin_of(base: &Uri, path_and_query: String) -> Option<Uri> {
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(path_and_query)
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets() {
        let base: Uri = "http://a.example/x/y/file?sig=1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "http://b.example/z")
                .unwrap()
                .to_string(),
            "http://b.example/z"
        );
        assert_eq!(
            resolve_location(&base, "/abs?q=1").unwrap().to_string(),
            "http://a.example/abs?q=1"
        );
        assert_eq!(
            resolve_location(&base, "rel").unwrap().to_string(),
            "http://a.example/x/y/rel"
        );
        assert_eq!(
            resolve_location(&base, "//c.example/p")
                .unwrap()
                .to_string(),
            "http://c.example/p"
        );
        assert!(resolve_location(&base, "ftp://x/y").is_none());
    }
}
