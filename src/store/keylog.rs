//! The `<hex>.keys` log beside each object (SPEC 4): the keys that map to the object, one JSON line per
//! change, either a key added or updated (with its validators, freshness and header block) or a key
//! removed. Adding a key appends one line and fsyncs it, whatever the number of keys already there: the
//! `.meta` of earlier versions held every key and was read, changed and rewritten whole for each new
//! one (13 ms per key at 2,400 keys, a 2.2 MB file rewritten each time). The log is rewritten compacted
//! (temp file, fsync, rename) once its dead lines outnumber its live ones, so that compaction costs
//! O(1) per change, amortised.
//!
//! A line is a record only when it ends with `\n` and parses: an append torn by a crash (half a line,
//! or zeros where the filesystem had not written the data yet) is ignored on read, and the log is
//! rewritten before its next append, so that no record is ever glued onto a torn one. The keys that an
//! old-format `.meta` holds are read as the log's first records (its lines win), until a compaction
//! moves them into the log.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::meta::KeyMeta;

/// One line of the log as written: without `meta`, the key was removed.
#[derive(Serialize)]
struct LineOut<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a KeyMeta>,
}

/// One line of the log as read.
#[derive(Deserialize)]
struct LineIn {
    key: String,
    #[serde(default)]
    meta: Option<KeyMeta>,
}

/// A change to an object's keys.
pub(super) enum Change<'a> {
    Put(&'a str, &'a KeyMeta),
    Remove(&'a str),
}

/// An object's keys as its files say.
#[derive(Default, Debug)]
pub(super) struct Keys {
    /// Live keys: their metadata, and the position of the record that last set it (oldest first).
    pub live: HashMap<String, (u64, KeyMeta)>,
    /// Records read: the keys of an old-format `.meta`, then the log's lines.
    pub records: u64,
    /// A line that did not end or did not parse: the log must be rewritten before it is appended to.
    pub torn: bool,
    /// The keys an old-format `.meta` holds.
    legacy: Vec<String>,
}

/// What the store keeps in memory about a log, to know when it is due for compaction or trimming
/// without reading it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Stats {
    pub records: u64,
    pub live: u64,
    /// Not to be appended to: rewrite it first (a torn line, or an append that failed half-way).
    pub dirty: bool,
}

impl Stats {
    pub fn of(keys: &Keys) -> Stats {
        Stats {
            records: keys.records,
            live: keys.live.len() as u64,
            dirty: keys.torn,
        }
    }

    /// Dead records outnumber live ones: a rewrite now costs no more than the changes since the last.
    pub fn due(&self) -> bool {
        self.records.saturating_sub(self.live) > self.live
    }
}

impl Keys {
    /// An object's keys: those of its `.meta` when that is of the old format (oldest fetched first),
    /// then the changes its log records. A missing log is an empty one.
    pub fn read(legacy: BTreeMap<String, KeyMeta>, log: &Path) -> std::io::Result<Keys> {
        let mut k = Keys::default();
        let mut old: Vec<(String, KeyMeta)> = legacy.into_iter().collect();
        old.sort_by_key(|(_, m)| m.fetched_at);
        for (key, m) in old {
            k.legacy.push(key.clone());
            k.apply(key, Some(m));
        }
        let raw = match std::fs::read(log) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(k),
            Err(e) => return Err(e),
        };
        let (body, tail) = match raw.iter().rposition(|b| *b == b'\n') {
            Some(i) => (&raw[..i], &raw[i + 1..]),
            None => (&raw[..0], &raw[..]),
        };
        k.torn = !tail.is_empty();
        if raw.len() > tail.len() {
            for line in body.split(|b| *b == b'\n') {
                match serde_json::from_slice::<LineIn>(line) {
                    Ok(l) => k.apply(l.key, l.meta),
                    Err(_) => k.torn = true,
                }
            }
        }
        Ok(k)
    }

    fn apply(&mut self, key: String, meta: Option<KeyMeta>) {
        self.records += 1;
        match meta {
            Some(m) => {
                self.live.insert(key, (self.records, m));
            }
            None => {
                self.live.remove(&key);
            }
        }
    }

    /// Live keys, the one set longest ago first.
    pub fn oldest_first(&self) -> Vec<(&str, &KeyMeta)> {
        let mut v: Vec<(u64, &str, &KeyMeta)> = self
            .live
            .iter()
            .map(|(k, (at, m))| (*at, k.as_str(), m))
            .collect();
        v.sort_unstable_by_key(|(at, _, _)| *at);
        v.into_iter().map(|(_, k, m)| (k, m)).collect()
    }

    /// The log's content, compacted: the live keys, oldest first, and a removal of every key that an
    /// old-format `.meta` still holds and that is gone (so that it stays gone until that `.meta` is
    /// rewritten without keys, whatever a crash leaves).
    pub fn compacted(&self) -> Vec<Change<'_>> {
        let mut out: Vec<Change<'_>> = self
            .oldest_first()
            .into_iter()
            .map(|(k, m)| Change::Put(k, m))
            .collect();
        for k in &self.legacy {
            if !self.live.contains_key(k) {
                out.push(Change::Remove(k));
            }
        }
        out
    }

    pub fn has_legacy(&self) -> bool {
        !self.legacy.is_empty()
    }
}

