//! What parents and peers alike are judged by: the outcome of sending to a hop, how long one that
//! failed is skipped, and the clock that is read for it (a test moves it on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

/// How long a parent that failed to connect, timed out or answered 503 is skipped.
pub const SKIP_FOR: Duration = Duration::from_secs(30);

/// What came of sending to a hop.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It answered with this status.
    Answered(StatusCode),
    /// It could not be connected to, timed out, or answered with something that is not HTTP.
    Failed(String),
}

/// Where the director reads the time (a test moves it on).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;
