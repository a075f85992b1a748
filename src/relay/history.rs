//! The in-memory index of the per-device history (`GET /v1/devices`, `/v1/devices/<id>`): which
//! entries each device has, their bytes, and which devices reported least recently. It plans what a
//! group of new reports removes (its device's oldest past `history_per_device`, and, past the
//! history's bound in bytes or entries, older history of other devices) and follows the commit.
//!
//! What goes first when the history is over its bound, and why:
//! 1. the older entries (all but the latest) of the devices that reported least recently; then
//! 2. whole devices (their latest report), least recently reporting first.
//!
//! The history is a read-back convenience, unlike the queue and the set-aside reports, which are
//! never dropped to make room. Of the history, a device's latest report is what the devices and
//! deployments tables show (a failed device that went quiet is the one a person on site looks for),
//! so every device keeps its latest report until only latest reports are left; among entries of
//! equal worth, those of the devices that reported longest ago matter least. Eviction runs down to
//! 15/16 of the bound, so a full history is trimmed once per sixteenth of it, not on every post.
//! Devices that report in the same group are not evicted by it (they are the most recent ones).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// The history's bounds: bytes (keys and values) and entries (which also bounds the devices, each
/// having at least one).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub bytes: u64,
    pub entries: u64,
    pub per_device: usize,
}

/// One device's entries: (seq, bytes), oldest first.
#[derive(Default, Debug)]
struct Device {
    entries: VecDeque<(u64, u32)>,
}

impl Device {
    fn latest(&self) -> Option<u64> {
        self.entries.back().map(|e| e.0)
    }
}

#[derive(Default, Debug)]
pub struct HistoryIndex {
    devices: HashMap<Arc<str>, Device>,
    /// Every device by its latest seq: the least recently reporting first.
    recency: BTreeMap<u64, Arc<str>>,
    /// The devices holding more than their latest report, by latest seq.
    older: BTreeMap<u64, Arc<str>>,
    bytes: u64,
    entries: u64,
}

/// A history entry added by a group: device, seq, bytes.
pub type Added = (String, u64, u32);

impl HistoryIndex {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Adds an entry newer than every other of its device.
    pub fn push(&mut self, device: &str, seq: u64, bytes: u32) {
        let key: Arc<str> = match self.devices.get_key_value(device) {
            Some((k, _)) => k.clone(),
            None => Arc::from(device),
        };
        self.unlink(&key);
        let d = self.devices.entry(key.clone()).or_default();
        d.entries.push_back((seq, bytes));
        self.bytes += bytes as u64;
        self.entries += 1;
        self.link(&key);
    }

    /// Removes a device's oldest entry, which must be `seq`; false when it is not there.
    pub fn pop_oldest(&mut self, device: &str, seq: u64) -> bool {
        let Some((key, d)) = self.devices.get_key_value(device) else {
            return false;
        };
        if d.entries.front().map(|e| e.0) != Some(seq) {
            return false;
        }
        let key = key.clone();
        self.unlink(&key);
        let Some(d) = self.devices.get_mut(&key) else {
            return false;
        };
        if let Some((_, b)) = d.entries.pop_front() {
            self.bytes -= b as u64;
            self.entries -= 1;
        }
        if d.entries.is_empty() {
            self.devices.remove(&key);
        } else {
            self.link(&key);
        }
        true
    }

    fn unlink(&mut self, key: &Arc<str>) {
        if let Some(latest) = self.devices.get(key).and_then(Device::latest) {
            self.recency.remove(&latest);
            self.older.remove(&latest);
        }
    }

    fn link(&mut self, key: &Arc<str>) {
        if let Some(d) = self.devices.get(key) {
            if let Some(latest) = d.latest() {
                self.recency.insert(latest, key.clone());
                if d.entries.len() > 1 {
                    self.older.insert(latest, key.clone());
                }
            }
        }
    }

