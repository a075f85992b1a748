//! A `Flight`: one upstream transfer in progress, shared by every client that asks for the object while
//! it arrives (SPEC 4, "one fetch per object"). The transfer task appends bytes; readers stream them as
//! they arrive, from a small in-memory window of the newest bytes or, when they fall behind it, from the
//! fill's temp file. The object's last byte is held back until the transfer has ended and verified, so
//! that a corrupt or truncated object can never look complete to a client.
//!
//! When the object is not being stored (pass-through), there is no file: the window then keeps every byte
//! that some reader still needs, and the transfer waits for the slowest reader (bounded memory).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use super::error::FetchError;
use crate::store::{now_ms, Digest, KeyMeta};
pub use head::Head;

/// Bytes kept in memory behind the newest byte while a file backs the flight.
const WINDOW: u64 = 2 << 20;
/// Bytes a pass-through flight may run ahead of its slowest reader.
const PASS_WINDOW: u64 = 8 << 20;
/// Largest slice a reader takes at once from a mapped fill.
const MAP_CHUNK: u64 = 1 << 20;
/// Largest chunk a reader takes at once from the file.
const READ_CHUNK: usize = 256 << 10;

/// How a client came to a flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// Its request started the transfer.
    Leader,
    /// It joined while the bytes were arriving (collapsed).
    InFlight,
    /// It joined once every byte had arrived and verified, while the object was being stored: a hit.
    Verified,
}

/// How a flight ended.
#[derive(Clone, Debug)]
pub enum End {
    /// Every byte arrived and (when a digest was known) matched; stored when `Head::storing` was set.
    Complete(Digest),
    /// A revalidation answered 304: the stored object is fresh again.
    Revalidated(Digest),
    /// Revalidation failed (upstream unreachable or 5xx, said by the string): the stored copy may be
    /// served stale, if it allows that.
    ServeStale(Digest, String),
    Failed(FetchError),
}

struct State {
    head: Option<Head>,
    /// Bytes received so far (of the current generation).
    written: u64,
    /// Newest bytes in memory: `window` holds [window_start, written).
    window: VecDeque<Bytes>,
    window_start: u64,
    file: Option<Arc<File>>,
    /// The fill file mapped at its announced size: readers take zero-copy slices of it.
    map: Option<Bytes>,
    /// Bumped when a restarted transfer turned out to differ from the bytes already sent: readers of the
    /// old generation are cut off.
    generation: u32,
    end: Option<End>,
    /// Every byte arrived and matched its digest: readers may take the last one, while the transfer
    /// still stores the object (its fsync is no reason to keep a client waiting).
    verified: bool,
    /// The digest of the verified bytes.
    digest: Option<Digest>,
    /// The freshness the response is stored with (set with `verified`): a client that joins while it
    /// is stored is served from it only when that freshness, at the client's time and under its
    /// request's directives, allows (the one reuse rule, `freshness::reuse`).
    meta: Option<KeyMeta>,
    /// Bytes of the fill file below this are what was written (u64::MAX while the file takes every
    /// byte); at and past it the file may hold a hole, never read.
    file_valid: u64,
    /// An unsafe method changed what the key names while this fill ran: it maps no key when it
    /// commits (RFC 9111 §4.4).
    doomed: bool,
    /// Position of each reader, for pass-through back-pressure.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    /// How fast the bytes arrive.
    pace: rate::Pace,
}

pub struct Flight {
    state: Mutex<State>,
    /// Ticks on every change; readers wait on it.
    tick: watch::Sender<u64>,
}

