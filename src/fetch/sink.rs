//! The sink of a fill: where an upstream body's bytes go as they arrive. It hashes them, writes them to
//! the fill file, and while a restarted transfer re-sends bytes already held, compares them instead.
//! At the first difference the fill moves to a new file holding the bytes before it (the old file is
//! never rewritten: readers may still hold bytes of it) and the hash is recomputed over what stays.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::store::{Fill, StoreError};

/// Where the bytes go while they arrive.
#[derive(Default)]
pub(super) struct Sink {
    pub hasher: Option<Sha256>,
    pub fill: Option<Fill>,
    /// Position of the next byte of the body.
    pub written: u64,
}

/// A restarted transfer differed from the bytes held from `at` on. `file` is the fill's new file
/// (with its mapping when the old one was mapped), None when nothing is stored any more.
pub(super) struct Diverged {
    pub at: u64,
    pub file: Option<(Arc<File>, Option<Bytes>)>,
}

/// What one batch did.
#[derive(Default)]
pub(super) struct Absorbed {
    /// The bytes new to readers.
    pub fresh: Vec<Bytes>,
    pub diverged: Option<Diverged>,
    /// A store error that ended the storing, with the position of the first byte not in the file.
    pub store_err: Option<(u64, StoreError)>,
}

impl Sink {
    /// Hashes and writes (or compares, below `held`) one batch that starts at `written`. Blocking.
    pub fn absorb(&mut self, mut held: u64, batch: Vec<Bytes>) -> Absorbed {
        let mut out = Absorbed::default();
        for mut chunk in batch {
            if self.written < held {
                let n = ((held - self.written) as usize).min(chunk.len());
                let same = self.same_as_held(&chunk[..n]);
                self.written += same as u64;
                chunk = chunk.slice(same..);
                if same < n {
                    let at = self.written;
                    out.diverged = Some(self.diverge(at, &mut out.store_err));
                    // Nothing after the difference is held any more.
                    held = 0;
                } else if chunk.is_empty() {
                    continue;
                }
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&chunk);
            }
            if let Some(f) = self.fill.as_mut() {
                if let Err(e) = f.write(&chunk) {
                    out.store_err = Some((self.written, e));
                    self.fill = None;
                }
            }
            self.written += chunk.len() as u64;
            out.fresh.push(chunk);
        }
        out
    }

    /// How many of `bytes` (which start at `written`) are the same as the bytes held there.
    fn same_as_held(&self, bytes: &[u8]) -> usize {
        let mut buf = vec![0u8; bytes.len()];
        let n = match self
            .fill
            .as_ref()
            .map(|f| f.read_at(&mut buf, self.written))
        {
            Some(Ok(n)) => n,
            _ => 0,
        };
        buf[..n]
            .iter()
            .zip(bytes)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Keeps the bytes before `at` in a new file (or, when that fails, stops storing) and re-hashes them.
    fn diverge(&mut self, at: u64, store_err: &mut Option<(u64, StoreError)>) -> Diverged {
        let Some(f) = self.fill.as_mut() else {
            return Diverged { at, file: None };
        };
        let forked = f.fork(at);
        // Whichever file holds them now, the bytes before `at` are the same as the new transfer's.
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < at {
            let want = ((at - off) as usize).min(buf.len());
            match f.read_at(&mut buf[..want], off) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    off += n as u64;
                }
            }
        }
        self.hasher = Some(h);
        match forked {
            Ok(map) => Diverged {
                at,
                file: Some((f.file(), map)),
            },
            Err(e) => {
                *store_err = Some((at, e));
                self.fill = None;
                Diverged { at, file: None }
            }
        }
    }
}

#[cfg(test)]
mod tests;
