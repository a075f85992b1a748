//! Data-plane answers (SPEC 4): a stored object or one still arriving, whole or as a range, with the
//! validators (`ETag`, `Repr-Digest`), conditional requests (RFC 9110 §13) and `Cache-Status` (RFC 9211).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::body::{empty, Body, BodyError};
use super::error::fetch_error_response;
use super::metered::Outcome;
use super::multipart::{self, Layout, Piece, Plan};
use super::range::{self, ByteRange, Resolved};
use crate::fetch::{headers, Flight, FlightReader, Head, HitKind, Joined};
use crate::store::{now_ms, Digest, Hit, KeyMeta};

/// What the client asked for, beyond the object itself.
pub struct Ask {
    pub head: bool,
    /// A single range asked.
    pub range: Option<ByteRange>,
    /// Several ranges asked, in their order (empty unless two or more).
    pub set: Vec<ByteRange>,
    /// `server.max_ranges`: a larger set is answered whole.
    pub max_ranges: usize,
    pub if_range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
}

impl Ask {
    pub fn from_headers(h: &HeaderMap, head: bool, max_ranges: usize) -> Ask {
        let s = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let mut set = s(http::header::RANGE)
            .and_then(|v| range::parse_set(&v))
            .unwrap_or_default();
        let range = (set.len() == 1).then(|| set.remove(0));
        Ask {
            head,
            range,
            set,
            max_ranges,
            if_range: s(http::header::IF_RANGE),
            if_none_match: s(http::header::IF_NONE_MATCH),
            if_modified_since: s(http::header::IF_MODIFIED_SINCE),
        }
    }

    /// Whether the request asks for any range at all.
    pub fn ranged(&self) -> bool {
        self.range.is_some() || !self.set.is_empty()
    }

    /// How the ranges asked are answered on a representation of `size` bytes.
    fn plan(&self, size: u64) -> Plan {
        if !self.set.is_empty() {
            return multipart::plan(&self.set, size, self.max_ranges);
        }
        match self.range.map(|r| r.resolve(size)) {
            None | Some(Resolved::Whole) => Plan::Whole,
            Some(Resolved::Partial { start, end }) => Plan::One { start, end },
            Some(Resolved::Unsatisfiable) => Plan::Unsatisfiable,
        }
    }
}

/// What is known of the representation when the headers go out.
struct Repr<'a> {
    status: StatusCode,
    size: Option<u64>,
    digest: Option<Digest>,
    upstream_etag: Option<String>,
    last_modified: Option<String>,
    content_type: Option<String>,
    cache_status: String,
    /// The upstream's end-to-end fields (stored, or of the response arriving).
    base: Option<&'a HeaderMap>,
    /// The response's current age (RFC 9111 §4.2.3), when it came from upstream.
    age: Option<u64>,
}

