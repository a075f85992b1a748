//! The status relay (SPEC 5): device reports accepted durably, deduplicated per (deviceId, reportId),
//! kept as per-device history and latest state for this node's subtree, and forwarded upward in order,
//! in batches, for as long as the outage lasts and across restarts.
//!
//! Everything lives in one sled tree under prefixes, so that one accepted request is one atomic batch:
//! `q`+seq -> report to forward, `o`+seq -> 128-bit hash of (deviceId, reportId) (the dedup record,
//! oldest first), `h`+device\0+seq -> history (the last entry is the device's latest state), `mseq` ->
//! next sequence number. The dedup set is held in memory and rebuilt from the `o` entries at start. The relay reads the parents'
//! health that `fetch` exposes and calls nothing else of cistern's.

mod forward;
pub mod report;
mod view;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub use forward::{client as forward_client, NextHop, ParentHealth};
pub use report::BadReport;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Bad(#[from] BadReport),
    #[error("the status queue is full ({0} bytes undelivered, status.max_queue)")]
    Full(u64),
    #[error("status queue: {0}")]
    Db(#[from] sled::Error),
}

/// Relay settings, from `[status]` and `[node]`.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub node_id: String,
    pub batch_size: usize,
    pub max_queue: u64,
    pub history_per_device: usize,
    pub max_backoff: std::time::Duration,
    pub dedup_entries: usize,
}

/// Counters ops reads.
#[derive(Default)]
pub struct RelayStats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub forwarded: AtomicU64,
    pub errors: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    cfg: RelayConfig,
    /// Where reports go; None: this node keeps them for its own read-back only.
    next_hop: Option<NextHop>,
    /// Serialises accepts: the dedup check and the batch that records it are one step.
    write: tokio::sync::Mutex<()>,
    mem: Mutex<Mem>,
    wake: tokio::sync::Notify,
    stats: RelayStats,
}

#[derive(Default)]
struct Mem {
    next_seq: u64,
    queue_bytes: u64,
    queue_len: u64,
    /// (deviceId, reportId) pairs accepted, as 128-bit hashes; bounded by `dedup_entries`.
    dedup: std::collections::HashSet<u128>,
    /// History seqs per device, oldest first, to trim to `history_per_device`.
    history: HashMap<String, VecDeque<u64>>,
}

