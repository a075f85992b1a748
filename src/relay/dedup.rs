//! What this node already holds, for telling a retry from a different report (SPEC 5 dedup): per
//! (deviceId, reportId) pair, the digests (`report::digest`) of the reports accepted under it.
//!
//! A report whose digest is known is a duplicate: a retry is byte-for-byte the same report, less what
//! the hops add. A report under a known pair with another digest is a conflict: report ids are
//! predictable, and a report posted first under the id of a device's next one must not make the real
//! one a "duplicate" that is dropped. A conflict is kept like a new report and counted apart; its
//! digest is recorded too, so a retry of either report stays a duplicate.
//!
//! One dedup record per report kept: (seq, pair, digest). Records written before digests were kept
//! (older versions, the sled import) have none: any report under such a pair is a duplicate, as it
//! was when they were written, until the record is forgotten. Records are forgotten oldest first past
//! `dedup_entries`; a pair stays known while any of its records is left.

use std::collections::{HashMap, HashSet};

/// A dedup record as memory keeps it: the pair hash and the report's digest, if it was recorded.
pub type Record = (u128, Option<u128>);

/// What a report is to this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    /// The same report again (or any report under a pair recorded without a digest).
    Duplicate,
    /// Another report under a pair already accepted.
    Conflict,
}

#[derive(Default, Debug)]
pub struct DedupIndex {
    /// Pairs with at least one record.
    pairs: HashSet<u128>,
    /// Pairs with more than one record (after conflicts): how many more.
    extra: HashMap<u128, u32>,
    /// The digests recorded. A digest covers deviceId and reportId, so it names its pair too.
    digests: HashSet<u128>,
    /// Pairs recorded without a digest.
    legacy: HashSet<u128>,
    records: usize,
}

impl DedupIndex {
    /// How many records there are (what `dedup_entries` bounds).
    pub fn records(&self) -> usize {
        self.records
    }

    pub fn seen(&self, pair: u128, digest: u128) -> Seen {
        if self.digests.contains(&digest) || self.legacy.contains(&pair) {
            Seen::Duplicate
        } else if self.pairs.contains(&pair) {
            Seen::Conflict
        } else {
            Seen::New
        }
    }

    pub fn add(&mut self, (pair, digest): Record) {
        match digest {
            Some(d) => self.digests.insert(d),
            None => self.legacy.insert(pair),
        };
        if !self.pairs.insert(pair) {
            *self.extra.entry(pair).or_default() += 1;
        }
        self.records += 1;
    }

    /// Removes a record (forgotten past `dedup_entries`).
    pub fn forget(&mut self, (pair, digest): Record) {
        match digest {
            Some(d) => self.digests.remove(&d),
            None => self.legacy.remove(&pair),
        };
        match self.extra.get_mut(&pair) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.extra.remove(&pair);
            }
            None => {
                self.pairs.remove(&pair);
            }
        }
        self.records = self.records.saturating_sub(1);
    }
}

impl FromIterator<Record> for DedupIndex {
    fn from_iter<I: IntoIterator<Item = Record>>(records: I) -> DedupIndex {
        let mut d = DedupIndex::default();
        for r in records {
            d.add(r);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_a_duplicate_another_report_a_conflict() {
        let mut d = DedupIndex::default();
        assert_eq!(d.seen(1, 10), Seen::New);
        d.add((1, Some(10)));
        assert_eq!(d.seen(1, 10), Seen::Duplicate);
        assert_eq!(d.seen(1, 11), Seen::Conflict);
        assert_eq!(d.seen(2, 20), Seen::New);
        d.add((1, Some(11)));
        assert_eq!(
            (d.seen(1, 10), d.seen(1, 11)),
            (Seen::Duplicate, Seen::Duplicate)
        );
        assert_eq!(d.records(), 2);
        // The first record forgotten: its report is a conflict again (the pair is still known).
        d.forget((1, Some(10)));
        assert_eq!(
            (d.seen(1, 10), d.seen(1, 11)),
            (Seen::Conflict, Seen::Duplicate)
        );
        d.forget((1, Some(11)));
        assert_eq!((d.seen(1, 10), d.records()), (Seen::New, 0));
    }

    /// Records of older versions have no digest: everything under their pair stays a duplicate.
    #[test]
    fn a_record_without_a_digest_makes_its_pair_a_duplicate() {
        let mut d: DedupIndex = [(1, None), (2, Some(20))].into_iter().collect();
        assert_eq!(
            (d.seen(1, 10), d.seen(1, 11)),
            (Seen::Duplicate, Seen::Duplicate)
        );
        assert_eq!(d.seen(2, 21), Seen::Conflict);
        d.forget((1, None));
        assert_eq!(d.seen(1, 10), Seen::New);
    }
}
