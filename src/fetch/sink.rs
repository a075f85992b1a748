//! The sink of a fill: where an upstream body's bytes go as they arrive. It hashes them, writes them to
//! the fill file, and while a restarted transfer re-sends bytes already held, compares them instead
//! (finding the first difference, cutting the file back there and re-hashing what stays).

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::store::{Fill, StoreError};

/// Where the bytes go while they arrive.
pub(super) struct Sink {
    pub hasher: Option<Sha256>,
    pub fill: Option<Fill>,
    pub written: u64,
}

/// What one batch did: the hasher and fill back, the position reached, the bytes new to readers, where
/// a restarted transfer diverged, and a store error that ended the storing (with the position of the
/// first byte that is not in the file).
pub(super) type Absorbed = (
    Option<Sha256>,
    Option<Fill>,
    u64,
    Vec<Bytes>,
    Option<u64>,
    Option<(u64, StoreError)>,
);

/// Hashes and writes (or compares, below `held`) one batch that starts at `start`. Blocking.
pub(super) fn absorb_batch(
    mut hasher: Option<Sha256>,
    mut fill: Option<Fill>,
    start: u64,
    held: u64,
    batch: Vec<Bytes>,
) -> Absorbed {
    let mut pos = start;
    let mut fresh: Vec<Bytes> = Vec::new();
    let mut diverged_at = None;
    let mut store_err = None;
    for chunk in batch {
        let mut chunk = chunk;
        if pos < held {
            // Compare the overlap with the held bytes.
            let n = ((held - pos) as usize).min(chunk.len());
            let mut buf = vec![0u8; n];
            let same = fill
                .as_ref()
                .is_some_and(|f| f.read_at(&mut buf, pos).ok() == Some(n))
                && buf[..] == chunk[..n];
            if same {
                pos += n as u64;
                chunk = chunk.slice(n..);
            } else {
                // First difference somewhere in this piece: find it, cut back, re-hash the prefix.
                let at = pos
                    + buf
                        .iter()
                        .zip(chunk.iter())
                        .take_while(|(a, b)| a == b)
                        .count() as u64;
                diverged_at = Some(at);
                if let Some(f) = fill.as_mut() {
                    let _ = f.truncate(at);
                    let mut h = Sha256::new();
                    let mut off = 0u64;
                    let mut buf = vec![0u8; 1 << 20];
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
                    hasher = Some(h);
                }
                let skip = (at - pos) as usize;
                pos = at;
                chunk = chunk.slice(skip..);
            }
            if chunk.is_empty() {
                continue;
            }
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if let Some(f) = fill.as_mut() {
            if let Err(e) = f.write(&chunk) {
                store_err = Some((pos, e));
                fill = None;
            }
        }
        pos += chunk.len() as u64;
        fresh.push(chunk);
    }
    (hasher, fill, pos, fresh, diverged_at, store_err)
}