impl Repr<'_> {
    fn headers(&self, h: &mut HeaderMap) {
        match self.base {
            Some(b) => h.clone_from(b),
            None => h.clear(),
        }
        let mut set = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(name, v);
            }
        };
        // URL forms keep the origin's ETag; the content-addressed form, and objects whose upstream
        // sent none, carry the digest's (SPEC 4).
        match (&self.upstream_etag, self.digest) {
            (Some(e), _) => set("etag", e),
            (None, Some(d)) => set("etag", &d.etag()),
            (None, None) => {}
        }
        if let Some(d) = self.digest {
            set("repr-digest", &d.repr_digest_header());
        }
        if let Some(lm) = &self.last_modified {
            set("last-modified", lm);
        }
        let typed = self
            .base
            .is_some_and(|b| b.contains_key(http::header::CONTENT_TYPE));
        if !typed {
            set(
                "content-type",
                self.content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            );
        }
        if self.status == StatusCode::OK {
            set("accept-ranges", "bytes");
        }
        if let Some(age) = self.age {
            set("age", &age.to_string());
        }
        set("cache-status", &self.cache_status);
    }

    /// The conditions of a GET (RFC 9110 §13.2.2): If-None-Match when present, else
    /// If-Modified-Since against the Last-Modified date.
    fn not_modified(&self, ask: &Ask) -> bool {
        if let Some(inm) = &ask.if_none_match {
            return self.none_match_fails(inm);
        }
        let date = |v: &str| httpdate::parse_http_date(v.trim()).ok();
        match (
            ask.if_modified_since.as_deref().and_then(date),
            self.last_modified.as_deref().and_then(date),
        ) {
            (Some(since), Some(lm)) => lm <= since,
            _ => false,
        }
    }

    /// If-None-Match with weak comparison (RFC 9110 §13.1.2).
    fn none_match_fails(&self, inm: &str) -> bool {
        let ours = self.digest.map(|d| d.etag());
        inm.split(',').map(str::trim).any(|t| {
            if t == "*" {
                return true;
            }
            let t = t.trim_start_matches("W/");
            ours.as_deref() == Some(t)
                || self
                    .upstream_etag
                    .as_deref()
                    .map(|e| e.trim_start_matches("W/"))
                    == Some(t)
        })
    }

    /// If-Range with strong comparison (RFC 9110 §13.1.5): our ETag, the upstream's strong ETag, or the
    /// exact Last-Modified date.
    fn range_applies(&self, if_range: &str) -> bool {
        let v = if_range.trim();
        if v.starts_with("W/") {
            return false;
        }
        if v.starts_with('"') {
            return self.digest.is_some_and(|d| d.etag() == v)
                || self
                    .upstream_etag
                    .as_deref()
                    .is_some_and(|e| !e.starts_with("W/") && e == v);
        }
        self.last_modified.as_deref() == Some(v)
    }
}

fn cache_status(upstream: Option<&str>, ours: &str) -> String {
    match upstream {
        Some(u) if !u.is_empty() => format!("{u}, {ours}"),
        _ => ours.to_string(),
    }
}

/// Answers from a stored object.
pub fn hit(hit: Hit, meta: Option<KeyMeta>, how: HitKind, ask: &Ask) -> Response<Body> {
    let outcome = match how {
        HitKind::Fresh => Outcome::Hit,
        HitKind::Revalidated => Outcome::Revalidated,
        HitKind::Stale => Outcome::Stale,
    };
    tagged(hit_response(hit, meta, how, ask), outcome)
}

/// Marks a response with what its request did, for the counters and the log line.
fn tagged(mut r: Response<Body>, o: Outcome) -> Response<Body> {
    r.extensions_mut().insert(o);
    r
}

fn hit_response(hit: Hit, meta: Option<KeyMeta>, how: HitKind, ask: &Ask) -> Response<Body> {
    let now = now_ms();
    let member = match how {
        HitKind::Fresh => "cistern; hit".to_string(),
        HitKind::Revalidated => "cistern; fwd=stale; fwd-status=304".to_string(),
        HitKind::Stale => {
            let ttl = meta.as_ref().and_then(|m| m.ttl(now)).unwrap_or(-1).min(-1);
            format!("cistern; hit; ttl={ttl}; detail=stale")
        }
    };
    let repr = Repr {
        status: meta
            .as_ref()
            .and_then(|m| StatusCode::from_u16(m.status).ok())
            .unwrap_or(StatusCode::OK),
        size: Some(hit.bytes.len() as u64),
        digest: Some(hit.digest),
        upstream_etag: meta.as_ref().and_then(|m| m.etag.clone()),
        last_modified: meta.as_ref().and_then(|m| m.last_modified.clone()),
        content_type: hit.content_type.clone(),
        cache_status: member,
        base: meta.as_ref().map(|m| headers::fields(&m.headers)),
        age: meta
            .as_ref()
            .filter(|m| m.fresh_for.is_some())
            .map(|m| m.age(now)),
    };
    let size = hit.bytes.len() as u64;
    let hit = Arc::new(hit);
    answer(&repr, ask, size, move |pieces| {
        // The bytes own the hit, so the object counts as being read (and is not evicted) until hyper
        // has written the last of them, not only until the headers were built. They go in slices, so
        // that what was sent can be counted as it goes; each part is a view of the object's mapping.
        multipart::stored_body(pieces, |start, end| {
            Bytes::from_owner(Sending {
                hit: hit.clone(),
                start: start as usize,
                end: end as usize,
            })
        })
    })
}

