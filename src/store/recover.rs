//! Recovery at start (SPEC 4): the store lock, orphan temp files removed, index entries without files
//! dropped, files without index entries re-indexed from their `.meta`. A lost or corrupt index is moved
//! aside and rebuilt from the files without losing objects, keys or pins.

use std::collections::HashMap;
use std::path::Path;

use super::index::{Index, KeyEntry, ObjectRecord};
use super::meta::{now_ms, ObjectMeta};
use super::{io_err, Digest, Obj, State, StoreError};

/// Takes an exclusive advisory lock on `<dir>/lock`, so that a second process cannot open the store.
pub fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
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

/// Brings the index in line with the files and returns the in-memory state.
pub fn reconcile(objects_dir: &Path, tmp_dir: &Path, index: &Index) -> Result<State, StoreError> {
    if let Ok(rd) = std::fs::read_dir(tmp_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut state = State::default();
    // Winner per key across all metas: the mapping fetched last.
    let mut keys: HashMap<String, KeyEntry> = HashMap::new();
    let mut rebuilt = 0usize;
    for shard in std::fs::read_dir(objects_dir)
        .map_err(io_err(objects_dir))?
        .flatten()
    {
        let Ok(rd) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.contains(".meta.tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if let Some(hex) = name.strip_suffix(".meta") {
                if !path.with_file_name(hex).exists() {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Ok(d) = name.parse::<Digest>() else {
                continue;
            };
            let Ok(md) = e.metadata() else { continue };
            let meta = ObjectMeta::read(&path.with_extension("meta"))
                .ok()
                .filter(|m| m.digest == d);
            let rec = match index.object(&d) {
                Some(r) => r,
                None => {
                    rebuilt += 1;
                    let r = ObjectRecord {
                        size: md.len(),
                        pinned: meta.as_ref().is_some_and(|m| m.pinned),
                        last_access: now_ms(),
                        hits: 0,
                        content_type: meta.as_ref().and_then(|m| m.content_type.clone()),
                    };
                    index.put_object(&d, &r)?;
                    r
                }
            };
            if let Some(m) = meta {
                for (k, km) in m.keys {
                    let newer = keys
                        .get(&k)
                        .is_none_or(|old| old.meta.fetched_at <= km.fetched_at);
                    if newer {
                        keys.insert(
                            k,
                            KeyEntry {
                                digest: d,
                                meta: km,
                            },
                        );
                    }
                }
            }
            state.used += md.len();
            state.objects.insert(
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
        }
    }
    let stale: Vec<Digest> = index
        .objects()
        .map(|(d, _)| d)
        .filter(|d| !state.objects.contains_key(d))
        .collect();
    for d in &stale {
        index.remove_object(d)?;
    }
    for (k, e) in index.keys() {
        if !state.objects.contains_key(&e.digest) {
            index.remove_key(&k)?;
        }
    }
    for (k, e) in keys {
        let current = index.key(&k);
        if current.is_none_or(|c| {
            !state.objects.contains_key(&c.digest) || c.meta.fetched_at < e.meta.fetched_at
        }) {
            index.put_key(&k, &e)?;
        }
    }
    index.flush()?;
    tracing::info!(
        objects = state.objects.len(),
        bytes = state.used,
        reindexed = rebuilt,
        dropped = stale.len(),
        "store recovered"
    );
    Ok(state)
}
