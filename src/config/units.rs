//! Sizes (`1048576`, `512MiB`, `20GiB`) and durations (`30s`, `5m`, `2h`) as they appear in the config
//! file and in `CISTERN_*` environment variables.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A byte count written as a plain number or with a binary/decimal unit suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "`{s}` is not a size (expected e.g. 1048576, 512MiB, 20GiB)"
            ));
        }
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" | "ki" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" | "mi" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" | "gi" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" | "ti" => 1 << 40,
            other => {
                return Err(format!(
                    "`{s}`: unknown size unit `{other}` (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        let too_big = || format!("`{s}` is too large a size (at most {} bytes)", u64::MAX);
        if !num.contains('.') {
            // Whole numbers exactly: through an f64, a byte count past 2^53 would change.
            let n: u64 = num.parse().map_err(|_| too_big())?;
            return n.checked_mul(mult).map(ByteSize).ok_or_else(too_big);
        }
        let v: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (expected e.g. 1048576, 512MiB, 20GiB)"))?;
        let bytes = v * mult as f64;
        if bytes >= u64::MAX as f64 {
            return Err(too_big());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (unit, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if v >= m && v.is_multiple_of(m) {
                return write!(f, "{}{}", v / m, unit);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// A duration written as `30s`, `5m`, `2h`, `500ms` or a plain number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    pub fn secs(n: u64) -> Self {
        Span(Duration::from_secs(n))
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (expected e.g. 30s, 5m, 2h)"))?;
        let secs = |per: u64| {
            n.checked_mul(per)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("`{s}` is too long a duration"))
        };
        let d = match unit.trim() {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86400)?,
            other => {
                return Err(format!(
                    "`{s}`: unknown duration unit `{other}` (use ms, s, m, h, d)"
                ))
            }
        };
        Ok(Span(d))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        if s != 0 && s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Span::secs(n)),
            Raw::S(s) => Span::parse(&s).map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1048576").unwrap().0, 1 << 20);
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("20GiB").unwrap().0, 20 << 30);
        assert_eq!(ByteSize::parse("0").unwrap().0, 0);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("GiB").is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
    }

    #[test]
    fn sizes_in_plain_bytes_are_exact() {
        // Regression (fuzz target config): every size went through an f64, so a byte count past 2^53
        // came back as a neighbour of itself, and one past 2^64 as u64::MAX.
        let n = 6_213_023_705_161_793_535u64;
        assert_eq!(ByteSize::parse(&n.to_string()).unwrap().0, n);
        assert_eq!(ByteSize::parse(&format!("000{n}")).unwrap().0, n);
        assert_eq!(ByteSize::parse("8388607TiB").unwrap().0, 8_388_607 << 40);
        assert_eq!(ByteSize::parse("1.5KiB").unwrap().0, 1536);
        for too_big in ["18446744073709551616", "16777216TiB", "16777216.5TiB"] {
            assert!(ByteSize::parse(too_big).is_err(), "{too_big}");
        }
    }

    #[test]
    fn spans() {
        assert_eq!(Span::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(Span::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Span::parse("2h").unwrap().0, Duration::from_secs(7200));
        assert_eq!(Span::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert!(Span::parse("soon").is_err());
        assert_eq!(Span::secs(600).to_string(), "10m");
    }

    #[test]
    fn spans_too_long_are_errors() {
        // Found reading the parser beside the config fuzz target: the unit's multiplication overflowed
        // (a panic in a debug build, a wrapped, short duration in a release build).
        for v in [
            "213503982334602d",
            "5124095576030432h",
            "307445734561825861m",
        ] {
            assert!(Span::parse(v).is_err(), "{v}");
        }
        assert_eq!(
            Span::parse("213503982334601d").unwrap().0.as_secs(),
            213_503_982_334_601 * 86400
        );
    }
}
