//! The status relay (SPEC 5): device reports accepted durably, deduplicated per (deviceId, reportId),
//! kept as per-device history and latest state for this node's subtree, and forwarded upward in order,
//! in batches, for as long as the outage lasts and across restarts. A different report under a
//! (deviceId, reportId) already accepted is a conflict, not a duplicate (`dedup`): kept, forwarded
//! and counted.
//!
//! The durable state is one redb file (`db`, which says why redb and not sled); every write goes
//! through one writer thread (`writer`, group commit), and a 202 is answered only after the commit
//! that holds the request's reports, dedup records and history returned. The dedup set, the queue's
//! size and the history index are held in memory, rebuilt from the file at start, and changed only
//! after a commit. Of `fetch` the relay uses only the upstream `Director` (which parents to send to,
//! in order, and what came of it, so that fills and forwarding agree on who is down) and the TLS
//! connector builder, and calls nothing else of cistern's.
//!
//! Bounds (`budget`): one report (`max_report`, 413), one request, one forwarded batch, the queue
//! (`max_queue`, 507) and everything kept (`max_store`, 507), of which the history may take half and
//! is trimmed to it (`history`). A report the next hop refuses for good is set aside, never dropped
//! (`forward`), until an admin puts it back in the queue or drops it.

pub mod budget;
mod db;
mod dedup;
mod forward;
mod history;
mod legacy;
pub mod report;
mod view;
mod writer;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use db::{AsideOp, DbError};
pub use forward::NextHop;
pub use report::BadReport;
use writer::{Job, Prepared};

/// Requests waiting for the writer at most; a post beyond it waits for room.
const JOBS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Bad(#[from] BadReport),
    #[error("the status queue is full ({0} bytes undelivered, status.max_queue)")]
    Full(u64),
    #[error("the status store is full ({used} bytes kept of {max}, status.max_store)")]
    StoreFull { used: u64, max: u64 },
    #[error("report {index} is {bytes} bytes, over status.max_report ({max})")]
    ReportTooLarge { index: usize, bytes: u64, max: u64 },
    #[error(
        "the request body is over {0} bytes (status.batch_size x status.max_report, 1MiB..32MiB)"
    )]
    RequestTooLarge(usize),
    #[error("status database: {0}")]
    Db(#[from] DbError),
    #[error("status database: the write failed, nothing of the request was kept: {0}")]
    Write(String),
    #[error("the status writer has stopped")]
    Stopped,
    #[error("cannot start the status writer: {0}")]
    Thread(std::io::Error),
}

/// Relay settings, from `[status]` and `[node]`.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub node_id: String,
    pub batch_size: usize,
    pub max_queue: u64,
    pub max_store: u64,
    pub max_report: u64,
    pub history_per_device: usize,
    pub max_backoff: std::time::Duration,
    pub dedup_entries: usize,
}

/// What became of a `POST /v1/status`'s reports (its 202 answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Reports kept: new ones and conflicts.
    pub accepted: usize,
    /// Reports this node already holds (retries), dropped.
    pub duplicates: usize,
    /// Of `accepted`, the reports under a (deviceId, reportId) accepted before with other content.
    pub conflicts: usize,
}

/// Counters ops reads.
#[derive(Default)]
pub struct RelayStats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub forwarded: AtomicU64,
    pub errors: AtomicU64,
    /// Reports the next hop refused for good, set aside since the start.
    pub set_aside: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database and the memory that mirrors it; the writer thread holds it weakly.
    state: Arc<State>,
    /// Where reports go; None: this node keeps them for its own read-back only.
    next_hop: Option<NextHop>,
    /// To the writer thread; dropping the last one ends it.
    jobs: mpsc::Sender<Job>,
    wake: tokio::sync::Notify,
    stats: RelayStats,
}

/// What the writer thread and the readers share.
struct State {
    db: db::StatusDb,
    cfg: RelayConfig,
    /// Whether there is a next hop, so reports are queued.
    forwarding: bool,
    mem: Mutex<Mem>,
}

