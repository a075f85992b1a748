//! What the relay accepts and keeps, in bytes (SPEC 5, `[status]`): one report (`status.max_report`),
//! one request body, one forwarded batch, and the status store as a whole (`status.max_store`), with
//! the share of it that the per-device history may take.
//!
//! The sizes are chosen so that a chain of nodes with the same settings never wedges on size: a node
//! accepts a request of at least `MIN_REQUEST` and forwards batches of at most `FORWARD_BATCH`
//! (= `MIN_REQUEST`), and a single report always fits in a request (its bound is at least twice
//! `max_report`), so a next hop like this node takes every batch it is sent.

use serde_json::{Map, Value};

use super::report::Report;
use super::RelayError;

/// The smallest request body bound: also what nginx accepts by default (`client_max_body_size 1m`),
/// a common front of a `forward_to` endpoint.
pub const MIN_REQUEST: usize = 1 << 20;
/// The largest request body bound: a post is read whole into memory before it is parsed.
pub const MAX_REQUEST: usize = 32 << 20;
/// Body bytes of one forwarded batch at most (past its first report, which always goes): what every
/// cistern accepts, whatever its `batch_size` and `max_report`.
pub const FORWARD_BATCH: usize = MIN_REQUEST;
/// Bytes of one dedup record: its sequence number and the 128-bit pair hash, and the same sequence
/// number with the report's 128-bit digest (`dedup`). `config` checks `max_store` against the same
/// figure.
pub const DEDUP_RECORD: u64 = 48;
/// Bytes of a queue or set-aside key (the sequence number), counted with each entry.
pub const SEQ: u64 = 8;

/// The bound on one `POST /v1/status` body: room for a full batch of the largest reports, at least
/// `MIN_REQUEST` and at most `MAX_REQUEST`, and always twice `max_report` so that one report fits
/// with the fields each hop adds (`via`, `receivedAt`).
pub fn max_request(batch_size: usize, max_report: u64) -> usize {
    let full = (batch_size as u64).saturating_mul(max_report);
    let bound = full.clamp(MIN_REQUEST as u64, MAX_REQUEST as u64);
    bound.max(max_report.saturating_mul(2)) as usize
}

/// The history's own bound within `max_store`: half of it. The queue and set-aside reports cannot be
/// dropped to make room, the history can, so it is the history that yields; half keeps a read-back
/// of the subtree even while an outage fills the queue.
pub fn history_bytes(max_store: u64) -> u64 {
    max_store / 2
}

/// A report's size as checked against `max_report`: its JSON without the fields the relay itself
/// adds (`via`, `receivedAt`), so that every hop of a chain measures the same report alike.
pub fn report_size(json: &mut Map<String, Value>) -> u64 {
    let via = json.remove("via");
    let at = json.remove("receivedAt");
    let mut n = Counter(0);
    let _ = serde_json::to_writer(&mut n, &*json);
    if let Some(v) = via {
        json.insert("via".into(), v);
    }
    if let Some(v) = at {
        json.insert("receivedAt".into(), v);
    }
    n.0
}

/// Refuses a request holding a report over `max`, naming the first such report.
pub fn check_reports(reports: &mut [Report], max: u64) -> Result<(), RelayError> {
    for (index, r) in reports.iter_mut().enumerate() {
        let bytes = report_size(&mut r.json);
        if bytes > max {
            return Err(RelayError::ReportTooLarge { index, bytes, max });
        }
    }
    Ok(())
}

/// Counts bytes written, to measure a serialisation without keeping it.
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_holds_a_batch_within_bounds() {
        assert_eq!(max_request(500, 64 << 10), 500 * 65536);
        assert_eq!(max_request(1000, 64 << 10), 32 << 20);
        assert_eq!(max_request(10, 1 << 10), 1 << 20);
        assert_eq!(max_request(5000, 16 << 20), 32 << 20);
        assert_eq!(max_request(1, 16 << 20), 32 << 20);
        assert_eq!(max_request(1, 4 << 20), 8 << 20);
    }

    #[test]
    fn the_relays_own_fields_do_not_count() {
        let v = serde_json::json!({"deviceId": "d", "reportId": "r", "state": "Idle"});
        let Value::Object(mut m) = v else {
            unreachable!()
        };
        let bare = report_size(&mut m);
        assert_eq!(bare, serde_json::to_vec(&m).unwrap().len() as u64);
        m.insert("via".into(), serde_json::json!(["leaf", "mid"]));
        m.insert("receivedAt".into(), "2026-01-01T00:00:00Z".into());
        assert_eq!(report_size(&mut m), bare);
        assert!(m.contains_key("via") && m.contains_key("receivedAt"));
    }
}
