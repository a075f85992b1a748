//! Which of the SPEC 3 forms a request is, parsed strictly, and the upstream URL and cache key it maps to.
//! Every upstream URL is built from parsed parts, never by pasting strings or by URL resolution.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri};
use percent_encoding::percent_decode_str;

use super::error::ApiError;
use crate::config::Origin;
use crate::fetch::key::{cache_key, param_name};
use crate::fetch::policy::split_host_port;
use crate::store::Digest;

/// The request form, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormKind {
    ForwardProxy,
    CacheHost,
    Named,
    Content,
    /// The container registry API under `/v2/` (SPEC 9).
    Registry,
}

impl FormKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FormKind::ForwardProxy => "forward-proxy",
            FormKind::CacheHost => "cache-host",
            FormKind::Named => "named-origin",
            FormKind::Content => "content",
            FormKind::Registry => "registry",
        }
    }
}

pub enum Route {
    Connect {
        authority: Authority,
    },
    /// A URL form: the origin URL, its cache key and whether its mapping never goes stale.
    Url {
        kind: FormKind,
        url: Uri,
        key: String,
        immutable: bool,
    },
    Content {
        digest: Digest,
    },
    /// The container registry API (`/v2/` and below), parsed by `server::registry`.
    Registry,
    /// cistern's own endpoints (`/v1/...`, `/healthz`, ...).
    Own,
}

pub struct Router<'a> {
    pub origins: &'a [Origin],
    pub origin_scheme: &'a str,
    pub strip_query: &'a [String],
}

impl Router<'_> {
    pub fn route(&self, method: &Method, uri: &Uri) -> Result<Route, ApiError> {
        if method == Method::CONNECT {
            let a = uri
                .authority()
                .cloned()
                .ok_or_else(|| ApiError::bad_request("bad-connect", "CONNECT needs host:port"))?;
            return Ok(Route::Connect { authority: a });
        }
        if uri.scheme().is_some() {
            let url = absolute(uri)?;
            let key = cache_key(&url, self.strip_query);
            return Ok(Route::Url {
                kind: FormKind::ForwardProxy,
                url,
                key,
                immutable: false,
            });
        }
        let path = uri.path();
        let query = uri.query();
        if let Some(q) = query {
            if q.split('&').any(|p| param_name(p) == "cacheHostOrigin") {
                let url = self.cache_host(path, q)?;
                let key = cache_key(&url, self.strip_query);
                return Ok(Route::Url {
                    kind: FormKind::CacheHost,
                    url,
                    key,
                    immutable: false,
                });
            }
        }
        if let Some(hex) = path.strip_prefix("/v1/content/sha256/") {
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            {
                if let Ok(digest) = hex.parse() {
                    return Ok(Route::Content { digest });
                }
            }
        }
        if let Some(rest) = path.strip_prefix("/o/") {
            let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
            let origin = self
                .origins
                .iter()
                .find(|o| o.name == name)
                .ok_or_else(|| ApiError::not_found(format!("no named origin `{name}`")))?;
            let url = named(origin, tail, query)?;
            let key = cache_key(&url, self.strip_query);
            return Ok(Route::Url {
                kind: FormKind::Named,
                url,
                key,
                immutable: origin.immutable,
            });
        }
        if path == "/v2" || path.starts_with("/v2/") {
            return Ok(Route::Registry);
        }
        Ok(Route::Own)
    }

    /// `/<path>?<query>&cacheHostOrigin=<host>` -> `<origin_scheme>://<host>/<path>?<query>`.
    fn cache_host(&self, path: &str, query: &str) -> Result<Uri, ApiError> {
        let bad = |d: &str| ApiError::bad_request("bad-cache-host-origin", d.to_string());
        let mut host = None;
        let mut rest: Vec<&str> = Vec::new();
        for p in query.split('&') {
            if param_name(p) == "cacheHostOrigin" {
                if host.is_some() {
                    return Err(bad("cacheHostOrigin occurs more than once"));
                }
                let raw = p.split_once('=').map(|(_, v)| v).unwrap_or("");
                let v = percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| bad("cacheHostOrigin is not valid UTF-8"))?
                    .to_string();
                host = Some(v);
            } else {
                rest.push(p);
            }
        }
        let host = host.unwrap_or_default();
        if host.is_empty()
            || host
                .chars()
                .any(|c| matches!(c, '@' | '/' | '#' | '?' | ' ' | '\\') || c.is_control())
        {
            return Err(bad("cacheHostOrigin must be host or host:port"));
        }
        let (h, port) = split_host_port(&host)
            .ok_or_else(|| bad("cacheHostOrigin must be host or host:port"))?;
        if h.is_empty() {
            return Err(bad("cacheHostOrigin must be host or host:port"));
        }
        let authority: Authority = host
            .parse()
            .map_err(|_| bad("cacheHostOrigin must be host or host:port"))?;
        // The URL names what the authority's own parse reads: it must be the host and port checked.
        if authority.host().trim_matches(['[', ']']) != h || authority.port_u16() != port {
            return Err(bad("cacheHostOrigin must be host or host:port"));
        }
        let pq = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        let scheme: Scheme = self
            .origin_scheme
            .parse()
            .map_err(|_| bad("bad origin_scheme"))?;
        build(scheme, authority, &pq).map_err(|_| bad("the request path cannot be forwarded"))
    }
}

