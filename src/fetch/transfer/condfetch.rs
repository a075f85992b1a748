//! A revalidation's answer (Varnish's condfetch): a 304 that selects the stored response refreshes
//! it (RFC 9111 §3.2, §4.3.4); a 304 naming another validator is no answer, and the object is asked
//! for again unconditionally; an unreachable or failing upstream leaves the stored copy to be served
//! stale where it allows (RFC 9111 §4.2.4).

use crate::fetch::uplink::Metered;
use http::{HeaderMap, Response, StatusCode};

use super::super::flight::End;
use super::super::{freshness, headers, FetchError};
use super::Transfer;
use crate::store::{now_ms, KeyEntry};

impl Transfer {
    /// The upstream's answer to the fill, or how the transfer ends without one: a revalidation's 304
    /// (the stored response is fresh again), or its failure (the stored copy may be served stale). A 304
    /// that does not select the stored response (another ETag: RFC 9111 §4.3.4) updates nothing, and the
    /// object is asked for again, unconditionally: what is stored is not what the upstream now serves.
    pub(super) async fn answer(
        &self,
        headers: &mut HeaderMap,
        request_ms: &mut u64,
    ) -> Result<Response<Metered>, End> {
        let mut conditional = self.stale.is_some();
        // At most twice: the second request is unconditional, so its 304 is not taken as one.
        for _ in 0..2 {
            *request_ms = now_ms();
            let resp = self.upstream(headers).await;
            let Some(stale) = &self.stale else {
                return resp.map_err(End::Failed);
            };
            match resp {
                Ok(r) if r.status() == StatusCode::NOT_MODIFIED && conditional => {
                    let m = &stale.meta;
                    let (etag, lm) = (m.etag.as_deref(), m.last_modified.as_deref());
                    if headers::selects(etag, lm, r.headers()) {
                        return Err(self.revalidated(stale, r.headers(), *request_ms).await);
                    }
                    tracing::warn!(
                        stored = ?etag,
                        got = ?r.headers().get(http::header::ETAG),
                        "a 304 names another validator than the stored response's; fetching again"
                    );
                    headers.remove(http::header::IF_NONE_MATCH);
                    headers.remove(http::header::IF_MODIFIED_SINCE);
                    conditional = false;
                }
                Ok(r) if r.status().is_server_error() => {
                    tracing::warn!(status = %r.status(), "revalidation failed");
                    let why = format!("upstream answered {}", r.status());
                    return Err(End::ServeStale(stale.digest, why));
                }
                Err(
                    e @ (FetchError::Unreachable(_)
                    | FetchError::Timeout(_)
                    | FetchError::BadResponse(_)),
                ) => {
                    tracing::warn!(error = %e, "revalidation failed");
                    return Err(End::ServeStale(stale.digest, e.to_string()));
                }
                other => return other.map_err(End::Failed),
            }
        }
        Err(End::Failed(FetchError::Internal(
            "no answer after an unconditional request".into(),
        )))
    }

    /// A 304 to a revalidation: the stored header block takes the 304's fields and the key its new
    /// freshness (RFC 9111 §3.2, §4.3.4).
    async fn revalidated(&self, stale: &KeyEntry, h: &HeaderMap, request_ms: u64) -> End {
        let merged = headers::to_map(&headers::updated_by(&stale.meta.headers, h));
        let mut meta = freshness::key_meta(freshness::Received {
            status: StatusCode::from_u16(stale.meta.status).unwrap_or(StatusCode::OK),
            headers: &merged,
            immutable: self.target.immutable,
            request_ms,
            response_ms: now_ms(),
            vary: stale.meta.vary.clone(),
        });
        meta.initial_age = freshness::initial_age(h, request_ms, meta.fetched_at);
        meta.etag = meta.etag.or(stale.meta.etag.clone());
        meta.last_modified = meta.last_modified.or(stale.meta.last_modified.clone());
        let store = self.fetcher.store().clone();
        let keys = self.fetcher.keys_for(&self.target.key, &meta.vary);
        let d = stale.digest;
        // The key records are appended and synced to disk: off the runtime's worker threads.
        let refreshed = tokio::task::spawn_blocking(move || {
            for key in keys {
                if store.lookup(&key).is_some_and(|e| e.digest == d) {
                    let _ = store.refresh_key(&key, meta.clone());
                }
            }
        });
        if let Err(e) = refreshed.await {
            tracing::error!(error = %e, "recording a revalidation failed");
        }
        End::Revalidated(d)
    }
}