    /// The entries (device, seq) that a group adding `added` (in seq order) removes, oldest of each
    /// device first: per device past `per_device`, then past the bounds (see the module's comment).
    pub fn plan(&self, added: &[Added], b: Bounds) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let (mut bytes, mut entries) = (self.bytes, self.entries);
        let mut per: HashMap<&str, Vec<(u64, u32)>> = HashMap::new();
        for (dev, seq, n) in added {
            per.entry(dev.as_str()).or_default().push((*seq, *n));
            bytes += *n as u64;
            entries += 1;
        }
        let keep = b.per_device.max(1);
        for (dev, new) in &per {
            let old = self.devices.get(*dev).map(|d| &d.entries);
            let all: Vec<&(u64, u32)> = old.into_iter().flatten().chain(new.iter()).collect();
            for (seq, n) in all.iter().take(all.len().saturating_sub(keep)) {
                out.push((dev.to_string(), *seq));
                bytes -= *n as u64;
                entries -= 1;
            }
        }
        if bytes > b.bytes || entries > b.entries {
            let touched: HashSet<&str> = per.keys().copied().collect();
            let target = (b.bytes - b.bytes / 16, b.entries - b.entries / 16);
            self.evict(&touched, (bytes, entries), target, &mut out);
        }
        out
    }

    /// Plans removals from devices not in `touched` until `now` is within `target`.
    fn evict(
        &self,
        touched: &HashSet<&str>,
        mut now: (u64, u64),
        target: (u64, u64),
        out: &mut Vec<(String, u64)>,
    ) {
        let over = |now: (u64, u64)| now.0 > target.0 || now.1 > target.1;
        // 1. Older entries, keeping each device's latest.
        for dev in self.older.values() {
            if !over(now) {
                return;
            }
            if touched.contains(&**dev) {
                continue;
            }
            let Some(d) = self.devices.get(dev) else {
                continue;
            };
            for (seq, n) in d.entries.iter().take(d.entries.len() - 1) {
                if !over(now) {
                    return;
                }
                out.push((dev.to_string(), *seq));
                now = (now.0 - *n as u64, now.1 - 1);
            }
        }
        // 2. Whole devices; each untouched one now holds only its latest report.
        for dev in self.recency.values() {
            if !over(now) {
                return;
            }
            if touched.contains(&**dev) {
                continue;
            }
            if let Some(&(seq, n)) = self.devices.get(dev).and_then(|d| d.entries.back()) {
                out.push((dev.to_string(), seq));
                now = (now.0 - n as u64, now.1 - 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(bytes: u64) -> Bounds {
        Bounds {
            bytes,
            entries: 1000,
            per_device: 3,
        }
    }

    /// Applies a plan the way the writer does after the commit.
    fn apply(h: &mut HistoryIndex, added: &[Added], removed: &[(String, u64)]) {
        for (d, s, n) in added {
            h.push(d, *s, *n);
        }
        for (d, s) in removed {
            assert!(h.pop_oldest(d, *s), "{d}/{s} is not the oldest");
        }
    }

    fn add(dev: &str, seq: u64) -> Added {
        (dev.to_string(), seq, 10)
    }

    #[test]
    fn a_device_keeps_its_last_entries() {
        let mut h = HistoryIndex::default();
        let added: Vec<Added> = (0..5).map(|s| add("a", s)).collect();
        let plan = h.plan(&added, bounds(1 << 20));
        assert_eq!(plan, [("a".to_string(), 0), ("a".to_string(), 1)]);
        apply(&mut h, &added, &plan);
        assert_eq!((h.entries(), h.bytes()), (3, 30));
    }

    #[test]
    fn older_entries_of_quiet_devices_go_first_then_whole_devices() {
        let mut h = HistoryIndex::default();
        // a: 0, 1, 2 (quiet longest); b: 3, 4, 5; c: 6.
        let first: Vec<Added> = (0..7)
            .map(|s| add(["a", "a", "a", "b", "b", "b", "c"][s as usize], s))
            .collect();
        let plan = h.plan(&first, bounds(1 << 20));
        apply(&mut h, &first, &plan);
        assert_eq!(h.bytes(), 70);
        // Bound 64 bytes, down to 60: one new entry (80 bytes) drops a's two older entries.
        let next = [add("d", 7)];
        let plan = h.plan(&next, bounds(64));
        assert_eq!(plan, [("a".to_string(), 0), ("a".to_string(), 1)]);
        apply(&mut h, &next, &plan);
        // Bound 32, down to 30 (60 now): b's older two go, then a (latest only) as a whole.
        let next = [add("e", 8)];
        let plan = h.plan(&next, bounds(32));
        let want: Vec<(String, u64)> = [("b", 3), ("b", 4), ("a", 2), ("b", 5)]
            .iter()
            .map(|(d, s)| (d.to_string(), *s))
            .collect();
        assert_eq!(plan, want);
        apply(&mut h, &next, &plan);
        assert_eq!(h.devices(), 3, "c, d and e are left");
        assert_eq!(h.bytes(), 30);
    }

    #[test]
    fn a_device_reporting_now_is_not_evicted_by_its_own_report() {
        let mut h = HistoryIndex::default();
        let first = [add("a", 0), add("b", 1)];
        apply(&mut h, &first, &[]);
        let next = [add("a", 2)];
        let plan = h.plan(&next, bounds(25));
        assert_eq!(plan, [("b".to_string(), 1)]);
        apply(&mut h, &next, &plan);
        assert_eq!(h.devices(), 1);
    }

    #[test]
    fn the_entry_bound_counts_like_the_byte_bound() {
        let mut h = HistoryIndex::default();
        let first: Vec<Added> = (0..20).map(|s| add(&format!("d{s}"), s)).collect();
        apply(&mut h, &first, &[]);
        let b = Bounds {
            bytes: 1 << 20,
            entries: 16,
            per_device: 3,
        };
        let next = [add("new", 20)];
        let plan = h.plan(&next, b);
        // 21 entries, down to 15: the six least recent devices go.
        assert_eq!(plan.len(), 6);
        assert_eq!(plan[0], ("d0".to_string(), 0));
        apply(&mut h, &next, &plan);
        assert_eq!(h.entries(), 15);
    }
}
