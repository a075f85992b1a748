//! The request target and routing (src/server/route.rs, SPEC 3): any request line's method and target
//! route without panicking, and every upstream URL that comes out was built from parsed parts that
//! say what the request said: the forward-proxy URL as asked, the cache-host origin as named once with
//! the other parameters in their order, a named origin's path under its `url` with no `..` or empty
//! segment, a content address as its 64 hex digits.
#![no_main]

use cistern::config::{Origin, Upstream};
use cistern::fetch::key::{cache_key, param_name};
use cistern::fetch::policy::normalise_host;
use cistern::server::route::{FormKind, Route, Router};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "PURGE",
];

fuzz_target!(|data: &[u8]| {
    // First byte: the method and the origin scheme; the rest: the request target as hyper reads it.
    let Some((&sel, target)) = data.split_first() else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let method = Method::from_bytes(METHODS[usize::from(sel) % METHODS.len()].as_bytes()).unwrap();
    let origins = origins();
    let strip = Upstream::default().strip_query;
    let router = Router {
        origins: &origins,
        origin_scheme: if sel & 0x80 == 0 { "http" } else { "https" },
        strip_query: &strip,
    };
    match router.route(&method, &uri) {
        Err(e) => assert!(e.status.is_client_error(), "{uri}: {} {}", e.status, e.code),
        Ok(Route::Connect { .. }) => assert_eq!(method, Method::CONNECT),
        Ok(Route::Content { digest }) => {
            assert_eq!(uri.path(), format!("/v1/content/sha256/{}", digest.hex()));
        }
        Ok(Route::Own) => {}
        Ok(Route::Registry) => assert!(uri.path() == "/v2" || uri.path().starts_with("/v2/")),
        Ok(Route::Url { kind, url, key, .. }) => {
            check_url(&url, &key, &strip);
            match kind {
                FormKind::ForwardProxy => {
                    assert_eq!(url.authority(), uri.authority());
                    assert_eq!(url.scheme(), uri.scheme());
                }
                FormKind::CacheHost => check_cache_host(&uri, &url),
                FormKind::Named => check_named(&uri, &url, &origins),
                FormKind::Content => panic!("{uri}: a URL route of the content kind"),
                FormKind::Registry => panic!("{uri}: a URL route of the registry kind"),
            }
        }
    }
});

fn origins() -> Vec<Origin> {
    vec![
        Origin {
            name: "debian".into(),
            url: "http://deb.example/debian/".into(),
            immutable: false,
        },
        Origin {
            name: "fw".into(),
            url: "https://fw.example:8443".into(),
            immutable: true,
        },
    ]
}

/// Every upstream URL: http(s), a host and no userinfo, one that reads back as itself, and its key.
fn check_url(url: &Uri, key: &str, strip: &[String]) {
    assert!(matches!(url.scheme_str(), Some("http" | "https")), "{url}");
    let authority = url.authority().expect("an upstream URL without a host");
    assert!(!authority.as_str().contains('@'), "{url}");
    assert!(!authority.host().is_empty(), "{url}");
    let again: Uri = url
        .to_string()
        .parse()
        .expect("an upstream URL that does not read back");
    assert_eq!(&again, url);
    assert_eq!(key, cache_key(url, strip));
    assert!(
        key.starts_with(&normalise_host(authority.host())),
        "{url}: {key}"
    );
}

/// `cacheHostOrigin` named exactly once, its value the upstream's authority, the other parameters
/// forwarded in their order, the path as it was.
fn check_cache_host(uri: &Uri, url: &Uri) {
    let q = uri.query().expect("a cache-host route without a query");
    let named: Vec<&str> = q
        .split('&')
        .filter(|p| param_name(p) == "cacheHostOrigin")
        .collect();
    assert_eq!(named.len(), 1, "{uri}");
    let rest: Vec<&str> = q
        .split('&')
        .filter(|p| param_name(p) != "cacheHostOrigin")
        .collect();
    let host = named[0].split_once('=').map(|(_, v)| v).unwrap_or("");
    let host = percent_encoding::percent_decode_str(host)
        .decode_utf8()
        .unwrap();
    assert_eq!(url.authority().unwrap().as_str(), host, "{uri}");
    assert_eq!(url.path(), uri.path(), "{uri}");
    let forwarded = url.query().map(|q| q.split('&').collect::<Vec<_>>());
    assert_eq!(forwarded.unwrap_or_default(), rest, "{uri}");
}

/// Under the origin's URL, with every segment of the tail a real name.
fn check_named(uri: &Uri, url: &Uri, origins: &[Origin]) {
    let rest = uri
        .path()
        .strip_prefix("/o/")
        .expect("a named route not under /o/");
    let name = rest.split('/').next().unwrap();
    let o = origins
        .iter()
        .find(|o| o.name == name)
        .expect("an unknown origin routed");
    let base: Uri = o.url.parse().unwrap();
    assert_eq!(url.authority(), base.authority(), "{uri}");
    let base_path = base.path().trim_end_matches('/');
    let tail = url
        .path()
        .strip_prefix(base_path)
        .expect("outside the origin's path");
    let tail = tail
        .strip_prefix('/')
        .expect("no `/` after the origin's path");
    for seg in tail.split('/') {
        let dec: Vec<u8> = percent_encoding::percent_decode_str(seg).collect();
        assert!(
            !dec.is_empty()
                && dec != b"."
                && dec != b".."
                && !dec.contains(&0)
                && !dec.contains(&b'\\'),
            "{uri} -> {url}: segment {seg:?}"
        );
    }
    assert_eq!(url.query(), uri.query(), "{uri}");
}
