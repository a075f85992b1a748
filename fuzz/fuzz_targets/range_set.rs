//! A Range header of several ranges (src/server/range.rs `parse_set`) and how it is answered
//! (src/server/multipart.rs): any value parses without panicking; the plan for an object of any size
//! serves only bytes of the object, respects `max_ranges` and the twice-the-object bound, leaves no two
//! parts that overlap or lie within `MERGE_GAP` of each other, covers every satisfiable byte asked, and
//! the multipart body announced is exactly as long as the one sent.
#![no_main]

use cistern::server::multipart::{plan, Layout, Piece, Plan, MERGE_GAP};
use cistern::server::range::{parse_set, Resolved};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: max_ranges; next byte (< 0x80) or 8 bytes: the object's size; the rest: the value.
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let max = usize::from(max);
    let (size, value) = match rest.split_first() {
        Some((&n, v)) if n < 0x80 => (u64::from(n) * 97, v),
        _ if rest.len() >= 9 => (
            u64::from_le_bytes(rest[1..9].try_into().unwrap()),
            &rest[9..],
        ),
        _ => return,
    };
    let Ok(value) = std::str::from_utf8(value) else {
        return;
    };
    let Some(set) = parse_set(value) else {
        return;
    };
    let spans: Vec<(u64, u64)> = set
        .iter()
        .filter_map(|r| match r.resolve(size) {
            Resolved::Partial { start, end } => Some((start, end)),
            _ => None,
        })
        .collect();
    let asked: u128 = spans.iter().map(|(s, e)| u128::from(e - s)).sum();
    match plan(&set, size, max) {
        Plan::Whole => assert!(
            set.len() > max || asked > u128::from(size) * 2 || spans.is_empty(),
            "{value:?} on {size}: whole"
        ),
        Plan::Unsatisfiable => assert!(spans.is_empty(), "{value:?} on {size}"),
        Plan::One { start, end } => check_parts(&[(start, end)], &spans, size, value),
        Plan::Many(parts) => {
            assert!(parts.len() >= 2 && parts.len() <= set.len());
            check_parts(&parts, &spans, size, value);
            let layout = Layout::new(parts, size, "application/octet-stream");
            let sent: u64 = layout
                .pieces()
                .iter()
                .map(|p| match p {
                    Piece::Text(b) => b.len() as u64,
                    Piece::Span(s, e) => e - s,
                })
                .sum();
            assert_eq!(layout.length(), sent, "{value:?} on {size}");
        }
    }
});

fn check_parts(parts: &[(u64, u64)], spans: &[(u64, u64)], size: u64, value: &str) {
    let mut sorted = parts.to_vec();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(
            w[1].0 > w[0].1.saturating_add(MERGE_GAP),
            "{value:?} on {size}: parts {:?} and {:?} should have merged",
            w[0],
            w[1]
        );
    }
    for &(s, e) in parts {
        assert!(s < e && e <= size, "{value:?} on {size}: part [{s}, {e})");
    }
    for &(s, e) in spans {
        assert!(
            parts.iter().any(|&(ps, pe)| ps <= s && e <= pe),
            "{value:?} on {size}: [{s}, {e}) not served"
        );
    }
}
