//! The content-addressed store (SPEC 4): blob files at `<dir>/sha256/<hex[0:2]>/<hex>`, their `.meta`
//! and `.keys` beside them, a sled index over these, the disk budget and eviction, and recovery at start.
//!
//! The store calls no other cistern module. Writes go through a [`Fill`], which is either committed
//! (fsynced, renamed, indexed) or dropped (temp file removed, reservation released), so that no error path
//! can leave a partial object visible. Blocking calls here (`open`, `Fill::commit`, `Fill::write`) are meant
//! to run on blocking threads.

mod budget;
mod catalog;
mod digest;
mod fill;
mod index;
mod keylog;
mod keys;
pub mod mapped;
mod meta;
mod partial;
mod records;
mod recover;
mod room;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;

pub(crate) use catalog::Commit;
pub use digest::{BadDigest, Digest};
pub use fill::Fill;
pub use index::KeyEntry;
pub use meta::{now_ms, KeyMeta, ObjectMeta, StoredHeaders};
pub use partial::PartialRecord;
pub use room::Room;

pub use budget::free_bytes;
use budget::Budget;
use index::{Index, ObjectRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("store index: {0}")]
    Index(#[from] sled::Error),
    #[error("no room in the store for {0} bytes")]
    NoRoom(u64),
    #[error("store {0} is in use by another cistern process")]
    Locked(String),
    /// The directory (or the lock or a subdirectory in it) refuses this process: in a container, a
    /// bind-mounted host directory owned by root is the usual cause, and the process runs as a fixed
    /// non-root user, so the message names that user and both ways out.
    #[error("store.dir {dir} is not writable by uid {uid} (gid {gid}): chown -R {uid}:{gid} the directory (on the host, when it is a bind mount) or mount a named volume there")]
    NotWritable { dir: String, uid: u32, gid: u32 },
    #[error("object {0} is not stored")]
    NotFound(Digest),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Like [`io_err`] for what opening the store creates in `dir`: a refusal becomes
/// [`StoreError::NotWritable`], which says whose write was refused and what to do.
fn open_err<'a>(dir: &'a Path, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            // SAFETY: geteuid and getegid cannot fail and touch no memory.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            StoreError::NotWritable {
                dir: dir.display().to_string(),
                uid,
                gid,
            }
        } else {
            io_err(path)(source)
        }
    }
}

/// Objects up to this size are read into memory when first mapped; larger ones page in as they are
/// served (their large reads go out by sendfile, which reads the file itself).
const POPULATE_MAX: u64 = 256 << 20;

/// Store settings, taken from `[store]` by the caller.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub max_size: u64,
    pub min_free: u64,
    pub max_object_size: u64,
    /// Room fills in flight may reserve together; 0 = half of what the store may use.
    pub max_filling: u64,
    /// Keys that may map to one object; past it, its oldest keys are dropped (at least 1).
    pub max_keys_per_object: usize,
}

/// A cheap-to-clone handle on the store.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    /// `<dir>/sha256`: the blobs and their `.meta`.
    objects_dir: PathBuf,
    /// `<dir>/tmp`: fills in progress; emptied at start.
    tmp_dir: PathBuf,
    index: Index,
    /// Sizes, pins, access times and readers of every stored object, mirrored from the index so that
    /// eviction and hit accounting need no disk access. Never held across an await.
    state: Mutex<State>,
    budget: Budget,
    max_object_size: u64,
    /// Memory maps of recently served objects, so that a hit costs no syscall. Objects never change in
    /// place (eviction unlinks), which is what makes sharing a mapping safe.
    maps: Mutex<HashMap<Digest, Bytes>>,
    /// Counters that ops reads.
    pub stats: StoreStats,
    /// Held for the life of the store: a second process cannot open it (SPEC 1: `--server`).
    _lock: std::fs::File,
    next_tmp: AtomicU64,
    /// The per-digest locks around everything that changes an object's files.
    catalog: catalog::Catalog,
    /// What is known of each object's `.keys` log (changed under the digest's lock).
    logs: keys::Logs,
    max_keys: usize,
    /// Partial fills kept across restarts.
    partials: Mutex<partial::Partials>,
}

