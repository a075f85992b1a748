//! The relay's single writer: a thread that takes every accepted request and every delivered batch,
//! gathers those waiting into one redb transaction (group commit: concurrent posts share one fsync),
//! commits it durably, and only then changes the in-memory state (dedup set, queue size, history
//! index) and answers. A request whose commit failed leaves nothing behind, on disk or in memory, so
//! the poster's retry is accepted, not counted as a duplicate.
//!
//! Planning a group checks the bounds (`max_queue`, `max_store`: 507 for the request that would pass
//! them) and adds to the transaction the history entries it trims (`history`). A report set aside
//! leaves the queue in the transaction that records it. An admin's retry or drop of the set-aside
//! reports is a group of its own.

use std::collections::HashSet;
use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use super::db::{self, AsideOp, Batch, DbError};
use super::history::{Added, Bounds};
use super::{budget, Mem, RelayError, State};

/// Requests gathered into one transaction at most.
const MAX_GROUP: usize = 64;

/// A report ready to store: parsed, stamped and serialised by the request's own task.
pub struct Prepared {
    /// (deviceId, reportId) hashed.
    pub hash: u128,
    pub device: String,
    /// As kept in the history.
    pub stored: Vec<u8>,
    /// As forwarded (with this node in `via`); None when there is no next hop.
    pub fwd: Option<Vec<u8>>,
}

pub type Reply<T> = oneshot::Sender<Result<T, RelayError>>;

pub enum Job {
    /// A `POST /v1/status`: its fresh reports and how many of its own were repeated inside it.
    Accept {
        reports: Vec<Prepared>,
        dups: usize,
        reply: Reply<(usize, usize)>,
    },
    /// Queue entries the next hop acknowledged, and their bytes.
    Deliver {
        seqs: Vec<u64>,
        bytes: u64,
        reply: Reply<()>,
    },
    /// A queue entry the next hop refused for good: the report as queued, the refusal as JSON.
    SetAside {
        seq: u64,
        report: Vec<u8>,
        refusal: Vec<u8>,
        reply: Reply<()>,
    },
    /// Every set-aside report back to the queue, or dropped; answered with how many.
    Aside { op: AsideOp, reply: Reply<u64> },
    /// Answered once everything sent before it is written.
    Barrier(oneshot::Sender<()>),
}

/// What one group will do, planned against the in-memory state before anything is written.
#[derive(Default)]
struct Group {
    batch: Batch,
    /// Pairs new in this group.
    pairs: HashSet<u128>,
    /// Bytes of the reports queued by this group.
    added_bytes: u64,
    delivered_bytes: u64,
    /// Bytes of the queued reports this group sets aside, and of their set-aside entries.
    aside_report_bytes: u64,
    aside_bytes: u64,
    /// History entries added, in seq order.
    history: Vec<Added>,
    history_bytes: u64,
    accepts: bool,
}

/// Starts the writer thread. It holds only a weak reference, so that dropping the last `Relay` closes
/// the database at once; it ends when the job channel closes.
pub fn spawn(state: Weak<State>, rx: mpsc::Receiver<Job>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("status-writer".into())
        .spawn(move || run(state, rx))
        .map(|_| ())
}

fn run(state: Weak<State>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let Some(state) = state.upgrade() else {
            return;
        };
        for group in segments(jobs) {
            // A panic in the engine fails this group's requests (their replies are dropped: 500),
            // not every later one: nothing of the group was applied in memory, its transaction is
            // aborted.
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_group(&state, group)
            }));
            if done.is_err() {
                tracing::error!(
                    "status relay: the status database panicked; those requests failed"
                );
            }
        }
    }
}

/// Splits the jobs gathered into groups: an admin's set-aside decision alone, the rest together, in
/// their order.
fn segments(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut out: Vec<Vec<Job>> = Vec::new();
    let mut alone = true;
    for job in jobs {
        let admin = matches!(job, Job::Aside { .. });
        match out.last_mut() {
            Some(last) if !admin && !alone => last.push(job),
            _ => out.push(vec![job]),
        }
        alone = admin;
    }
    out
}

fn write_group(state: &State, jobs: Vec<Job>) {
    let (group, planned) = plan(&jobs, &state.mem(), state);
    let written = if group.batch_is_empty() {
        Ok(Vec::new())
    } else {
        commit(state, &group)
    };
    let ok = match written {
        Ok(forgotten) => {
            apply(&mut state.mem(), &group, forgotten);
            if group.accepts {
                failpoint!("relay-after-commit");
            }
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "status relay: writing to the status database failed");
            Some(e.to_string())
        }
    };
    answer(jobs, planned, ok);
}