/// A slice of a stored object that keeps the object's read guard for as long as it lives.
struct Sending {
    hit: Arc<Hit>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Sending {
    fn as_ref(&self) -> &[u8] {
        &self.hit.bytes[self.start..self.end]
    }
}

/// Builds the answer for a representation of known size; `body(pieces)` gives the bytes: the whole
/// object, one range, or the parts of a `multipart/byteranges` answer with their framing.
fn answer(
    repr: &Repr<'_>,
    ask: &Ask,
    size: u64,
    body: impl FnOnce(Vec<Piece>) -> Body,
) -> Response<Body> {
    let mut h = HeaderMap::new();
    repr.headers(&mut h);
    if repr.status != StatusCode::OK {
        // Ranges and validators are about 200 representations (RFC 9110 §14.2, §13.1).
        set(&mut h, "content-length", &size.to_string());
        let b = if ask.head {
            empty()
        } else {
            body(vec![Piece::Span(0, size)])
        };
        return with(repr.status, h, b);
    }
    if repr.not_modified(ask) {
        return with(StatusCode::NOT_MODIFIED, h, empty());
    }
    let applies = ask
        .if_range
        .as_deref()
        .is_none_or(|v| repr.range_applies(v));
    let plan = if applies { ask.plan(size) } else { Plan::Whole };
    let (status, length, pieces) = match plan {
        Plan::Whole => (StatusCode::OK, size, vec![Piece::Span(0, size)]),
        Plan::One { start, end } => {
            set(
                &mut h,
                "content-range",
                &format!("bytes {start}-{}/{size}", end - 1),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                end - start,
                vec![Piece::Span(start, end)],
            )
        }
        Plan::Many(parts) => {
            let part_type = h
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream");
            let layout = Layout::new(parts, size, part_type);
            set(&mut h, "content-type", &layout.content_type());
            (
                StatusCode::PARTIAL_CONTENT,
                layout.length(),
                layout.pieces(),
            )
        }
        Plan::Unsatisfiable => {
            set(&mut h, "content-range", &format!("bytes */{size}"));
            h.remove("cache-status");
            let e = super::error::ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                "the range starts at or past the end of the object",
            );
            let mut r = e.into_response();
            for (k, v) in h.iter() {
                if k != http::header::CONTENT_TYPE {
                    r.headers_mut().insert(k.clone(), v.clone());
                }
            }
            return r;
        }
    };
    set(&mut h, "content-length", &length.to_string());
    let b = if ask.head { empty() } else { body(pieces) };
    with(status, h, b)
}

fn set(h: &mut HeaderMap, name: &'static str, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        h.insert(name, v);
    }
}

fn with(status: StatusCode, h: HeaderMap, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = h;
    r
}

/// The Cache-Status member of a client of a flight.
fn flight_member(joined: Joined, head: &Head) -> &'static str {
    match joined {
        Joined::Verified => "cistern; hit",
        Joined::InFlight => "cistern; fwd=uri-miss; collapsed",
        Joined::Leader if head.storing => "cistern; fwd=uri-miss; stored",
        Joined::Leader => "cistern; fwd=bypass",
    }
}

/// Answers from a transfer in flight whose head is known, streaming its bytes as they arrive.
pub async fn flight(
    flight: Arc<Flight>,
    joined: Joined,
    head: Head,
    reader: FlightReader,
    ask: &Ask,
) -> Response<Body> {
    let outcome = match joined {
        Joined::Verified => Outcome::Hit,
        Joined::InFlight => Outcome::Collapsed,
        Joined::Leader if head.storing => Outcome::Miss,
        Joined::Leader => Outcome::Bypass,
    };
    let r = flight_response(flight, joined, head, reader, ask).await;
    match r.status().is_client_error() || r.status().is_server_error() {
        true => r,
        false => tagged(r, outcome),
    }
}

