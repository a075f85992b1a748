//! The relay's durable state: one redb file, `<store.dir>/status.redb`, holding the queue of reports
//! to forward, the dedup records and the per-device history. One accepted group of requests is one
//! write transaction committed with `Durability::Immediate`; the relay answers 202 only after that
//! commit has returned.
//!
//! Why not sled, which held this state before (seen after power cuts of a qemu guest whose
//! disk honours flushes: sled's `conf` files were 0 bytes, the next start panicked in sled's
//! serialization.rs:662 "tried to serialize Uninitialized", and 128 of 1,688 acknowledged reports
//! were gone). sled 0.34.7, read in its source and its tracker:
//! - `Tree::flush` writes the log with `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`
//!   (pagecache/iobuf.rs), which by its man page "does not flush disk write caches and thus does not
//!   provide any data integrity on systems with volatile disk write caches", nor the file size of a
//!   log that grew. Open issue spacejam/sled#1452 "Data is not written durably" says so; in
//!   spacejam/sled#1351 redb's author points at the same man page and the maintainer answers that the
//!   performance benefit "is enormous"; in spacejam/sled#1077 the maintainer describes the hole
//!   (a segment allocated at the end of the log is made durable by `sync_file_range` before its new
//!   length is, so recovery reads a shorter file) and it is not fixed in 0.34.7.
//! - `conf` is written by `Config::write_config` (config.rs) with `OpenOptions::create` and two
//!   `write_all`s: no fsync, no rename. After a cut it can be empty; `read_config` then logs
//!   "empty/corrupt configuration file found" and treats the store as new over the old log. An empty
//!   `conf` plus 8 KiB of the log lost (zeros) reproduces that panic at open every time (the test
//!   in legacy.rs); sled returns no error a caller could handle.
//! - the default `flush_every_ms` is 500 ms (config.rs), so a write sits up to half a second in
//!   sled's own buffers; the relay did call `flush_async` before answering, but that flush is the
//!   `sync_file_range` above. And it flushed after the batch was applied and the dedup pair was
//!   added in memory, so a failed flush left a pair that made the poster's retry a "duplicate".
//! - maintainer statements: "sled has never claimed it has the durability property" is answered in
//!   spacejam/sled#654 with "data is going to be in the OS pagecache, surviving process crashes",
//!   i.e. not power loss; the README says "if reliability is your primary constraint, use SQLite.
//!   sled is beta." spacejam/sled#1533 and #1527 report 0.34 databases that no longer open after an
//!   abrupt stop.
//!
//! So sled cannot promise what SPEC 5 says a 202 means. redb can, and says so as its contract
//! (docs.rs `redb::Durability::Immediate`, redb's docs/design.md "Commit strategies" and "Assumptions
//! about underlying media"): an Immediate commit returns only after `fdatasync` (file_backend); the
//! B-trees are copy-on-write with two commit slots and XXH3 checksums, so a torn commit is detected
//! and rolled back to the previous one; its assumptions are those SQLite makes (fsync means durable,
//! power-safe overwrite). It is pure Rust (no C build, unlike rusqlite's bundled SQLite, which would
//! have been the other choice: WAL with synchronous=FULL). Its 1-phase commit (one fsync) is kept:
//! the 2-phase variant only guards against an attacker who controls crash timing and page write
//! order, at the cost of a second fsync per accept.
//!
//! What redb does not do, done here: fsync the directory after creating or renaming files (else the
//! new file's name can be lost with everything in it), and never panic on a damaged file: the file
//! is opened with `set_check_integrity_on_open` (every page's checksum verified, so corruption is an
//! error at open instead of a panic on a later read), the open and the start-up scan run inside
//! `catch_unwind`, and a damaged file is moved aside to `status.corrupt-<ms>` with a warning and a
//! new one created: its reports are lost, the gateway comes back.
//!
//! Layout: `queue` seq -> report as forwarded; `dedup` seq -> 128-bit hash of (deviceId, reportId),
//! oldest first, and `dedup_digest` seq -> the report's digest (`report::digest`) for the same seq: a
//! table of its own, so that files of earlier versions (dedup records without digests) open as they
//! are and a record without a digest reads as one (`dedup`); `history` (deviceId, seq) -> report as
//! stored (the last one per device is its latest state); `set_aside` seq -> (report as forwarded, the
//! refusal as JSON): reports the next hop refused for good, moved there from `queue` in one
//! transaction; `conflicts` seq -> the record of a report accepted as a conflict (the newest
//! `CONFLICTS_KEPT`); `meta` "next_seq", "sled_migrated" and "conflicts" (how many ever). It calls
//! nothing else of cistern's.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::dedup::Record;