fn build(scheme: Scheme, authority: Authority, pq: &str) -> Result<Uri, http::Error> {
    let pq: PathAndQuery = pq.parse()?;
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
}

/// The absolute-form target of a forward-proxy request; only http and https are forwarded.
fn absolute(uri: &Uri) -> Result<Uri, ApiError> {
    let bad = || ApiError::bad_request("bad-url", "the request URL must be http://host/path");
    let scheme = uri.scheme().cloned().ok_or_else(bad)?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(bad());
    }
    let authority = uri.authority().cloned().ok_or_else(bad)?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad());
    }
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    build(scheme, authority, pq).map_err(|_| bad())
}

/// `/o/<name>/<tail>` -> `<url>/<tail>`, `.` segments removed, `..`/empty/NUL segments and `/` or `\`
/// inside one (`%2F`, `%5C`: an origin may read them as separators) refused (SPEC 3).
fn named(origin: &Origin, tail: &str, query: Option<&str>) -> Result<Uri, ApiError> {
    let bad = |d: &str| ApiError::bad_request("bad-path", d.to_string());
    let mut segs = Vec::new();
    for seg in tail.split('/') {
        let dec = percent_decode_str(seg).collect::<Vec<u8>>();
        if dec == b"." {
            continue;
        }
        if dec.is_empty() || dec == b".." || dec.contains(&0) {
            return Err(bad("the path has an empty, `..` or NUL segment"));
        }
        if dec.contains(&b'/') || dec.contains(&b'\\') {
            return Err(bad(
                "a path segment holds an encoded `/` or `\\` (%2F, %5C)",
            ));
        }
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err(bad("the path names no file"));
    }
    let base: Uri = origin
        .url
        .parse()
        .map_err(|_| bad("the origin URL does not parse"))?;
    let base_path = base.path().trim_end_matches('/');
    let mut pq = format!("{base_path}/{}", segs.join("/"));
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let scheme = base
        .scheme()
        .cloned()
        .ok_or_else(|| bad("the origin URL has no scheme"))?;
    let authority = base
        .authority()
        .cloned()
        .ok_or_else(|| bad("the origin URL has no host"))?;
    build(scheme, authority, &pq).map_err(|_| bad("the path cannot be forwarded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(origins: &[Origin]) -> Router<'_> {
        static STRIP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let strip = STRIP.get_or_init(|| crate::config::Upstream::default().strip_query);
        Router {
            origins,
            origin_scheme: "http",
            strip_query: strip,
        }
    }

    fn url_of(r: Result<Route, ApiError>) -> (String, String) {
        match r {
            Ok(Route::Url { url, key, .. }) => (url.to_string(), key),
            Ok(_) => panic!("not a URL form"),
            Err(e) => panic!("{}: {}", e.code, e.detail),
        }
    }

    #[test]
    fn cache_host_form() {
        let r = router(&[]);
        let u: Uri = "/filestreamingservice/files/abc?P1=x&cacheHostOrigin=dl.delivery.mp.microsoft.com&P2=y"
            .parse()
            .unwrap();
        let (url, key) = url_of(r.route(&Method::GET, &u));
        assert_eq!(
            url,
            "http://dl.delivery.mp.microsoft.com/filestreamingservice/files/abc?P1=x&P2=y"
        );
        assert_eq!(
            key,
            "dl.delivery.mp.microsoft.com/filestreamingservice/files/abc?P1=x&P2=y"
        );
        let u: Uri = "/f?cacheHostOrigin=h.example%3A8081".parse().unwrap();
        assert_eq!(
            url_of(r.route(&Method::GET, &u)).0,
            "http://h.example:8081/f"
        );
        for bad in [
            "/f?cacheHostOrigin=a.example&cacheHostOrigin=b.example",
            "/f?cacheHostOrigin=user%40evil.example",
            "/f?cacheHostOrigin=evil.example%2Fx",
            "/f?cacheHostOrigin=",
            "/f?cacheHostOrigin=a%20b",
            // Regression (fuzz target route): our split saw host `:[:F]` and port 801, the URL's
            // own parse an empty host, and the URL went out with no host.
            "/f?cacheHostOrigin=:[:F]:801",
            "/f?cacheHostOrigin=%3A%5B%3A1%5D%3A80",
        ] {
            let u: Uri = bad.parse().unwrap();
            match r.route(&Method::GET, &u) {
                Err(e) => assert_eq!(e.code, "bad-cache-host-origin", "{bad}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
    }

    #[test]
    fn sas_tokens_leave_the_key() {
        let u: Uri = "http://x.blob.core.windows.net/c/fw.bin?sv=2020&se=1&sig=SECRET&foo=1"
            .parse()
            .unwrap();
        let strip = crate::config::Upstream::default().strip_query;
        assert_eq!(
            cache_key(&u, &strip),
            "x.blob.core.windows.net/c/fw.bin?foo=1"
        );
        let u: Uri = "http://X.Example.:8080/a?se=1".parse().unwrap();
        assert_eq!(cache_key(&u, &strip), "x.example:8080/a?se=1");
        let u: Uri = "https://x.example:443/a".parse().unwrap();
        assert_eq!(cache_key(&u, &strip), "x.example/a");
    }

    #[test]
    fn named_origin_paths() {
        let o = vec![Origin {
            name: "debian".into(),
            url: "http://deb.example/debian/".into(),
            immutable: false,
        }];
        let r = router(&o);
        let (url, _) = url_of(r.route(
            &Method::GET,
            &"/o/debian/./dists/InRelease".parse().unwrap(),
        ));
        assert_eq!(url, "http://deb.example/debian/dists/InRelease");
        for bad in [
            "/o/debian/../etc/passwd",
            "/o/debian/a//b",
            "/o/debian/a/%2e%2e/b",
            "/o/debian/a%5cb",
            "/o/debian/a%5C..%5Cb",
            "/o/debian/a%2Fb",
            "/o/debian/%2f..%2fetc",
            "/o/debian/a%00",
        ] {
            assert!(
                r.route(&Method::GET, &bad.parse().unwrap()).is_err(),
                "{bad}"
            );
        }
        assert!(r
            .route(&Method::GET, &"/o/nope/x".parse().unwrap())
            .is_err());
    }

    #[test]
    fn content_and_own() {
        let r = router(&[]);
        let hex = "a".repeat(64);
        assert!(matches!(
            r.route(
                &Method::GET,
                &format!("/v1/content/sha256/{hex}").parse().unwrap()
            ),
            Ok(Route::Content { .. })
        ));
        assert!(matches!(
            r.route(
                &Method::GET,
                &format!("/v1/content/sha256/{}", "A".repeat(64))
                    .parse()
                    .unwrap()
            ),
            Ok(Route::Own)
        ));
        assert!(matches!(
            r.route(&Method::GET, &"/healthz".parse().unwrap()),
            Ok(Route::Own)
        ));
    }
}
