//! Small durable records kept beside the objects, `<dir>/records/<kind>/<id>.json` (prefetch jobs, so
//! that a job survives a restart), and the atomic write that `.meta` files use too: a reader, or a
//! crash, sees the old file or the new one, never half of one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::{Store, StoreError};

/// Writes `bytes` to `path` atomically: a temp name of its own, fsync, rename, directory fsync.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // A name of its own per write: two writers never share (and never rename away) one temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = path.with_extension(format!("{ext}.tmp.{}.{n}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable only once the directory is.
    if let Some(dir) = path.parent().and_then(|p| std::fs::File::open(p).ok()) {
        dir.sync_all()?;
    }
    Ok(())
}

/// Kinds and ids are cistern's own names: letters, digits, `-` and `_`, never a path.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Store {
    fn records_dir(&self, kind: &str) -> PathBuf {
        self.shared.budget.dir.join("records").join(kind)
    }

    /// Writes (or replaces) a record, durably. Blocking.
    pub fn put_record(&self, kind: &str, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.records_dir(kind);
        let io = |source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        if !name_ok(kind) || !name_ok(id) {
            return Err(io(std::io::Error::other(format!(
                "bad record name {kind}/{id}"
            ))));
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        write_atomic(&dir.join(format!("{id}.json")), bytes).map_err(io)
    }

    /// Every record of a kind, as (id, bytes), oldest written first. Blocking.
    pub fn records(&self, kind: &str) -> Vec<(String, Vec<u8>)> {
        let Ok(rd) = std::fs::read_dir(self.records_dir(kind)) else {
            return Vec::new();
        };
        let mut out: Vec<(std::time::SystemTime, String, Vec<u8>)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let id = name.strip_suffix(".json")?.to_string();
                let when = e.metadata().ok()?.modified().ok()?;
                Some((when, id, std::fs::read(e.path()).ok()?))
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, id, b)| (id, b)).collect()
    }

    /// Removes a record (gone already is fine). Blocking.
    pub fn remove_record(&self, kind: &str, id: &str) {
        if name_ok(kind) && name_ok(id) {
            let _ = std::fs::remove_file(self.records_dir(kind).join(format!("{id}.json")));
        }
    }
}
