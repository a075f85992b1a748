//! The `<hex>.meta` file beside each object: which keys map to it, its pin, and per key the upstream's
//! validators and freshness (SPEC 4). It is the durable truth the sled index is rebuilt from, so it is
//! always replaced atomically (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Digest;

/// What cistern knows about one key (one URL form) that maps to an object.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyMeta {
    /// When the mapping was made or last revalidated (Unix ms): "the one fetched last wins" on rebuild,
    /// and the age for RFC 9111 freshness.
    pub fetched_at: u64,
    /// Freshness lifetime in seconds from `fetched_at`; None = never goes stale (digest URL, manifest,
    /// immutable origin).
    pub fresh_for: Option<u64>,
    /// The upstream's ETag as it sent it, for If-None-Match on revalidation and for If-Range on resume.
    pub etag: Option<String>,
    /// The upstream's Last-Modified, for If-Modified-Since and heuristic freshness.
    pub last_modified: Option<String>,
}

impl KeyMeta {
    pub fn immutable() -> Self {
        KeyMeta {
            fetched_at: now_ms(),
            ..Default::default()
        }
    }

    /// Seconds left before the mapping goes stale (negative once stale); None when it never does.
    pub fn ttl(&self, now_ms: u64) -> Option<i64> {
        let fresh = self.fresh_for? as i64;
        let age = (now_ms.saturating_sub(self.fetched_at) / 1000) as i64;
        Some(fresh - age)
    }

    /// The upstream's ETag when it is strong (usable for If-Range, RFC 9110 §13.1.5).
    pub fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| !e.starts_with("W/"))
    }
}

/// The content of `<hex>.meta`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
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
        let tmp = path.with_extension("meta.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