fn encode(changes: &[Change<'_>]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for c in changes {
        let line = match c {
            Change::Put(key, m) => LineOut { key, meta: Some(m) },
            Change::Remove(key) => LineOut { key, meta: None },
        };
        serde_json::to_writer(&mut buf, &line).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    Ok(buf)
}

/// Appends changes to a log (creating it) and fsyncs them; the directory too when the log is new and
/// `sync_dir` is set (a caller about to fsync the directory anyway leaves it unset). On an error the
/// log is cut back to its length before, as far as that goes; the caller rewrites it before the next
/// append in any case.
pub(super) fn append(log: &Path, changes: &[Change<'_>], sync_dir: bool) -> std::io::Result<()> {
    let buf = encode(changes)?;
    let created = std::fs::symlink_metadata(log).is_err();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let before = f.metadata()?.len();
    let written = f.write_all(&buf).and_then(|_| f.sync_data());
    if written.is_err() {
        let _ = f.set_len(before);
    }
    written?;
    if created && sync_dir {
        if let Some(dir) = log.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

/// Replaces a log atomically with these changes.
pub(super) fn rewrite(log: &Path, changes: &[Change<'_>]) -> std::io::Result<()> {
    super::records::write_atomic(log, &encode(changes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(at: u64) -> KeyMeta {
        KeyMeta {
            fetched_at: at,
            ..KeyMeta::default()
        }
    }

    #[test]
    fn a_torn_or_garbled_line_is_ignored_and_marks_the_log_for_a_rewrite() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("x.keys");
        let (a, b) = (meta(1), meta(2));
        append(&log, &[Change::Put("a", &a), Change::Put("b", &b)], true).unwrap();
        let whole = std::fs::read(&log).unwrap();
        let k = Keys::read(BTreeMap::new(), &log).unwrap();
        assert_eq!((k.live.len(), k.records, k.torn), (2, 2, false));
        // The second record cut anywhere short of its newline is not a record.
        let first = whole.iter().position(|b| *b == b'\n').unwrap() + 1;
        for cut in [first + 1, whole.len() - 2, whole.len() - 1] {
            std::fs::write(&log, &whole[..cut]).unwrap();
            let k = Keys::read(BTreeMap::new(), &log).unwrap();
            assert!(k.torn, "cut at {cut}");
            assert_eq!(k.live.keys().collect::<Vec<_>>(), ["a"], "cut at {cut}");
        }
        // Zeros where the filesystem had not written the data of an append.
        let mut zeros = whole[..first].to_vec();
        zeros.extend([0u8; 300]);
        std::fs::write(&log, &zeros).unwrap();
        let k = Keys::read(BTreeMap::new(), &log).unwrap();
        assert_eq!((k.live.len(), k.torn), (1, true));
    }

    #[test]
    fn the_log_wins_over_an_old_meta_and_its_removals_survive_compaction() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("x.keys");
        let legacy: BTreeMap<String, KeyMeta> =
            [("old".to_string(), meta(5)), ("gone".into(), meta(1))]
                .into_iter()
                .collect();
        let newer = meta(9);
        append(
            &log,
            &[Change::Put("old", &newer), Change::Remove("gone")],
            true,
        )
        .unwrap();
        let k = Keys::read(legacy.clone(), &log).unwrap();
        assert_eq!(k.live.len(), 1);
        assert_eq!(k.live["old"].1.fetched_at, 9);
        // Compacted while the `.meta` still lists "gone": it stays removed.
        rewrite(&log, &k.compacted()).unwrap();
        let k = Keys::read(legacy, &log).unwrap();
        assert_eq!(k.live.keys().collect::<Vec<_>>(), ["old"]);
        assert_eq!(k.live["old"].1.fetched_at, 9);
    }
}
