//! Recovery at start (SPEC 4): the store lock, orphan temp files removed, index entries without files
//! dropped, files without index entries re-indexed from their `.meta` and `.keys`, and keys and pins
//! where the index and those files disagree taken from the files. A lost or corrupt index is moved
//! aside and rebuilt from the files without losing objects, keys or pins.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::index::{Index, KeyEntry, ObjectRecord};
use super::keylog::{Keys, Stats};
use super::meta::{now_ms, ObjectMeta};
use super::{io_err, open_err, Digest, Obj, State, StoreError};

/// Takes an exclusive advisory lock on `<dir>/lock`, so that a second process cannot open the store.
pub fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(open_err(dir, &path))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(dir.display().to_string()));
    }
    Ok(f)
}

/// Opens the index; one that cannot be opened (an error, or sled panicking on a damaged file, as it
/// does on a `conf` left empty by a power cut) is moved aside and rebuilt from the object files.
pub fn open_index(path: &Path) -> Result<Index, StoreError> {
    let tried = std::panic::catch_unwind(|| Index::open(path));
    let why = match tried {
        Ok(Ok(i)) => return Ok(i),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "sled panicked".into()),
    };
    let aside = path.with_extension(format!("corrupt-{}", now_ms()));
    tracing::warn!(error = %why, moved_to = %aside.display(), "store index cannot be opened; rebuilding it from the object files");
    std::fs::rename(path, &aside).map_err(io_err(path))?;
    Ok(Index::open(path)?)
}

