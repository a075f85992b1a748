//! RFC 9111 as a shared cache applies it: whether a response may be stored (§3), its freshness lifetime
//! (§4.2.1, heuristic §4.2.2) and age (§4.2.3), the request's own directives (§5.2.1), and the one
//! decision every reuse goes through: fresh, stale but allowed, or revalidate (§4.2.4, RFC 5861).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

use crate::store::KeyMeta;

/// Heuristic freshness is 10% of the time since Last-Modified (RFC 9111 §4.2.2), at most this.
const HEURISTIC_CAP_SECS: u64 = 24 * 3600;
/// A delta-seconds value too large to represent is taken as this (RFC 9111 §1.2.2: 2^31).
const DELTA_MAX: u64 = 1 << 31;

/// The directives of every Cache-Control field line, lower-cased names, values unquoted.
pub fn directives(h: &HeaderMap) -> Vec<(String, Option<String>)> {
    parse_directives(
        h.get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// The directives that govern how this node stores and reuses a response: `CDN-Cache-Control`'s when
/// the response has a valid one (RFC 9213: it is aimed at caches like this one, and Cache-Control and
/// Expires then do not count here; both are still passed on unchanged), else Cache-Control's.
pub fn response_directives(h: &HeaderMap) -> Vec<(String, Option<String>)> {
    targeted::directives(h).unwrap_or_else(|| directives(h))
}

/// Whether `Expires` counts for a response: not when a valid CDN-Cache-Control is in charge.
fn expires_counts(h: &HeaderMap) -> bool {
    h.contains_key(http::header::EXPIRES) && targeted::directives(h).is_none()
}

/// Cache-Control field lines as directives (RFC 9111 §5.2: `token [ "=" ( token / quoted-string ) ]`,
/// comma-separated). A comma inside a quoted string is part of its value (RFC 9110 §5.6.4), and a
/// member whose name is not a token is not a directive.
fn parse_directives<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, Option<String>)> {
    lines
        .flat_map(list_members)
        .filter_map(|d| {
            let d = d.trim();
            let (name, value) = match d.split_once('=') {
                Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
                None => (d, None),
            };
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
            token.then(|| (name.to_ascii_lowercase(), value))
        })
        .collect()
}

/// The members of a comma-separated list; commas inside quoted strings do not separate.
fn list_members(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&v[start..]);
    out
}

/// A directive's value: a token as it is, a quoted string without its quotes and escapes.
fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"') else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            _ if escaped => {
                out.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            '"' => break,
            _ => out.push(c),
        }
    }
    out
}

fn has(ds: &[(String, Option<String>)], name: &str) -> bool {
    ds.iter().any(|(k, _)| k == name)
}

/// A delta-seconds directive (the first occurrence): Some(None) when present but not a number.
fn seconds(ds: &[(String, Option<String>)], name: &str) -> Option<Option<u64>> {
    let (_, v) = ds.iter().find(|(k, _)| k == name)?;
    Some(v.as_deref().and_then(delta))
}

