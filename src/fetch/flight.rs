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
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::error::FetchError;
use super::uplink::Priority;
use crate::store::{now_ms, Digest, KeyMeta};
pub use head::Head;
pub use progress::Progress;
pub use reader::FlightReader;

/// Bytes kept in memory behind the newest byte while a file backs the flight.
const WINDOW: u64 = 2 << 20;
/// Bytes a pass-through flight may run ahead of its slowest reader.
const PASS_WINDOW: u64 = 8 << 20;

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

/// What the transfer and its readers share besides the published `Progress`: where the bytes are.
/// Locked before the progress is read or written, never across an `.await`.
struct State {
    /// Newest bytes in memory: `window` holds [window_start, written).
    window: VecDeque<Bytes>,
    window_start: u64,
    file: Option<Arc<File>>,
    /// The fill file mapped at its announced size: readers take zero-copy slices of it.
    map: Option<Bytes>,
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

impl State {
    /// The bytes of the window from `pos` up to `upto`, when the window holds `pos`.
    fn window_slice(&self, pos: u64, upto: u64) -> Option<Bytes> {
        let mut off = self.window_start;
        if pos < off {
            return None;
        }
        for c in &self.window {
            let clen = c.len() as u64;
            if pos < off + clen {
                let a = (pos - off) as usize;
                let b = (upto.min(off + clen) - off) as usize;
                return Some(c.slice(a..b));
            }
            off += clen;
        }
        None
    }

    /// Drops window chunks wholly before `keep_from`.
    fn trim_window(&mut self, keep_from: u64) {
        while let Some(front) = self.window.front() {
            let flen = front.len() as u64;
            if self.window_start + flen > keep_from {
                break;
            }
            self.window_start += flen;
            self.window.pop_front();
        }
    }
}

pub struct Flight {
    state: Mutex<State>,
    /// How far the fill has got: readers wait on it, and nothing else wakes them.
    progress: watch::Sender<Progress>,
    /// A reader moved or left: what a pass-through transfer waits on (its back-pressure).
    readers_moved: Notify,
    /// Whom the transfer's bytes are for (SPEC 4, uplink budget): raised to foreground when a client
    /// joins a prefetch's fill.
    priority: Priority,
}

impl Flight {
    /// The transfer's class in the uplink budget.
    pub fn priority(&self) -> &Priority {
        &self.priority
    }