#[derive(Default)]
struct State {
    objects: HashMap<Digest, Obj>,
    /// Bytes of committed objects.
    used: u64,
    /// Bytes promised to fills in progress.
    reserved: u64,
    /// Objects read since the last flush: their access time and hits are to be written to the index.
    touched: std::collections::HashSet<Digest>,
    /// Of `reserved`, bytes fills already occupy on the filesystem (allocated ahead or written).
    on_disk: u64,
}

#[derive(Clone, Debug)]
struct Obj {
    size: u64,
    pinned: bool,
    last_access: u64,
    hits: u64,
    readers: u32,
    content_type: Option<String>,
}

/// Counters exposed to ops.
#[derive(Default)]
pub struct StoreStats {
    pub evictions: AtomicU64,
    pub commits: AtomicU64,
}

/// An object as served: its bytes (one zero-copy mapping) and a guard that keeps it off eviction's list.
pub struct Hit {
    pub digest: Digest,
    pub bytes: Bytes,
    pub content_type: Option<String>,
    _reading: ReadGuard,
}

struct ReadGuard {
    store: Store,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Some(o) = self.store.state().objects.get_mut(&self.digest) {
            o.readers = o.readers.saturating_sub(1);
        }
    }
}

/// One row of `GET /v1/admin/content`.
#[derive(Serialize, Debug, Clone)]
pub struct ObjectListing {
    pub digest: Digest,
    pub size: u64,
    pub keys: Vec<String>,
    pub pinned: bool,
    pub hits: u64,
    pub last_access: u64,
}

/// Figures for `/metrics`, `/summary` and the dashboard.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Usage {
    pub objects: u64,
    pub bytes: u64,
    pub reserved: u64,
    pub max_size: u64,
    pub free: u64,
    pub min_free: u64,
}

impl Usage {
    /// What the store may use: `max_size`, or what it holds plus what the filesystem has free above
    /// `min_free` (the budget's own rule for the room fills may take), whichever is smaller.
    pub fn may_use(&self) -> u64 {
        let room = self
            .bytes
            .saturating_add(self.free.saturating_sub(self.min_free));
        if self.max_size > 0 {
            self.max_size.min(room)
        } else {
            room
        }
    }
}

impl Store {
    /// Opens (creating if needed) and recovers the store. Blocking.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.dir).map_err(open_err(&cfg.dir, &cfg.dir))?;
        let lock = recover::lock(&cfg.dir)?;
        let objects_dir = cfg.dir.join("sha256");
        let tmp_dir = cfg.dir.join("tmp");
        for d in [&objects_dir, &tmp_dir] {
            std::fs::create_dir_all(d).map_err(open_err(&cfg.dir, d))?;
        }
        let index = recover::open_index(&cfg.dir.join("index"))?;
        let (state, logs) = recover::reconcile(&objects_dir, &tmp_dir, &index)?;
        let store = Store {
            shared: Arc::new(Shared {
                objects_dir,
                tmp_dir,
                index,
                state: Mutex::new(state),
                budget: Budget {
                    dir: cfg.dir.clone(),
                    max_size: cfg.max_size,
                    min_free: cfg.min_free,
                    max_filling: cfg.max_filling,
                },
                max_object_size: cfg.max_object_size,
                maps: Mutex::new(HashMap::new()),
                stats: StoreStats::default(),
                _lock: lock,
                next_tmp: AtomicU64::new(0),
                catalog: catalog::Catalog::default(),
                logs: keys::Logs::new(logs),
                max_keys: cfg.max_keys_per_object.max(1),
                partials: Mutex::default(),
            }),
        };
        store.adopt_partials();
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &StoreStats {
        &self.shared.stats
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.shared.objects_dir.join(&hex[..2]).join(hex)
    }

    fn meta_path(&self, d: &Digest) -> PathBuf {
        self.blob_path(d).with_extension("meta")
    }

    /// The digest and freshness a key maps to, when its object is stored.
    pub fn lookup(&self, key: &str) -> Option<KeyEntry> {
        let e = self.shared.index.key(key)?;
        self.contains(&e.digest).then_some(e)
    }

    /// The stored variants of a key (`<key>\u{1f}...`, RFC 9111 §4.1), at most `max` of them: found
    /// even when the key's own mapping is gone (its newest variant evicted or purged).
    pub fn variants(&self, key: &str, max: usize) -> Vec<KeyEntry> {
        let mut v = self
            .shared
            .index
            .entries_with_prefix(&format!("{key}\u{1f}"), max);
        v.retain(|e| self.contains(&e.digest));
        v
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.state().objects.contains_key(d)
    }