/// A 128-bit hash of (deviceId, reportId): two SipHash runs with different keys. Collisions (which would
/// drop a report as a duplicate) are vanishingly unlikely at the bounded set sizes used here.
fn pair_hash(device: &str, report: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    (0u8, device, report).hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (1u8, device, report).hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn seq_key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn device_seq_key(device: &str, seq: u64) -> Vec<u8> {
    let mut k = key(b'h', &[device.as_bytes()]);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Relay {
    /// Opens (or creates) the relay's database under `dir`. Blocking.
    pub fn open(
        dir: &Path,
        cfg: RelayConfig,
        next_hop: Option<NextHop>,
    ) -> Result<Relay, RelayError> {
        let db = sled::Config::new().path(dir).open()?;
        let tree = db.open_tree("status")?;
        let mut mem = Mem::default();
        if let Some(v) = tree.get(b"mseq")? {
            mem.next_seq = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
        }
        for r in tree.scan_prefix(b"q") {
            let (_, v) = r?;
            mem.queue_bytes += v.len() as u64;
            mem.queue_len += 1;
        }
        for r in tree.scan_prefix(b"o") {
            let (_, v) = r?;
            if let Ok(b) = <[u8; 16]>::try_from(v.as_ref()) {
                mem.dedup.insert(u128::from_be_bytes(b));
            }
        }
        for r in tree.scan_prefix(b"h") {
            let (k, _) = r?;
            if k.len() < 10 {
                continue;
            }
            let (dev, seq) = k[1..].split_at(k.len() - 1 - 9);
            let seq = u64::from_be_bytes(seq[1..].try_into().unwrap_or([0; 8]));
            mem.history
                .entry(String::from_utf8_lossy(dev).to_string())
                .or_default()
                .push_back(seq);
        }
        tracing::info!(
            queued = mem.queue_len,
            devices = mem.history.len(),
            "status relay opened"
        );
        Ok(Relay {
            inner: Arc::new(Inner {
                db,
                tree,
                cfg,
                next_hop,
                write: tokio::sync::Mutex::new(()),
                mem: Mutex::new(mem),
                wake: tokio::sync::Notify::new(),
                stats: RelayStats::default(),
            }),
        })
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &RelayStats {
        &self.inner.stats
    }

    pub fn queue_depth(&self) -> u64 {
        self.mem().queue_len
    }

    /// Accepts a `POST /v1/status` body; returns (accepted, duplicates) once durably written.
    pub async fn accept(&self, body: &[u8]) -> Result<(usize, usize), RelayError> {
        let reports = report::parse_body(body)?;
        let forwarding = self.inner.next_hop.is_some();
        let (accepted, duplicates) = {
            let _w = self.inner.write.lock().await;
            let tree = &self.inner.tree;
            let mut batch = sled::Batch::default();
            let mut mem = self.mem();
            let mut seen = std::collections::HashSet::new();
            let mut fresh = Vec::new();
            let mut dups = 0usize;
            for r in reports {
                let h = pair_hash(&r.device_id, &r.report_id);
                if mem.dedup.contains(&h) || !seen.insert(h) {
                    dups += 1;
                    continue;
                }
                fresh.push((h, r));
            }
            let mut seq = mem.next_seq;
            let mut added_bytes = 0u64;
            let mut queued = Vec::new();
            let now = chrono_now();
            for (h, r) in fresh.iter_mut() {
                r.json
                    .entry("receivedAt")
                    .or_insert(Value::String(now.clone()));
                let stored = serde_json::to_vec(&r.json).unwrap_or_default();
                if forwarding {
                    if let Some(Value::Array(via)) = r.json.get_mut("via") {
                        via.push(Value::String(self.inner.cfg.node_id.clone()));
                    }
                    let fwd = serde_json::to_vec(&r.json).unwrap_or_default();
                    added_bytes += fwd.len() as u64;
                    queued.push((seq_key(b'q', seq), fwd));
                }
                batch.insert(seq_key(b'o', seq), &h.to_be_bytes());
                batch.insert(device_seq_key(&r.device_id, seq), stored);
                seq += 1;
            }
            if forwarding && mem.queue_bytes + added_bytes > self.inner.cfg.max_queue {
                return Err(RelayError::Full(mem.queue_bytes));
            }
            for (k, v) in &queued {
                batch.insert(k.clone(), v.clone());
            }
            // History per device, oldest first out.
            let first_seq = mem.next_seq;
            for (i, (_, r)) in fresh.iter().enumerate() {
                let h = mem.history.entry(r.device_id.clone()).or_default();
                h.push_back(first_seq + i as u64);
                while h.len() > self.inner.cfg.history_per_device.max(1) {
                    if let Some(old) = h.pop_front() {
                        batch.remove(device_seq_key(&r.device_id, old));
                    }
                }
            }
            // Dedup memory is bounded: the oldest pairs are forgotten first.
            let total = mem.dedup.len() + fresh.len();
            let excess = total.saturating_sub(self.inner.cfg.dedup_entries);
            let mut forgotten = Vec::new();
            if excess > 0 {
                for r in tree.scan_prefix(b"o").take(excess) {
                    let (k, v) = r?;
                    batch.remove(k);
                    if let Ok(b) = <[u8; 16]>::try_from(v.as_ref()) {
                        forgotten.push(u128::from_be_bytes(b));
                    }
                }
            }
            batch.insert(b"mseq".to_vec(), &seq.to_be_bytes());
            tree.apply_batch(batch)?;
            mem.next_seq = seq;
            mem.queue_bytes += added_bytes;
            mem.queue_len += queued.len() as u64;
            for h in forgotten {
                mem.dedup.remove(&h);
            }
            mem.dedup.extend(fresh.iter().map(|(h, _)| *h));
            (fresh.len(), dups)
        };
        // Durable before the answer (group commit: concurrent requests share flushes).
        self.inner.db.flush_async().await?;
        self.inner
            .stats
            .accepted
            .fetch_add(accepted as u64, Ordering::Relaxed);
        self.inner
            .stats
            .duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        if accepted > 0 && forwarding {
            self.inner.wake.notify_one();
        }
        Ok((accepted, duplicates))
    }

    /// Flushes the queue to disk (at shutdown).
    pub async fn flush(&self) {
        let _ = self.inner.db.flush_async().await;
    }
}

fn chrono_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
