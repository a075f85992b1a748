//! Writing one batch inside a write transaction: every change of a group of requests, or of the
//! sled import.

use redb::ReadableTable;

use super::{
    conflict_bytes, AsideOp, Batch, DbError, Record, Written, CONFLICTS, CONFLICT_COUNT, DEDUP,
    DEDUP_DIGEST, HISTORY, META, NEXT_SEQ, QUEUE, SET_ASIDE,
};

/// The changes of one batch, inside `txn`; returns what it removed.
pub fn batch(txn: &redb::WriteTransaction, b: &Batch) -> Result<Written, DbError> {
    let mut queue = txn.open_table(QUEUE)?;
    for (seq, v) in &b.queue {
        queue.insert(*seq, v.as_slice())?;
    }
    for seq in &b.delivered {
        queue.remove(*seq)?;
    }
    let mut aside = txn.open_table(SET_ASIDE)?;
    for (seq, report, refusal) in &b.aside {
        queue.remove(*seq)?;
        aside.insert(*seq, (report.as_slice(), refusal.as_slice()))?;
    }
    match b.aside_op {
        Some(AsideOp::Requeue) => {
            while let Some((k, v)) = aside.pop_first()? {
                queue.insert(k.value(), v.value().0)?;
            }
        }
        Some(AsideOp::Drop) => while aside.pop_first()?.is_some() {},
        None => {}
    }
    let forgotten = dedup(txn, b)?;
    let conflicts_dropped = conflicts(txn, b)?;
    let mut history = txn.open_table(HISTORY)?;
    for (dev, seq, v) in &b.history {
        history.insert((dev.as_str(), *seq), v.as_slice())?;
    }
    for (dev, seq) in &b.trim {
        history.remove((dev.as_str(), *seq))?;
    }
    txn.open_table(META)?.insert(NEXT_SEQ, b.next_seq)?;
    Ok(Written {
        forgotten,
        conflicts_dropped,
    })
}

/// New dedup records, and the oldest `forget` forgotten with their digests; returns those.
fn dedup(txn: &redb::WriteTransaction, b: &Batch) -> Result<Vec<Record>, DbError> {
    let mut dedup = txn.open_table(DEDUP)?;
    let mut digests = txn.open_table(DEDUP_DIGEST)?;
    for (seq, pair, digest) in &b.dedup {
        dedup.insert(*seq, *pair)?;
        if let Some(d) = digest {
            digests.insert(*seq, *d)?;
        }
    }
    let mut forgotten = Vec::with_capacity(b.forget);
    for _ in 0..b.forget {
        let Some((seq, pair)) = dedup.pop_first()? else {
            break;
        };
        let (seq, mut record) = (seq.value(), (pair.value(), None));
        // Its digest, and any older one left without a record (by a version that forgot records
        // without knowing of digests).
        loop {
            let first = digests.first()?.map(|(k, d)| (k.value(), d.value()));
            let Some((k, d)) = first else {
                break;
            };
            if k > seq {
                break;
            }
            if k == seq {
                record.1 = Some(d);
            }
            digests.remove(k)?;
        }
        forgotten.push(record);
    }
    Ok(forgotten)
}

/// New conflict records, the count of all, and the oldest past `CONFLICTS_KEPT` dropped; returns
/// how many were dropped and their bytes.
fn conflicts(txn: &redb::WriteTransaction, b: &Batch) -> Result<(u64, u64), DbError> {
    if b.conflicts.is_empty() && b.conflicts_trim == 0 {
        return Ok((0, 0));
    }
    let mut table = txn.open_table(CONFLICTS)?;
    for (seq, record) in &b.conflicts {
        table.insert(*seq, record.as_slice())?;
    }
    let mut meta = txn.open_table(META)?;
    let total = meta.get(CONFLICT_COUNT)?.map(|v| v.value()).unwrap_or(0);
    meta.insert(CONFLICT_COUNT, total + b.conflicts.len() as u64)?;
    let mut dropped = (0, 0);
    for _ in 0..b.conflicts_trim {
        let Some((_, v)) = table.pop_first()? else {
            break;
        };
        dropped = (dropped.0 + 1, dropped.1 + conflict_bytes(v.value()));
    }
    Ok(dropped)
}
