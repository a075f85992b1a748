//! Memory-mapped object files, handed out as zero-copy `Bytes`, and a registry of the live mappings so
//! that a socket writer given a slice of one can send it from the file with `sendfile(2)` instead of
//! copying it through user space (the same bytes: the mapping and the file share one page cache).
//!
//! A mapping is registered after `mmap` and unregistered in `Drop` before it is unmapped, so a registered
//! address range always belongs to a live mapping of the file recorded with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, LazyLock, RwLock};

use bytes::Bytes;

/// start address -> (length, file).
type Registry = BTreeMap<usize, (usize, Arc<File>)>;

static LIVE: LazyLock<RwLock<Registry>> = LazyLock::new(|| RwLock::new(BTreeMap::new()));

struct Mapped {
    map: memmap2::Mmap,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        let start = self.map.as_ptr() as usize;
        LIVE.write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&start);
    }
}

/// Wraps a mapping of `file` as `Bytes` and registers it.
pub fn into_bytes(file: Arc<File>, map: memmap2::Mmap) -> Bytes {
    if map.is_empty() {
        return Bytes::new();
    }
    let start = map.as_ptr() as usize;
    LIVE.write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(start, (map.len(), file));
    Bytes::from_owner(Mapped { map })
}

/// The file and offset behind `len` bytes at `ptr`, when they lie inside one live mapping.
pub fn source_of(ptr: *const u8, len: usize) -> Option<(Arc<File>, u64)> {
    let p = ptr as usize;
    let live = LIVE.read().unwrap_or_else(|p| p.into_inner());
    let (start, (mlen, file)) = live.range(..=p).next_back()?;
    (p + len <= start + mlen).then(|| (file.clone(), (p - start) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn slices_map_back_to_their_file_until_dropped() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let f = Arc::new(f);
        let map = unsafe { memmap2::Mmap::map(&*f) }.unwrap();
        let b = into_bytes(f, map);
        let s = b.slice(3..7);
        let (_, off) = source_of(s.as_ptr(), s.len()).unwrap();
        assert_eq!(off, 3);
        let outside = [0u8; 4];
        assert!(source_of(outside.as_ptr(), 4).is_none());
        let ptr = s.as_ptr();
        drop(s);
        drop(b);
        assert!(source_of(ptr, 4).is_none());
    }
}
