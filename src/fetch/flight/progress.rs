//! How far a fill has got: the one record its readers wait on, published through a `watch` (the shape
//! of Varnish's busyobj: readers attach to the object being fetched and wait on how far it has got).
//! Whether a body is complete, and so how far a reader may read, is decided here and nowhere else.

use super::{End, Head};

/// What the fill has published so far. Only the transfer writes it (through `Flight`); readers and
/// joiners read it.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// The response head, once upstream answered (replaced by a restart's new one: SPEC 4).
    pub head: Option<Head>,
    /// Bytes received so far, of the current generation.
    pub written: u64,
    /// Bumped when a restarted transfer turned out to differ from the bytes already sent: readers of
    /// an older generation are cut off.
    pub generation: u32,
    /// Every byte arrived and matched its digest: readers may take the last one while the transfer
    /// still stores the object (its fsync is no reason to keep a client waiting).
    pub verified: bool,
    /// How the fill ended, once it has.
    pub end: Option<End>,
}

impl Progress {
    /// Whether every byte of the body is there for readers: verified, or ended in a way that leaves
    /// the bytes whole. A failed fill is never complete.
    pub fn complete(&self) -> bool {
        match &self.end {
            Some(End::Failed(_)) => false,
            Some(_) => true,
            None => self.verified,
        }
    }

    /// The object's size, when the head announced one.
    pub fn size(&self) -> Option<u64> {
        self.head.as_ref().and_then(|h| h.size)
    }

    /// How far a reader whose range ends at `end` (u64::MAX: the end of the object) may read now:
    /// the bytes written, except the object's last byte, which is held back until the body is
    /// complete, so that a corrupt or truncated object can never look whole to a client (SPEC 4).
    pub fn readable(&self, end: u64) -> u64 {
        let size = self.size();
        let reaches_last = end == u64::MAX || size.is_some_and(|s| end >= s);
        let upto = if self.complete() || !reaches_last {
            self.written
        } else {
            match size {
                Some(s) => self.written.min(s.saturating_sub(1)),
                None => self.written.saturating_sub(1),
            }
        };
        upto.min(end)
    }

    /// Where a reader's range [from, to) ends in this object (`to` None: at its end).
    pub fn range_end(&self, to: Option<u64>) -> u64 {
        match (to, self.size()) {
            (Some(t), Some(s)) => t.min(s),
            (Some(t), None) => t,
            (None, Some(s)) => s,
            (None, None) => u64::MAX,
        }
    }

    /// Whether a reader at `pos` whose range ends at `end` has read all there will be.
    pub fn read_all(&self, pos: u64, end: u64) -> bool {
        pos >= end || (self.complete() && (pos >= self.written || end == u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::FetchError;
    use crate::store::Digest;

    fn at(written: u64, size: Option<u64>) -> Progress {
        Progress {
            head: Some(Head {
                size,
                ..Default::default()
            }),
            written,
            ..Default::default()
        }
    }

    #[test]
    fn the_last_byte_waits_for_completion() {
        let mut p = at(4, Some(4));
        assert_eq!(p.readable(u64::MAX), 3);
        assert_eq!(
            p.readable(4),
            3,
            "a range to the end holds the last byte too"
        );
        assert_eq!(
            p.readable(2),
            2,
            "a range before the end needs no verification"
        );
        p.verified = true;
        assert_eq!(p.readable(u64::MAX), 4);
    }

    #[test]
    fn an_unknown_length_holds_back_its_newest_byte() {
        let mut p = at(10, None);
        assert_eq!(p.readable(u64::MAX), 9);
        p.end = Some(End::Complete(Digest([0; 32])));
        assert_eq!(p.readable(u64::MAX), 10);
        assert!(p.read_all(10, u64::MAX));
    }

    #[test]
    fn a_failed_fill_is_never_complete() {
        let mut p = at(4, Some(4));
        p.verified = true;
        p.end = Some(End::Failed(FetchError::Internal("x".into())));
        assert!(!p.complete());
        assert_eq!(p.readable(u64::MAX), 3);
        assert!(!p.read_all(3, 4));
    }
}