impl State {
    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-memory mirror of the file; only the writer changes it, after a commit.
#[derive(Default)]
struct Mem {
    next_seq: u64,
    /// Bytes of the queued reports (what `max_queue` bounds).
    queue_bytes: u64,
    queue_len: u64,
    /// The dedup records: (deviceId, reportId) pairs and digests of the reports accepted; bounded by
    /// `dedup_entries`.
    dedup: dedup::DedupIndex,
    /// The per-device history: entries, bytes, recency.
    history: history::HistoryIndex,
    aside_len: u64,
    /// Bytes of the set-aside reports as they were queued (back to the queue on a retry).
    aside_report_bytes: u64,
    /// Bytes of the set-aside entries with their refusals.
    aside_bytes: u64,
    conflicts: db::Conflicts,
}

impl Mem {
    /// Bytes of the store that are never dropped to make room: queue, set-aside, dedup records
    /// (those are bounded by count, `dedup_entries`), conflict records (`db::CONFLICTS_KEPT`), keys
    /// included.
    fn kept_bytes(&self) -> u64 {
        self.queue_bytes
            + budget::SEQ * self.queue_len
            + self.aside_bytes
            + budget::DEDUP_RECORD * self.dedup.records() as u64
            + self.conflicts.bytes
    }

    /// Bytes of everything the relay keeps, as counted against `max_store`.
    fn store_bytes(&self) -> u64 {
        self.kept_bytes() + self.history.bytes()
    }
}

impl From<db::Loaded> for Mem {
    fn from(l: db::Loaded) -> Mem {
        let mut history = history::HistoryIndex::default();
        for (dev, entries) in &l.history {
            for (seq, bytes) in entries {
                history.push(dev, *seq, *bytes);
            }
        }
        Mem {
            next_seq: l.next_seq,
            queue_bytes: l.queue_bytes,
            queue_len: l.queue_len,
            dedup: l.dedup.into_iter().collect(),
            history,
            aside_len: l.aside_len,
            aside_report_bytes: l.aside_report_bytes,
            aside_bytes: l.aside_bytes,
            conflicts: l.conflicts,
        }
    }
}

/// A 128-bit hash of (deviceId, reportId): two SipHash runs with different keys. Collisions (which would
/// make a new report a conflict) are vanishingly unlikely at the bounded set sizes used here.
fn pair_hash(device: &str, report: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    (0u8, device, report).hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (1u8, device, report).hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

impl Relay {
    /// Opens (or creates) the relay's database `<store_dir>/status.redb`, importing once the sled
    /// store of earlier versions from `<store_dir>/status`, and starts its writer. Blocking.
    pub fn open(
        store_dir: &Path,
        cfg: RelayConfig,
        next_hop: Option<NextHop>,
    ) -> Result<Relay, RelayError> {
        std::fs::create_dir_all(store_dir).map_err(|source| DbError::Io {
            path: store_dir.to_path_buf(),
            source,
        })?;
        let (db, loaded) = db::StatusDb::open(&store_dir.join("status.redb"))?;
        let loaded = legacy::migrate(&store_dir.join("status"), &db, loaded)?;
        let mem = Mem::from(loaded);
        tracing::info!(
            queued = mem.queue_len,
            devices = mem.history.devices(),
            set_aside = mem.aside_len,
            "status relay opened"
        );
        let state = Arc::new(State {
            db,
            cfg,
            forwarding: next_hop.is_some(),
            mem: Mutex::new(mem),
        });
        let (jobs, rx) = mpsc::channel(JOBS);
        writer::spawn(Arc::downgrade(&state), rx).map_err(RelayError::Thread)?;
        Ok(Relay {
            inner: Arc::new(Inner {
                state,
                next_hop,
                jobs,
                wake: tokio::sync::Notify::new(),
                stats: RelayStats::default(),
            }),
        })
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.state.mem()
    }

    fn db(&self) -> &db::StatusDb {
        &self.inner.state.db
    }

    fn cfg(&self) -> &RelayConfig {
        &self.inner.state.cfg
    }

    pub fn stats(&self) -> &RelayStats {
        &self.inner.stats
    }

    pub fn queue_depth(&self) -> u64 {
        self.mem().queue_len
    }

    /// Reports accepted as conflicts since the status store was created.
    pub fn conflicts_total(&self) -> u64 {
        self.mem().conflicts.total
    }

    /// Hands a job to the writer and waits for its answer.
    async fn submit<T>(&self, job: impl FnOnce(writer::Reply<T>) -> Job) -> Result<T, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(job(tx))
            .await
            .map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)?
    }