const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
const DEDUP: TableDefinition<u64, u128> = TableDefinition::new("dedup");
const DEDUP_DIGEST: TableDefinition<u64, u128> = TableDefinition::new("dedup_digest");
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("conflicts");
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SET_ASIDE: TableDefinition<u64, (&[u8], &[u8])> = TableDefinition::new("set_aside");

const NEXT_SEQ: &str = "next_seq";
const SLED_MIGRATED: &str = "sled_migrated";
const CONFLICT_COUNT: &str = "conflicts";

/// Records of conflicts kept for `/v1/relay` and the dashboard, the newest.
pub const CONFLICTS_KEPT: u64 = 50;

/// Read cache of the database; the status store is small and mostly appended to.
const CACHE_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("status database: {0}")]
    Engine(#[from] redb::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Raised only by the fail points of the crash tests (`--features failpoints`).
    #[error("failure injected at {0}")]
    Injected(&'static str),
}

macro_rules! engine_error {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Engine(e.into())
            }
        }
    )*};
}
engine_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// One write transaction's worth of changes, built by the writer from a group of requests.
#[derive(Default, Debug)]
pub struct Batch {
    /// (seq, report as forwarded): new queue entries.
    pub queue: Vec<(u64, Vec<u8>)>,
    /// (seq, pair hash, digest): new dedup records (the sled import has no digests).
    pub dedup: Vec<(u64, u128, Option<u128>)>,
    /// (device, seq, report as stored): new history entries.
    pub history: Vec<(String, u64, Vec<u8>)>,
    /// History entries trimmed to `history_per_device`.
    pub trim: Vec<(String, u64)>,
    /// How many of the oldest dedup records to forget (`dedup_entries`).
    pub forget: usize,
    /// Queue entries delivered to the next hop.
    pub delivered: Vec<u64>,
    /// Queue entries the next hop refused for good: (seq, report as queued, the refusal as JSON),
    /// moved from the queue to the set-aside table.
    pub aside: Vec<(u64, Vec<u8>, Vec<u8>)>,
    /// What happens to every set-aside report (after `aside`).
    pub aside_op: Option<AsideOp>,
    /// (seq, record as JSON): reports accepted as conflicts.
    pub conflicts: Vec<(u64, Vec<u8>)>,
    /// How many of the oldest conflict records to drop (`CONFLICTS_KEPT`).
    pub conflicts_trim: u64,
    /// The sequence number after this batch.
    pub next_seq: u64,
}

/// An admin's decision about the set-aside reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsideOp {
    /// Back into the queue, at their old places (`POST /v1/admin/relay/retry`).
    Requeue,
    /// Dropped (`DELETE /v1/admin/relay/set-aside`).
    Drop,
}

/// What the relay keeps in memory, rebuilt from the file at start.
#[derive(Default, Debug)]
pub struct Loaded {
    pub next_seq: u64,
    pub queue_len: u64,
    pub queue_bytes: u64,
    /// Dedup records, oldest first.
    pub dedup: Vec<Record>,
    /// History entries per device, oldest first: (seq, bytes of key and value).
    pub history: HashMap<String, Vec<(u64, u32)>>,
    pub aside_len: u64,
    /// Bytes of the set-aside reports as queued (what goes back to the queue on a retry).
    pub aside_report_bytes: u64,
    /// Bytes of the set-aside entries: keys, reports and refusals.
    pub aside_bytes: u64,
    pub conflicts: Conflicts,
}

/// The conflicts: how many ever, and the records kept of the newest.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflicts {
    pub total: u64,
    pub kept: u64,
    /// Bytes of the records kept, keys included.
    pub bytes: u64,
}

/// What a commit removed that memory follows.
#[derive(Default, Debug)]
pub struct Written {
    /// The dedup records forgotten.
    pub forgotten: Vec<Record>,
    /// The conflict records dropped, and their bytes.
    pub conflicts_dropped: (u64, u64),
}

/// The open status database.
pub struct StatusDb {
    db: Database,
}