impl Flight {
    pub fn new() -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(State {
                head: None,
                written: 0,
                window: VecDeque::new(),
                window_start: 0,
                file: None,
                map: None,
                generation: 0,
                end: None,
                verified: false,
                digest: None,
                file_valid: u64::MAX,
                doomed: false,
                meta: None,
                readers: HashMap::new(),
                next_reader: 0,
                pace: rate::Pace::new(),
            }),
            tick: watch::channel(0).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.tick.send_modify(|v| *v = v.wrapping_add(1));
    }

    // ---- the transfer side ----

    pub fn set_head(&self, head: Head, file: Option<Arc<File>>, map: Option<Bytes>) {
        {
            let mut st = self.state();
            st.head = Some(head);
            st.file = file;
            st.map = map;
        }
        self.bump();
    }

    /// A restart took a new response: clients that come after are answered with its head. The bytes
    /// held stay readable (until they turn out to differ: `diverge`).
    pub fn restarted(&self, head: Head) {
        self.state().head = Some(head);
        self.bump();
    }

    /// The fill starts with `at` bytes already in its file (a partial kept across a restart), which
    /// it was receiving at `rate` bytes/s.
    pub fn held(&self, at: u64, rate: u64) {
        if at > 0 {
            let mut st = self.state();
            st.written = at;
            st.window_start = at;
        }
        self.state().pace.seed(rate);
        self.bump();
    }

    /// The store gave up on the object half-way: bytes from `at` on are not in the file (a full disk
    /// leaves a hole there, which must never reach a reader), so from now on they are kept in the window
    /// until every reader has them. Bytes before `at` stay readable from the file (mapped or not),
    /// which readers hold open.
    pub fn stop_storing(&self, at: u64) {
        let mut st = self.state();
        if let Some(h) = st.head.as_mut() {
            h.storing = false;
        }
        st.file_valid = st.file_valid.min(at);
    }

    /// How a new client with request fields `req` may join this flight; None when it needs a
    /// transfer of its own (the response is not shareable with it, not reusable, or failed).
    pub fn joinable(&self, req: &http::HeaderMap) -> Option<Joined> {
        let st = self.state();
        match &st.end {
            None | Some(End::Complete(_)) => {}
            Some(_) => return None,
        }
        let Some(head) = &st.head else {
            return Some(Joined::InFlight);
        };
        if !head.storing || !head.shareable_with(req) {
            return None;
        }
        if st.verified || st.end.is_some() {
            let fresh = match &st.meta {
                Some(m) => {
                    let cc = super::freshness::RequestCc::parse(req);
                    super::freshness::reuse(m, &cc, now_ms()) == super::freshness::Reuse::Fresh
                }
                None => head.fresh,
            };
            return fresh.then_some(Joined::Verified);
        }
        Some(Joined::InFlight)
    }

    /// What the key names changed while this fill ran: its bytes are not to be mapped to the key.
    pub fn doom(&self) {
        self.state().doomed = true;
    }

    pub fn doomed(&self) -> bool {
        self.state().doomed
    }

    /// Every byte arrived and verified, and the object is being stored.
    pub fn is_committing(&self) -> bool {
        let st = self.state();
        st.verified && st.end.is_none() && st.head.as_ref().is_some_and(|h| h.storing)
    }

    pub fn is_storing(&self) -> bool {
        self.state().head.as_ref().is_some_and(|h| h.storing)
    }

    pub fn size(&self) -> Option<u64> {
        self.state().head.as_ref().and_then(|h| h.size)
    }

    pub fn written(&self) -> u64 {
        self.state().written
    }

    /// Whether the fill has reached `offset`, or will at its recent pace within `within` (SPEC 4).
    pub fn reaches_within(&self, offset: u64, within: std::time::Duration) -> bool {
        let st = self.state();
        st.verified || st.end.is_some() || st.pace.reaches(st.written, offset, within)
    }

    pub fn reader_count(&self) -> usize {
        self.state().readers.len()
    }

    /// Appends bytes already written to the file (if any).
    pub fn append(&self, chunks: Vec<Bytes>) {
        {
            let mut st = self.state();
            for c in chunks {
                st.pace.arrived(c.len() as u64);
                let at = st.written;
                st.written += c.len() as u64;
                // Bytes in the mapped file are read from the mapping; the others from memory.
                if st.map.is_some() && st.written <= st.file_valid {
                    continue;
                }
                if st.window.is_empty() {
                    st.window_start = at;
                }
                st.window.push_back(c);
            }
            if st.window.is_empty() {
                st.window_start = st.written;
            }
            let storing = st.head.as_ref().is_some_and(|h| h.storing) && st.file.is_some();
            let keep_from = if storing {
                st.written.saturating_sub(WINDOW)
            } else {
                st.readers.values().copied().min().unwrap_or(st.written)
            };
            while let Some(front) = st.window.front() {
                let flen = front.len() as u64;
                if st.window_start + flen > keep_from {
                    break;
                }
                st.window_start += flen;
                st.window.pop_front();
            }
        }
        self.bump();
    }

    /// For pass-through: waits until the slowest reader is within `PASS_WINDOW` of the newest byte.
    /// Returns false when no reader is left (the transfer can stop: nothing is being stored).
    pub async fn wait_for_readers(&self) -> bool {
        let mut rx = self.tick.subscribe();
        loop {
            {
                let st = self.state();
                if st.readers.is_empty() {
                    return false;
                }
                let min = st.readers.values().copied().min().unwrap_or(st.written);
                if st.written.saturating_sub(min) <= PASS_WINDOW {
                    return true;
                }
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// A restarted transfer differs from the bytes held from `at` on: readers of the current generation
    /// are cut off; the flight goes on from `at` with the new bytes, in `file` (and its mapping) when
    /// the fill moved to a new one.
    pub fn diverge(&self, at: u64, file: Option<(Arc<File>, Option<Bytes>)>) {
        {
            let mut st = self.state();
            st.generation += 1;
            if let Some((file, map)) = file {
                st.file = Some(file);
                st.map = map;
            }
            st.written = at;
            st.window.clear();
            st.window_start = at;
        }
        self.bump();
    }

    /// Releases the held-back last byte to readers: the bytes are complete and verified. The flight
    /// ends (and new clients go to the store) only once the object is stored, with `finish`.
    pub fn verified(&self, d: Digest, meta: Option<KeyMeta>) {
        {
            let mut st = self.state();
            st.verified = true;
            st.digest = Some(d);
            st.meta = meta;
        }
        self.bump();
    }

    /// The digest of the bytes, once they are verified.
    pub fn digest(&self) -> Option<Digest> {
        self.state().digest
    }

    pub fn finish(&self, end: End) {
        self.state().end = Some(end);
        self.bump();
    }

    pub fn end(&self) -> Option<End> {
        self.state().end.clone()
    }

    // ---- the reader side ----

    /// Waits for the end of the flight.
    pub async fn wait_end(&self) -> End {
        let mut rx = self.tick.subscribe();
        loop {
            let end = self.state().end.clone();
            if let Some(e) = end {
                return e;
            }
            if rx.changed().await.is_err() {
                return End::Failed(FetchError::Internal("transfer vanished".into()));
            }
        }
    }

    /// Waits until a byte of the body arrived, or every byte verified, or the flight ended: the error
    /// that ended it first, if any. A body that ends empty has no last byte to hold back, so a client
    /// whose answer would say it is whole waits here for the check instead (SPEC 4).
    pub async fn first_byte(&self) -> Result<(), FetchError> {
        let mut rx = self.tick.subscribe();
        loop {
            {
                let st = self.state();
                match &st.end {
                    Some(End::Failed(e)) => return Err(e.clone()),
                    Some(_) => return Ok(()),
                    None if st.written > 0 || st.verified => return Ok(()),
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Internal("transfer vanished".into()));
            }
        }
    }

    /// Waits until the response head is known or the flight ended before it.
    pub async fn head(&self) -> Result<Head, End> {
        let mut rx = self.tick.subscribe();
        loop {
            {
                let st = self.state();
                if let Some(h) = &st.head {
                    return Ok(h.clone());
                }
                if let Some(e) = &st.end {
                    return Err(e.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err(End::Failed(FetchError::Internal(
                    "transfer vanished".into(),
                )));
            }
        }
    }

    /// Attaches a reader for bytes [from, to) (`to` None = to the end of the object).
    pub fn reader(self: &Arc<Self>, from: u64, to: Option<u64>) -> FlightReader {
        let mut st = self.state();
        let id = st.next_reader;
        st.next_reader += 1;
        st.readers.insert(id, from);
        let generation = st.generation;
        drop(st);
        FlightReader {
            flight: self.clone(),
            id,
            pos: from,
            to,
            generation,
        }
    }
}

/// One client's view of a flight.
pub struct FlightReader {
    flight: Arc<Flight>,
    id: u64,
    pos: u64,
    to: Option<u64>,
    generation: u32,
}

enum Step {
    Data(Bytes),
    FromFile(Arc<File>, u64, usize),
    Done,
    Wait,
}

impl FlightReader {
    /// Positions the reader on bytes [from, to) (`to` None = to the end of the object).
    pub fn seek(&mut self, from: u64, to: Option<u64>) {
        self.pos = from;
        self.to = to;
        let id = self.id;
        self.flight.state().readers.insert(id, from);
        self.flight.bump();
    }

    /// The next bytes, None at the end of the requested range, or the error that ended the flight (the
    /// client's connection must then be aborted, never finished).
    pub async fn next(&mut self) -> Option<Result<Bytes, FetchError>> {
        let mut rx = self.flight.tick.subscribe();
        loop {
            let step = match self.step() {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            match step {
                Step::Data(b) => return Some(Ok(self.advance(b))),
                Step::Done => return None,
                Step::FromFile(file, at, len) => {
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        let n = file.read_at(&mut buf, at)?;
                        buf.truncate(n);
                        Ok::<_, std::io::Error>(buf)
                    })
                    .await;
                    match read {
                        Ok(Ok(buf)) if !buf.is_empty() => {
                            // The bytes may have been replaced meanwhile by a diverging restart.
                            if self.flight.state().generation != self.generation {
                                return Some(Err(FetchError::Diverged));
                            }
                            return Some(Ok(self.advance(Bytes::from(buf))));
                        }
                        Ok(Ok(_)) => {
                            return Some(Err(FetchError::Internal(
                                "fill file shorter than written".into(),
                            )))
                        }
                        Ok(Err(e)) => {
                            return Some(Err(FetchError::Internal(format!("reading fill: {e}"))))
                        }
                        Err(e) => return Some(Err(FetchError::Internal(e.to_string()))),
                    }
                }
                Step::Wait => {
                    if rx.changed().await.is_err() {
                        return Some(Err(FetchError::Internal("transfer vanished".into())));
                    }
                }
            }
        }
    }

    fn advance(&mut self, b: Bytes) -> Bytes {
        self.pos += b.len() as u64;
        let pos = self.pos;
        let id = self.id;
        self.flight.state().readers.insert(id, pos);
        self.flight.bump();
        b
    }

    fn step(&self) -> Result<Step, FetchError> {
        let st = self.flight.state();
        if st.generation != self.generation {
            return Err(FetchError::Diverged);
        }
        let size = st.head.as_ref().and_then(|h| h.size);
        let (complete, failed) = match &st.end {
            Some(End::Complete(_)) => (true, None),
            Some(End::Failed(e)) => (false, Some(e.clone())),
            Some(_) => (true, None),
            None => (st.verified, None),
        };
        let end = match (self.to, size) {
            (Some(t), Some(s)) => t.min(s),
            (Some(t), None) => t,
            (None, Some(s)) => s,
            (None, None) => u64::MAX,
        };
        if self.pos >= end {
            return Ok(Step::Done);
        }
        // Hold back the object's last byte until the transfer completed (and verified).
        let readable = if complete {
            st.written
        } else if size.is_some_and(|s| end >= s) || end == u64::MAX {
            match size {
                Some(s) => st.written.min(s.saturating_sub(1)),
                None => st.written.saturating_sub(1),
            }
        } else {
            st.written
        };
        let readable = readable.min(end);
        if self.pos < readable {
            if let Some(map) = &st.map {
                let end = readable
                    .min(self.pos + MAP_CHUNK)
                    .min(map.len() as u64)
                    .min(st.file_valid);
                if self.pos < end {
                    return Ok(Step::Data(map.slice(self.pos as usize..end as usize)));
                }
            }
            if self.pos >= st.window_start {
                // Find the chunk that holds `pos` in the window.
                let mut off = st.window_start;
                for c in &st.window {
                    let clen = c.len() as u64;
                    if self.pos < off + clen {
                        let a = (self.pos - off) as usize;
                        let b = (readable.min(off + clen) - off) as usize;
                        return Ok(Step::Data(c.slice(a..b)));
                    }
                    off += clen;
                }
            }
            return match &st.file {
                Some(f) if self.pos < st.file_valid => {
                    let limit = readable
                        .min(st.window_start.max(self.pos + 1))
                        .min(st.file_valid);
                    let len = (limit - self.pos).min(READ_CHUNK as u64) as usize;
                    Ok(Step::FromFile(f.clone(), self.pos, len))
                }
                _ => Err(FetchError::Internal(
                    "reader fell behind a pass-through transfer".into(),
                )),
            };
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if complete && (self.pos >= st.written || end == u64::MAX) {
            return Ok(Step::Done);
        }
        Ok(Step::Wait)
    }
}

impl Drop for FlightReader {
    fn drop(&mut self) {
        let id = self.id;
        self.flight.state().readers.remove(&id);
        self.flight.bump();
    }
}

mod head;
mod rate;
#[cfg(test)]
mod tests;
