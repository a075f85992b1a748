//! The upstream response head where cistern reads it itself (src/fetch/framing.rs, the digest fields
//! of src/store/digest.rs, the request fields of src/fetch/headers.rs): Content-Length as RFC 9110
//! §8.6 defines it, a 206's Content-Range accepted as a continuation only when it is one (§14.4), a
//! digest read from `Repr-Digest`/`Digest` whatever other members or lines surround it (RFC 9530),
//! and the fields sent upstream on a client's behalf never carrying hop-by-hop ones.
#![no_main]

use cistern::fetch::headers;
use cistern::fuzzing::{content_length, continues, header_map, same_etag, strong_date};
use cistern::store::Digest;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 8 bytes: the bytes held before a resume (small numbers are the interesting ones); then the head.
    if data.len() < 8 {
        return;
    }
    let written = u64::from_le_bytes(data[..8].try_into().unwrap()) % 1024;
    let h = header_map(&data[8..]);
    check_length(&h);
    for size in [None, content_length(&h), Some(written + 100)] {
        if continues(&h, written, size) {
            check_continuation(&h, written, size);
        }
    }
    let text = |n| h.get(n).and_then(|v: &HeaderValue| v.to_str().ok());
    if let Some(lm) = text(http::header::LAST_MODIFIED) {
        let _ = strong_date(lm, &h);
    }
    let etag = text(http::header::ETAG);
    let _ = same_etag(&h, etag);
    let _ = same_etag(&h, Some("\"x\""));
    check_digest(&h);
    check_fill_request(&h);
});

/// Content-Length (RFC 9110 §8.6): 1*DIGIT, or a list of one value repeated; anything else is no
/// length at all (hyper refuses such a response before cistern reads it).
fn check_length(h: &HeaderMap) {
    let mut values = Vec::new();
    let mut valid = true;
    for line in h.get_all(http::header::CONTENT_LENGTH) {
        let Ok(line) = line.to_str() else {
            valid = false;
            break;
        };
        for member in line.split(',').map(str::trim) {
            let digits = !member.is_empty() && member.bytes().all(|b| b.is_ascii_digit());
            match member.parse::<u64>() {
                Ok(n) if digits => values.push(n),
                _ => valid = false,
            }
        }
    }
    values.dedup();
    let want = (valid && values.len() == 1).then(|| values[0]);
    assert_eq!(content_length(h), want, "{:?}", h.get_all("content-length"));
}

/// A continuation: `bytes first-last/complete` with first where the held bytes end, first <= last,
/// and last within the size when the size is known.
fn check_continuation(h: &HeaderMap, written: u64, size: Option<u64>) {
    let cr = h[http::header::CONTENT_RANGE].to_str().unwrap();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let rest = cr.trim().strip_prefix("bytes ").expect(cr);
    let (range, total) = rest.split_once('/').expect(cr);
    let (first, last) = range.split_once('-').expect(cr);
    assert!(digits(first) && digits(last), "{cr:?} accepted");
    let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
    assert_eq!(first, written, "{cr:?}");
    assert!(first <= last, "{cr:?} accepted");
    if total != "*" {
        assert!(digits(total), "{cr:?} accepted");
        let total: u64 = total.parse().unwrap();
        assert!(last < total, "{cr:?} accepted");
        if let Some(s) = size {
            assert_eq!(total, s, "{cr:?}");
        }
    }
}

/// The digest of a head does not depend on what else its digest fields hold: another algorithm's
/// member, a member with no value, or another line before it.
fn check_digest(h: &HeaderMap) {
    let Some(d) = Digest::from_headers(h) else {
        return;
    };
    let b64 = d.base64();
    let hex = d.hex();
    let named = h
        .get_all("repr-digest")
        .iter()
        .chain(h.get_all("digest").iter())
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(&b64) || v.to_ascii_lowercase().contains(&hex));
    assert!(named, "{d:?} named by no field");
    for extra in ["sha-512=:AAAA:", "adler", "unixsum=1"] {
        let mut more = HeaderMap::new();
        more.append("repr-digest", HeaderValue::from_static(extra));
        for (n, v) in h {
            more.append(n, v.clone());
        }
        assert_eq!(
            Digest::from_headers(&more),
            Some(d),
            "with a `{extra}` line first"
        );
    }
}

/// The fields of a fill request: no hop-by-hop field, no range or condition, ours added.
fn check_fill_request(client: &HeaderMap) {
    let mut h = headers::for_fill(client);
    headers::add_ours(&mut h, "gw-1");
    let listed: Vec<String> = client
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for n in h.keys() {
        let n = n.as_str();
        assert!(
            ![
                "connection",
                "te",
                "transfer-encoding",
                "upgrade",
                "range",
                "if-range",
                "host"
            ]
            .contains(&n),
            "{n} sent upstream"
        );
        assert!(
            n == "via"
                || n == "accept-encoding"
                || n == "user-agent"
                || !listed.iter().any(|l| l == n),
            "{n} is listed in Connection but was sent upstream"
        );
    }
    assert_eq!(h["accept-encoding"], "identity");
    let via = h[http::header::VIA].to_str().unwrap();
    assert!(via.ends_with("1.1 gw-1"), "{via}");
}
