//! An object's keys in its files: the changes appended to its `.keys` log (see `keylog`), the log
//! compacted when it is due, and the bound on keys per object (`store.max_keys_per_object`). Every
//! function here is called with the object's catalog lock held.
//!
//! Past the bound, the keys set longest ago are dropped (from the log first, then from the index) down
//! to nine tenths of it, so that the read of the whole log that picks them is made once per tenth of
//! the bound of new keys: adding a key costs the same at 10 keys and at 10,000.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::keylog::{self, Change, Keys, Stats};
use super::meta::{KeyMeta, ObjectMeta};
use super::{io_err, Digest, Store, StoreError};

/// What the store knows of each object's log, so that an append reads nothing.
#[derive(Default)]
pub(super) struct Logs(Mutex<HashMap<Digest, Stats>>);

impl Logs {
    pub fn new(known: HashMap<Digest, Stats>) -> Logs {
        Logs(Mutex::new(known))
    }

    fn get(&self, d: &Digest) -> Option<Stats> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .copied()
    }

    fn set(&self, d: &Digest, s: Stats) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*d, s);
    }

    pub fn forget(&self, d: &Digest) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(d);
    }
}

impl Store {
    pub(super) fn keys_path(&self, d: &Digest) -> PathBuf {
        self.blob_path(d).with_extension("keys")
    }

    /// An object's `.meta` (when readable) and its keys, as its files say.
    pub(super) fn read_keys(&self, d: &Digest) -> Result<(Option<ObjectMeta>, Keys), StoreError> {
        let mut meta = ObjectMeta::read(&self.meta_path(d)).ok();
        let legacy = meta
            .as_mut()
            .map(|m| std::mem::take(&mut m.keys))
            .unwrap_or_default();
        let path = self.keys_path(d);
        let keys = Keys::read(legacy, &path).map_err(io_err(&path))?;
        Ok((meta, keys))
    }

    fn log_stats(&self, d: &Digest) -> Result<Stats, StoreError> {
        if let Some(s) = self.shared.logs.get(d) {
            return Ok(s);
        }
        let s = Stats::of(&self.read_keys(d)?.1);
        self.shared.logs.set(d, s);
        Ok(s)
    }

    /// Records in `d`'s log that `key` maps to it. `sync_dir`: see [`keylog::append`].
    pub(super) fn log_put(
        &self,
        d: &Digest,
        key: &str,
        meta: &KeyMeta,
        sync_dir: bool,
    ) -> Result<(), StoreError> {
        let known = self.shared.index.key(key).is_some_and(|e| e.digest == *d);
        self.log_append(d, &[Change::Put(key, meta)], u64::from(!known), 0, sync_dir)
    }

    /// Records in `d`'s log that `key`, which mapped to it, no longer does. Nothing for an object
    /// that is gone (its files went with it).
    pub(super) fn log_remove(&self, d: &Digest, key: &str) -> Result<(), StoreError> {
        if !self.contains(d) {
            return Ok(());
        }
        self.log_append(d, &[Change::Remove(key)], 0, 1, true)
    }

    /// Appends to `d`'s log (rewritten first when it is dirty), counting `added` and `removed` live
    /// keys, and compacts it when that is due.
    fn log_append(
        &self,
        d: &Digest,
        changes: &[Change<'_>],
        added: u64,
        removed: u64,
        sync_dir: bool,
    ) -> Result<(), StoreError> {
        let mut s = self.log_stats(d)?;
        if s.dirty {
            s = self.compact(d)?;
        }
        let path = self.keys_path(d);
        if let Err(e) = keylog::append(&path, changes, sync_dir) {
            self.shared.logs.set(d, Stats { dirty: true, ..s });
            return Err(io_err(&path)(e));
        }
        s.records += changes.len() as u64;
        s.live = (s.live + added).saturating_sub(removed);
        self.shared.logs.set(d, s);
        if s.due() {
            // The change is durable already; a failed compaction is tried again on a later change.
            if let Err(e) = self.compact(d) {
                tracing::warn!(digest = %d, error = %e, "compacting an object's key log failed");
            }
        }
        Ok(())
    }

    /// Rewrites `d`'s log with its live keys only, then its `.meta` without keys when that is of the
    /// old format (the rewritten log records every removal that needs).
    fn compact(&self, d: &Digest) -> Result<Stats, StoreError> {
        let (meta, keys) = self.read_keys(d)?;
        let lines = keys.compacted();
        let path = self.keys_path(d);
        let dirty = Stats {
            dirty: true,
            ..Stats::of(&keys)
        };
        if let Err(e) = keylog::rewrite(&path, &lines) {
            self.shared.logs.set(d, dirty);
            return Err(io_err(&path)(e));
        }
        let s = Stats {
            records: lines.len() as u64,
            live: keys.live.len() as u64,
            dirty: false,
        };
        if let Some(m) = meta.filter(|_| keys.has_legacy()) {
            // Written without keys (`read_keys` took them out of it).
            let mpath = self.meta_path(d);
            if let Err(e) = m.write(&mpath) {
                self.shared.logs.set(d, Stats { dirty: true, ..s });
                return Err(io_err(&mpath)(e));
            }
        }
        self.shared.logs.set(d, s);
        Ok(s)
    }

    /// Drops `d`'s oldest keys when it has more than the bound: from its log, then from the index.
    pub(super) fn trim_keys(&self, d: &Digest) -> Result<(), StoreError> {
        let max = self.shared.max_keys;
        if self.log_stats(d)?.live <= max as u64 {
            return Ok(());
        }
        let (_, keys) = self.read_keys(d)?;
        self.shared.logs.set(d, Stats::of(&keys));
        if keys.live.len() <= max {
            return Ok(());
        }
        let excess = keys.live.len() - (max - max / 10);
        let victims: Vec<&str> = keys
            .oldest_first()
            .into_iter()
            .take(excess)
            .map(|(k, _)| k)
            .collect();
        let changes: Vec<Change<'_>> = victims.iter().map(|k| Change::Remove(k)).collect();
        self.log_append(d, &changes, 0, victims.len() as u64, true)?;
        for k in &victims {
            if self.shared.index.key(k).is_some_and(|e| e.digest == *d) {
                self.shared.index.remove_key(k)?;
            }
        }
        tracing::warn!(
            digest = %d,
            dropped = victims.len(),
            max_keys_per_object = max,
            "an object had more keys than store.max_keys_per_object: its oldest ones were dropped"
        );
        Ok(())
    }

    /// Every key `d`'s files list (none when they cannot be read).
    pub(super) fn keys_of(&self, d: &Digest) -> Vec<String> {
        self.read_keys(d)
            .map(|(_, k)| k.live.into_keys().collect())
            .unwrap_or_default()
    }
}