    /// The bound on one `POST /v1/status` body (413 beyond).
    pub fn max_request(&self) -> usize {
        budget::max_request(self.cfg().batch_size, self.cfg().max_report)
    }

    /// Accepts a `POST /v1/status` body; answers what became of its reports once durably written. A
    /// report over `max_report` refuses the whole request: nothing of it is kept.
    pub async fn accept(&self, body: &[u8]) -> Result<Accepted, RelayError> {
        if body.len() > self.max_request() {
            return Err(RelayError::RequestTooLarge(self.max_request()));
        }
        let mut reports = report::parse_body(body)?;
        budget::check_reports(&mut reports, self.cfg().max_report)?;
        let (reports, dups) = self.prepare(reports);
        let got = self
            .submit(|reply| Job::Accept {
                reports,
                dups,
                reply,
            })
            .await?;
        let s = &self.inner.stats;
        s.accepted.fetch_add(got.accepted as u64, Ordering::Relaxed);
        s.duplicates
            .fetch_add(got.duplicates as u64, Ordering::Relaxed);
        if got.conflicts > 0 {
            tracing::warn!(
                conflicts = got.conflicts,
                "status relay: reports under a (deviceId, reportId) already accepted with other \
                 content: kept as conflicts (GET /v1/relay lists them)"
            );
        }
        if got.accepted > 0 && self.inner.next_hop.is_some() {
            self.inner.wake.notify_one();
        }
        Ok(got)
    }

    /// Stamps and serialises a request's reports (on the request's own task, not the writer's);
    /// returns them with how many repeated a report earlier in the same request (the same digest;
    /// another report under the same pair goes on, to be counted a conflict).
    fn prepare(&self, reports: Vec<report::Report>) -> (Vec<Prepared>, usize) {
        let forwarding = self.inner.next_hop.is_some();
        let now = chrono_now();
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(reports.len());
        let mut dups = 0;
        for mut r in reports {
            // Before this node stamps or extends anything (`digest` leaves those members out anyway).
            let digest = report::digest(&r.json);
            if !seen.insert(digest) {
                dups += 1;
                continue;
            }
            r.json
                .entry("receivedAt")
                .or_insert(Value::String(now.clone()));
            let stored = serde_json::to_vec(&r.json).unwrap_or_default();
            let fwd = forwarding.then(|| {
                if let Some(Value::Array(via)) = r.json.get_mut("via") {
                    via.push(Value::String(self.cfg().node_id.clone()));
                }
                serde_json::to_vec(&r.json).unwrap_or_default()
            });
            out.push(Prepared {
                pair: pair_hash(&r.device_id, &r.report_id),
                digest,
                device: r.device_id,
                report_id: r.report_id,
                stored,
                fwd,
            });
        }
        (out, dups)
    }

    /// `POST /v1/admin/relay/retry` (`AsideOp::Requeue`) and `DELETE /v1/admin/relay/set-aside`
    /// (`AsideOp::Drop`): every set-aside report back in the queue, or dropped; returns how many.
    pub async fn set_aside_op(&self, op: AsideOp) -> Result<u64, RelayError> {
        let n = self.submit(|reply| Job::Aside { op, reply }).await?;
        if op == AsideOp::Requeue && n > 0 {
            self.inner.wake.notify_one();
        }
        Ok(n)
    }

    /// Waits until everything handed to the writer so far is written (at shutdown). Every accept is
    /// durable when answered, so there is nothing else to flush.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.jobs.send(Job::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn chrono_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
