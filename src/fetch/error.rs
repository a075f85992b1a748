//! Why an object could not be had, as fetch tells its callers.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// Why an object could not be had. Cloned to every client of a failed transfer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("origin {0} is not in upstream.allowed_origins")]
    NotAllowed(String),
    #[error("{0} resolves to an address cistern may not connect to")]
    AddressRefused(String),
    #[error("redirect refused: {0}")]
    RedirectNotAllowed(String),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream's TLS handshake failed: its certificate does not verify against the system roots
    /// and `upstream.ca_file`, or it spoke no acceptable TLS. Never retried without verification.
    #[error("upstream TLS failed: {0}")]
    UpstreamTls(String),
    #[error("upstream sent a response that cannot be read: {0}")]
    BadResponse(String),
    #[error("upstream {0} did not answer in time")]
    Timeout(String),
    #[error("upstream answered {status}")]
    Status {
        status: StatusCode,
        content_type: Option<String>,
        /// The upstream's end-to-end fields, passed on with its answer.
        headers: Box<HeaderMap>,
        body: Bytes,
    },
    #[error("payload digest mismatch: {0}")]
    DigestMismatch(String),
    #[error("the upstream transfer changed content mid-way")]
    Diverged,
    #[error("{0}")]
    NotFound(String),
    #[error(
        "the object is not stored and the request asked for cached content only (only-if-cached)"
    )]
    NotCached,
    #[error("{0} upstream transfers are running (upstream.max_transfers); try again shortly")]
    Busy(usize),
    #[error("internal error: {0}")]
    Internal(String),
}
