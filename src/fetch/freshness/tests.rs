use super::*;

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    m
}

const OK: StatusCode = StatusCode::OK;

#[test]
fn lifetimes() {
    let l = |p: &[(&str, &str)]| lifetime(OK, &h(p));
    assert_eq!(l(&[("cache-control", "public, max-age=300")]), 300);
    assert_eq!(l(&[("cache-control", "max-age=300, s-maxage=60")]), 60);
    assert_eq!(l(&[("cache-control", "no-cache, max-age=300")]), 0);
    assert_eq!(l(&[("cache-control", "max-age=abc")]), 0);
    assert_eq!(l(&[("cache-control", "max-age=\"30\"")]), 30);
    assert_eq!(
        l(&[("cache-control", "max-age=99999999999999999999")]),
        1 << 31
    );
    assert_eq!(
        l(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:59:37 GMT")
        ]),
        600
    );
    assert_eq!(l(&[("expires", "0")]), 0);
    let heuristic = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("last-modified", "Sun, 06 Nov 1994 07:49:37 GMT"),
    ];
    assert_eq!(l(&heuristic), 360);
    // Heuristic freshness only for the statuses that allow it.
    assert_eq!(lifetime(StatusCode::FORBIDDEN, &h(&heuristic)), 0);
    assert_eq!(l(&[]), 0);
}

#[test]
fn storability() {
    let s = |st: u16, p: &[(&str, &str)]| storable(StatusCode::from_u16(st).unwrap(), &h(p), false);
    assert!(!s(200, &[("cache-control", "private")]));
    assert!(!s(200, &[("cache-control", "no-store")]));
    assert!(s(200, &[("cache-control", "max-age=5")]));
    assert!(s(404, &[]));
    assert!(s(301, &[]));
    assert!(!s(403, &[]));
    assert!(s(403, &[("cache-control", "max-age=5")]));
    assert!(!s(206, &[("cache-control", "max-age=5")]));
    assert!(!storable(OK, &h(&[("cache-control", "max-age=5")]), true));
    assert!(storable(OK, &h(&[("cache-control", "public")]), true));
}

#[test]
fn age_counts_the_upstream_age_and_date() {
    let now = 1_000_000_000_000u64;
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(now - 30_000));
    assert_eq!(initial_age(&h(&[("age", "7200")]), now, now), 7200);
    assert_eq!(initial_age(&h(&[("date", &date)]), now, now), 30);
    assert_eq!(
        initial_age(&h(&[("age", "10"), ("date", &date)]), now, now),
        30
    );
    // The time the request took counts too.
    assert_eq!(initial_age(&h(&[("age", "10")]), now - 5000, now), 15);
    assert_eq!(initial_age(&h(&[("age", "abc")]), now, now), 0);
    assert_eq!(initial_age(&h(&[("age", "5, 100")]), now, now), 5);
}

fn meta(p: &[(&str, &str)], now: u64) -> KeyMeta {
    key_meta(Received {
        status: OK,
        headers: &h(p),
        immutable: false,
        request_ms: now,
        response_ms: now,
        vary: Vec::new(),
    })
}

#[test]
fn reuse_decisions() {
    let now = 1_000_000_000_000u64;
    let any = RequestCc::default();
    let m = meta(&[("cache-control", "max-age=3600"), ("age", "7200")], now);
    assert_eq!(reuse(&m, &any, now), Reuse::Revalidate, "Age ignored");
    let m = meta(&[("cache-control", "max-age=100")], now);
    assert_eq!(reuse(&m, &any, now + 50_000), Reuse::Fresh);
    let req = |v: &str| RequestCc::parse(&h(&[("cache-control", v)]));
    assert_eq!(
        reuse(&m, &req("max-age=10"), now + 50_000),
        Reuse::Revalidate
    );
    assert_eq!(
        reuse(&m, &req("min-fresh=60"), now + 50_000),
        Reuse::Revalidate
    );
    assert_eq!(reuse(&m, &req("no-cache"), now), Reuse::Revalidate);
    assert_eq!(reuse(&m, &req("max-age=0"), now), Reuse::Revalidate);
    // Stale: max-stale accepts it, unless the response forbids stale use.
    assert_eq!(reuse(&m, &any, now + 150_000), Reuse::Revalidate);
    assert_eq!(reuse(&m, &req("max-stale"), now + 150_000), Reuse::Stale);
    assert_eq!(
        reuse(&m, &req("max-stale=10"), now + 150_000),
        Reuse::Revalidate
    );
    let mr = meta(&[("cache-control", "max-age=100, must-revalidate")], now);
    assert_eq!(
        reuse(&mr, &req("max-stale"), now + 150_000),
        Reuse::Revalidate
    );
    assert!(!stale_on_error(&mr, now + 150_000));
    assert!(stale_on_error(&m, now + 150_000));
    let swr = meta(
        &[("cache-control", "max-age=1, stale-while-revalidate=60")],
        now,
    );
    assert_eq!(reuse(&swr, &any, now + 30_000), Reuse::StaleRevalidating);
    assert_eq!(reuse(&swr, &any, now + 90_000), Reuse::Revalidate);
    let sie = meta(
        &[("cache-control", "max-age=1, s-maxage=1, stale-if-error=60")],
        now,
    );
    assert!(stale_on_error(&sie, now + 30_000));
    assert!(!stale_on_error(&sie, now + 90_000));
    assert!(RequestCc::parse(&h(&[("pragma", "no-cache")])).no_cache);
    assert!(RequestCc::parse(&h(&[("cache-control", "only-if-cached")])).only_if_cached);
}