fn commit(state: &State, group: &Group) -> Result<Vec<u128>, DbError> {
    if group.accepts {
        failpoint!("relay-before-commit", |_| Err(DbError::Injected(
            "relay-before-commit"
        )));
    }
    if !group.batch.aside.is_empty() {
        failpoint!("relay-set-aside", |_| Err(DbError::Injected(
            "relay-set-aside"
        )));
    }
    state.db.commit(&group.batch)
}

impl Group {
    fn batch_is_empty(&self) -> bool {
        let b = &self.batch;
        b.queue.is_empty()
            && b.dedup.is_empty()
            && b.delivered.is_empty()
            && b.trim.is_empty()
            && b.aside.is_empty()
            && b.aside_op.is_none()
    }
}

/// What a job will get if the group's commit succeeds.
enum Planned {
    /// (accepted, duplicates)
    Accepted(usize, usize),
    /// Refused: the queue's bytes that left no room (507).
    Full(u64),
    /// Refused: the store's bytes that left no room, and its bound (507).
    StoreFull(u64, u64),
    /// How many set-aside reports an admin's decision moved.
    Count(u64),
    Done,
}

/// Plans the group's batch, and what each job will get.
fn plan(jobs: &[Job], mem: &Mem, state: &State) -> (Group, Vec<Planned>) {
    let mut g = Group::default();
    g.batch.next_seq = mem.next_seq;
    let mut planned = Vec::with_capacity(jobs.len());
    for job in jobs {
        planned.push(match job {
            Job::Accept { reports, dups, .. } => plan_accept(&mut g, reports, *dups, mem, state),
            Job::Deliver { seqs, bytes, .. } => {
                g.batch.delivered.extend_from_slice(seqs);
                g.delivered_bytes += bytes;
                Planned::Done
            }
            Job::SetAside {
                seq,
                report,
                refusal,
                ..
            } => {
                g.aside_report_bytes += report.len() as u64;
                g.aside_bytes += db::aside_bytes(report, refusal);
                g.batch.aside.push((*seq, report.clone(), refusal.clone()));
                Planned::Done
            }
            Job::Aside { op, .. } => {
                g.batch.aside_op = Some(*op);
                Planned::Count(mem.aside_len)
            }
            Job::Barrier(_) => Planned::Done,
        });
    }
    // History: per device past `history_per_device`, and past the history's bounds.
    g.batch.trim = mem.history.plan(&g.history, history_bounds(state));
    // Dedup memory is bounded: the oldest pairs are forgotten first.
    g.batch.forget = (mem.dedup.len() + g.pairs.len()).saturating_sub(state.cfg.dedup_entries);
    (g, planned)
}

/// The history's bounds: half the store in bytes (`budget`), and as many entries as dedup records
/// (each device holds at least one, so this bounds the devices and the index in memory too).
fn history_bounds(state: &State) -> Bounds {
    Bounds {
        bytes: budget::history_bytes(state.cfg.max_store),
        entries: state.cfg.dedup_entries.max(1) as u64,
        per_device: state.cfg.history_per_device,
    }
}

/// Adds one request's fresh reports to the group, unless they would overfill the queue or the store.
fn plan_accept(
    g: &mut Group,
    reports: &[Prepared],
    dups: usize,
    mem: &Mem,
    state: &State,
) -> Planned {
    // Known: accepted by an earlier commit (memory holds only committed pairs) or earlier in the group.
    let fresh: Vec<&Prepared> = reports
        .iter()
        .filter(|p| !mem.dedup.contains(&p.hash) && !g.pairs.contains(&p.hash))
        .collect();
    if fresh.is_empty() {
        // Nothing to keep: a retry of reports already accepted is answered even when full.
        return Planned::Accepted(0, dups + reports.len());
    }
    let bytes: u64 = fresh
        .iter()
        .filter_map(|p| p.fwd.as_ref())
        .map(|f| f.len() as u64)
        .sum();
    let queued = mem.queue_bytes + g.added_bytes;
    if state.forwarding && queued + bytes > state.cfg.max_queue {
        return Planned::Full(queued);
    }
    if let Err(used) = room_in_store(g, &fresh, bytes, mem, state) {
        return Planned::StoreFull(used, state.cfg.max_store);
    }
    g.accepts = true;
    g.added_bytes += bytes;
    let b = &mut g.batch;
    for p in &fresh {
        let seq = b.next_seq;
        if let Some(f) = &p.fwd {
            b.queue.push((seq, f.clone()));
        }
        b.dedup.push((seq, p.hash));
        b.history.push((p.device.clone(), seq, p.stored.clone()));
        let n = db::history_bytes(&p.device, &p.stored);
        g.history.push((p.device.clone(), seq, n));
        g.history_bytes += n as u64;
        g.pairs.insert(p.hash);
        b.next_seq += 1;
    }
    Planned::Accepted(fresh.len(), dups + reports.len() - fresh.len())
}