    pub fn size_of(&self, d: &Digest) -> Option<u64> {
        self.state().objects.get(d).map(|o| o.size)
    }

    /// Opens a stored object for serving and counts the access. The mapping is made on first use and
    /// shared after that.
    pub fn open_object(&self, d: &Digest) -> Result<Hit, StoreError> {
        let content_type = {
            let mut st = self.state();
            let o = st.objects.get_mut(d).ok_or(StoreError::NotFound(*d))?;
            o.readers += 1;
            o.hits += 1;
            o.last_access = now_ms();
            let ct = o.content_type.clone();
            st.touched.insert(*d);
            ct
        };
        let guard = ReadGuard {
            store: self.clone(),
            digest: *d,
        };
        let cached = self
            .shared
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned();
        let bytes = match cached {
            Some(b) => b,
            None => {
                let path = self.blob_path(d);
                let f = Arc::new(std::fs::File::open(&path).map_err(io_err(&path))?);
                let len = f.metadata().map_err(io_err(&path))?.len();
                let b = if len == 0 {
                    Bytes::new()
                } else {
                    // SAFETY: stored objects are never written in place; eviction and purge unlink the
                    // file, which leaves an existing mapping valid.
                    // Populated up front, so that serving the object takes no page fault; not a large
                    // one, whose 64 KiB range must not read gigabytes from the disk first.
                    let mut opts = memmap2::MmapOptions::new();
                    if len <= POPULATE_MAX {
                        opts.populate();
                    }
                    let map = unsafe { opts.map(&*f) }.map_err(io_err(&path))?;
                    mapped::into_bytes(f, map)
                };
                let mut maps = self.shared.maps.lock().unwrap_or_else(|p| p.into_inner());
                if maps.len() >= 4096 {
                    maps.clear();
                }
                maps.insert(*d, b.clone());
                b
            }
        };
        Ok(Hit {
            digest: *d,
            bytes,
            content_type,
            _reading: guard,
        })
    }

    /// Records what a staged manifest says (SPEC 6): `key` holds `d`, which is fetched from `url`. Kept
    /// across restarts, so that devices asking later by URL or by digest get verified objects.
    pub fn stage(&self, d: &Digest, key: &str, url: &str) -> Result<(), StoreError> {
        Ok(self.shared.index.stage(d, key, url)?)
    }

    /// Forgets a staged record of `key` -> `d` and `d` -> `url`, each only while it still says so.
    pub fn unstage(&self, d: &Digest, key: &str, url: &str) -> Result<(), StoreError> {
        Ok(self.shared.index.unstage(d, key, url)?)
    }

    /// The URL a staged manifest named for a digest.
    pub fn staged_url(&self, d: &Digest) -> Option<String> {
        self.shared.index.staged_url(d)
    }

    /// The digest a staged manifest gave a key.
    pub fn staged_digest(&self, key: &str) -> Option<Digest> {
        self.shared.index.staged_digest(key)
    }

    /// Whether serving the object needs no new mapping (then `open_object` does no blocking work).
    pub fn is_mapped(&self, d: &Digest) -> bool {
        self.shared
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(d)
    }

    fn meta_from_state(&self, d: &Digest) -> ObjectMeta {
        let st = self.state();
        let o = st.objects.get(d);
        ObjectMeta {
            digest: *d,
            size: o.map(|o| o.size).unwrap_or(0),
            pinned: o.map(|o| o.pinned).unwrap_or(false),
            content_type: o.and_then(|o| o.content_type.clone()),
            keys: Default::default(),
        }
    }

    /// Records a successful revalidation (RFC 9111 §4.3.4): new freshness for the key, same object.
    pub fn refresh_key(&self, key: &str, meta: KeyMeta) -> Result<(), StoreError> {
        let Some(e) = self.shared.index.key(key) else {
            return Ok(());
        };
        self.map_key(key, &e.digest, meta)
    }

    /// A temp file name no other fill of this process uses.
    pub(super) fn tmp_path(&self) -> std::path::PathBuf {
        let n = self.shared.next_tmp.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        self.shared.tmp_dir.join(format!("fill-{pid}-{n}"))
    }

