//! The `<hex>.meta` file beside each object: its size, pin and type, and what cistern knows about each
//! key that maps to it (`KeyMeta`: the upstream's validators, freshness and header block), which the
//! `<hex>.keys` log beside it records (see `keylog`; the `.meta` of earlier versions held the keys
//! itself). With that log, it is the durable truth the sled index is rebuilt from (SPEC 4), so it is
//! always replaced atomically (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Digest;

/// What cistern knows about one key (one URL form, or one variant of one) that maps to an object.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyMeta {
    /// When the response was received or last revalidated (Unix ms): "the one fetched last wins" on
    /// rebuild, and the response time of RFC 9111 §4.2.3.
    pub fetched_at: u64,
    /// Freshness lifetime in seconds; None = never goes stale (digest URL, manifest, immutable origin).
    pub fresh_for: Option<u64>,
    /// The upstream's ETag as it sent it, for If-None-Match on revalidation and for If-Range on resume.
    pub etag: Option<String>,
    /// The upstream's Last-Modified, for If-Modified-Since and heuristic freshness.
    pub last_modified: Option<String>,
    /// The response's corrected initial age in seconds at `fetched_at` (RFC 9111 §4.2.3): what the
    /// upstream's `Age` and `Date` said, plus the time the request took.
    #[serde(default)]
    pub initial_age: u64,
    /// The status the upstream answered (200, or another cacheable one such as 404 or 301).
    #[serde(default = "status_ok")]
    pub status: u16,
    /// The upstream's end-to-end response fields, replayed on hits.
    #[serde(default)]
    pub headers: StoredHeaders,
    /// The response forbids serving it stale (`must-revalidate`, `proxy-revalidate`, `s-maxage`,
    /// `no-cache`: RFC 9111 §4.2.4), even while the upstream is unreachable.
    #[serde(default)]
    pub no_stale: bool,
    /// `stale-if-error` and `stale-while-revalidate` (RFC 5861), in seconds.
    #[serde(default)]
    pub stale_if_error: Option<u64>,
    #[serde(default)]
    pub stale_while_revalidate: Option<u64>,
    /// The request fields the response varies on (RFC 9111 §4.1) and their values, normalised, in the
    /// request it answered (None: the field was absent). Empty: the response has no `Vary`.
    #[serde(default)]
    pub vary: Vec<(String, Option<String>)>,
}

fn status_ok() -> u16 {
    200
}

/// A stored response header block: the upstream's end-to-end fields in the order it sent them, lower-
/// case names. Shared, so that a hit costs no copy of it, and built into header fields once (by the
/// caller's `build`, on first use), so that a hit costs one clone of those.
#[derive(Clone, Debug, Default)]
pub struct StoredHeaders(Arc<Block>);

#[derive(Debug, Default)]
struct Block {
    pairs: Vec<(String, String)>,
    fields: std::sync::OnceLock<http::HeaderMap>,
}

impl StoredHeaders {
    pub fn new(pairs: Vec<(String, String)>) -> StoredHeaders {
        StoredHeaders(Arc::new(Block {
            pairs,
            fields: std::sync::OnceLock::new(),
        }))
    }

    /// The first value of a field, by lower-case name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.pairs.iter()
    }

    pub fn len(&self) -> usize {
        self.0.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.pairs.is_empty()
    }

    /// The block as header fields, built by `build` the first time.
    pub fn fields(&self, build: impl FnOnce(&Self) -> http::HeaderMap) -> &http::HeaderMap {
        self.0.fields.get_or_init(|| build(self))
    }
}

impl PartialEq for StoredHeaders {
    fn eq(&self, other: &Self) -> bool {
        self.0.pairs == other.0.pairs
    }
}

impl Serialize for StoredHeaders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.pairs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StoredHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<(String, String)>::deserialize(d).map(StoredHeaders::new)
    }
}

impl KeyMeta {
    pub fn immutable() -> Self {
        KeyMeta {
            fetched_at: now_ms(),
            status: 200,
            ..Default::default()
        }
    }

    /// The response's current age in seconds (RFC 9111 §4.2.3).
    /// Saturating: the values come from a file on disk, which may hold anything.
    pub fn age(&self, now_ms: u64) -> u64 {
        self.initial_age
            .saturating_add(now_ms.saturating_sub(self.fetched_at) / 1000)
    }

    /// Seconds left before the mapping goes stale (negative once stale); None when it never does.
    pub fn ttl(&self, now_ms: u64) -> Option<i64> {
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Some(signed(self.fresh_for?).saturating_sub(signed(self.age(now_ms))))
    }

    /// The upstream's ETag when it is strong (usable for If-Range, RFC 9110 §13.1.5).
    pub fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| !e.starts_with("W/"))
    }
}

/// The content of `<hex>.meta`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ObjectMeta {
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub content_type: Option<String>,
    /// The keys, in a `.meta` written by an earlier version: read as the first records of the
    /// object's `.keys` log, kept when the `.meta` is rewritten (a pin), moved into the log when that
    /// is compacted. Empty in a `.meta` this version made, and then not written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, KeyMeta>,
}

impl ObjectMeta {
    pub fn read(path: &Path) -> std::io::Result<ObjectMeta> {
        let raw = std::fs::read(path)?;
        serde_json::from_slice(&raw)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes atomically: a reader (or a crash) sees the old file or the new one, never half of one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        super::records::write_atomic(path, &json)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_of_any_decoded_meta_do_not_overflow() {
        // Found reading `age` and `ttl` beside the meta fuzz target: a `.meta` is read back from disk
        // (a torn or hand-edited one too), and an `initial_age` or `fresh_for` near u64::MAX
        // overflowed (a panic in a debug build, a wrapped age that looked fresh in a release one).
        let m: KeyMeta = serde_json::from_str(&format!(
            r#"{{"fetched_at": 0, "fresh_for": {max}, "etag": null, "last_modified": null,
                "initial_age": {max}}}"#,
            max = u64::MAX
        ))
        .unwrap();
        assert_eq!(m.age(5_000), u64::MAX);
        assert_eq!(m.ttl(5_000), Some(0));
        let fresh = KeyMeta {
            fresh_for: Some(u64::MAX),
            ..Default::default()
        };
        assert_eq!(fresh.ttl(0), Some(i64::MAX));
        let stale = KeyMeta {
            fresh_for: Some(0),
            initial_age: u64::MAX,
            ..Default::default()
        };
        assert_eq!(stale.ttl(0), Some(-i64::MAX));
    }
}
