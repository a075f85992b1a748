//! The status database alone: a batch survives reopening, a damaged file opens as a fresh one.

use super::*;

fn one(seq: u64) -> Batch {
    Batch {
        queue: vec![(seq, b"{\"q\":1}".to_vec())],
        dedup: vec![(seq, 7 + seq as u128, Some(70 + seq as u128))],
        history: vec![("dev".into(), seq, b"{\"h\":1}".to_vec())],
        next_seq: seq + 1,
        ..Default::default()
    }
}

#[test]
fn a_batch_survives_reopening() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("status.redb");
    {
        let (db, l) = StatusDb::open(&path).unwrap();
        assert_eq!(l.next_seq, 0);
        db.commit(&one(0)).unwrap();
        db.commit(&one(1)).unwrap();
    }
    let (db, l) = StatusDb::open(&path).unwrap();
    assert_eq!((l.next_seq, l.queue_len, l.dedup.len()), (2, 2, 2));
    let seqs: Vec<u64> = l.history["dev"].iter().map(|e| e.0).collect();
    assert_eq!(seqs, [0, 1]);
    assert_eq!(db.peek(10, 1 << 20).unwrap().len(), 2);
    let f = db
        .commit(&Batch {
            delivered: vec![0],
            forget: 1,
            next_seq: 2,
            trim: vec![("dev".into(), 0)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(f.forgotten, [(7, Some(70))]);
    assert_eq!(db.peek(10, 1 << 20).unwrap()[0].0, 1);
    assert_eq!(db.history("dev").unwrap().len(), 1);
}

/// A set-aside report leaves the queue in the same commit, survives reopening, and goes back to its
/// place in the queue on a requeue, or away on a drop.
#[test]
fn a_set_aside_report_is_kept_apart_until_requeued_or_dropped() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("status.redb");
    let aside = |seq: u64| Batch {
        aside: vec![(seq, b"{\"q\":1}".to_vec(), b"{\"status\":400}".to_vec())],
        next_seq: 3,
        ..Default::default()
    };
    {
        let (db, _) = StatusDb::open(&path).unwrap();
        for seq in 0..3 {
            db.commit(&one(seq)).unwrap();
        }
        db.commit(&aside(0)).unwrap();
    }
    let (db, l) = StatusDb::open(&path).unwrap();
    assert_eq!((l.queue_len, l.aside_len, l.aside_report_bytes), (2, 1, 7));
    assert_eq!(l.aside_bytes, 8 + 7 + 14);
    assert_eq!(db.set_aside(10).unwrap(), [b"{\"status\":400}".to_vec()]);
    let requeue = Batch {
        aside_op: Some(AsideOp::Requeue),
        next_seq: 3,
        ..Default::default()
    };
    db.commit(&requeue).unwrap();
    assert_eq!(db.peek(10, 1 << 20).unwrap()[0].0, 0, "back at its place");
    db.commit(&aside(1)).unwrap();
    let drop = Batch {
        aside_op: Some(AsideOp::Drop),
        next_seq: 3,
        ..Default::default()
    };
    db.commit(&drop).unwrap();
    let l = db.reload().unwrap();
    assert_eq!((l.queue_len, l.aside_len), (2, 0));
    let queued: Vec<u64> = db.peek(10, 1 << 20).unwrap().iter().map(|e| e.0).collect();
    assert_eq!(queued, [0, 2]);
}

/// A batch's body is bounded in bytes past its first entry.
#[test]
fn peek_bounds_the_body() {
    let t = tempfile::tempdir().unwrap();
    let (db, _) = StatusDb::open(&t.path().join("status.redb")).unwrap();
    for seq in 0..3 {
        db.commit(&one(seq)).unwrap();
    }
    // Entries of 7 bytes: `[` + 7 + `,` + 7 + `]` = 17.
    assert_eq!(db.peek(10, 17).unwrap().len(), 2);
    assert_eq!(db.peek(10, 16).unwrap().len(), 1);
    assert_eq!(db.peek(10, 1).unwrap().len(), 1, "the first always goes");
}

/// A damaged file (a torn or foreign write) opens as a fresh one, never panics, and is kept
/// aside.
#[test]
fn a_damaged_file_opens_as_a_fresh_one() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("status.redb");
    {
        let (db, _) = StatusDb::open(&path).unwrap();
        db.commit(&one(0)).unwrap();
    }
    // Garbage over the header and the first pages, as a torn or foreign write would leave.
    let mut bytes = std::fs::read(&path).unwrap();
    for (i, b) in bytes.iter_mut().enumerate().take(64 << 10) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    std::fs::write(&path, &bytes).unwrap();
    let (db, l) = StatusDb::open(&path).expect("a damaged file opens as a fresh one");
    assert_eq!((l.next_seq, l.queue_len), (0, 0));
    db.commit(&one(0)).unwrap();
    let aside: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("status.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");

    // Garbage that is not a database at all, of any length.
    drop(db);
    std::fs::write(&path, b"not a database, just some text").unwrap();
    let (db, l) = StatusDb::open(&path).expect("a foreign file opens as a fresh one");
    assert_eq!(l.queue_len, 0);

    // Pages flipped behind an intact header: the checksums catch it at open.
    for seq in 0..200 {
        db.commit(&one(seq)).unwrap();
    }
    drop(db);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(16 << 10).take(64 << 10) {
        *b ^= 0x5A;
    }
    std::fs::write(&path, &bytes).unwrap();
    let (_, l) = StatusDb::open(&path).expect("damaged pages open as a fresh file");
    assert_eq!(l.queue_len, 0);
}

/// A file a version without digests has written to after this one (it forgets dedup records and
/// leaves their digests): each record still reads with its own digest, and the orphans go when the
/// records after them are forgotten.
#[test]
fn digests_left_without_their_record_are_passed_over_then_dropped() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("status.redb");
    let (db, _) = StatusDb::open(&path).unwrap();
    for seq in 0..3 {
        db.commit(&one(seq)).unwrap();
    }
    // What the older version does when it forgets the oldest record.
    let txn = db.write().unwrap();
    txn.open_table(DEDUP).unwrap().remove(0).unwrap();
    txn.commit().unwrap();
    let l = db.reload().unwrap();
    assert_eq!(l.dedup, [(8, Some(71)), (9, Some(72))]);
    let forget = Batch {
        forget: 1,
        next_seq: 3,
        ..Default::default()
    };
    assert_eq!(db.commit(&forget).unwrap().forgotten, [(8, Some(71))]);
    let txn = db.db.begin_read().unwrap();
    let left: Vec<u64> = txn
        .open_table(DEDUP_DIGEST)
        .unwrap()
        .iter()
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect();
    assert_eq!(left, [2], "the orphan went with the record after it");
}
