//! Header fields across the intermediary (RFC 9110 §7.6): which fields are hop-by-hop and never cross
//! it, the request fields sent upstream on a client's behalf, and the response header block that is
//! stored per key and replayed on hits (RFC 9111 §3.1).

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::store::StoredHeaders;

/// Fields that only describe one connection (RFC 9110 §7.6.1), plus `Proxy-Connection` (a non-standard
/// alias old clients send) and `Proxy-Authorization` (credentials for this hop only).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Response fields that cistern computes itself for each answer and so never stores: framing, the
/// age (recomputed, RFC 9111 §4.2.3) and the fields it adds as a cache.
const NOT_STORED: [&str; 6] = [
    "content-length",
    "age",
    "accept-ranges",
    "repr-digest",
    "cache-status",
    "digest",
];

/// Request fields a cache fill must not forward: the fill asks for the whole object, unconditionally,
/// and answers each client's range and conditions itself.
const FILL_DROPS: [&str; 7] = [
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "host",
];

/// Request fields that frame a body (RFC 9112 §6, RFC 9110 §10.1.1). cistern frames every request it
/// sends upstream itself, from the body it actually sends: a client's `Content-Length` on a GET without
/// a body would make the upstream read the next request on a pooled connection as that body (request
/// smuggling, then a poisoned key), and its `Expect` would make the upstream wait for a body that never
/// comes.
const REQUEST_FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "expect"];

/// Removes a client's body framing from fields about to go upstream (see [`REQUEST_FRAMING`]).
pub fn drop_framing(h: &mut HeaderMap) {
    for n in REQUEST_FRAMING {
        h.remove(n);
    }
}

/// An upstream request: the given fields without any body framing (hyper frames the body it sends:
/// none for an empty one, `Content-Length` for a body of known size, chunked otherwise).
pub fn upstream_request<B>(
    method: http::Method,
    url: http::Uri,
    fields: &HeaderMap,
    body: B,
) -> http::Result<http::Request<B>> {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(h) = req.headers_mut() {
        h.extend(fields.clone());
        drop_framing(h);
    }
    req.body(body)
}

/// Whether a field is hop-by-hop in a message whose `Connection` header is `h`.
fn hop_by_hop(name: &HeaderName, h: &HeaderMap) -> bool {
    let n = name.as_str();
    if HOP_BY_HOP.contains(&n) {
        return true;
    }
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(n))
}

/// The end-to-end fields of a message: every field but the hop-by-hop ones.
pub fn end_to_end(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (name, v) in h {
        if !hop_by_hop(name, h) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// The client's fields to send upstream with a cache fill (or a revalidation): end-to-end, without the
/// range and conditional fields the cache answers itself.
pub fn for_fill(client: &HeaderMap) -> HeaderMap {
    let mut h = end_to_end(client);
    for n in FILL_DROPS {
        h.remove(n);
    }
    h
}

/// Adds the fields every upstream request carries: identity coding and Via with this node appended
/// (RFC 9110 §7.6.3), so that a loop in a chain is seen. `Host` is set by the client from the URL, and
/// the body framing by hyper from the body sent.
pub fn add_ours(h: &mut HeaderMap, node_id: &str) {
    h.remove(header::HOST);
    drop_framing(h);
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let prior: Vec<&str> = h
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .collect();
    let ours = format!("1.1 {node_id}");
    let via = if prior.is_empty() {
        ours
    } else {
        format!("{}, {ours}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&via) {
        h.insert(header::VIA, v);
    }
    if !h.contains_key(header::USER_AGENT) {
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("cistern/", env!("CARGO_PKG_VERSION"))),
        );
    }
}

/// The block to store for a response with fields `h`: its end-to-end fields as it sent them, minus the
/// ones cistern computes per answer.
pub fn capture(h: &HeaderMap) -> StoredHeaders {
    let v = h
        .iter()
        .filter(|(n, _)| !hop_by_hop(n, h) && !NOT_STORED.contains(&n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    StoredHeaders::new(v)
}

/// A stored block as header fields (built once per block, then shared).
pub fn fields(s: &StoredHeaders) -> &HeaderMap {
    s.fields(build)
}

/// A stored block as an owned copy of its header fields.
pub fn to_map(s: &StoredHeaders) -> HeaderMap {
    fields(s).clone()
}

fn build(s: &StoredHeaders) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(s.len());
    for (n, v) in s.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            out.append(n, v);
        }
    }
    out
}

/// A stored block updated by a 304's fields (RFC 9111 §3.2, §4.3.4): each field the 304 carries
/// replaces the stored ones of that name, except the ones that describe the content itself.
pub fn updated_by(s: &StoredHeaders, h: &HeaderMap) -> StoredHeaders {
    let fresh = capture(h);
    let skip = |n: &str| {
        matches!(
            n,
            "content-type" | "content-encoding" | "content-location" | "content-disposition"
        )
    };
    let replaced: Vec<&str> = fresh
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !skip(n))
        .collect();
    let mut v: Vec<(String, String)> = s
        .iter()
        .filter(|(n, _)| !replaced.contains(&n.as_str()))
        .cloned()
        .collect();
    v.extend(fresh.iter().filter(|(n, _)| !skip(n)).cloned());
    StoredHeaders::new(v)
}