/// A damaged file is one whose contents redb refuses or chokes on; anything else (held by another
/// process, permission denied) is an error to report, never a reason to move the file aside.
fn damaged(e: &DbError) -> bool {
    let de = match e {
        DbError::Open { source, .. } => source,
        DbError::Engine(redb::Error::Corrupted(_)) => return true,
        _ => return false,
    };
    match de {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
        | redb::DatabaseError::UpgradeRequired(_)
        | redb::DatabaseError::RepairAborted => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// fsync of a directory, so that a file created or renamed in it keeps its name after a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), DbError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DbError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Renames `path` to `<dir>/<stem>.<what>-<ms>` and syncs the directory; returns the new name.
pub fn set_aside(path: &Path, what: &str) -> Result<PathBuf, DbError> {
    let ms = crate::store::now_ms();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "status".into());
    let to = path.with_file_name(format!("{stem}.{what}-{ms}"));
    std::fs::rename(path, &to).map_err(|source| DbError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(to)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

impl StatusDb {
    /// Opens (or creates) the database at `path` and reads what the relay keeps in memory. A damaged
    /// file is moved aside and replaced by an empty one. Blocking.
    pub fn open(path: &Path) -> Result<(StatusDb, Loaded), DbError> {
        let attempt = catch_unwind(AssertUnwindSafe(|| Self::open_and_scan(path)));
        let why = match attempt {
            Ok(Ok(opened)) => return Ok(opened),
            Ok(Err(e)) if damaged(&e) => e.to_string(),
            Ok(Err(e)) => return Err(e),
            Err(p) => format!("the database engine panicked: {}", panic_text(p.as_ref())),
        };
        let aside = set_aside(path, "corrupt")?;
        tracing::warn!(
            file = %path.display(),
            moved_to = %aside.display(),
            error = %why,
            "status database damaged: moved aside and started empty; the reports it held are lost"
        );
        match catch_unwind(AssertUnwindSafe(|| Self::open_and_scan(path))) {
            Ok(r) => r,
            Err(p) => Err(DbError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(panic_text(p.as_ref())),
            }),
        }
    }

    fn open_and_scan(path: &Path) -> Result<(StatusDb, Loaded), DbError> {
        let existed = path.exists();
        let db = Self::open_file(path)?;
        if !existed {
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
        }
        let db = StatusDb { db };
        db.create_tables()?;
        let loaded = db.scan()?;
        Ok((db, loaded))
    }

    /// Opens the file; a previous handle of this process closing right now (a restart in tests) gets
    /// a moment to let go of its lock, bounded.
    fn open_file(path: &Path) -> Result<Database, DbError> {
        let mut tries = 0;
        loop {
            let r = Database::builder()
                .set_cache_size(CACHE_BYTES)
                .set_check_integrity_on_open(true)
                .create(path);
            match r {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(DbError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Ok(db) => return Ok(db),
            }
        }
    }

    fn write(&self) -> Result<redb::WriteTransaction, DbError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        Ok(txn)
    }

    fn create_tables(&self) -> Result<(), DbError> {
        let txn = self.write()?;
        txn.open_table(QUEUE)?;
        txn.open_table(DEDUP)?;
        txn.open_table(HISTORY)?;
        txn.open_table(META)?;
        txn.open_table(SET_ASIDE)?;
        txn.open_table(DEDUP_DIGEST)?;
        txn.open_table(CONFLICTS)?;
        txn.commit()?;
        Ok(())
    }

    fn scan(&self) -> Result<Loaded, DbError> {
        let txn = self.db.begin_read()?;
        let mut l = Loaded::default();
        let meta = txn.open_table(META)?;
        l.next_seq = meta.get(NEXT_SEQ)?.map(|v| v.value()).unwrap_or(0);
        for r in txn.open_table(QUEUE)?.iter()? {
            let (k, v) = r?;
            l.queue_len += 1;
            l.queue_bytes += v.value().len() as u64;
            l.next_seq = l.next_seq.max(k.value() + 1);
        }
        // Both ordered by seq: each record's digest is found walking the two together.
        let digest_table = txn.open_table(DEDUP_DIGEST)?;
        let mut digests = digest_table.iter()?;
        let mut next = || -> Result<Option<(u64, u128)>, DbError> {
            Ok(digests
                .next()
                .transpose()?
                .map(|(k, v)| (k.value(), v.value())))
        };
        let mut digest = next()?;
        for r in txn.open_table(DEDUP)?.iter()? {
            let (k, v) = r?;
            let seq = k.value();
            // Digests without a record (left by an older version) are passed over.
            while digest.is_some_and(|(k, _)| k < seq) {
                digest = next()?;
            }
            let d = digest.filter(|(k, _)| *k == seq).map(|(_, d)| d);
            l.dedup.push((v.value(), d));
            l.next_seq = l.next_seq.max(seq + 1);
        }
        l.conflicts.total = meta.get(CONFLICT_COUNT)?.map(|v| v.value()).unwrap_or(0);
        for r in txn.open_table(CONFLICTS)?.iter()? {
            let (k, v) = r?;
            l.conflicts.kept += 1;
            l.conflicts.bytes += conflict_bytes(v.value());
            l.next_seq = l.next_seq.max(k.value() + 1);
        }
        for r in txn.open_table(HISTORY)?.iter()? {
            let (k, v) = r?;
            let (dev, seq) = k.value();
            l.next_seq = l.next_seq.max(seq + 1);
            let bytes = history_bytes(dev, v.value());
            l.history
                .entry(dev.to_string())
                .or_default()
                .push((seq, bytes));
        }
        for r in txn.open_table(SET_ASIDE)?.iter()? {
            let (k, v) = r?;
            let (report, refusal) = v.value();
            l.aside_len += 1;
            l.aside_report_bytes += report.len() as u64;
            l.aside_bytes += aside_bytes(report, refusal);
            l.next_seq = l.next_seq.max(k.value() + 1);
        }
        Ok(l)
    }

    /// Writes a batch in one durable transaction; returns what it removed.
    pub fn commit(&self, b: &Batch) -> Result<Written, DbError> {
        let txn = self.write()?;
        let written = write::batch(&txn, b)?;
        // Written but not committed: dropping `txn` aborts it.
        failpoint!("relay-commit", |_| Err(DbError::Injected("relay-commit")));
        txn.commit()?;
        Ok(written)
    }

    /// The oldest queue entries, up to `n`, and (past the first) as many as a JSON array of at most
    /// `max_body` bytes holds.
    pub fn peek(&self, n: usize, max_body: usize) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        // `[`, then each entry with the `,` or `]` after it.
        let mut body = 1usize;
        for r in txn.open_table(QUEUE)?.iter()?.take(n) {
            let (k, v) = r?;
            let v = v.value();
            if !out.is_empty() && body + v.len() + 1 > max_body {
                break;
            }
            body += v.len() + 1;
            out.push((k.value(), v.to_vec()));
        }
        Ok(out)
    }

    /// The refusals of the oldest `n` set-aside reports (JSON objects).
    pub fn set_aside(&self, n: usize) -> Result<Vec<Vec<u8>>, DbError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for r in txn.open_table(SET_ASIDE)?.iter()?.take(n) {
            out.push(r?.1.value().1.to_vec());
        }
        Ok(out)
    }

    /// The records of the newest conflicts, newest first (JSON objects).
    pub fn conflicts(&self) -> Result<Vec<Vec<u8>>, DbError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for r in txn.open_table(CONFLICTS)?.iter()?.rev() {
            out.push(r?.1.value().to_vec());
        }
        Ok(out)
    }

    /// The oldest undelivered report.
    pub fn oldest_queued(&self) -> Result<Option<Vec<u8>>, DbError> {
        let txn = self.db.begin_read()?;
        let q = txn.open_table(QUEUE)?;
        let first = q.first()?.map(|(_, v)| v.value().to_vec());
        Ok(first)
    }

    /// A device's history, oldest first.
    pub fn history(&self, device: &str) -> Result<Vec<Vec<u8>>, DbError> {
        let txn = self.db.begin_read()?;
        let h = txn.open_table(HISTORY)?;
        let mut out = Vec::new();
        for r in h.range((device, 0)..=(device, u64::MAX))? {
            out.push(r?.1.value().to_vec());
        }
        Ok(out)
    }

    /// The latest report of every device, in device order.
    pub fn latest(&self) -> Result<Vec<Vec<u8>>, DbError> {
        let txn = self.db.begin_read()?;
        let h = txn.open_table(HISTORY)?;
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut current: Option<String> = None;
        for r in h.iter()? {
            let (k, v) = r?;
            let (dev, _) = k.value();
            if current.as_deref() == Some(dev) {
                if let Some(last) = out.last_mut() {
                    *last = v.value().to_vec();
                }
            } else {
                current = Some(dev.to_string());
                out.push(v.value().to_vec());
            }
        }
        Ok(out)
    }

    /// Whether the sled store was already migrated into this file (a crash between the migration's
    /// commit and the old directory's rename must not import it twice).
    pub fn sled_migrated(&self) -> Result<bool, DbError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(SLED_MIGRATED)?.is_some())
    }

    /// Imports the old store's entries (already renumbered from `next_seq`) in the transaction that
    /// also marks the migration done.
    pub fn import(&self, b: &Batch) -> Result<(), DbError> {
        let txn = self.write()?;
        write::batch(&txn, b)?;
        txn.open_table(META)?
            .insert(SLED_MIGRATED, crate::store::now_ms())?;
        txn.commit()?;
        Ok(())
    }

    /// Re-reads the in-memory state (after an import).
    pub fn reload(&self) -> Result<Loaded, DbError> {
        self.scan()
    }
}

/// Bytes a history entry counts for: its key (device, seq) and the report.
pub fn history_bytes(device: &str, report: &[u8]) -> u32 {
    (device.len() + 8 + report.len()).min(u32::MAX as usize) as u32
}

/// Bytes a conflict record counts for: its key and the record.
pub fn conflict_bytes(record: &[u8]) -> u64 {
    8 + record.len() as u64
}

/// Bytes a set-aside entry counts for: its key, the report and the refusal.
pub fn aside_bytes(report: &[u8], refusal: &[u8]) -> u64 {
    8 + report.len() as u64 + refusal.len() as u64
}

mod write;

#[cfg(test)]
mod tests;