async fn flight_response(
    flight: Arc<Flight>,
    joined: Joined,
    head: Head,
    reader: FlightReader,
    ask: &Ask,
) -> Response<Body> {
    let member = flight_member(joined, &head);
    if let Some(crate::fetch::End::Failed(e)) = flight.end() {
        // Failed before its head went out (a small body whose check failed at once): an error the
        // client can read, not a connection closed before any status line.
        return fetch_error_response(e);
    }
    if head.digest.is_some() && head.size.is_none_or(|s| s == 0) {
        // The body may be empty: with no last byte to hold back, the head waits for the check (or,
        // when the length is unknown, for a first byte), and a mismatch is a 502 (SPEC 4).
        if let Err(e) = flight.first_byte().await {
            return fetch_error_response(e);
        }
    }
    let mut repr = Repr {
        status: head.status,
        size: head.size,
        digest: head.digest.or_else(|| flight.digest()),
        upstream_etag: head.etag.clone(),
        last_modified: head.last_modified.clone(),
        content_type: head.content_type.clone(),
        cache_status: cache_status(head.upstream_cache_status.as_deref(), member),
        base: Some(headers::fields(&head.headers)),
        // Its age now, not when the head arrived: a late joiner adds the time since (RFC 9111 §4.2.3).
        age: head.age_now(now_ms()),
    };
    let applies = ask
        .if_range
        .as_deref()
        .is_none_or(|v| repr.range_applies(v));
    let range = ask.range.filter(|_| applies);
    if repr.size.is_none() {
        if let Some((start, end)) = range.and_then(|r| r.bounded()) {
            // `a-b` on an object of unknown size: served as the bytes arrive (RFC 9110 §14.4 `a-b/*`).
            let mut h = HeaderMap::new();
            repr.headers(&mut h);
            set(
                &mut h,
                "content-range",
                &format!("bytes {start}-{}/*", end - 1),
            );
            let b = if ask.head {
                empty()
            } else {
                stream(reader, start, Some(end))
            };
            return with(StatusCode::PARTIAL_CONTENT, h, b);
        }
        if range.is_some() || (applies && !ask.set.is_empty()) {
            // `a-` and `-n` need the size, and so does a set of ranges (its answer's exact length goes
            // out before its first part): wait for the end of the object.
            match flight.wait_end().await {
                crate::fetch::End::Complete(_) => repr.size = Some(flight.written()),
                crate::fetch::End::Failed(e) => return fetch_error_response(e),
                _ => {}
            }
        }
    }
    match repr.size {
        Some(size) => answer(&repr, ask, size, move |pieces| {
            multipart::flight_body(reader, pieces)
        }),
        None => {
            let mut h = HeaderMap::new();
            repr.headers(&mut h);
            if repr.status == StatusCode::OK && repr.not_modified(ask) {
                return with(StatusCode::NOT_MODIFIED, h, empty());
            }
            let b = if ask.head {
                empty()
            } else {
                stream(reader, 0, None)
            };
            with(repr.status, h, b)
        }
    }
}

fn stream(mut reader: FlightReader, from: u64, to: Option<u64>) -> Body {
    reader.seek(from, to);
    let s = futures_util::stream::unfold(reader, |mut r| async move {
        let item = r.next().await?;
        Some((
            item.map(Frame::data).map_err(|e| BodyError(e.to_string())),
            r,
        ))
    });
    StreamBody::new(s).boxed()
}

/// Passes an upstream response through (HEAD on a miss, requests with Authorization, bypass).
pub fn pass(resp: Response<crate::fetch::uplink::Metered>, member: &str) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers = headers::end_to_end(&parts.headers);
    let upstream = parts
        .headers
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    set(
        &mut parts.headers,
        "cache-status",
        &cache_status(upstream.as_deref(), member),
    );
    let r = Response::from_parts(parts, body.map_err(|e| BodyError(e.to_string())).boxed());
    tagged(r, Outcome::Bypass)
}
