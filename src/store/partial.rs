//! Partial fills that survive a restart (SPEC 4, "Resume"). A fill whose response can be resumed (a
//! strong validator) moves its temp file to `<dir>/partial/<id>.data`, `<id>` the SHA-256 of its key,
//! and keeps beside it `<id>.json`: the response's head and validators and `valid`, the bytes of the
//! data file known to be on disk. The data is fsynced before `valid` is raised, and the record is
//! written atomically, so after a crash or a power cut `valid` is a lower bound of what the file holds.
//! At start the partials are taken back (each reserves its room in the budget like a fill; the oldest
//! give way first, to new fills too) and the next fill of the key resumes from `valid`; a torn or
//! unreadable record, one whose data is gone or shorter than `valid`, or one older than a day goes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::records::write_atomic;
use super::{now_ms, Fill, Store, StoreError};

/// A partial older than this is not resumed: what the upstream serves has likely moved on.
const MAX_AGE_MS: u64 = 24 * 3600 * 1000;
/// The data is fsynced and `valid` raised at most this often (and at least this often while bytes come).
const SYNC_EVERY: Duration = Duration::from_millis(500);

/// What is kept of a partial fill: enough to resume it and to serve and store what it becomes. The
/// key, not the URL, is kept: a URL may carry a SAS token, which never goes to disk outside the object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartialRecord {
    pub key: String,
    /// The upstream's status and response fields, as they arrived.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The digest the bytes must have, when it was known (hex).
    pub digest: Option<String>,
    /// Bytes of the data file that are fsynced: the resume starts here.
    pub valid: u64,
    /// Bytes per second the fill was receiving when `valid` was last raised.
    pub rate: u64,
    /// When the record was last written (ms since the epoch).
    pub updated_ms: u64,
}

/// The partial a live fill keeps up to date.
pub(super) struct Tracked {
    id: String,
    record: PartialRecord,
    synced_at: Instant,
    /// The fill's file has moved to the partials' folder (done at the first sync).
    placed: bool,
}

/// A partial taken back at start, waiting for the next fill of its key; its room is reserved.
struct Parked {
    record: PartialRecord,
    reserved: u64,
    on_disk: u64,
}

/// The partials of the store: parked ones, and the ids live fills keep.
#[derive(Default)]
pub(super) struct Partials {
    parked: HashMap<String, Parked>,
    live: HashSet<String>,
    /// The gateway is stopping and the fills still running are cut off: each keeps its partial
    /// (bytes synced, record raised to them) instead of removing it, as a crash would have.
    stopping: bool,
}

