//! `Range: bytes=...` (RFC 9110 §14.1.2), reduced to what a cache answers: one satisfiable range, the
//! whole body (no header, not parseable, not bytes), or unsatisfiable. A set of several ranges is
//! parsed here too ([`parse_set`]); `multipart` decides how it is answered.

/// A parsed single byte range, before the object's size is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` (`b` inclusive) or `a-` (`b` None).
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// Largest number of range-specs parsed from one header: far more than `server.max_ranges` may allow,
/// so that a hostile header of thousands of tiny ranges costs no more than this to look at.
pub const PARSE_LIMIT: usize = 10_000;

/// Parses a Range header value holding exactly one range. None means "ignore it and send the whole
/// body" (RFC 9110: a server may ignore a Range it does not understand) or "several ranges" (see
/// [`parse_set`]).
pub fn parse(v: &str) -> Option<ByteRange> {
    match parse_set(v)?.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Parses a Range header value into its range-specs, in the order asked (RFC 9110 §14.1.1: empty list
/// elements are allowed). None when any spec does not parse, the unit is not bytes, or the set holds
/// more than [`PARSE_LIMIT`] specs: the header is then ignored as a whole.
pub fn parse_set(v: &str) -> Option<Vec<ByteRange>> {
    let (unit, set) = v.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut out = Vec::new();
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if out.len() == PARSE_LIMIT {
            return None;
        }
        out.push(parse_spec(spec)?);
    }
    (!out.is_empty()).then_some(out)
}

/// One `a-b`, `a-` or `-n`.
fn parse_spec(spec: &str) -> Option<ByteRange> {
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if a.is_empty() {
        return Some(ByteRange::Suffix(num(b)?));
    }
    let first = num(a)?;
    if b.is_empty() {
        return Some(ByteRange::From { first, last: None });
    }
    let last = num(b)?;
    (last >= first).then_some(ByteRange::From {
        first,
        last: Some(last),
    })
}

/// The outcome of a range against an object of known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Bytes [start, end) as a 206.
    Partial { start: u64, end: u64 },
    /// The whole body as a 200 (a suffix range on an empty object).
    Whole,
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

impl ByteRange {
    pub fn resolve(self, size: u64) -> Resolved {
        match self {
            ByteRange::From { first, last } => {
                if first >= size {
                    return Resolved::Unsatisfiable;
                }
                let end = last.map(|l| l.saturating_add(1).min(size)).unwrap_or(size);
                Resolved::Partial { start: first, end }
            }
            ByteRange::Suffix(n) => {
                if size == 0 {
                    return Resolved::Whole;
                }
                if n == 0 {
                    return Resolved::Unsatisfiable;
                }
                Resolved::Partial {
                    start: size.saturating_sub(n),
                    end: size,
                }
            }
        }
    }

    /// The first byte a 206 for this range would send, when that is known now: None for a range that is
    /// unsatisfiable (or whole) at the size, and for a suffix range while the size is unknown.
    pub fn first_byte(self, size: Option<u64>) -> Option<u64> {
        match (self, size) {
            (_, Some(size)) => match self.resolve(size) {
                Resolved::Partial { start, .. } => Some(start),
                _ => None,
            },
            (ByteRange::From { first, .. }, None) => Some(first),
            (ByteRange::Suffix(_), None) => None,
        }
    }

    /// For an object whose size is not known yet: the bytes [start, end) when that can be served as they
    /// arrive (`a-b`); None when the size is needed first (`a-`, `-n`). A last byte of u64::MAX ends
    /// the range at u64::MAX (no object reaches it), unless that leaves it empty: then it too waits.
    pub fn bounded(self) -> Option<(u64, u64)> {
        match self {
            ByteRange::From {
                first,
                last: Some(l),
            } => Some((first, l.saturating_add(1))).filter(|(s, e)| s < e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            parse("bytes=0-99"),
            Some(ByteRange::From {
                first: 0,
                last: Some(99)
            })
        );
        assert_eq!(
            parse("bytes=100-"),
            Some(ByteRange::From {
                first: 100,
                last: None
            })
        );
        assert_eq!(parse("bytes=-5"), Some(ByteRange::Suffix(5)));
        assert_eq!(
            parse("Bytes = 1-2"),
            Some(ByteRange::From {
                first: 1,
                last: Some(2)
            })
        );
    }

    #[test]
    fn ignores_what_it_cannot_serve_as_one_range() {
        for v in [
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=0-1,x",
            "bytes=,",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "bytes",
            "bytes=+1-2",
        ] {
            assert_eq!(parse(v), None, "{v}");
        }
    }

    #[test]
    fn parses_a_set_in_the_order_asked() {
        let set = parse_set("bytes=500-599, 0-99,,-10 ,7-").unwrap();
        assert_eq!(
            set,
            vec![
                ByteRange::From {
                    first: 500,
                    last: Some(599)
                },
                ByteRange::From {
                    first: 0,
                    last: Some(99)
                },
                ByteRange::Suffix(10),
                ByteRange::From {
                    first: 7,
                    last: None
                },
            ]
        );
        assert_eq!(parse_set("bytes=0-1,2-1"), None);
        let many = format!("bytes={}", vec!["0-0"; PARSE_LIMIT + 1].join(","));
        assert_eq!(parse_set(&many), None);
        let most = format!("bytes={}", vec!["0-0"; PARSE_LIMIT].join(","));
        assert_eq!(parse_set(&most).map(|s| s.len()), Some(PARSE_LIMIT));
    }

    #[test]
    fn resolves_against_the_size() {
        let r = |s| parse(s).unwrap();
        assert_eq!(
            r("bytes=0-99").resolve(50),
            Resolved::Partial { start: 0, end: 50 }
        );
        assert_eq!(r("bytes=50-").resolve(50), Resolved::Unsatisfiable);
        assert_eq!(
            r("bytes=-10").resolve(50),
            Resolved::Partial { start: 40, end: 50 }
        );
        assert_eq!(
            r("bytes=-100").resolve(50),
            Resolved::Partial { start: 0, end: 50 }
        );
        assert_eq!(r("bytes=0-0").resolve(0), Resolved::Unsatisfiable);
        assert_eq!(r("bytes=-5").resolve(0), Resolved::Whole);
        assert_eq!(r("bytes=10-19").bounded(), Some((10, 20)));
        assert_eq!(r("bytes=10-").bounded(), None);
        assert_eq!(r("bytes=10-").first_byte(None), Some(10));
        assert_eq!(r("bytes=-10").first_byte(None), None);
        assert_eq!(r("bytes=-10").first_byte(Some(50)), Some(40));
        assert_eq!(r("bytes=50-").first_byte(Some(50)), None);
        // Regression: a last byte of u64::MAX overflowed while the size was still unknown.
        let huge = format!("bytes=0-{}", u64::MAX);
        assert_eq!(r(&huge).bounded(), Some((0, u64::MAX)));
        assert_eq!(
            r(&huge).resolve(10),
            Resolved::Partial { start: 0, end: 10 }
        );
    }

    #[test]
    fn a_range_of_the_last_possible_byte_is_not_served_empty() {
        // Regression (fuzz target range): `bytes=M-M` with M = u64::MAX was bounded to the empty
        // [M, M), answered 206 with `Content-Range: bytes M-(M-1)/*`. It waits for the size instead
        // (and is unsatisfiable, as no object is that large).
        let max = u64::MAX;
        let r = parse(&format!("bytes={max}-{max}")).unwrap();
        assert_eq!(r.bounded(), None);
        assert_eq!(r.resolve(10), Resolved::Unsatisfiable);
        let r = parse(&format!("bytes={}-{max}", max - 1)).unwrap();
        assert_eq!(r.bounded(), Some((max - 1, max)));
    }
}
