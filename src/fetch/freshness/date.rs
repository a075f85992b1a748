//! HTTP dates as a cache reads them (RFC 9110 §5.6.7): the three formats, with the lenience recipients
//! are asked for ("SHOULD accept all three"), and no more: names in any letter case and a day of the
//! week that does not match the date are accepted, while a date of another shape (two-digit year in
//! IMF-fixdate, dashes, a one-digit hour, another zone than GMT) stays invalid, as RFC 9111 §5.3 wants
//! for `Expires`.

use std::time::SystemTime;

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Parses an HTTP date, None when it is not one.
pub fn parse(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    if let Ok(t) = httpdate::parse_http_date(v) {
        return Some(t);
    }
    let fixed = canonical_case(v);
    if let Ok(t) = httpdate::parse_http_date(&fixed) {
        return Some(t);
    }
    // The day of the week says nothing the date does not: try the date with each.
    let word_end = fixed.find(|c: char| !c.is_ascii_alphabetic())?;
    let (word, rest) = fixed.split_at(word_end);
    let names = if word.len() == 3 {
        &DAYS[..]
    } else {
        &LONG_DAYS[..]
    };
    if !names.contains(&word) {
        return None;
    }
    names
        .iter()
        .find_map(|d| httpdate::parse_http_date(&format!("{d}{rest}")).ok())
}

/// The date with day names, month names and `GMT` in the case the grammar spells them.
fn canonical_case(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let known = DAYS
            .iter()
            .chain(LONG_DAYS.iter())
            .chain(MONTHS.iter())
            .chain(["GMT"].iter())
            .find(|n| n.eq_ignore_ascii_case(word));
        out.push_str(known.copied().unwrap_or(word));
        word.clear();
    };
    for c in v.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_formats_in_any_case() {
        let want = parse("Thu, 18 Aug 2050 02:01:18 GMT").unwrap();
        for v in [
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            "Mon, 18 Aug 2050 02:01:18 GMT",
            "Thursday, 18-Aug-50 02:01:18 GMT",
            "Thu Aug 18 02:01:18 2050",
        ] {
            assert_eq!(parse(v), Some(want), "{v}");
        }
        assert!(parse("Thu Aug  8 02:01:18 2050").is_some());
    }

    #[test]
    fn other_shapes_stay_invalid() {
        for v in [
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu,  18 Aug 2050 02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02.01.18 GMT",
            "Thu, 18 Aug 2050 2:01:18 GMT",
            "0",
            "",
        ] {
            assert_eq!(parse(v), None, "{v:?}");
        }
    }
}