/// Whether the store has room for `fresh` (with `bytes` to queue) after what the group already
/// holds: what is never dropped (queue, set-aside, dedup records) plus the history, counted at most
/// at its own bound because it is trimmed to make room. Err: the bytes the store holds now.
fn room_in_store(
    g: &Group,
    fresh: &[&Prepared],
    bytes: u64,
    mem: &Mem,
    state: &State,
) -> Result<(), u64> {
    let queued = g.batch.queue.len() + fresh.iter().filter(|p| p.fwd.is_some()).count();
    let pairs = (mem.dedup.len() + g.pairs.len() + fresh.len()).min(state.cfg.dedup_entries);
    let kept = mem.queue_bytes
        + g.added_bytes
        + bytes
        + budget::SEQ * (mem.queue_len + queued as u64)
        + mem.aside_bytes
        + budget::DEDUP_RECORD * pairs as u64;
    let history: u64 = fresh
        .iter()
        .map(|p| db::history_bytes(&p.device, &p.stored) as u64)
        .sum::<u64>()
        + mem.history.bytes()
        + g.history_bytes;
    let history = history.min(budget::history_bytes(state.cfg.max_store));
    if kept + history > state.cfg.max_store {
        return Err(mem.store_bytes());
    }
    Ok(())
}

/// The group is durable: the in-memory state follows it.
fn apply(mem: &mut Mem, g: &Group, forgotten: Vec<u128>) {
    let b = &g.batch;
    mem.next_seq = b.next_seq;
    let left = (b.delivered.len() + b.aside.len()) as u64;
    mem.queue_len = (mem.queue_len + b.queue.len() as u64).saturating_sub(left);
    mem.queue_bytes =
        (mem.queue_bytes + g.added_bytes).saturating_sub(g.delivered_bytes + g.aside_report_bytes);
    mem.aside_len += b.aside.len() as u64;
    mem.aside_report_bytes += g.aside_report_bytes;
    mem.aside_bytes += g.aside_bytes;
    if b.aside_op == Some(AsideOp::Requeue) {
        mem.queue_len += mem.aside_len;
        mem.queue_bytes += mem.aside_report_bytes;
    }
    if b.aside_op.is_some() {
        (mem.aside_len, mem.aside_report_bytes, mem.aside_bytes) = (0, 0, 0);
    }
    mem.dedup.extend(g.pairs.iter().copied());
    for h in forgotten {
        mem.dedup.remove(&h);
    }
    for (dev, seq, n) in &g.history {
        mem.history.push(dev, *seq, *n);
    }
    for (dev, seq) in &b.trim {
        mem.history.pop_oldest(dev, *seq);
    }
}

/// Answers every job of the group: `failed` is the commit's error, if it failed.
fn answer(jobs: Vec<Job>, planned: Vec<Planned>, failed: Option<String>) {
    let failure = || RelayError::Write(failed.clone().unwrap_or_default());
    let done = || match failed {
        Some(_) => Err(failure()),
        None => Ok(()),
    };
    for (job, outcome) in jobs.into_iter().zip(planned) {
        match job {
            Job::Accept { reply, .. } => {
                let _ = reply.send(match outcome {
                    Planned::Full(q) => Err(RelayError::Full(q)),
                    Planned::StoreFull(used, max) => Err(RelayError::StoreFull { used, max }),
                    _ if failed.is_some() => Err(failure()),
                    Planned::Accepted(a, d) => Ok((a, d)),
                    _ => Ok((0, 0)),
                });
            }
            Job::Deliver { reply, .. } | Job::SetAside { reply, .. } => {
                let _ = reply.send(done());
            }
            Job::Aside { reply, .. } => {
                let _ = reply.send(match outcome {
                    Planned::Count(n) => done().map(|_| n),
                    _ => done().map(|_| 0),
                });
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}
