//! `Room`: the bytes a fill will take, reserved in the budget before its file exists. Reserving is
//! done in memory (one `statfs`), so that a miss knows whether its object will be stored before its
//! head goes out; the disk work (removing what made way, creating and sizing the file) follows
//! on a blocking thread with `Room::fill`, after the head, because it waits on the filesystem's
//! journal, which a commit's fsync may hold for tens of milliseconds.

use std::sync::atomic::Ordering;

use super::{Digest, Fill, Store, StoreError};

pub struct Room {
    store: Store,
    /// Bytes reserved in the budget.
    bytes: u64,
    /// Objects evicted for the room and partials given up for it: out of the budget already, their
    /// files still to be removed.
    evicted: Vec<Digest>,
    given_up: Vec<String>,
    /// Handed on to a fill: the reservation is the fill's now.
    taken: bool,
}

impl Store {
    /// Reserves room for a fill of `expected` bytes (its Content-Length, when known), evicting
    /// least-recently-used unpinned objects that nobody is reading, and giving up partial fills kept
    /// from before a restart (oldest first) when that is not enough. NoRoom: the caller streams the
    /// object through without storing it. Not blocking.
    pub fn reserve_room(&self, expected: Option<u64>) -> Result<Room, StoreError> {
        let want = expected.unwrap_or(0);
        if self.shared.max_object_size > 0 && want > self.shared.max_object_size {
            return Err(StoreError::NoRoom(want));
        }
        self.room(want)
    }

    /// Reserves `want` bytes, evicting and giving up partials as needed (see `reserve_room`).
    fn room(&self, want: u64) -> Result<Room, StoreError> {
        let mut room = Room {
            store: self.clone(),
            bytes: 0,
            evicted: Vec::new(),
            given_up: Vec::new(),
            taken: false,
        };
        loop {
            match self.take_room(want) {
                Ok(victims) => {
                    room.bytes = want;
                    room.evicted = victims;
                    return Ok(room);
                }
                Err(StoreError::NoRoom(n)) => match self.give_up_oldest_partial() {
                    Some(id) => room.given_up.push(id),
                    None => return Err(StoreError::NoRoom(n)),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a fill: room reserved, then its file made. Blocking.
    pub fn begin_fill(&self, expected: Option<u64>) -> Result<Fill, StoreError> {
        self.reserve_room(expected)?.fill()
    }

    /// Reserves `n` more bytes for a fill that grows past what it announced. Blocking.
    pub(crate) fn reserve(&self, n: u64) -> Result<(), StoreError> {
        let mut room = self.room(n)?;
        room.taken = true;
        Ok(())
    }

    /// Takes `n` bytes in the budget, in memory; the objects evicted for them are returned, their
    /// files still to be removed.
    pub(super) fn take_room(&self, n: u64) -> Result<Vec<Digest>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut st = self.state();
        let victims = self.shared.budget.make_room(&mut st, n)?;
        st.reserved += n;
        Ok(victims)
    }

    /// Removes the objects `take_room` evicted. Blocking.
    pub(super) fn evict(&self, victims: Vec<Digest>) {
        for d in victims {
            self.unlink(&d, true);
            self.shared.stats.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(digest = %d, "evicted");
        }
    }
}

impl Room {
    /// Removes the files of what made way, then creates the fill's temp file (its room taken on the
    /// filesystem when the length is known). Blocking.
    pub fn fill(mut self) -> Result<Fill, StoreError> {
        self.clear();
        failpoint!("store-fill-begin");
        let f = Fill::create(self.store.clone(), self.store.tmp_path(), self.bytes)?;
        self.taken = true;
        Ok(f)
    }

    /// Removes the files of the objects evicted and the partials given up. Blocking.
    fn clear(&mut self) {
        self.store.evict(std::mem::take(&mut self.evicted));
        for id in std::mem::take(&mut self.given_up) {
            self.store.remove_partial_files(&id);
        }
    }
}

impl Drop for Room {
    /// Room not handed on is given back; what made way for it is gone from the budget, so its files
    /// go too (blocking, but only when a fill is abandoned before its file was made).
    fn drop(&mut self) {
        self.clear();
        if !self.taken {
            self.store.release(self.bytes, 0);
        }
    }
}