#[test]
fn vary_selects_by_normalised_request_fields() {
    let resp = h(&[("vary", "Accept-Language, accept-encoding")]);
    let req = h(&[("accept-language", "de, en")]);
    let v = vary_of(&resp, &req).unwrap();
    assert_eq!(
        v,
        [
            ("accept-encoding".to_string(), None),
            ("accept-language".to_string(), Some("de,en".to_string()))
        ]
    );
    assert!(vary_matches(&v, &h(&[("accept-language", "de,en")])));
    assert!(vary_matches(
        &v,
        &h(&[("accept-language", "de"), ("accept-language", "en")])
    ));
    assert!(!vary_matches(&v, &h(&[("accept-language", "fr")])));
    assert!(!vary_matches(
        &v,
        &h(&[("accept-language", "de,en"), ("accept-encoding", "gzip")])
    ));
    assert!(vary_of(&h(&[("vary", "*")]), &req).is_none());
    // Language ranges in another order or letter case select the same variant; other fields keep
    // their order.
    assert!(vary_matches(&v, &h(&[("accept-language", "en, DE")])));
    let other = vary_of(&h(&[("vary", "x-order")]), &h(&[("x-order", "a, b")])).unwrap();
    assert!(!vary_matches(&other, &h(&[("x-order", "b, a")])));
}

#[test]
fn must_understand_overrides_no_store_for_known_statuses() {
    let cc = h(&[("cache-control", "max-age=3600, no-store, must-understand")]);
    assert!(storable(OK, &cc, false));
    let unknown = StatusCode::from_u16(599).unwrap();
    assert!(!storable(unknown, &cc, false));
    assert!(!storable(
        OK,
        &h(&[("cache-control", "max-age=3600, no-store")]),
        false
    ));
}

#[test]
fn cdn_cache_control_replaces_cache_control_and_expires() {
    let l = |p: &[(&str, &str)]| lifetime(OK, &h(p));
    let expires = ("expires", "Sun, 06 Nov 1994 08:59:37 GMT");
    let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(
        l(&[
            ("cdn-cache-control", "max-age=5"),
            ("cache-control", "max-age=60")
        ]),
        5
    );
    assert_eq!(l(&[("cdn-cache-control", "max-age=0"), expires, date]), 0);
    assert_eq!(l(&[("cdn-cache-control", "foo"), expires, date]), 0);
    assert_eq!(
        l(&[("cdn-cache-control", "max-age=\"5\""), expires, date]),
        600
    );
    let nostore = ("cache-control", "no-store");
    assert!(storable(
        OK,
        &h(&[nostore, ("cdn-cache-control", "max-age=60")]),
        false
    ));
    assert!(!storable(
        OK,
        &h(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store")
        ]),
        false
    ));
}

#[test]
fn commas_in_quoted_strings_do_not_end_a_directive() {
    // Regression (fuzz target cache_control): the field was split at every comma, inside quoted strings
    // too (RFC 9110 §5.6.4), so the tail of a quoted value became a directive of its own, and a member
    // whose name is not a token counted as a directive.
    let cc = |v: &str| h(&[("cache-control", v)]);
    let v = r#"ext="a, max-age=31536000", max-age=60"#;
    assert_eq!(lifetime(OK, &cc(v)), 60);
    assert_eq!(
        directives(&cc(v)),
        [
            ("ext".to_string(), Some("a, max-age=31536000".to_string())),
            ("max-age".to_string(), Some("60".to_string())),
        ]
    );
    let escaped = directives(&cc(r#"ext="a\", public", =5, x/y, Max-Age="30""#));
    assert_eq!(
        escaped,
        [
            ("ext".to_string(), Some("a\", public".to_string())),
            ("max-age".to_string(), Some("30".to_string())),
        ]
    );
    // The qualified form of no-cache still makes the response stale.
    assert_eq!(
        lifetime(OK, &cc(r#"no-cache="set-cookie, x", max-age=60"#)),
        0
    );
    let mut m = meta(&[("cache-control", r#"ext="x, public", max-age=60"#)], 0);
    assert!(!shareable_with_credentials(&m));
    m.headers = crate::store::StoredHeaders::new(vec![(
        "cache-control".into(),
        "max-age=60, public".into(),
    )]);
    assert!(shareable_with_credentials(&m));
}
