//! What an upstream response's head says about its body and about resuming it: its length, whether a
//! 206 continues the bytes held, and which validators may guard a resume (RFC 9110 §13.1.5, §14.4).

use http::HeaderMap;

/// Whether a Last-Modified date is a strong validator (RFC 9110 §8.8.2.2): at least a second older
/// than the response's Date, so that it cannot have changed twice within its second.
pub fn strong_date(lm: &str, h: &HeaderMap) -> bool {
    let date = h
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    match (httpdate::parse_http_date(lm).ok(), date) {
        (Some(lm), Some(d)) => d.duration_since(lm).is_ok_and(|g| g.as_secs() >= 1),
        _ => false,
    }
}

/// A 206 resumes the same representation: when the validator was an ETag, the 206 carries it too.
pub fn same_etag(h: &HeaderMap, v: Option<&str>) -> bool {
    match (v, h.get(http::header::ETAG).and_then(|e| e.to_str().ok())) {
        (Some(v), Some(e)) if v.starts_with('"') => v == e,
        _ => true,
    }
}

/// The Content-Length (RFC 9110 §8.6): `1*DIGIT`, or one value repeated in a list or over several
/// lines, which hyper accepts and frames the body by; anything else is no length.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for line in h.get_all(http::header::CONTENT_LENGTH) {
        for member in line.to_str().ok()?.split(',').map(str::trim) {
            if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = member.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// A 206 continues the held bytes when its Content-Range starts where they end and names the same size.
pub fn continues(h: &HeaderMap, written: u64, size: Option<u64>) -> bool {
    let Some((first, _, complete)) = content_range(h) else {
        return false;
    };
    let size_ok = match (complete, size) {
        (Some(c), Some(s)) => c == s,
        _ => true,
    };
    first == written && size_ok
}

/// A 206's `Content-Range: bytes first-last/complete` (RFC 9110 §14.4), `complete` None for `*`;
/// None unless each number is `1*DIGIT`, `last` is not before `first` and, when the complete length is
/// known, before it.
fn content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let cr = h.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, complete) = cr.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let num = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    let (first, last) = (num(first)?, num(last)?);
    let complete = match complete {
        "*" => None,
        c => Some(num(c)?),
    };
    (first <= last && complete.is_none_or(|c| last < c)).then_some((first, last, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_continuation() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 100-199/200".parse().unwrap(),
        );
        assert!(continues(&h, 100, Some(200)));
        assert!(!continues(&h, 50, Some(200)));
        assert!(!continues(&h, 100, Some(300)));
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 100-199/*".parse().unwrap(),
        );
        assert!(continues(&h, 100, None));
    }

    #[test]
    fn only_a_well_formed_content_range_continues() {
        // Regression (fuzz target upstream_head): only the first byte and the complete length were
        // read, so a 206 whose last byte was not a number (`bytes 100-v99/*`), or came before the
        // first or past the end, was taken as continuing the bytes held.
        let continues_with = |cr: &str, size| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_RANGE, cr.parse().unwrap());
            continues(&h, 100, size)
        };
        for bad in [
            "bytes 100-v99/*",
            "bytes 100-19~/*",
            "bytes 100-/200",
            "bytes 100-99/200",
            "bytes 100-200/200",
            "bytes +100-199/200",
            "bytes 100-199/2x0",
            "bytes 100-199",
        ] {
            assert!(!continues_with(bad, Some(200)), "{bad}");
        }
        assert!(continues_with("bytes 100-100/101", None));
        assert!(continues_with("bytes 100-149/200", Some(200)));
    }

    #[test]
    fn content_length_as_hyper_frames_it() {
        // Regression (fuzz target upstream_head): `42, 42` (RFC 9110 §8.6 lets a recipient take a list
        // of one value repeated, and hyper frames the body by it) gave no length at all.
        let cl = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(http::header::CONTENT_LENGTH, l.parse().unwrap());
            }
            content_length(&h)
        };
        assert_eq!(cl(&["42"]), Some(42));
        assert_eq!(cl(&["42, 42"]), Some(42));
        assert_eq!(cl(&["42", " 42 "]), Some(42));
        for bad in [
            &["42, 43"][..],
            &["42", "43"],
            &["+42"],
            &["4 2"],
            &["42,"],
            &[""],
        ] {
            assert_eq!(cl(bad), None, "{bad:?}");
        }
        assert_eq!(cl(&[]), None);
    }
}
