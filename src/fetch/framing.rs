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
    let Some(cr) = h
        .get(http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(rest) = cr.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((a, _)) = range.split_once('-') else {
        return false;
    };
    let total_ok = match (total.trim().parse::<u64>().ok(), size) {
        (Some(t), Some(s)) => t == s,
        (None, _) => total.trim() == "*",
        (Some(_), None) => true,
    };
    a.trim().parse::<u64>().ok() == Some(written) && total_ok
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
        for bad in [&["42, 43"][..], &["42", "43"], &["+42"], &["4 2"], &["42,"], &[""]] {
            assert_eq!(cl(bad), None, "{bad:?}");
        }
        assert_eq!(cl(&[]), None);
    }
}