/// The file name of a key's partial.
fn id_of(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Store {
    /// The gateway is stopping without waiting for the fills still running: from now on a fill that
    /// ends uncommitted keeps its partial, to be resumed after the restart (SPEC 4, "Resume").
    pub fn keep_partials_at_stop(&self) {
        self.partials().stopping = true;
    }

    fn partial_dir(&self) -> PathBuf {
        self.shared.budget.dir.join("partial")
    }

    fn partials(&self) -> std::sync::MutexGuard<'_, Partials> {
        self.shared
            .partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn remove_partial_files(&self, id: &str) {
        let dir = self.partial_dir();
        let _ = std::fs::remove_file(dir.join(format!("{id}.data")));
        let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
    }

    /// At start: takes back the partials that are whole and young, newest first while the budget has
    /// room for them; removes the rest and any stray file. Blocking.
    pub(super) fn adopt_partials(&self) {
        let dir = self.partial_dir();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut found: Vec<(u64, String, PartialRecord, u64)> = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_suffix(".json") else {
                // Data files are looked at from their record; temp files of records go.
                let data_id = name.strip_suffix(".data");
                if data_id.is_none_or(|id| !dir.join(format!("{id}.json")).exists()) {
                    let _ = std::fs::remove_file(e.path());
                }
                continue;
            };
            match read_partial(&dir, id) {
                Some((rec, alloc)) => found.push((rec.updated_ms, id.to_string(), rec, alloc)),
                None => {
                    tracing::info!(partial = id, "partial fill unusable; removed");
                    self.remove_partial_files(id);
                }
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (_, id, record, alloc) in found {
            let reserved = record.size.unwrap_or(record.valid).max(record.valid);
            match self.take_room(reserved) {
                Ok(victims) => self.evict(victims),
                Err(_) => {
                    tracing::info!(partial = %id, "no room for a partial fill; removed");
                    self.remove_partial_files(&id);
                    continue;
                }
            }
            let on_disk = alloc.min(reserved);
            self.note_on_disk(on_disk);
            tracing::info!(partial = %id, valid = record.valid, "partial fill kept for resuming");
            let parked = Parked {
                record,
                reserved,
                on_disk,
            };
            self.partials().parked.insert(id, parked);
        }
    }

    /// Whether a partial of `key` is parked, waiting to be resumed. Not blocking: a miss asks it before
    /// going to the disk for the partial.
    pub fn has_partial(&self, key: &str) -> bool {
        let p = self.partials();
        !p.parked.is_empty() && p.parked.contains_key(&id_of(key))
    }

    /// Bytes reserved by parked partials (for the budget's tests and ops).
    pub fn parked_partials(&self) -> (usize, u64) {
        let p = self.partials();
        let bytes = p.parked.values().map(|x| x.reserved).sum();
        (p.parked.len(), bytes)
    }

    /// Gives up the oldest parked partial, for room: its reservation is released now, and its id
    /// returned for its files to be removed (`remove_partial_files`). None when there is none.
    pub(super) fn give_up_oldest_partial(&self) -> Option<String> {
        let (id, parked) = {
            let mut p = self.partials();
            let id = p
                .parked
                .iter()
                .min_by_key(|(_, x)| x.record.updated_ms)
                .map(|(id, _)| id.clone())?;
            let parked = p.parked.remove(&id)?;
            (id, parked)
        };
        tracing::info!(partial = %id, "partial fill given up for room");
        self.release(parked.reserved, parked.on_disk);
        Some(id)
    }

    /// The partial kept of `key`, as a fill positioned at its `valid` bytes, with its record. The fill
    /// keeps the partial up to date from then on. Blocking.
    pub fn take_partial(&self, key: &str) -> Option<(PartialRecord, Fill)> {
        let id = id_of(key);
        let parked = {
            let mut p = self.partials();
            let parked = p.parked.remove(&id)?;
            p.live.insert(id.clone());
            parked
        };
        let path = self.partial_dir().join(format!("{id}.data"));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path);
        let (file, len) = match opened.and_then(|f| f.metadata().map(|m| (f, m.len()))) {
            Ok(x) if parked.record.key == key => x,
            _ => {
                self.partials().live.remove(&id);
                self.remove_partial_files(&id);
                self.release(parked.reserved, parked.on_disk);
                return None;
            }
        };
        let record = parked.record;
        let fill = Fill {
            store: self.clone(),
            path,
            file: Arc::new(file),
            len: record.valid,
            reserved: parked.reserved,
            on_disk: parked.on_disk,
            preallocated: record.size.is_some_and(|s| len >= s && s > 0),
            mapped: None,
            committed: false,
            flushed: record.valid,
            partial: Some(Tracked {
                id,
                record: record.clone(),
                synced_at: Instant::now(),
                placed: true,
            }),
        };
        Some((record, fill))
    }
}

/// A partial's record and its data file's allocated bytes, when the record is readable, its own,
/// young, and its data holds `valid` bytes.
fn read_partial(dir: &std::path::Path, id: &str) -> Option<(PartialRecord, u64)> {
    use std::os::unix::fs::MetadataExt;
    let bytes = std::fs::read(dir.join(format!("{id}.json"))).ok()?;
    let rec: PartialRecord = serde_json::from_slice(&bytes).ok()?;
    let md = std::fs::metadata(dir.join(format!("{id}.data"))).ok()?;
    let young = now_ms().saturating_sub(rec.updated_ms) < MAX_AGE_MS;
    let whole = md.len() >= rec.valid && rec.size.is_none_or(|s| rec.valid <= s);
    (id_of(&rec.key) == id && young && whole && rec.valid > 0)
        .then_some((rec, md.blocks().saturating_mul(512)))
}

impl Fill {
    /// Keeps this fill as a partial that survives a restart. Nothing is written yet: at the first
    /// sync (`SYNC_EVERY` into the fill) its file moves beside its record, so that a fill that ends
    /// sooner costs no disk sync and delays no client. A key whose partial another fill keeps is not
    /// kept twice (false). Blocking.
    pub fn keep_partial(&mut self, mut record: PartialRecord) -> Result<bool, StoreError> {
        let id = id_of(&record.key);
        let old = {
            let mut p = self.store.partials();
            if !p.live.insert(id.clone()) {
                return Ok(false);
            }
            p.parked.remove(&id)
        };
        if let Some(old) = old {
            // Superseded by this fill: its files go now, not when this one is first synced.
            self.store.release(old.reserved, old.on_disk);
            self.store.remove_partial_files(&id);
        }
        record.valid = 0;
        record.updated_ms = now_ms();
        self.partial = Some(Tracked {
            id,
            record,
            synced_at: Instant::now(),
            placed: false,
        });
        Ok(true)
    }

    /// Makes the bytes written so far durable and raises the record's `valid` to them, when it is
    /// time to. A failure stops the keeping (the fill goes on). Blocking.
    pub(super) fn sync_partial(&mut self) {
        let Some(t) = self.partial.as_mut() else {
            return;
        };
        let elapsed = t.synced_at.elapsed();
        if elapsed < SYNC_EVERY || self.len <= t.record.valid {
            return;
        }
        let gained = self.len - t.record.valid;
        t.record.rate = (gained as f64 / elapsed.as_secs_f64().max(0.001)) as u64;
        t.record.valid = self.len;
        t.record.updated_ms = now_ms();
        t.synced_at = Instant::now();
        let json = t.partial_json();
        let path = self.store.partial_dir().join(format!("{}.json", t.id));
        let synced = self.place_partial().and_then(|_| {
            self.file
                .sync_data()
                .and_then(|_| json.and_then(|j| write_atomic(&path, &j)))
        });
        if let Err(e) = synced {
            tracing::warn!(error = %e, "partial fill record not updated; it is no longer kept");
            self.drop_partial();
        }
    }

    /// At a stop that cuts this fill off (`Store::keep_partials_at_stop`), keeps the bytes it holds
    /// as its partial: synced, and its record raised to them. False when there is none to keep, or
    /// it could not be written (the fill then removes it as usual).
    pub(super) fn park_at_stop(&mut self) -> bool {
        if !self.store.partials().stopping {
            return false;
        }
        let Some(t) = self.partial.as_mut() else {
            return false;
        };
        t.record.valid = self.len;
        t.record.updated_ms = now_ms();
        let path = self.store.partial_dir().join(format!("{}.json", t.id));
        let json = t.partial_json();
        let key = t.record.key.clone();
        let kept = self
            .place_partial()
            .and_then(|_| self.file.sync_data())
            .and(json)
            .and_then(|j| write_atomic(&path, &j));
        match kept {
            Ok(()) => {
                tracing::info!(%key, bytes = self.len, "stopping: fill kept as a partial");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "stopping: partial fill not kept");
                false
            }
        }
    }

    /// Moves the fill's file to the partials' folder, once (a rename: readers and the mapping keep
    /// their open file).
    fn place_partial(&mut self) -> std::io::Result<()> {
        let Some(t) = self.partial.as_mut().filter(|t| !t.placed) else {
            return Ok(());
        };
        let dir = self.store.partial_dir();
        let to = dir.join(format!("{}.data", t.id));
        std::fs::create_dir_all(&dir).and_then(|_| std::fs::rename(&self.path, &to))?;
        t.placed = true;
        self.path = to;
        Ok(())
    }

    /// Stops keeping the partial: its record goes (the data file is the fill's, to commit or remove).
    pub(super) fn drop_partial(&mut self) {
        if let Some(t) = self.partial.take() {
            let dir = self.store.partial_dir();
            let _ = std::fs::remove_file(dir.join(format!("{}.json", t.id)));
            self.store.partials().live.remove(&t.id);
        }
    }
}