fn delta(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

fn date(h: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    date::parse(h.get(name)?.to_str().ok()?)
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1).
pub fn heuristically_cacheable(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Whether a shared cache may store this response to a GET (RFC 9111 §3, §3.5).
pub fn storable(status: StatusCode, h: &HeaderMap, authorized: bool) -> bool {
    let ds = response_directives(h);
    // `must-understand` lets a cache that implements the status's caching rules ignore `no-store`
    // (RFC 9111 §5.2.2.3); every status this cache stores by default is such a status.
    let understood = has(&ds, "must-understand") && heuristically_cacheable(status);
    if (has(&ds, "no-store") && !understood) || has(&ds, "private") {
        return false;
    }
    if authorized && !(has(&ds, "must-revalidate") || has(&ds, "public") || has(&ds, "s-maxage")) {
        return false;
    }
    if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return false;
    }
    let explicit = has(&ds, "max-age") || has(&ds, "s-maxage") || expires_counts(h);
    heuristically_cacheable(status) || explicit || has(&ds, "public")
}

/// Whether a stored response may answer a request with credentials (RFC 9111 §3.5): its
/// Cache-Control says `public`, `s-maxage` or `must-revalidate`.
pub fn shareable_with_credentials(m: &KeyMeta) -> bool {
    let mut h = HeaderMap::new();
    for (n, v) in m.headers.iter() {
        if n == "cache-control" || n == "cdn-cache-control" {
            if let (Ok(n), Ok(v)) = (
                http::header::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                h.append(n, v);
            }
        }
    }
    let ds = response_directives(&h);
    ["public", "s-maxage", "must-revalidate"]
        .iter()
        .any(|d| has(&ds, d))
}

/// The freshness lifetime in seconds of a response, as a shared cache computes it.
pub fn lifetime(status: StatusCode, h: &HeaderMap) -> u64 {
    let ds = response_directives(h);
    if has(&ds, "no-cache") {
        return 0;
    }
    for wanted in ["s-maxage", "max-age"] {
        if let Some(v) = seconds(&ds, wanted) {
            // An invalid value makes the response stale (RFC 9111 §4.2.1).
            return v.unwrap_or(0);
        }
    }
    let served = date(h, http::header::DATE).unwrap_or_else(SystemTime::now);
    if expires_counts(h) {
        // An invalid Expires means "already expired" (RFC 9111 §5.3).
        return date(h, http::header::EXPIRES)
            .and_then(|e| e.duration_since(served).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
    }
    if !(heuristically_cacheable(status) || has(&ds, "public")) {
        return 0;
    }
    if let Some(lm) = date(h, http::header::LAST_MODIFIED) {
        if let Ok(age) = served.duration_since(lm) {
            return (age.as_secs() / 10).min(HEURISTIC_CAP_SECS);
        }
    }
    0
}

/// The corrected initial age of a response (RFC 9111 §4.2.3), in seconds.
pub fn initial_age(h: &HeaderMap, request_ms: u64, response_ms: u64) -> u64 {
    let age_value = h
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| delta(v.trim()))
        .unwrap_or(0);
    let response_time = UNIX_EPOCH + Duration::from_millis(response_ms);
    let apparent = date(h, http::header::DATE)
        .and_then(|d| response_time.duration_since(d).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let delay = response_ms.saturating_sub(request_ms) / 1000;
    apparent.max(age_value + delay)
}

/// What the store keeps for a key, from the response that filled (or revalidated) it. `vary` is what
/// [`vary_of`] gave for the request that asked.
pub struct Received<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub immutable: bool,
    pub request_ms: u64,
    pub response_ms: u64,
    pub vary: Vec<(String, Option<String>)>,
}

pub fn key_meta(r: Received<'_>) -> KeyMeta {
    let h = r.headers;
    let s =
        |n: http::header::HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let ds = response_directives(h);
    let no_stale = [
        "must-revalidate",
        "proxy-revalidate",
        "s-maxage",
        "no-cache",
    ]
    .iter()
    .any(|d| has(&ds, d));
    KeyMeta {
        fetched_at: r.response_ms,
        fresh_for: (!r.immutable).then(|| lifetime(r.status, h)),
        etag: s(http::header::ETAG),
        last_modified: s(http::header::LAST_MODIFIED),
        initial_age: initial_age(h, r.request_ms, r.response_ms),
        status: r.status.as_u16(),
        headers: super::headers::capture(h),
        no_stale,
        stale_if_error: seconds(&ds, "stale-if-error").flatten(),
        stale_while_revalidate: seconds(&ds, "stale-while-revalidate").flatten(),
        vary: r.vary,
    }
}

/// The request's own cache directives (RFC 9111 §5.2.1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestCc {
    pub max_age: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `max-stale`: Some(None) accepts any staleness.
    pub max_stale: Option<Option<u64>>,
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
}

