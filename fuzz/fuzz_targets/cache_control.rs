//! Cache-Control, Vary and the stored header block (src/fetch/freshness.rs, src/fetch/headers.rs,
//! `fetch::vary_for`): any response head and request head give a storability, a lifetime, an age and
//! a reuse decision without panicking; a stored response matches the request it answered, under the
//! key the lookup computes again; the stored block and the key's metadata read back as they were.
#![no_main]

use cistern::fetch::freshness::{self, Received, RequestCc};
use cistern::fetch::{headers, variant_key};
use cistern::fuzzing::{header_map, vary_for};
use cistern::store::{KeyMeta, StoredHeaders};
use http::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Two bytes of status, 8 of response time, 8 of "now" after it; then the response head and, after
    // a NUL, the request head.
    if data.len() < 18 {
        return;
    }
    let status = StatusCode::from_u16(100 + u16::from_le_bytes([data[0], data[1]]) % 500).unwrap();
    let response_ms = u64::from_le_bytes(data[2..10].try_into().unwrap()) >> 20;
    let later = u64::from_le_bytes(data[10..18].try_into().unwrap()) >> 24;
    let heads = &data[18..];
    let (resp, req) = match heads.iter().position(|b| *b == 0) {
        Some(i) => (&heads[..i], &heads[i + 1..]),
        None => (heads, &[][..]),
    };
    let (resp, req) = (header_map(resp), header_map(req));
    check_directives(&resp);
    let rc = RequestCc::parse(&req);
    for v in [rc.max_age, rc.min_fresh, rc.max_stale.flatten()]
        .into_iter()
        .flatten()
    {
        assert!(v <= 1 << 31, "a delta-seconds beyond 2^31: {v}");
    }
    let _ = freshness::storable(status, &resp, false);
    let _ = freshness::storable(status, &resp, true);
    let lifetime = freshness::lifetime(status, &resp);
    let _ = freshness::initial_age(&resp, response_ms.saturating_sub(later), response_ms);
    let Some(vary) = freshness::vary_of(&resp, &req) else {
        return;
    };
    check_vary(&vary, &req);
    let m = freshness::key_meta(Received {
        status,
        headers: &resp,
        immutable: false,
        request_ms: response_ms.saturating_sub(later % 10_000),
        response_ms,
        vary,
    });
    assert_eq!(m.fresh_for, Some(lifetime));
    let json = serde_json::to_string(&m).unwrap();
    let back: KeyMeta = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m, "{json}");
    let now = response_ms.saturating_add(later);
    let _ = freshness::reuse(&m, &rc, now);
    let _ = freshness::stale_on_error(&m, now);
    let _ = freshness::shareable_with_credentials(&m);
    let _ = m.ttl(now);
    check_block(&m.headers, &resp);
});

/// Every directive is named by a token (RFC 9111 §5.2), lower-cased.
fn check_directives(h: &HeaderMap) {
    for (name, _) in freshness::directives(h) {
        let token = name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
        assert!(!name.is_empty() && token, "directive {name:?}");
        assert_eq!(name, name.to_ascii_lowercase());
    }
}

/// A response stored for a request matches that request, and the lookup finds its variant again.
fn check_vary(vary: &[(String, Option<String>)], req: &HeaderMap) {
    let names: Vec<&str> = vary.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    assert!(freshness::vary_matches(vary, req), "{vary:?}");
    let again = vary_for(vary, req);
    assert_eq!(
        variant_key("k", &again),
        variant_key("k", vary),
        "the lookup's variant key differs"
    );
}

/// The stored block: JSON round trip, and built into fields then captured again, the same block.
fn check_block(s: &StoredHeaders, resp: &HeaderMap) {
    let json = serde_json::to_string(s).unwrap();
    let back: StoredHeaders = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s);
    assert_eq!(&headers::capture(&headers::to_map(s)), s, "{s:?}");
    let e2e = headers::end_to_end(resp);
    for n in e2e.keys() {
        assert!(
            ![
                "connection",
                "keep-alive",
                "transfer-encoding",
                "upgrade",
                "te",
                "trailer"
            ]
            .contains(&n.as_str()),
            "{n} crossed"
        );
    }
    let updated = headers::updated_by(s, resp);
    assert_eq!(
        updated.get("content-type"),
        s.get("content-type"),
        "a 304 replaced the content type"
    );
}