    pub fn new() -> Arc<Flight> {
        Arc::new(Flight {
            priority: Priority::for_new_transfer(),
            state: Mutex::new(State {
                window: VecDeque::new(),
                window_start: 0,
                file: None,
                map: None,
                digest: None,
                file_valid: u64::MAX,
                doomed: false,
                meta: None,
                readers: HashMap::new(),
                next_reader: 0,
                pace: rate::Pace::new(),
            }),
            progress: watch::channel(Progress::default()).0,
            readers_moved: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the published progress (and wakes the readers).
    fn publish(&self, change: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(change);
    }

    /// The progress as published now.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    // ---- the transfer side ----

    pub fn set_head(&self, head: Head, file: Option<Arc<File>>, map: Option<Bytes>) {
        let mut st = self.state();
        st.file = file;
        st.map = map;
        self.publish(|p| p.head = Some(head));
    }

    /// The fill's file, made after the head was published and before any byte is appended.
    pub fn attach(&self, file: Arc<File>, map: Option<Bytes>) {
        let mut st = self.state();
        st.file = Some(file);
        st.map = map;
    }

    /// A restart took a new response: clients that come after are answered with its head. The bytes
    /// held stay readable (until they turn out to differ: `diverge`).
    pub fn restarted(&self, head: Head) {
        self.publish(|p| p.head = Some(head));
    }

    /// The fill starts with `at` bytes already in its file (a partial kept across a restart), which
    /// it was receiving at `rate` bytes/s.
    pub fn held(&self, at: u64, rate: u64) {
        let mut st = self.state();
        st.pace.seed(rate);
        if at > 0 {
            st.window_start = at;
            self.publish(|p| p.written = at);
        }
    }

    /// The store gave up on the object half-way: bytes from `at` on are not in the file (a full disk
    /// leaves a hole there, which must never reach a reader), so from now on they are kept in the window
    /// until every reader has them. Bytes before `at` stay readable from the file (mapped or not),
    /// which readers hold open.
    pub fn stop_storing(&self, at: u64) {
        let mut st = self.state();
        st.file_valid = st.file_valid.min(at);
        self.publish(|p| {
            if let Some(h) = p.head.as_mut() {
                h.storing = false;
            }
        });
    }

    /// How a new client with request fields `req` may join this flight; None when it needs a
    /// transfer of its own (the response is not shareable with it, not reusable, or failed).
    pub fn joinable(&self, req: &http::HeaderMap) -> Option<Joined> {
        let st = self.state();
        let p = self.progress.borrow();
        match &p.end {
            None | Some(End::Complete(_)) => {}
            Some(_) => return None,
        }
        let Some(head) = &p.head else {
            return Some(Joined::InFlight);
        };
        if !head.storing || !head.shareable_with(req) {
            return None;
        }
        if p.verified || p.end.is_some() {
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
        let p = self.progress.borrow();
        p.verified && p.end.is_none() && p.head.as_ref().is_some_and(|h| h.storing)
    }

    pub fn is_storing(&self) -> bool {
        self.progress
            .borrow()
            .head
            .as_ref()
            .is_some_and(|h| h.storing)
    }

    pub fn size(&self) -> Option<u64> {
        self.progress.borrow().size()
    }

    pub fn written(&self) -> u64 {
        self.progress.borrow().written
    }

    /// Whether the fill has reached `offset`, or will at its recent pace within `within` (SPEC 4).
    pub fn reaches_within(&self, offset: u64, within: std::time::Duration) -> bool {
        let st = self.state();
        let p = self.progress.borrow();
        p.verified || p.end.is_some() || st.pace.reaches(p.written, offset, within)
    }

    pub fn reader_count(&self) -> usize {
        self.state().readers.len()
    }

    /// Appends bytes already written to the file (if any).
    pub fn append(&self, chunks: Vec<Bytes>) {
        let mut st = self.state();
        let (mut written, storing) = {
            let p = self.progress.borrow();
            (p.written, p.head.as_ref().is_some_and(|h| h.storing))
        };
        for c in chunks {
            st.pace.arrived(c.len() as u64);
            let at = written;
            written += c.len() as u64;
            // Bytes in the mapped file are read from the mapping; the others from memory.
            if st.map.is_some() && written <= st.file_valid {
                continue;
            }
            if st.window.is_empty() {
                st.window_start = at;
            }
            st.window.push_back(c);
        }
        if st.window.is_empty() {
            st.window_start = written;
        }
        let keep_from = if storing && st.file.is_some() {
            written.saturating_sub(WINDOW)
        } else {
            st.readers.values().copied().min().unwrap_or(written)
        };
        st.trim_window(keep_from);
        self.publish(|p| p.written = written);
    }

    /// For pass-through: waits until the slowest reader is within `PASS_WINDOW` of the newest byte.
    /// Returns false when no reader is left (the transfer can stop: nothing is being stored).
    pub async fn wait_for_readers(&self) -> bool {
        loop {
            let moved = self.readers_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            {
                let st = self.state();
                if st.readers.is_empty() {
                    return false;
                }
                let written = self.progress.borrow().written;
                let min = st.readers.values().copied().min().unwrap_or(written);
                if written.saturating_sub(min) <= PASS_WINDOW {
                    return true;
                }
            }
            moved.await;
        }
    }

    /// A restarted transfer differs from the bytes held from `at` on: readers of the current generation
    /// are cut off; the flight goes on from `at` with the new bytes, in `file` (and its mapping) when
    /// the fill moved to a new one.
    pub fn diverge(&self, at: u64, file: Option<(Arc<File>, Option<Bytes>)>) {
        let mut st = self.state();
        if let Some((file, map)) = file {
            st.file = Some(file);
            st.map = map;
        }
        st.window.clear();
        st.window_start = at;
        self.publish(|p| {
            p.generation += 1;
            p.written = at;
        });
    }

    /// Releases the held-back last byte to readers: the bytes are complete and verified. The flight
    /// ends (and new clients go to the store) only once the object is stored, with `finish`.
    pub fn verified(&self, d: Digest, meta: Option<KeyMeta>) {
        let mut st = self.state();
        st.digest = Some(d);
        st.meta = meta;
        self.publish(|p| p.verified = true);
    }

    /// The digest of the bytes, once they are verified.
    pub fn digest(&self) -> Option<Digest> {
        self.state().digest
    }

    pub fn finish(&self, end: End) {
        self.publish(|p| p.end = Some(end));
    }

    pub fn end(&self) -> Option<End> {
        self.progress.borrow().end.clone()
    }

    /// A reader moved to `pos`.
    fn moved(&self, id: u64, pos: u64) {
        self.state().readers.insert(id, pos);
        self.readers_moved.notify_waiters();
    }

    /// A reader left. The last one to leave a fill that goes on leaves it as background work: the
    /// uplink is for those who wait (SPEC 4); a client joining later raises it again.
    fn left(&self, id: u64) {
        let none_left = {
            let mut st = self.state();
            st.readers.remove(&id);
            st.readers.is_empty()
        };
        if none_left && self.progress.borrow().end.is_none() {
            self.priority.lower();
        }
        self.readers_moved.notify_waiters();
    }

    // ---- the reader side ----

    /// Waits until `ready` says the progress is what the caller waits for.
    async fn wait_for<T>(
        &self,
        mut ready: impl FnMut(&Progress) -> Option<T>,
    ) -> Result<T, FetchError> {
        let mut rx = self.progress.subscribe();
        loop {
            if let Some(t) = ready(&rx.borrow_and_update()) {
                return Ok(t);
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Internal("transfer vanished".into()));
            }
        }
    }

    /// Waits for the end of the flight.
    pub async fn wait_end(&self) -> End {
        self.wait_for(|p| p.end.clone())
            .await
            .unwrap_or_else(End::Failed)
    }

    /// Waits until a byte of the body arrived, or every byte verified, or the flight ended: the error
    /// that ended it first, if any. A body that ends empty has no last byte to hold back, so a client
    /// whose answer would say it is whole waits here for the check instead (SPEC 4).
    pub async fn first_byte(&self) -> Result<(), FetchError> {
        self.wait_for(|p| match &p.end {
            Some(End::Failed(e)) => Some(Err(e.clone())),
            Some(_) => Some(Ok(())),
            None if p.written > 0 || p.verified => Some(Ok(())),
            None => None,
        })
        .await?
    }

    /// Waits until the response head is known or the flight ended before it.
    pub async fn head(&self) -> Result<Head, End> {
        let got = self.wait_for(|p| match (&p.head, &p.end) {
            (Some(h), _) => Some(Ok(h.clone())),
            (None, Some(e)) => Some(Err(e.clone())),
            (None, None) => None,
        });
        got.await.unwrap_or_else(|e| Err(End::Failed(e)))
    }

    /// Attaches a reader for bytes [from, to) (`to` None = to the end of the object).
    pub fn reader(self: &Arc<Self>, from: u64, to: Option<u64>) -> FlightReader {
        let mut st = self.state();
        let id = st.next_reader;
        st.next_reader += 1;
        st.readers.insert(id, from);
        let generation = self.progress.borrow().generation;
        drop(st);
        FlightReader::new(self.clone(), id, from, to, generation)
    }
}

mod head;
mod progress;
mod rate;
mod reader;
#[cfg(test)]
mod tests;
