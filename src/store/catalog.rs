//! The catalog: everything that changes which objects exist and what their `.meta` and `.keys` say —
//! commit, key mappings, pins, unlink — done under one lock per digest, so that two fills of the same
//! bytes under different keys, or an eviction racing a commit, cannot lose a key or leave an index entry
//! without its file. No code path holds two digests' locks at once (a key that moves between objects is
//! dropped from the old object's `.keys` after the new one's lock is released), so the striping cannot
//! deadlock.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use super::index::{KeyEntry, ObjectRecord};
use super::meta::{now_ms, KeyMeta, ObjectMeta};
use super::{io_err, Digest, Obj, Store, StoreError};

/// Stripes of the per-digest lock.
pub(super) const STRIPES: usize = 256;

/// The per-digest locks, striped by the digest's first byte.
pub(super) struct Catalog {
    stripes: Vec<Mutex<()>>,
}

impl Default for Catalog {
    fn default() -> Catalog {
        Catalog {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl Catalog {
    fn lock(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[d.0[0] as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A verified fill to make visible.
pub(crate) struct Commit<'a> {
    pub tmp: &'a Path,
    pub digest: Digest,
    pub size: u64,
    /// Room the fill reserved, and how much of it is on disk: released exactly once, whatever the
    /// outcome.
    pub reserved: u64,
    pub on_disk: u64,
    pub key: Option<(&'a str, KeyMeta)>,
    pub content_type: Option<String>,
    pub pin: bool,
}

/// Releases a reservation when dropped, so that every exit of a commit releases it once.
struct Reservation<'a> {
    store: &'a Store,
    bytes: u64,
    on_disk: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.store.release(self.bytes, self.on_disk);
    }
}

impl Store {
    /// Maps `key` to an already stored object (and records its freshness), in `.keys` and the index.
    pub fn map_key(&self, key: &str, d: &Digest, meta: KeyMeta) -> Result<(), StoreError> {
        let moved = {
            let _g = self.shared.catalog.lock(d);
            if !self.contains(d) {
                return Err(StoreError::NotFound(*d));
            }
            self.add_key(d, key, meta)?
        };
        self.drop_moved_key(moved, key);
        Ok(())
    }

    /// Maps `key` to the stored object `d`: its log, then the index, then the bound on its keys.
    /// Returns the object the key pointed at before, if another. Called with the digest's lock held.
    fn add_key(&self, d: &Digest, key: &str, meta: KeyMeta) -> Result<Option<Digest>, StoreError> {
        self.log_put(d, key, &meta, true)?;
        let moved = self.index_key(key, d, meta)?;
        self.bound_keys(d);
        Ok(moved)
    }

    /// Drops the oldest keys of an object past `store.max_keys_per_object`. The key just added is in
    /// place whatever happens here, so a failure is only logged.
    fn bound_keys(&self, d: &Digest) {
        if let Err(e) = self.trim_keys(d) {
            tracing::warn!(digest = %d, error = %e, "dropping an object's oldest keys failed");
        }
    }

    /// A key that moved away from object `from` leaves that object's `.keys` (unless it moved back).
    fn drop_moved_key(&self, from: Option<Digest>, key: &str) {
        let Some(d) = from else { return };
        let _g = self.shared.catalog.lock(&d);
        if self.shared.index.key(key).is_some_and(|e| e.digest == d) {
            return;
        }
        if let Err(e) = self.log_remove(&d, key) {
            tracing::warn!(digest = %d, error = %e, "recording a key's removal failed");
        }
    }

    /// Makes a verified fill visible: meta, rename, directory fsync, index. Blocking.
    pub(crate) fn commit_blob(&self, c: Commit<'_>) -> Result<(), StoreError> {
        let _release = Reservation {
            store: self,
            bytes: c.reserved,
            on_disk: c.on_disk,
        };
        let d = &c.digest;
        let moved = {
            let _g = self.shared.catalog.lock(d);
            if self.contains(d) {
                let _ = std::fs::remove_file(c.tmp);
                if c.pin {
                    self.pin_locked(d, true)?;
                }
                match &c.key {
                    Some((k, km)) => self.add_key(d, k, km.clone())?,
                    None => None,
                }
            } else {
                self.publish(&c)?;
                match &c.key {
                    Some((k, km)) => {
                        let moved = self.index_key(k, d, km.clone())?;
                        self.bound_keys(d);
                        moved
                    }
                    None => None,
                }
            }
        };
        if let Some((k, _)) = &c.key {
            self.drop_moved_key(moved, k);
        }
        Ok(())
    }

    /// The new object's `.keys` and `.meta`, then its blob renamed into place, the directory fsynced,
    /// the index and the in-memory state. Called with the digest's lock held.
    fn publish(&self, c: &Commit<'_>) -> Result<(), StoreError> {
        let d = &c.digest;
        let final_path = self.blob_path(d);
        let parent = final_path
            .parent()
            .unwrap_or(&self.shared.objects_dir)
            .to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let mpath = self.meta_path(d);
        let mut m = ObjectMeta::read(&mpath).unwrap_or(ObjectMeta {
            digest: *d,
            size: c.size,
            pinned: false,
            content_type: c.content_type.clone(),
            keys: Default::default(),
        });
        m.size = c.size;
        m.pinned |= c.pin;
        if let Some((k, km)) = &c.key {
            // The `.meta` written next fsyncs the directory that a new log was made in.
            self.log_put(d, k, km, false)?;
        }
        m.write(&mpath).map_err(io_err(&mpath))?;
        failpoint!("store-meta-written");
        std::fs::rename(c.tmp, &final_path).map_err(io_err(&final_path))?;
        failpoint!("store-renamed");
        if let Ok(dir) = std::fs::File::open(&parent) {
            let _ = dir.sync_all();
        }
        failpoint!("store-dir-synced");
        let rec = ObjectRecord {
            size: c.size,
            pinned: m.pinned,
            last_access: now_ms(),
            hits: 0,
            content_type: c.content_type.clone(),
        };
        self.shared.index.put_object(d, &rec)?;
        failpoint!("store-indexed");
        let mut st = self.state();
        st.used += c.size;
        st.objects.insert(
            *d,
            Obj {
                size: c.size,
                pinned: rec.pinned,
                last_access: rec.last_access,
                hits: 0,
                readers: 0,
                content_type: rec.content_type,
            },
        );
        self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Points `key` at `d` in the index; returns the object it pointed at before, if another.
    fn index_key(
        &self,
        key: &str,
        d: &Digest,
        meta: KeyMeta,
    ) -> Result<Option<Digest>, StoreError> {
        let old = self
            .shared
            .index
            .key(key)
            .map(|e| e.digest)
            .filter(|o| o != d);
        self.shared
            .index
            .put_key(key, &KeyEntry { digest: *d, meta })?;
        Ok(old)
    }

    /// Forgets what is stored for a key and its variants (`<key>\u{1f}...`), as an unsafe request to
    /// it demands (RFC 9111 §4.4). The objects stay: other keys may map to them.
    pub fn invalidate(&self, key: &str) {
        let mut keys = self.shared.index.keys_with_prefix(&format!("{key}\u{1f}"));
        keys.push(key.to_string());
        for k in keys {
            let Some(e) = self.shared.index.key(&k) else {
                continue;
            };
            let _ = self.shared.index.remove_key(&k);
            self.drop_moved_key(Some(e.digest), &k);
        }
    }

    /// Pins or unpins an object (pinned objects are never evicted).
    pub fn set_pin(&self, d: &Digest, pinned: bool) -> Result<(), StoreError> {
        let _g = self.shared.catalog.lock(d);
        self.pin_locked(d, pinned)
    }

    fn pin_locked(&self, d: &Digest, pinned: bool) -> Result<(), StoreError> {
        {
            let mut st = self.state();
            let o = st.objects.get_mut(d).ok_or(StoreError::NotFound(*d))?;
            o.pinned = pinned;
        }
        let mpath = self.meta_path(d);
        let mut m = ObjectMeta::read(&mpath).unwrap_or_else(|_| self.meta_from_state(d));
        m.pinned = pinned;
        m.write(&mpath).map_err(io_err(&mpath))?;
        if let Some(mut r) = self.shared.index.object(d) {
            r.pinned = pinned;
            self.shared.index.put_object(d, &r)?;
        }
        Ok(())
    }

    /// Removes an object's files, its keys and its index entry. An eviction victim (already taken off
    /// the in-memory state by the budget) that was committed again meanwhile is left alone.
    pub(super) fn unlink(&self, d: &Digest, evicting: bool) {
        let _g = self.shared.catalog.lock(d);
        if evicting && self.contains(d) {
            return;
        }
        for k in &self.keys_of(d) {
            if self.shared.index.key(k).is_some_and(|e| e.digest == *d) {
                let _ = self.shared.index.remove_key(k);
            }
        }
        let _ = self.shared.index.remove_object(d);
        let _ = std::fs::remove_file(self.blob_path(d));
        let _ = std::fs::remove_file(self.meta_path(d));
        let _ = std::fs::remove_file(self.keys_path(d));
        self.shared.logs.forget(d);
        if let Some(parent) = self.blob_path(d).parent() {
            if let Ok(dir) = std::fs::File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        self.forget_map(d);
        let mut st = self.state();
        if let Some(o) = st.objects.remove(d) {
            st.used = st.used.saturating_sub(o.size);
        }
    }
}