impl RequestCc {
    pub fn parse(h: &HeaderMap) -> RequestCc {
        let ds = directives(h);
        // Pragma: no-cache counts only when the request has no Cache-Control (RFC 9111 §5.4).
        let pragma = !h.contains_key(http::header::CACHE_CONTROL)
            && h.get_all(http::header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains("no-cache"));
        RequestCc {
            // An invalid max-age asks for revalidation, like max-age=0.
            max_age: seconds(&ds, "max-age").map(|v| v.unwrap_or(0)),
            min_fresh: seconds(&ds, "min-fresh").flatten(),
            max_stale: ds
                .iter()
                .find(|(k, _)| k == "max-stale")
                .map(|(_, v)| v.as_deref().and_then(delta)),
            no_cache: has(&ds, "no-cache") || pragma,
            no_store: has(&ds, "no-store"),
            only_if_cached: has(&ds, "only-if-cached"),
        }
    }
}

/// How a stored response may be used for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    Fresh,
    /// Stale, and the request accepts it as it is (`max-stale`).
    Stale,
    /// Stale within `stale-while-revalidate`: served now, revalidated in the background.
    StaleRevalidating,
    Revalidate,
}

/// The one freshness decision (RFC 9111 §4.2, §5.2.1; RFC 5861).
pub fn reuse(m: &KeyMeta, req: &RequestCc, now_ms: u64) -> Reuse {
    let Some(lifetime) = m.fresh_for else {
        return Reuse::Fresh;
    };
    if req.no_cache {
        return Reuse::Revalidate;
    }
    let age = m.age(now_ms);
    if let Some(max) = req.max_age {
        // max-age=0 always revalidates (what apt means by it), even within the second of the fetch.
        if max == 0 || age > max {
            return Reuse::Revalidate;
        }
    }
    if lifetime > age {
        let left = lifetime - age;
        return match req.min_fresh {
            Some(mf) if left < mf => Reuse::Revalidate,
            _ => Reuse::Fresh,
        };
    }
    if m.no_stale {
        return Reuse::Revalidate;
    }
    let stale_for = age - lifetime;
    if let Some(ms) = req.max_stale {
        if ms.is_none_or(|n| stale_for <= n) {
            return Reuse::Stale;
        }
    }
    if m.stale_while_revalidate.is_some_and(|n| stale_for <= n) {
        return Reuse::StaleRevalidating;
    }
    Reuse::Revalidate
}

/// Whether a stored response may be served stale because its upstream failed (RFC 9111 §4.2.4: the
/// cache is disconnected; RFC 5861 `stale-if-error`).
pub fn stale_on_error(m: &KeyMeta, now_ms: u64) -> bool {
    let stale_for = m
        .fresh_for
        .map(|l| m.age(now_ms).saturating_sub(l))
        .unwrap_or(0);
    !m.no_stale || m.stale_if_error.is_some_and(|n| stale_for <= n)
}

/// The request fields a response varies on (RFC 9111 §4.1), with the values `req` has for them. None
/// when the response has `Vary: *` (it never matches a later request).
pub fn vary_of(resp: &HeaderMap, req: &HeaderMap) -> Option<Vec<(String, Option<String>)>> {
    let mut names: Vec<String> = resp
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    if names.iter().any(|n| n == "*") {
        return None;
    }
    names.sort();
    names.dedup();
    Some(
        names
            .into_iter()
            .map(|n| {
                let v = normalised(req, &n);
                (n, v)
            })
            .collect(),
    )
}

/// A request field's value for Vary matching: every line combined, whitespace around the list
/// separators removed (RFC 9111 §4.1 allows both). None when the field is absent.
fn normalised(req: &HeaderMap, name: &str) -> Option<String> {
    let lines: Vec<&str> = req
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = lines
        .iter()
        .flat_map(|l| l.split(','))
        .map(|p| p.trim().to_string())
        .collect();
    // Language ranges and content codings are case-insensitive, and their order says nothing that
    // their weights do not (RFC 9110 §12.5.3, §12.5.4; RFC 4647 §2): such requests select the same
    // variant.
    if name == "accept-language" || name == "accept-encoding" {
        for p in &mut parts {
            *p = p.to_ascii_lowercase().replace(' ', "");
        }
        parts.sort();
    }
    Some(parts.join(","))
}

/// Whether a stored response's Vary matches a new request.
pub fn vary_matches(stored: &[(String, Option<String>)], req: &HeaderMap) -> bool {
    stored.iter().all(|(n, v)| normalised(req, n) == *v)
}

mod date;
mod targeted;
#[cfg(test)]
mod tests;
