//! The sled index: key -> (digest, key metadata) and digest -> object record. It is a cache of the
//! `.meta` files (see `recover`), so losing it loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::meta::KeyMeta;
use super::Digest;

/// One key's entry in the index.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyEntry {
    pub digest: Digest,
    pub meta: KeyMeta,
}

/// One object's entry in the index.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    pub pinned: bool,
    pub last_access: u64,
    pub hits: u64,
    pub content_type: Option<String>,
}

#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    keys: sled::Tree,
    objects: sled::Tree,
    /// What staged manifests said before the objects were stored: `u`+digest -> URL, `k`+key -> digest.
    staged: sled::Tree,
    /// Whether `staged` holds anything: most gateways never stage, and then a request costs no read.
    any_staged: Arc<AtomicBool>,
    /// Key entries read so far (a write or removal of a key drops its entry): a hit costs a hash
    /// lookup instead of a sled read and a JSON decode (about a tenth of the request handling's CPU on
    /// 64 KiB ranges).
    key_cache: Arc<RwLock<HashMap<String, KeyEntry>>>,
}

/// Entries kept in `key_cache`; it starts over when full.
const KEY_CACHE_MAX: usize = 1 << 16;

impl Index {
    pub fn open(path: &std::path::Path) -> sled::Result<Index> {
        let db = sled::Config::new()
            .path(path)
            // The key cache is ours (above); sled's own page cache need not be large, and its default
            // (1 GiB) makes it log an ERROR on every start of a gateway with less memory than that.
            .cache_capacity(64 << 20)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let keys = db.open_tree("keys")?;
        let objects = db.open_tree("objects")?;
        let staged = db.open_tree("staged")?;
        Ok(Index {
            db,
            keys,
            objects,
            any_staged: Arc::new(AtomicBool::new(!staged.is_empty())),
            staged,
            key_cache: Arc::default(),
        })
    }

