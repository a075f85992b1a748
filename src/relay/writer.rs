//! The relay's single writer: a thread that takes every accepted request and every delivered batch,
//! gathers those waiting into one redb transaction (group commit: concurrent posts share one fsync),
//! commits it durably, and only then changes the in-memory state (dedup set, queue size, history
//! index) and answers. A request whose commit failed leaves nothing behind, on disk or in memory, so
//! the poster's retry is accepted, not counted as a duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use super::db::{Batch, DbError};
use super::{Mem, RelayError, State};

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
    /// Answered once everything sent before it is written.
    Barrier(oneshot::Sender<()>),
}

/// What one group will do, planned against the in-memory state before anything is written.
#[derive(Default)]
struct Group {
    batch: Batch,
    /// Pairs new in this group.
    pairs: HashSet<u128>,
    added_bytes: u64,
    delivered_bytes: u64,
    /// History seqs added per device, in order.
    history: HashMap<String, Vec<u64>>,
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
        // A panic in the engine fails this group's requests (their replies are dropped: 500), not
        // every later one: nothing of the group was applied in memory, its transaction is aborted.
        let group =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_group(&state, jobs)));
        if group.is_err() {
            tracing::error!("status relay: the status database panicked; those requests failed");
        }
    }
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
            apply(
                &mut state.mem(),
                &group,
                forgotten,
                state.cfg.history_per_device,
            );
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
    state.db.commit(&group.batch)
}

impl Group {
    fn batch_is_empty(&self) -> bool {
        let b = &self.batch;
        b.queue.is_empty() && b.dedup.is_empty() && b.delivered.is_empty() && b.trim.is_empty()
    }
}

/// What a job will get if the group's commit succeeds.
enum Planned {
    /// (accepted, duplicates)
    Accepted(usize, usize),
    /// Refused: the queue's bytes that left no room (507).
    Full(u64),
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
            Job::Barrier(_) => Planned::Done,
        });
    }
    // History per device, oldest first out; the same rule `apply` follows in memory.
    let keep = state.cfg.history_per_device.max(1);
    for (dev, added) in &g.history {
        let old = mem.history.get(dev);
        let total = old.map_or(0, |h| h.len()) + added.len();
        let all = old.into_iter().flatten().chain(added.iter());
        for s in all.take(total.saturating_sub(keep)) {
            g.batch.trim.push((dev.clone(), *s));
        }
    }
    // Dedup memory is bounded: the oldest pairs are forgotten first.
    g.batch.forget = (mem.dedup.len() + g.pairs.len()).saturating_sub(state.cfg.dedup_entries);
    (g, planned)
}

/// Adds one request's fresh reports to the group, unless they would overfill the queue.
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
    let bytes: u64 = fresh
        .iter()
        .filter_map(|p| p.fwd.as_ref())
        .map(|f| f.len() as u64)
        .sum();
    let queued = mem.queue_bytes + g.added_bytes;
    if state.forwarding && queued + bytes > state.cfg.max_queue {
        return Planned::Full(queued);
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
        g.history.entry(p.device.clone()).or_default().push(seq);
        g.pairs.insert(p.hash);
        b.next_seq += 1;
    }
    Planned::Accepted(fresh.len(), dups + reports.len() - fresh.len())
}

/// The group is durable: the in-memory state follows it.
fn apply(mem: &mut Mem, g: &Group, forgotten: Vec<u128>, history_per_device: usize) {
    mem.next_seq = g.batch.next_seq;
    mem.queue_bytes = (mem.queue_bytes + g.added_bytes).saturating_sub(g.delivered_bytes);
    mem.queue_len =
        (mem.queue_len + g.batch.queue.len() as u64).saturating_sub(g.batch.delivered.len() as u64);
    mem.dedup.extend(g.pairs.iter().copied());
    for h in forgotten {
        mem.dedup.remove(&h);
    }
    let keep = history_per_device.max(1);
    for (dev, added) in &g.history {
        let h = mem.history.entry(dev.clone()).or_default();
        h.extend(added.iter().copied());
        while h.len() > keep {
            h.pop_front();
        }
    }
}

/// Answers every job of the group: `failed` is the commit's error, if it failed.
fn answer(jobs: Vec<Job>, planned: Vec<Planned>, failed: Option<String>) {
    for (job, outcome) in jobs.into_iter().zip(planned) {
        let failure = || RelayError::Write(failed.clone().unwrap_or_default());
        match job {
            Job::Accept { reply, .. } => {
                let _ = reply.send(match outcome {
                    Planned::Full(q) => Err(RelayError::Full(q)),
                    _ if failed.is_some() => Err(failure()),
                    Planned::Accepted(a, d) => Ok((a, d)),
                    Planned::Done => Ok((0, 0)),
                });
            }
            Job::Deliver { reply, .. } => {
                let _ = reply.send(if failed.is_some() {
                    Err(failure())
                } else {
                    Ok(())
                });
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}
