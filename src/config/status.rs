//! `[status]`: the relay of the devices' update status (SPEC 5), and the bounds it is checked against.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, path, ByteSize, Config, ConfigError, Span};

/// `status.max_report` bounds: below 1 KiB an ordinary report's `resultDetails` would not fit; above
/// 16 MiB a report would not fit twice in the largest request the relay reads (32 MiB).
const MIN_REPORT: u64 = 1 << 10;
const MAX_REPORT: u64 = 16 << 20;
/// Bytes of one dedup record as the relay counts them against `status.max_store` (its sequence
/// number with the 128-bit pair hash, and again with the report's 128-bit digest;
/// `relay::budget::DEDUP_RECORD`).
const DEDUP_RECORD: u64 = 48;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Status {
    pub forward_to: String,
    pub forward_token: String,
    #[serde(with = "path")]
    pub forward_token_file: Option<PathBuf>,
    pub batch_size: usize,
    pub max_queue: ByteSize,
    /// Everything the relay keeps (queue, history, dedup records, set-aside reports); 507 beyond.
    pub max_store: ByteSize,
    /// One report; a larger one is refused with 413 (and bounds a request's body, see `relay`).
    pub max_report: ByteSize,
    pub history_per_device: usize,
    pub max_backoff: Span,
    pub dedup_entries: usize,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            forward_to: String::new(),
            forward_token: String::new(),
            forward_token_file: None,
            batch_size: 500,
            max_queue: ByteSize(1 << 30),
            max_store: ByteSize(2 << 30),
            max_report: ByteSize(64 << 10),
            history_per_device: 100,
            max_backoff: Span::secs(60),
            dedup_entries: 1_000_000,
        }
    }
}

impl Config {
    /// `status.max_report` within what one request may carry, and `status.max_store` with room beyond
    /// the dedup records, which are bounded by count (`dedup_entries`), not dropped to make room.
    pub(super) fn validate_status_bounds(&self) -> Result<(), ConfigError> {
        let s = &self.status;
        let report = s.max_report.0;
        if !(MIN_REPORT..=MAX_REPORT).contains(&report) {
            return Err(invalid(
                "status.max_report",
                format!("{report} is not between {MIN_REPORT} (1KiB) and {MAX_REPORT} (16MiB)"),
            ));
        }
        let dedup = (s.dedup_entries as u64).saturating_mul(DEDUP_RECORD);
        let least = dedup
            .saturating_mul(2)
            .saturating_add(report.saturating_mul(2));
        if s.max_store.0 < least {
            return Err(invalid(
                "status.max_store",
                format!(
                    "{} leaves no room for reports: the dedup records may take {dedup} bytes \
                     (status.dedup_entries x {DEDUP_RECORD}); at least {least}",
                    s.max_store.0
                ),
            ));
        }
        Ok(())
    }
}
