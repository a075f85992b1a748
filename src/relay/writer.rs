//! The relay's single writer: a thread that takes every accepted request and every delivered batch,
//! gathers those waiting into one redb transaction (group commit: concurrent posts share one fsync),
//! commits it durably, and only then changes the in-memory state (dedup set, queue size, history
//! index) and answers. A request whose commit failed leaves nothing behind, on disk or in memory, so
//! the poster's retry is accepted, not counted as a duplicate.
//!
//! Planning a group checks the bounds (`max_queue`, `max_store`: 507 for the request that would pass
//! them) and adds to the transaction the history entries it trims (`history`). Each report is new, a
//! duplicate or a conflict (`dedup`) against what is committed, what the group took before it and
//! what its own request holds before it; a conflict is kept like a new report, with a record of its
//! own besides (`db::CONFLICTS_KEPT`). A report set aside leaves the queue in the transaction that
//! records it. An admin's retry or drop of the set-aside reports is a group of its own.

use std::collections::HashSet;
use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use super::db::{self, AsideOp, Batch, DbError, Written};
use super::dedup::Seen;
use super::history::{Added, Bounds};
use super::{budget, Accepted, Mem, RelayError, State};

/// Requests gathered into one transaction at most.
const MAX_GROUP: usize = 64;

/// A report ready to store: parsed, stamped and serialised by the request's own task.
pub struct Prepared {
    /// (deviceId, reportId) hashed.
    pub pair: u128,
    /// `report::digest`: what tells a retry from another report under the same pair.
    pub digest: u128,
    pub device: String,
    pub report_id: String,
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
        reply: Reply<Accepted>,
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
    /// Pairs and digests recorded by this group.
    pairs: HashSet<u128>,
    digests: HashSet<u128>,
    /// Bytes of the conflict records of this group.
    conflict_bytes: u64,
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
        Ok(Written::default())
    } else {
        commit(state, &group)
    };
    let ok = match written {
        Ok(written) => {
            apply(&mut state.mem(), &group, written);
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

fn commit(state: &State, group: &Group) -> Result<Written, DbError> {
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
            && b.conflicts.is_empty()
    }
}

/// What a job will get if the group's commit succeeds.
enum Planned {
    Accepted(Accepted),
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
    // Dedup memory is bounded: the oldest records are forgotten first.
    g.batch.forget =
        (mem.dedup.records() + g.batch.dedup.len()).saturating_sub(state.cfg.dedup_entries);
    g.batch.conflicts_trim =
        (mem.conflicts.kept + g.batch.conflicts.len() as u64).saturating_sub(db::CONFLICTS_KEPT);
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

/// Adds one request's new reports and conflicts to the group, unless they would overfill the queue
/// or the store.
fn plan_accept(
    g: &mut Group,
    reports: &[Prepared],
    dups: usize,
    mem: &Mem,
    state: &State,
) -> Planned {
    let (kept, new_pairs) = sort_out(g, reports, mem);
    let duplicates = dups + reports.len() - kept.len();
    if kept.is_empty() {
        // Nothing to keep: a retry of reports already accepted is answered even when full.
        return Planned::Accepted(Accepted {
            duplicates,
            ..Accepted::default()
        });
    }
    let records = conflict_records(&kept);
    let added = Kept {
        queued: kept
            .iter()
            .filter_map(|(p, _)| p.fwd.as_ref())
            .map(|f| f.len() as u64)
            .sum(),
        records: records.iter().map(|r| db::conflict_bytes(&r.1)).sum(),
    };
    if let Some(refused) = refusal(g, &kept, &added, mem, state) {
        // Nothing of this request goes in: the group forgets what it noted of it.
        for (p, _) in &kept {
            g.digests.remove(&p.digest);
        }
        for pair in new_pairs {
            g.pairs.remove(&pair);
        }
        return refused;
    }
    g.accepts = true;
    g.added_bytes += added.queued;
    g.conflict_bytes += added.records;
    let conflicts = records.len();
    let mut records = records.into_iter().peekable();
    for (i, (p, _)) in kept.iter().enumerate() {
        let seq = g.batch.next_seq;
        if let Some((_, r)) = records.next_if(|(at, _)| *at == i) {
            g.batch.conflicts.push((seq, r));
        }
        add_report(g, p, seq);
    }
    Planned::Accepted(Accepted {
        accepted: kept.len(),
        duplicates,
        conflicts,
    })
}

/// Bytes a request adds to what is never dropped: its reports as queued, its conflict records.
struct Kept {
    queued: u64,
    records: u64,
}

/// The 507 a request gets when its reports would overfill the queue or the store; None if they fit.
fn refusal(
    g: &Group,
    kept: &[(&Prepared, bool)],
    added: &Kept,
    mem: &Mem,
    state: &State,
) -> Option<Planned> {
    let queued = mem.queue_bytes + g.added_bytes;
    if state.forwarding && queued + added.queued > state.cfg.max_queue {
        return Some(Planned::Full(queued));
    }
    room_in_store(g, kept, added.queued + added.records, mem, state)
        .err()
        .map(|used| Planned::StoreFull(used, state.cfg.max_store))
}

/// The reports of a request to keep, each with whether it is a conflict, noted in the group as they
/// come (a request may hold a pair twice); and the pairs that were new to the group.
fn sort_out<'a>(
    g: &mut Group,
    reports: &'a [Prepared],
    mem: &Mem,
) -> (Vec<(&'a Prepared, bool)>, Vec<u128>) {
    let mut kept = Vec::new();
    let mut new_pairs = Vec::new();
    for p in reports {
        // Memory holds only committed records; the group, what it took before this report.
        let seen = match mem.dedup.seen(p.pair, p.digest) {
            Seen::Duplicate => continue,
            _ if g.digests.contains(&p.digest) => continue,
            Seen::New if !g.pairs.contains(&p.pair) => Seen::New,
            _ => Seen::Conflict,
        };
        g.digests.insert(p.digest);
        if g.pairs.insert(p.pair) {
            new_pairs.push(p.pair);
        }
        kept.push((p, seen == Seen::Conflict));
    }
    (kept, new_pairs)
}

/// One report into the group's batch at `seq`: queue, dedup record, history.
fn add_report(g: &mut Group, p: &Prepared, seq: u64) {
    let b = &mut g.batch;
    if let Some(f) = &p.fwd {
        b.queue.push((seq, f.clone()));
    }
    b.dedup.push((seq, p.pair, Some(p.digest)));
    b.history.push((p.device.clone(), seq, p.stored.clone()));
    let n = db::history_bytes(&p.device, &p.stored);
    g.history.push((p.device.clone(), seq, n));
    g.history_bytes += n as u64;
    b.next_seq += 1;
}

/// Characters of an id a conflict record keeps (ids are bounded only by `max_report`).
const RECORD_ID: usize = 256;

/// The records of the conflicts among `kept`, each with its index there.
fn conflict_records(kept: &[(&Prepared, bool)]) -> Vec<(usize, Vec<u8>)> {
    if !kept.iter().any(|(_, conflict)| *conflict) {
        return Vec::new();
    }
    let at = super::chrono_now();
    kept.iter()
        .enumerate()
        .filter(|(_, (_, conflict))| *conflict)
        .map(|(i, (p, _))| (i, conflict_record(p, &at)))
        .collect()
}

/// The record of a report accepted as a conflict, as `/v1/relay` shows it.
fn conflict_record(p: &Prepared, at: &str) -> Vec<u8> {
    let cut = |s: &str| match s.char_indices().nth(RECORD_ID) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    };
    let rec = serde_json::json!({
        "deviceId": cut(&p.device),
        "reportId": cut(&p.report_id),
        "at": at,
    });
    serde_json::to_vec(&rec).unwrap_or_default()
}

/// Whether the store has room for `kept` (with `bytes` to queue and of conflict records) after what
/// the group already holds: what is never dropped (queue, set-aside, dedup and conflict records)
/// plus the history, counted at most at its own bound because it is trimmed to make room. Err: the
/// bytes the store holds now.
fn room_in_store(
    g: &Group,
    kept: &[(&Prepared, bool)],
    bytes: u64,
    mem: &Mem,
    state: &State,
) -> Result<(), u64> {
    let queued = g.batch.queue.len() + kept.iter().filter(|(p, _)| p.fwd.is_some()).count();
    let records =
        (mem.dedup.records() + g.batch.dedup.len() + kept.len()).min(state.cfg.dedup_entries);
    let kept_bytes = mem.queue_bytes
        + g.added_bytes
        + bytes
        + budget::SEQ * (mem.queue_len + queued as u64)
        + mem.aside_bytes
        + budget::DEDUP_RECORD * records as u64
        + mem.conflicts.bytes
        + g.conflict_bytes;
    let history: u64 = kept
        .iter()
        .map(|(p, _)| db::history_bytes(&p.device, &p.stored) as u64)
        .sum::<u64>()
        + mem.history.bytes()
        + g.history_bytes;
    let history = history.min(budget::history_bytes(state.cfg.max_store));
    if kept_bytes + history > state.cfg.max_store {
        return Err(mem.store_bytes());
    }
    Ok(())
}

/// The group is durable: the in-memory state follows it.
fn apply(mem: &mut Mem, g: &Group, written: Written) {
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
    for (_, pair, digest) in &b.dedup {
        mem.dedup.add((*pair, *digest));
    }
    for r in written.forgotten {
        mem.dedup.forget(r);
    }
    let c = &mut mem.conflicts;
    let (dropped, dropped_bytes) = written.conflicts_dropped;
    c.total += b.conflicts.len() as u64;
    c.kept = (c.kept + b.conflicts.len() as u64).saturating_sub(dropped);
    c.bytes = (c.bytes + g.conflict_bytes).saturating_sub(dropped_bytes);
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
                    Planned::Accepted(a) => Ok(a),
                    _ => Ok(Accepted::default()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{report, NextHop, Relay, RelayConfig};

    /// A request refused for want of room leaves nothing noted in its group: the same report in a
    /// later request of the group is new, not a duplicate of a report that was never kept.
    #[tokio::test]
    async fn a_refused_request_leaves_nothing_in_its_group() {
        let t = tempfile::tempdir().unwrap();
        let cfg = RelayConfig {
            node_id: "n1".into(),
            batch_size: 10,
            max_queue: 1000,
            max_store: 64 << 20,
            max_report: 64 << 10,
            history_per_device: 3,
            max_backoff: std::time::Duration::from_secs(1),
            dedup_entries: 100,
        };
        let hop = NextHop::Url {
            url: "http://127.0.0.1:1/v1/status".parse().unwrap(),
            token: None,
        };
        let r = Relay::open(t.path(), cfg, Some(hop)).unwrap();
        let one = r#"{"reportId": "1", "deviceId": "d", "state": 1}"#;
        let big = format!(
            r#"[{one}, {{"reportId": "2", "deviceId": "d", "state": 1, "x": "{}"}}]"#,
            "x".repeat(1000)
        );
        let job = |body: &str| {
            let (reports, dups) = r.prepare(report::parse_body(body.as_bytes()).unwrap());
            let (reply, _) = oneshot::channel();
            Job::Accept {
                reports,
                dups,
                reply,
            }
        };
        let state = &r.inner.state;
        let (_, planned) = plan(&[job(&big), job(one)], &state.mem(), state);
        assert!(matches!(planned[0], Planned::Full(_)));
        let Planned::Accepted(a) = planned[1] else {
            panic!("the second request is refused too");
        };
        assert_eq!((a.accepted, a.duplicates, a.conflicts), (1, 0, 0));
    }
}
