//! `Range` (src/server/range.rs): any header value parses without panicking; a parsed range reads
//! back as itself, and resolved against a size it stays within that size and means what was asked.
#![no_main]

use cistern::server::range::{parse, ByteRange, Resolved};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes: the object's size (small sizes are the interesting ones, so one byte of
    // input can also stand for it); the rest: the header value.
    let (size, value) = match data.split_first() {
        Some((&n, rest)) if n < 0x80 => (u64::from(n), rest),
        _ if data.len() >= 9 => (
            u64::from_le_bytes(data[1..9].try_into().unwrap()),
            &data[9..],
        ),
        _ => return,
    };
    let Ok(value) = std::str::from_utf8(value) else {
        return;
    };
    let Some(r) = parse(value) else {
        return;
    };
    let written = match r {
        ByteRange::From {
            first,
            last: Some(last),
        } => {
            assert!(last >= first, "{value:?} gave {r:?}");
            format!("bytes={first}-{last}")
        }
        ByteRange::From { first, last: None } => format!("bytes={first}-"),
        ByteRange::Suffix(n) => format!("bytes=-{n}"),
    };
    assert_eq!(parse(&written), Some(r), "{value:?} does not read back");
    check_resolved(r, size, value);
    if let Some((start, end)) = r.bounded() {
        // Served as `bytes start-(end-1)/*` while the size is unknown: never empty, never inverted.
        assert!(start < end, "{value:?}: bounded to [{start}, {end})");
        let ByteRange::From {
            first,
            last: Some(last),
        } = r
        else {
            panic!("{value:?}: {r:?} bounded without a last byte");
        };
        assert_eq!(start, first);
        assert!(end == last.saturating_add(1), "{value:?}: end {end}");
    }
});

fn check_resolved(r: ByteRange, size: u64, value: &str) {
    match (r, r.resolve(size)) {
        (_, Resolved::Partial { start, end }) => {
            assert!(
                start < end && end <= size,
                "{value:?} on {size}: [{start}, {end})"
            );
            match r {
                ByteRange::From { first, last } => {
                    assert_eq!(start, first);
                    let want = last.map_or(size, |l| l.saturating_add(1).min(size));
                    assert_eq!(end, want, "{value:?} on {size}");
                }
                ByteRange::Suffix(n) => {
                    assert_eq!(end, size);
                    assert_eq!(end - start, n.min(size), "{value:?} on {size}");
                }
            }
        }
        (ByteRange::From { first, .. }, Resolved::Unsatisfiable) => assert!(first >= size),
        (ByteRange::Suffix(n), Resolved::Unsatisfiable) => assert!(n == 0 && size > 0),
        (ByteRange::Suffix(_), Resolved::Whole) => assert_eq!(size, 0),
        (ByteRange::From { .. }, Resolved::Whole) => panic!("{value:?} on {size}: whole"),
    }
}