impl Tracked {
    fn partial_json(&self) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(&self.record).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn open(dir: &std::path::Path, max_size: u64) -> Store {
        Store::open(&StoreConfig {
            dir: dir.to_path_buf(),
            max_size,
            min_free: 0,
            max_object_size: 0,
            max_filling: 0,
            max_keys_per_object: 100,
        })
        .unwrap()
    }

    /// A partial of `valid` bytes for `key`, as a crash leaves it.
    fn plant(dir: &std::path::Path, key: &str, valid: u64, updated_ms: u64) -> PathBuf {
        let p = dir.join("partial");
        std::fs::create_dir_all(&p).unwrap();
        let id = id_of(key);
        std::fs::write(p.join(format!("{id}.data")), vec![7u8; valid as usize]).unwrap();
        let rec = PartialRecord {
            key: key.into(),
            status: 200,
            headers: Vec::new(),
            size: Some(valid),
            etag: Some("\"e\"".into()),
            last_modified: None,
            digest: None,
            valid,
            rate: 0,
            updated_ms,
        };
        let json = p.join(format!("{id}.json"));
        std::fs::write(&json, serde_json::to_vec(&rec).unwrap()).unwrap();
        json
    }

    #[test]
    fn partials_count_against_the_budget_and_give_way() {
        let t = tempfile::tempdir().unwrap();
        plant(t.path(), "k/a", 1 << 20, now_ms());
        let s = open(t.path(), 4 << 20);
        assert_eq!(s.parked_partials(), (1, 1 << 20));
        // Fills may reserve half the store: 1.5 MiB fits only once the partial gives way.
        let f = s.begin_fill(Some(3 << 19)).unwrap();
        assert_eq!(s.parked_partials(), (0, 0));
        assert!(!t.path().join("partial").read_dir().unwrap().any(|_| true));
        drop(f);
        // A store with no room for it at start does not keep it.
        plant(t.path(), "k/b", 1 << 20, now_ms());
        drop(s);
        let s = open(t.path(), 1 << 20);
        assert_eq!(s.parked_partials(), (0, 0));
    }