/// Brings the index in line with the files and returns the in-memory state, with what each object's
/// `.keys` log holds. The `.meta` and `.keys` files are the truth: the index is written lazily (sled
/// reaches the disk every half second or so), so after a crash it may still hold a key that was
/// invalidated or moved, or a pin that was changed, after its files said so.
pub fn reconcile(
    objects_dir: &Path,
    tmp_dir: &Path,
    index: &Index,
) -> Result<(State, HashMap<Digest, Stats>), StoreError> {
    if let Ok(rd) = std::fs::read_dir(tmp_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut found = Found::default();
    for shard in std::fs::read_dir(objects_dir)
        .map_err(io_err(objects_dir))?
        .flatten()
    {
        let Ok(rd) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for e in rd.flatten() {
            found.file(&e, index)?;
        }
    }
    let dropped = found.drop_stale(index)?;
    found.put_keys(index)?;
    index.flush()?;
    tracing::info!(
        objects = found.state.objects.len(),
        bytes = found.state.used,
        reindexed = found.rebuilt,
        dropped,
        "store recovered"
    );
    Ok((found.state, found.logs))
}

/// What the object files say, gathered file by file.
#[derive(Default)]
struct Found {
    state: State,
    /// Winner per key across all objects' files: the mapping fetched last.
    keys: HashMap<String, KeyEntry>,
    /// The keys each object's readable files list: an index entry for a key that they do not list
    /// was removed (invalidated, moved, dropped past the bound) after the index last reached the disk.
    listed: HashMap<Digest, HashSet<String>>,
    /// What each object's `.keys` log holds.
    logs: HashMap<Digest, Stats>,
    /// Objects that had no index entry.
    rebuilt: usize,
}

impl Found {
    /// One file under a shard: temp files and orphan `.meta` and `.keys` files go, a blob is taken in.
    fn file(&mut self, e: &std::fs::DirEntry, index: &Index) -> Result<(), StoreError> {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.contains(".meta.tmp") || name.contains(".keys.tmp") {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        if let Some(hex) = name
            .strip_suffix(".meta")
            .or_else(|| name.strip_suffix(".keys"))
        {
            if !path.with_file_name(hex).exists() {
                let _ = std::fs::remove_file(&path);
            }
            return Ok(());
        }
        let (Ok(d), Ok(md)) = (name.parse::<Digest>(), e.metadata()) else {
            return Ok(());
        };
        let mut meta = ObjectMeta::read(&path.with_extension("meta"))
            .ok()
            .filter(|m| m.digest == d);
        let rec = self.record(index, &d, md.len(), meta.as_ref())?;
        let complete = meta.is_some();
        let legacy = meta.as_mut().map(|m| std::mem::take(&mut m.keys));
        match Keys::read(legacy.unwrap_or_default(), &path.with_extension("keys")) {
            Ok(keys) => {
                self.logs.insert(d, Stats::of(&keys));
                self.take_keys(d, keys, complete);
            }
            Err(e) => tracing::warn!(
                digest = %d,
                error = %e,
                "an object's .keys cannot be read; the index keeps the keys it gives the object"
            ),
        }
        self.state.used += md.len();
        self.state.objects.insert(
            d,
            Obj {
                size: md.len(),
                pinned: rec.pinned,
                last_access: rec.last_access,
                hits: rec.hits,
                readers: 0,
                content_type: rec.content_type,
            },
        );
        Ok(())
    }

    /// The object's index record, made from its `.meta` when missing, its pin taken from the
    /// `.meta` when the two differ.
    fn record(
        &mut self,
        index: &Index,
        d: &Digest,
        size: u64,
        meta: Option<&ObjectMeta>,
    ) -> Result<ObjectRecord, StoreError> {
        match (index.object(d), meta.map(|m| m.pinned)) {
            (Some(mut r), Some(pinned)) if r.pinned != pinned => {
                r.pinned = pinned;
                index.put_object(d, &r)?;
                Ok(r)
            }
            (Some(r), _) => Ok(r),
            (None, pinned) => {
                self.rebuilt += 1;
                let r = ObjectRecord {
                    size,
                    pinned: pinned.unwrap_or(false),
                    last_access: now_ms(),
                    hits: 0,
                    content_type: meta.and_then(|m| m.content_type.clone()),
                };
                index.put_object(d, &r)?;
                Ok(r)
            }
        }
    }

    /// Takes in the keys an object's files list; `complete` when its `.meta` was readable too (else
    /// it may hold keys of its own, and the index keeps the keys it gives the object).
    fn take_keys(&mut self, d: Digest, keys: Keys, complete: bool) {
        let mut listed = HashSet::new();
        for (k, (_, km)) in keys.live {
            listed.insert(k.clone());
            let newer = self
                .keys
                .get(&k)
                .is_none_or(|old| old.meta.fetched_at <= km.fetched_at);
            if newer {
                self.keys.insert(
                    k,
                    KeyEntry {
                        digest: d,
                        meta: km,
                    },
                );
            }
        }
        if complete {
            self.listed.insert(d, listed);
        }
    }

    /// Drops index entries of objects that are gone, and keys that their object's files do not list
    /// (an object without a readable `.meta` or `.keys` keeps the keys the index gives it). Returns the
    /// number of objects dropped.
    fn drop_stale(&self, index: &Index) -> Result<usize, StoreError> {
        let stale: Vec<Digest> = index
            .objects()
            .map(|(d, _)| d)
            .filter(|d| !self.state.objects.contains_key(d))
            .collect();
        for d in &stale {
            index.remove_object(d)?;
        }
        for (k, e) in index.keys() {
            let gone = !self.state.objects.contains_key(&e.digest);
            let unlisted = self.listed.get(&e.digest).is_some_and(|l| !l.contains(&k));
            if gone || unlisted {
                index.remove_key(&k)?;
            }
        }
        Ok(stale.len())
    }

    /// Points each key at the object whose files say it fetched it last, where the index says otherwise.
    fn put_keys(&self, index: &Index) -> Result<(), StoreError> {
        for (k, e) in &self.keys {
            let current = index.key(k);
            if current.is_none_or(|c| {
                !self.state.objects.contains_key(&c.digest) || c.meta.fetched_at < e.meta.fetched_at
            }) {
                index.put_key(k, e)?;
            }
        }
        Ok(())
    }
}
