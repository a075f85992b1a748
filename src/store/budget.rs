//! The disk budget (SPEC 4): room is reserved before bytes are written; the store stays within
//! `max_size` and leaves `min_free` free on the filesystem, evicting least-recently-used objects that are
//! neither pinned nor being read.

use std::path::PathBuf;

use super::{Digest, State, StoreError};

/// Free bytes on the filesystem that holds `dir`, for an unprivileged writer.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero is a valid statvfs; `c` is a valid NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

pub struct Budget {
    pub dir: PathBuf,
    /// 0 = no cap besides `min_free`.
    pub max_size: u64,
    pub min_free: u64,
    /// Bound on the room reserved by fills in flight together; 0 = half of what the store may use.
    pub max_filling: u64,
}

impl Budget {
    /// Free bytes on the store's filesystem for an unprivileged writer.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    /// The bound on reservations: `max_filling`, else half of what the store may use (its `max_size`,
    /// or what it holds plus what the filesystem has free above `min_free`), so that a burst of fills
    /// cannot evict the whole cache for objects that may never complete.
    fn filling_cap(&self, used: u64, fs_free: u64) -> u64 {
        if self.max_filling > 0 {
            return self.max_filling;
        }
        let usable = if self.max_size > 0 {
            self.max_size
        } else {
            used.saturating_add(fs_free.saturating_sub(self.min_free))
        };
        usable / 2
    }

    /// Chooses the objects to evict so that `n` more bytes fit, removes them from `st` and returns them
    /// for the caller to unlink; NoRoom (and nothing evicted) when even evicting every candidate would
    /// not make room.
    pub fn make_room(&self, st: &mut State, n: u64) -> Result<Vec<Digest>, StoreError> {
        let fs_free = self.free_bytes().unwrap_or(u64::MAX);
        if st.reserved + n > self.filling_cap(st.used, fs_free) {
            return Err(StoreError::NoRoom(n));
        }
        // Room fills already took is out of the filesystem's free space: count only the rest.
        let free = fs_free.saturating_sub(st.reserved.saturating_sub(st.on_disk));
        let over_size = |freed: u64| {
            self.max_size > 0 && st.used + st.reserved + n > self.max_size.saturating_add(freed)
        };
        let over_free = |freed: u64| free.saturating_add(freed) < n.saturating_add(self.min_free);
        if !over_size(0) && !over_free(0) {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<(u64, Digest, u64)> = st
            .objects
            .iter()
            .filter(|(_, o)| !o.pinned && o.readers == 0)
            .map(|(d, o)| (o.last_access, *d, o.size))
            .collect();
        candidates.sort();
        let mut freed = 0u64;
        let mut chosen = Vec::new();
        for (_, d, size) in candidates {
            if !over_size(freed) && !over_free(freed) {
                break;
            }
            freed += size;
            chosen.push(d);
        }
        if over_size(freed) || over_free(freed) {
            return Err(StoreError::NoRoom(n));
        }
        for d in &chosen {
            if let Some(o) = st.objects.remove(d) {
                st.used = st.used.saturating_sub(o.size);
            }
        }
        Ok(chosen)
    }
}
