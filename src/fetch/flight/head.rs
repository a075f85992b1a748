//! The head of a flight: what the upstream said about the object, shared by every client of it.

use crate::store::{Digest, StoredHeaders};

/// What the upstream said about the object, known once its response headers arrived.
#[derive(Clone, Debug)]
pub struct Head {
    /// The upstream's status (200, or another cacheable one).
    pub status: http::StatusCode,
    /// Object length, when the upstream announced it.
    pub size: Option<u64>,
    pub content_type: Option<String>,
    /// The digest the bytes must have, when known before they arrive.
    pub digest: Option<Digest>,
    /// The upstream's ETag and Last-Modified, passed to clients.
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The upstream's end-to-end fields, as they are stored and passed to clients.
    pub headers: StoredHeaders,
    /// Whether the object will be stored (false: streamed through only).
    pub storing: bool,
    /// Whether the response may serve later requests without revalidation (it has freshness left).
    pub fresh: bool,
    /// `Cache-Control: private`: never shared with another client, not even a collapsed one.
    pub private: bool,
    /// The request fields the response varies on, with the first client's values; None for `Vary: *`.
    pub vary: Option<Vec<(String, Option<String>)>>,
    /// Cache-Status members of upstream caches (a parent cistern), kept before ours.
    pub upstream_cache_status: Option<String>,
    /// The response's age when it arrived (RFC 9111 §4.2.3), when the upstream said anything of it.
    pub age: Option<u64>,
    /// When (ms since the epoch) `age` was the response's age: a client answered later adds the time
    /// since (its resident time, RFC 9111 §4.2.3).
    pub age_at: u64,
}

impl Default for Head {
    fn default() -> Head {
        Head {
            status: http::StatusCode::OK,
            size: None,
            content_type: None,
            digest: None,
            etag: None,
            last_modified: None,
            headers: StoredHeaders::default(),
            storing: false,
            fresh: true,
            private: false,
            vary: Some(Vec::new()),
            upstream_cache_status: None,
            age: None,
            age_at: 0,
        }
    }
}

impl Head {
    /// Whether this response may be given to a client whose request has fields `req`.
    /// The response's age now, for a client answered at `now_ms`.
    pub fn age_now(&self, now_ms: u64) -> Option<u64> {
        let resident = now_ms.saturating_sub(self.age_at) / 1000;
        self.age.map(|a| a.saturating_add(resident))
    }

    pub fn shareable_with(&self, req: &http::HeaderMap) -> bool {
        !self.private
            && self
                .vary
                .as_ref()
                .is_some_and(|v| crate::fetch::freshness::vary_matches(v, req))
    }
}