    #[test]
    fn torn_old_or_foreign_partials_go() {
        let t = tempfile::tempdir().unwrap();
        let torn = plant(t.path(), "k/torn", 1000, now_ms());
        let bytes = std::fs::read(&torn).unwrap();
        std::fs::write(&torn, &bytes[..bytes.len() / 2]).unwrap();
        plant(t.path(), "k/old", 1000, now_ms() - MAX_AGE_MS - 1);
        let good = plant(t.path(), "k/good", 1000, now_ms());
        std::fs::write(t.path().join("partial/stray.data"), b"x").unwrap();
        let s = open(t.path(), 0);
        assert_eq!(s.parked_partials(), (1, 1000));
        let left = t.path().join("partial").read_dir().unwrap().count();
        assert_eq!(left, 2, "the good partial's data and record");
        assert!(good.exists());
        let (rec, fill) = s.take_partial("k/good").unwrap();
        assert_eq!((rec.valid, fill.len()), (1000, 1000));
        assert!(s.take_partial("k/good").is_none());
        drop(fill);
        assert!(!good.exists(), "a dropped fill leaves no partial");
    }

    fn record(key: &str) -> PartialRecord {
        PartialRecord {
            key: key.into(),
            status: 200,
            headers: Vec::new(),
            size: Some(8),
            etag: Some("\"e\"".into()),
            last_modified: None,
            digest: None,
            valid: 0,
            rate: 0,
            updated_ms: now_ms(),
        }
    }

    /// A fill kept as a partial writes nothing (no disk sync before the first bytes reach clients)
    /// until it has run for `SYNC_EVERY`; a fill that ends sooner never touches the partials' folder.
    #[test]
    fn a_partial_is_written_only_once_the_fill_has_run_a_while() {
        let t = tempfile::tempdir().unwrap();
        let s = open(t.path(), 0);
        let partials = t.path().join("partial");
        let count = || partials.read_dir().map(|d| d.count()).unwrap_or(0);
        let mut quick = s.begin_fill(Some(8)).unwrap();
        assert!(quick.keep_partial(record("k/quick")).unwrap());
        quick.write(b"abcd").unwrap();
        assert_eq!(count(), 0, "nothing written for a young fill");
        drop(quick);
        assert_eq!(count(), 0);
        let mut slow = s.begin_fill(Some(8)).unwrap();
        assert!(slow.keep_partial(record("k/slow")).unwrap());
        slow.write(b"abcd").unwrap();
        std::thread::sleep(SYNC_EVERY);
        slow.write(b"efgh").unwrap();
        assert_eq!(count(), 2, "its data and its record, once synced");
        let json = partials.join(format!("{}.json", id_of("k/slow")));
        let rec: PartialRecord = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        assert_eq!(rec.valid, 8);
    }
}
