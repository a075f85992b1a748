//! The status store of earlier versions: the sled tree `status` in the directory `<store.dir>/status`
//! (`q`+seq -> report to forward, `o`+seq -> dedup hash, `h`+device\0+seq -> history, `mseq` -> next
//! seq). At the first start with redb its reports are imported once, in one transaction that also
//! marks the import done, and the directory is moved aside (`status.sled-migrated-<ms>`). A directory
//! that sled cannot open, or that makes it panic (as after power cuts), is moved aside too
//! (`status.sled-corrupt-<ms>`) with one warning line: the relay starts without those reports rather
//! than not at all.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use super::db::{set_aside, Batch, DbError, Loaded, StatusDb};

/// Imports the sled store in `dir`, if there is one, into `db`; returns the state to start from.
pub fn migrate(dir: &Path, db: &StatusDb, loaded: Loaded) -> Result<Loaded, DbError> {
    if !dir.is_dir() {
        return Ok(loaded);
    }
    if db.sled_migrated()? {
        // Imported by an earlier start that stopped before the rename.
        set_aside(dir, "sled-migrated")?;
        return Ok(loaded);
    }
    let base = loaded.next_seq;
    let read = catch_unwind(AssertUnwindSafe(|| read(dir, base)));
    let why = match read {
        Ok(Ok(batch)) => {
            db.import(&batch)?;
            let to = set_aside(dir, "sled-migrated")?;
            tracing::info!(
                reports = batch.history.len(),
                queued = batch.queue.len(),
                moved_to = %to.display(),
                "status relay: imported the sled status store"
            );
            return db.reload();
        }
        Ok(Err(e)) => e.to_string(),
        Err(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "sled panicked".into()),
    };
    let to = set_aside(dir, "sled-corrupt")?;
    tracing::warn!(
        dir = %dir.display(),
        moved_to = %to.display(),
        error = %why,
        "status relay: the old sled status store cannot be read; starting without its reports"
    );
    Ok(loaded)
}

fn seq_of(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Reads the sled tree into one batch, its seqs moved up by `base` (the redb file may already hold
/// reports, which keep theirs).
fn read(dir: &Path, base: u64) -> Result<Batch, sled::Error> {
    // No flusher thread: nothing is written, and a panic there would not be caught.
    let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
    let tree = db.open_tree("status")?;
    let mut b = Batch::default();
    let mut next = tree.get(b"mseq")?.and_then(|v| seq_of(&v)).unwrap_or(0);
    for r in tree.scan_prefix(b"q") {
        let (k, v) = r?;
        if let Some(seq) = seq_of(&k[1..]) {
            next = next.max(seq + 1);
            b.queue.push((base + seq, v.to_vec()));
        }
    }
    for r in tree.scan_prefix(b"o") {
        let (k, v) = r?;
        if let (Some(seq), Ok(h)) = (seq_of(&k[1..]), <[u8; 16]>::try_from(v.as_ref())) {
            next = next.max(seq + 1);
            b.dedup.push((base + seq, u128::from_be_bytes(h), None));
        }
    }
    for r in tree.scan_prefix(b"h") {
        let (k, v) = r?;
        // h + device + \0 + seq (8 bytes)
        if k.len() < 10 {
            continue;
        }
        let Some(seq) = seq_of(&k) else { continue };
        let dev = String::from_utf8_lossy(&k[1..k.len() - 9]).to_string();
        next = next.max(seq + 1);
        b.history.push((dev, base + seq, v.to_vec()));
    }
    b.next_seq = base + next;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_store(dir: &Path) {
        let db = sled::open(dir).unwrap();
        let t = db.open_tree("status").unwrap();
        let mut q = vec![b'q'];
        q.extend_from_slice(&0u64.to_be_bytes());
        t.insert(q, &b"{\"reportId\":\"1\",\"via\":[\"n1\"]}"[..])
            .unwrap();
        let mut o = vec![b'o'];
        o.extend_from_slice(&0u64.to_be_bytes());
        t.insert(o, &42u128.to_be_bytes()).unwrap();
        let mut h = b"hdev-1\0".to_vec();
        h.extend_from_slice(&0u64.to_be_bytes());
        t.insert(h, &b"{\"reportId\":\"1\",\"deviceId\":\"dev-1\"}"[..])
            .unwrap();
        t.insert(b"mseq", &1u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn the_sled_store_is_imported_once_then_moved_aside() {
        let t = tempfile::tempdir().unwrap();
        let old = t.path().join("status");
        old_store(&old);
        let (db, l) = StatusDb::open(&t.path().join("status.redb")).unwrap();
        let l = migrate(&old, &db, l).unwrap();
        assert_eq!(
            (l.next_seq, l.queue_len, l.dedup.as_slice()),
            (1, 1, &[(42, None)][..])
        );
        assert_eq!(db.history("dev-1").unwrap().len(), 1);
        assert!(!old.exists(), "the sled directory is moved aside");
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("status.sled-migrated-")));
    }

    /// Seen after power cuts: sled's `conf` left empty and a stretch of its log lost makes sled
    /// panic at open ("tried to serialize Uninitialized", serialization.rs:662); the relay starts.
    #[test]
    fn a_sled_store_that_panics_sled_is_moved_aside_and_the_relay_starts_empty() {
        let t = tempfile::tempdir().unwrap();
        let old = t.path().join("status");
        {
            let db = sled::open(&old).unwrap();
            let tree = db.open_tree("status").unwrap();
            for i in 0..2000u64 {
                let mut k = b"hdev-1\0".to_vec();
                k.extend_from_slice(&i.to_be_bytes());
                tree.insert(k, vec![b'7'; 500]).unwrap();
            }
            db.flush().unwrap();
        }
        std::fs::write(old.join("conf"), b"").unwrap();
        let mut log = std::fs::read(old.join("db")).unwrap();
        let third = log.len() / 3;
        log[third..third + 8192].fill(0);
        std::fs::write(old.join("db"), log).unwrap();
        let (db, l) = StatusDb::open(&t.path().join("status.redb")).unwrap();
        let l = migrate(&old, &db, l).expect("starts, whatever sled does");
        assert_eq!(l.queue_len + db.history("dev-1").unwrap().len() as u64, 0);
        assert!(!old.exists(), "the sled directory is moved aside");
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("status.sled-corrupt-")),
            "{names:?}"
        );
    }
}