    fn cache_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, KeyEntry>> {
        self.key_cache.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn key(&self, key: &str) -> Option<KeyEntry> {
        if let Some(e) = self
            .key_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Some(e.clone());
        }
        // Read and remember under the write lock, so that a concurrent put cannot be overtaken by the
        // value read before it.
        let mut cache = self.cache_write();
        if let Some(e) = cache.get(key) {
            return Some(e.clone());
        }
        let raw = self.keys.get(key.as_bytes()).ok()??;
        let e: KeyEntry = serde_json::from_slice(&raw).ok()?;
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key.to_string(), e.clone());
        Some(e)
    }

    pub fn put_key(&self, key: &str, e: &KeyEntry) -> sled::Result<()> {
        let v = serde_json::to_vec(e).unwrap_or_default();
        let mut cache = self.cache_write();
        cache.remove(key);
        self.keys.insert(key.as_bytes(), v)?;
        Ok(())
    }

    pub fn remove_key(&self, key: &str) -> sled::Result<()> {
        let mut cache = self.cache_write();
        cache.remove(key);
        self.keys.remove(key.as_bytes())?;
        Ok(())
    }

    /// Keys that start with `prefix` (a key's Vary variants).
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys
            .scan_prefix(prefix.as_bytes())
            .keys()
            .filter_map(|k| String::from_utf8(k.ok()?.to_vec()).ok())
            .collect()
    }

    /// At most `max` entries of keys that start with `prefix`.
    pub fn entries_with_prefix(&self, prefix: &str, max: usize) -> Vec<KeyEntry> {
        self.keys
            .scan_prefix(prefix.as_bytes())
            .values()
            .take(max)
            .filter_map(|v| serde_json::from_slice(&v.ok()?).ok())
            .collect()
    }

    pub fn keys(&self) -> impl Iterator<Item = (String, KeyEntry)> {
        self.keys.iter().filter_map(|r| {
            let (k, v) = r.ok()?;
            Some((
                String::from_utf8(k.to_vec()).ok()?,
                serde_json::from_slice(&v).ok()?,
            ))
        })
    }

    pub fn object(&self, d: &Digest) -> Option<ObjectRecord> {
        let raw = self.objects.get(d.0).ok()??;
        serde_json::from_slice(&raw).ok()
    }

    pub fn put_object(&self, d: &Digest, r: &ObjectRecord) -> sled::Result<()> {
        let v = serde_json::to_vec(r).unwrap_or_default();
        self.objects.insert(d.0, v)?;
        Ok(())
    }

    pub fn remove_object(&self, d: &Digest) -> sled::Result<()> {
        self.objects.remove(d.0)?;
        Ok(())
    }

    pub fn objects(&self) -> impl Iterator<Item = (Digest, ObjectRecord)> {
        self.objects.iter().filter_map(|r| {
            let (k, v) = r.ok()?;
            let d = Digest(k.as_ref().try_into().ok()?);
            Some((d, serde_json::from_slice(&v).ok()?))
        })
    }

    pub fn stage(&self, d: &Digest, key: &str, url: &str) -> sled::Result<()> {
        let mut b = sled::Batch::default();
        b.insert([b"u".as_slice(), &d.0].concat(), url.as_bytes());
        b.insert([b"k".as_slice(), key.as_bytes()].concat(), &d.0);
        self.staged.apply_batch(b)?;
        self.any_staged.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes what `stage` recorded for `key` and `d`, each record only while it still says so (a
    /// later manifest may have staged the key or the digest anew).
    pub fn unstage(&self, d: &Digest, key: &str, url: &str) -> sled::Result<()> {
        let k = [b"k".as_slice(), key.as_bytes()].concat();
        let u = [b"u".as_slice(), &d.0].concat();
        // A record that says something else now is left as it is: not an error.
        let _ = self.staged.compare_and_swap(k, Some(&d.0), None::<&[u8]>)?;
        let _ = self
            .staged
            .compare_and_swap(u, Some(url.as_bytes()), None::<&[u8]>)?;
        Ok(())
    }

    pub fn staged_url(&self, d: &Digest) -> Option<String> {
        if !self.any_staged.load(Ordering::Acquire) {
            return None;
        }
        let v = self.staged.get([b"u".as_slice(), &d.0].concat()).ok()??;
        String::from_utf8(v.to_vec()).ok()
    }

    pub fn staged_digest(&self, key: &str) -> Option<Digest> {
        if !self.any_staged.load(Ordering::Acquire) {
            return None;
        }
        let v = self
            .staged
            .get([b"k".as_slice(), key.as_bytes()].concat())
            .ok()??;
        Some(Digest(v.as_ref().try_into().ok()?))
    }

    pub fn flush(&self) -> sled::Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(byte: u8, etag: &str) -> KeyEntry {
        KeyEntry {
            digest: Digest([byte; 32]),
            meta: KeyMeta {
                etag: Some(etag.into()),
                ..KeyMeta::default()
            },
        }
    }

    #[test]
    fn key_reads_see_every_write_and_removal() {
        let t = tempfile::tempdir().unwrap();
        let ix = Index::open(&t.path().join("index")).unwrap();
        assert!(ix.key("a").is_none());
        ix.put_key("a", &entry(1, "v1")).unwrap();
        assert_eq!(ix.key("a").unwrap().meta.etag.as_deref(), Some("v1"));
        // Now cached: a rewrite must not leave the old entry behind.
        ix.put_key("a", &entry(2, "v2")).unwrap();
        let e = ix.key("a").unwrap();
        assert_eq!(
            (e.digest, e.meta.etag.as_deref()),
            (Digest([2; 32]), Some("v2"))
        );
        ix.remove_key("a").unwrap();
        assert!(ix.key("a").is_none());
    }

    #[test]
    fn staged_entries_are_found_after_a_reopen() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("index");
        {
            let ix = Index::open(&path).unwrap();
            assert!(ix.staged_digest("k").is_none());
            ix.stage(&Digest([7; 32]), "k", "http://o/x").unwrap();
            assert_eq!(ix.staged_digest("k"), Some(Digest([7; 32])));
            ix.flush().unwrap();
        }
        // sled's threads of the first handle may hold the file lock a moment after the drop.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ix = loop {
            match Index::open(&path) {
                Ok(ix) => break ix,
                Err(_) if std::time::Instant::now() < end => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening the index: {e}"),
            }
        };
        assert_eq!(ix.staged_digest("k"), Some(Digest([7; 32])));
        assert_eq!(
            ix.staged_url(&Digest([7; 32])).as_deref(),
            Some("http://o/x")
        );
    }

    #[test]
    fn unstaging_removes_only_what_still_names_the_entry() {
        let t = tempfile::tempdir().unwrap();
        let ix = Index::open(&t.path().join("index")).unwrap();
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        ix.stage(&a, "k", "http://o/a").unwrap();
        ix.stage(&b, "k", "http://o/b").unwrap();
        // The key was staged anew with b: unstaging a leaves it, and removes a's URL.
        ix.unstage(&a, "k", "http://o/a").unwrap();
        assert_eq!(ix.staged_digest("k"), Some(b));
        assert!(ix.staged_url(&a).is_none());
        ix.unstage(&b, "k", "http://o/other").unwrap();
        assert!(ix.staged_digest("k").is_none());
        assert_eq!(ix.staged_url(&b).as_deref(), Some("http://o/b"));
    }
}
