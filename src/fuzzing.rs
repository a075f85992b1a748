//! Entry points for the fuzz targets in `fuzz/`, compiled only with the `fuzzing` feature (which only
//! the fuzz crate enables), so the library's API does not grow: the parsers that are private to their
//! modules, re-exported as they are, and the one helper every target shares to turn raw bytes into
//! header fields the way hyper hands them to cistern.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::fetch::framing;

/// The upstream response head (`fetch::framing`): its Content-Length.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    framing::content_length(h)
}

/// Whether a 206 continues the `written` bytes held of an object of `size`.
pub fn continues(h: &HeaderMap, written: u64, size: Option<u64>) -> bool {
    framing::continues(h, written, size)
}

/// Whether a Last-Modified date is a strong validator in a response with fields `h`.
pub fn strong_date(lm: &str, h: &HeaderMap) -> bool {
    framing::strong_date(lm, h)
}

/// Whether a 206 resumes the representation that validator `v` named.
pub fn same_etag(h: &HeaderMap, v: Option<&str>) -> bool {
    framing::same_etag(h, v)
}

/// The request's values for the fields a stored response varies on (the lookup side of Vary).
pub fn vary_for(
    stored: &[(String, Option<String>)],
    req: &HeaderMap,
) -> Vec<(String, Option<String>)> {
    crate::fetch::key::vary_for(stored, req)
}

/// Header fields from text: one `name: value` per line (`\n` or `\r\n`). A line that hyper would
/// refuse (no colon, a name that is not a token, a control character in the value) is skipped, so
/// the targets see only heads that can reach cistern; values may hold obs-text bytes, as hyper's do.
pub fn header_map(text: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}
