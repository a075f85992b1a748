//! `Digest`: the SHA-256 that names every stored object, and its spellings on the wire (hex in paths and
//! ETags, base64 in `Repr-Digest` / `Digest`, RFC 9530).

use std::fmt;
use std::str::FromStr;

use base64::Engine;

/// A SHA-256 digest. Objects are stored under it, so it is both an identity and a checksum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Parses 64 hex digits (either case) or standard base64 of 32 bytes, as manifests write it.
    pub fn parse_any(s: &str) -> Option<Digest> {
        let s = s.trim();
        if s.len() == 64 {
            if let Ok(d) = s.parse() {
                return Some(d);
            }
        }
        let raw = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        Some(Digest(raw.try_into().ok()?))
    }

    /// `Repr-Digest: sha-256=:<b64>:` (RFC 9530) or the older `Digest: SHA-256=<b64>` (RFC 3230).
    /// Other members, members without a value and lines that are not ASCII are passed over: they say
    /// nothing about the sha-256 member.
    pub fn from_headers(h: &http::HeaderMap) -> Option<Digest> {
        if let Some(val) = sha256_member(h, "repr-digest") {
            return Digest::parse_any(val.trim().trim_matches(':'));
        }
        sha256_member(h, "digest").and_then(|val| Digest::parse_any(val.trim()))
    }

    pub fn repr_digest_header(&self) -> String {
        format!("sha-256=:{}:", self.base64())
    }

    pub fn etag(&self) -> String {
        format!("\"{}\"", self.hex())
    }
}

/// The value of the first `sha-256` member of a digest field's lines.
fn sha256_member<'a>(h: &'a http::HeaderMap, field: &str) -> Option<&'a str> {
    h.get_all(field)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|member| member.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sha-256"))
        .map(|(_, val)| val)
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a SHA-256 digest (64 hex digits)")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadDigest(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.hex()[..12])
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn spellings_round_trip() {
        let d = Digest(sha2::Sha256::digest(b"abc").into());
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse_any(&d.base64()), Some(d));
        assert_eq!(Digest::parse_any(&d.hex().to_uppercase()), Some(d));
        let mut h = http::HeaderMap::new();
        h.insert("repr-digest", d.repr_digest_header().parse().unwrap());
        assert_eq!(Digest::from_headers(&h), Some(d));
        let mut h = http::HeaderMap::new();
        h.insert(
            "digest",
            format!("MD5=abc, SHA-256={}", d.base64()).parse().unwrap(),
        );
        assert_eq!(Digest::from_headers(&h), Some(d));
        assert!("xyz".parse::<Digest>().is_err());
    }

    #[test]
    fn repr_digest_found_beside_members_without_a_value() {
        // Regression (fuzz target upstream_head): a member without `=` (a Structured Field boolean,
        // RFC 9530 allows other members) or a line that is not ASCII before the sha-256 member hid it.
        let d = Digest(sha2::Sha256::digest(b"abc").into());
        let mut h = http::HeaderMap::new();
        h.append("repr-digest", "adler".parse().unwrap());
        h.append(
            "repr-digest",
            http::HeaderValue::from_bytes(b"x=:\xff:").unwrap(),
        );
        h.append(
            "repr-digest",
            format!("unixsum, {}", d.repr_digest_header())
                .parse()
                .unwrap(),
        );
        assert_eq!(Digest::from_headers(&h), Some(d));
        let mut h = http::HeaderMap::new();
        h.append("repr-digest", "sha-512=:AAAA:, adler".parse().unwrap());
        h.append("digest", format!("SHA-256={}", d.base64()).parse().unwrap());
        assert_eq!(Digest::from_headers(&h), Some(d));
    }
}
