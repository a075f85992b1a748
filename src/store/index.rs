//! The sled index: key -> (digest, key metadata) and digest -> object record. It is a cache of the
//! `.meta` files (see `recover`), so losing it loses nothing.

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
}

impl Index {
    pub fn open(path: &std::path::Path) -> sled::Result<Index> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let keys = db.open_tree("keys")?;
        let objects = db.open_tree("objects")?;
        let staged = db.open_tree("staged")?;
        Ok(Index {
            db,
            keys,
            objects,
            staged,
        })
    }

    pub fn key(&self, key: &str) -> Option<KeyEntry> {
        let raw = self.keys.get(key.as_bytes()).ok()??;
        serde_json::from_slice(&raw).ok()
    }

    pub fn put_key(&self, key: &str, e: &KeyEntry) -> sled::Result<()> {
        let v = serde_json::to_vec(e).unwrap_or_default();
        self.keys.insert(key.as_bytes(), v)?;
        Ok(())
    }

    pub fn remove_key(&self, key: &str) -> sled::Result<()> {
        self.keys.remove(key.as_bytes())?;
        Ok(())
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
        self.staged.apply_batch(b)
    }

    pub fn staged_url(&self, d: &Digest) -> Option<String> {
        let v = self.staged.get([b"u".as_slice(), &d.0].concat()).ok()??;
        String::from_utf8(v.to_vec()).ok()
    }

    pub fn staged_digest(&self, key: &str) -> Option<Digest> {
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