    /// Gives back a reservation of `n` bytes, `on_disk` of which a fill occupied on the filesystem.
    pub(crate) fn release(&self, n: u64, on_disk: u64) {
        let mut st = self.state();
        st.reserved = st.reserved.saturating_sub(n);
        st.on_disk = st.on_disk.saturating_sub(on_disk);
    }

    /// A fill now occupies `n` more of its reserved bytes on the filesystem.
    pub(crate) fn note_on_disk(&self, n: u64) {
        if n > 0 {
            self.state().on_disk += n;
        }
    }

    pub(crate) fn max_object_size(&self) -> u64 {
        self.shared.max_object_size
    }

    /// Drops the shared mapping of an object that is going away.
    fn forget_map(&self, d: &Digest) {
        self.shared
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(d);
    }

    /// Removes an object, its meta and every key that maps to it.
    pub fn purge(&self, d: &Digest) -> Result<(), StoreError> {
        if !self.contains(d) {
            return Err(StoreError::NotFound(*d));
        }
        self.unlink(d, false);
        Ok(())
    }

    /// Every stored object with its keys, for the admin listing and the dashboard.
    pub fn list(&self) -> Vec<ObjectListing> {
        let mut keys: HashMap<Digest, Vec<String>> = HashMap::new();
        for (k, e) in self.shared.index.keys() {
            keys.entry(e.digest).or_default().push(k);
        }
        let st = self.state();
        let mut out: Vec<ObjectListing> = st
            .objects
            .iter()
            .map(|(d, o)| ObjectListing {
                digest: *d,
                size: o.size,
                keys: keys.remove(d).unwrap_or_default(),
                pinned: o.pinned,
                hits: o.hits,
                last_access: o.last_access,
            })
            .collect();
        out.sort_by_key(|o| std::cmp::Reverse(o.last_access));
        out
    }

    pub fn usage(&self) -> Usage {
        let st = self.state();
        Usage {
            objects: st.objects.len() as u64,
            bytes: st.used,
            reserved: st.reserved,
            max_size: self.shared.budget.max_size,
            free: self.shared.budget.free_bytes().unwrap_or(0),
            min_free: self.shared.budget.min_free,
        }
    }

    /// Writes access times and hit counts to the index and flushes it (periodically and at shutdown).
    /// Only the objects read since the last flush are written: the others' records have not changed
    /// (rewriting every record every 30 s wore the flash of a gateway for nothing).
    pub fn flush(&self) -> Result<(), StoreError> {
        let snapshot: Vec<(Digest, Obj)> = {
            let mut st = self.state();
            let touched = std::mem::take(&mut st.touched);
            touched
                .into_iter()
                .filter_map(|d| Some((d, st.objects.get(&d)?.clone())))
                .collect()
        };
        for (d, o) in snapshot {
            let rec = ObjectRecord {
                size: o.size,
                pinned: o.pinned,
                last_access: o.last_access,
                hits: o.hits,
                content_type: o.content_type,
            };
            self.shared.index.put_object(&d, &rec)?;
        }
        self.shared.index.flush()?;
        Ok(())
    }

    /// Re-hashes every stored object; returns those whose bytes do not match their name, removing them
    /// when `repair` is set. Blocking.
    pub fn verify(&self, repair: bool) -> Vec<(Digest, String)> {
        use sha2::Digest as _;
        let digests: Vec<Digest> = self.state().objects.keys().copied().collect();
        let mut bad = Vec::new();
        for d in digests {
            let path = self.blob_path(&d);
            let verdict = (|| -> std::io::Result<Option<String>> {
                let mut f = std::fs::File::open(&path)?;
                let mut h = sha2::Sha256::new();
                std::io::copy(&mut f, &mut h)?;
                let got = Digest(h.finalize().into());
                Ok((got != d).then(|| format!("bytes hash to {got}")))
            })();
            let problem = match verdict {
                Ok(None) => continue,
                Ok(Some(p)) => p,
                Err(e) => e.to_string(),
            };
            if repair {
                self.unlink(&d, false);
            }
            bad.push((d, problem));
        }
        bad
    }
}

#[cfg(test)]
mod tests;