/// Whether a 304 with fields `h` selects, for update, the stored response whose validators are `etag`
/// and `last_modified` (RFC 9111 §4.3.4): by the 304's ETag when it has one (strong comparison when
/// that is strong, weak otherwise), else by its Last-Modified. A 304 with neither answers the conditions
/// made from the stored response's own validators, and selects it. A 304 that names another validator
/// than the stored one's is about another representation: the stored response is not updated from it.
pub fn selects(etag: Option<&str>, last_modified: Option<&str>, h: &HeaderMap) -> bool {
    let field = |n| {
        h.get(n)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(new) = field(header::ETAG) {
        return etag.is_some_and(|old| same_etag(old.trim(), new));
    }
    if let Some(new) = field(header::LAST_MODIFIED) {
        return last_modified.is_some_and(|old| same_date(old.trim(), new));
    }
    true
}

/// A strong ETag matches only the same strong one; a weak one matches either form (RFC 9110 §8.8.3.2).
fn same_etag(stored: &str, new: &str) -> bool {
    match new.strip_prefix("W/") {
        None => stored == new,
        Some(opaque) => stored.strip_prefix("W/").unwrap_or(stored) == opaque,
    }
}

fn same_date(a: &str, b: &str) -> bool {
    match (httpdate::parse_http_date(a), httpdate::parse_http_date(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_lists_are_dropped() {
        let h = map(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
            ("user-agent", "DO-agent"),
        ]);
        let e = end_to_end(&h);
        let names: Vec<&str> = e.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "user-agent"]);
    }

    #[test]
    fn fill_requests_carry_the_clients_fields_and_ours() {
        let mut h = for_fill(&map(&[
            ("host", "gw"),
            ("range", "bytes=0-1"),
            ("if-none-match", "\"x\""),
            ("user-agent", "DO-agent"),
            ("accept", "application/octet-stream"),
            ("via", "1.1 child"),
            ("accept-encoding", "gzip"),
            ("content-length", "40"),
            ("expect", "100-continue"),
        ]));
        add_ours(&mut h, "gw-1");
        assert_eq!(h["user-agent"], "DO-agent");
        assert_eq!(h["accept"], "application/octet-stream");
        assert_eq!(h["via"], "1.1 child, 1.1 gw-1");
        assert_eq!(h["accept-encoding"], "identity");
        for gone in ["host", "range", "if-none-match", "content-length", "expect"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
    }

    #[test]
    fn stored_blocks_keep_end_to_end_fields_and_take_304_updates() {
        let h = map(&[
            ("cache-control", "max-age=60"),
            ("content-length", "5"),
            ("x-custom", "a"),
            ("connection", "close"),
            ("age", "10"),
            ("content-type", "text/plain"),
        ]);
        let s = capture(&h);
        assert_eq!(
            s.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["cache-control", "x-custom", "content-type"]
        );
        let u = updated_by(
            &s,
            &map(&[
                ("cache-control", "max-age=120"),
                ("x-new", "b"),
                ("content-type", "evil/type"),
            ]),
        );
        assert_eq!(u.get("cache-control"), Some("max-age=120"));
        assert_eq!(u.get("x-new"), Some("b"));
        assert_eq!(u.get("x-custom"), Some("a"));
        assert_eq!(u.get("content-type"), Some("text/plain"));
        let json = serde_json::to_string(&u).unwrap();
        let back: crate::store::StoredHeaders = serde_json::from_str(&json).unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn a_304_selects_the_stored_response_by_its_validators() {
        let lm = "Tue, 01 Jul 2025 10:00:00 GMT";
        let (e1, w1) = (Some("\"e1\""), Some("W/\"e1\""));
        assert!(selects(e1, None, &map(&[("etag", "\"e1\"")])));
        assert!(!selects(e1, None, &map(&[("etag", "\"e2\"")])));
        assert!(!selects(None, Some(lm), &map(&[("etag", "\"e1\"")])));
        assert!(!selects(w1, None, &map(&[("etag", "\"e1\"")])));
        assert!(selects(e1, None, &map(&[("etag", "W/\"e1\"")])));
        assert!(selects(w1, None, &map(&[("etag", "W/\"e1\"")])));
        // The ETag decides before Last-Modified.
        let both = map(&[("etag", "\"e2\""), ("last-modified", lm)]);
        assert!(!selects(e1, Some(lm), &both));
        assert!(selects(None, Some(lm), &map(&[("last-modified", lm)])));
        let other = map(&[("last-modified", "Wed, 02 Jul 2025 10:00:00 GMT")]);
        assert!(!selects(e1, Some(lm), &other));
        assert!(selects(
            e1,
            Some(lm),
            &map(&[("cache-control", "max-age=5")])
        ));
    }
}
