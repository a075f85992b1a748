//! One upstream transfer, run as its own task so that no client's departure stops it: request (or
//! revalidate), hash and write the bytes as they arrive, resume a broken body with Range + If-Range, and
//! at the end verify and commit, or give up leaving nothing stored (SPEC 4).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::Digest as _;
use tokio::sync::OwnedSemaphorePermit;

use super::collapse::Permit;
use super::flight::{End, Flight, Head};
use super::framing::{content_length, strong_date};
use super::sink::Sink;
use super::{freshness, headers, FetchError, Fetcher, Target};
use crate::store::{now_ms, Digest, KeyEntry, KeyMeta, StoreError};
use body::{BodyEnd, Resumed};
use restart::{FromPartial, Prior};

/// Most of an upstream error body kept to pass on to clients.
const ERROR_BODY_MAX: usize = 64 << 10;

/// The upstream response whose bytes the fill is taking: the first, or the one a restart began
/// (SPEC 4: after a restart, the new response's validators and header block are what is stored).
pub(super) struct Answered {
    pub h: HeaderMap,
    pub head: Head,
    pub request_ms: u64,
    pub response_ms: u64,
}

impl Answered {
    /// The validator that may guard a resume (RFC 9110 §13.1.5): a strong ETag, else a strong
    /// Last-Modified date.
    fn validator(&self) -> Option<String> {
        let etag = self.head.etag.as_deref().filter(|e| !e.starts_with("W/"));
        let lm = self.head.last_modified.as_deref();
        etag.or(lm.filter(|lm| strong_date(lm, &self.h)))
            .map(str::to_string)
    }
}

pub(super) struct Transfer {
    pub fetcher: Fetcher,
    pub flight: Arc<Flight>,
    pub target: Target,
    /// The stored entry being revalidated, if this transfer is a revalidation.
    pub stale: Option<KeyEntry>,
    /// Its place in the one-fetch-per-object table, given up when it ends.
    pub permit: Arc<Permit>,
}

impl Transfer {
    pub async fn run(self) {
        let span = tracing::info_span!("transfer", key = %self.target.key);
        let flight = self.flight.clone();
        let permit = self.permit.clone();
        let fetcher = self.fetcher.clone();
        let end = match self.slot().await {
            Ok(_slot) => tracing::Instrument::instrument(self.transfer(), span).await,
            Err(end) => end,
        };
        if let End::Failed(e) = &end {
            fetcher.count_error(e);
        }
        flight.finish(end);
        drop(permit);
    }

    /// One of `upstream.max_transfers` slots, held for the whole transfer. A miss waits for one up to
    /// the connect timeout (then its clients get 503); a revalidation of a copy that may be served stale
    /// does not wait: that copy is served at once, as when the upstream is unreachable (SPEC 2: only a
    /// miss waits; RFC 9111 §4.2.4).
    async fn slot(&self) -> Result<OwnedSemaphorePermit, End> {
        let (cfg, slots) = (self.fetcher.config(), self.fetcher.slots());
        let busy = FetchError::Busy(cfg.max_transfers);
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let servable = |e: &&KeyEntry| freshness::stale_on_error(&e.meta, now_ms());
        if let Some(stale) = self.stale.as_ref().filter(servable) {
            tracing::info!("every upstream slot is taken; serving the stale copy");
            return Err(End::ServeStale(stale.digest, busy.to_string()));
        }
        let wait = cfg.connect_timeout;
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(End::Failed(busy)),
        }
    }

    async fn transfer(self) -> End {
        let started = std::time::Instant::now();
        let mut headers = self.fetcher.fill_headers(&self.target);
        if let Some(stale) = &self.stale {
            let validators = [
                (http::header::IF_NONE_MATCH, stale.meta.etag.as_deref()),
                (
                    http::header::IF_MODIFIED_SINCE,
                    stale.meta.last_modified.as_deref(),
                ),
            ];
            for (name, v) in validators {
                if let Some(v) = v.and_then(|v| HeaderValue::from_str(v).ok()) {
                    headers.insert(name, v);
                }
            }
            self.fetcher
                .stats()
                .revalidations
                .fetch_add(1, Ordering::Relaxed);
        }
        let mut request_ms = now_ms();
        let resp = match self.resume_partial(&headers).await {
            FromPartial::Resumed(prior) => return self.fill(headers, *prior, request_ms).await,
            FromPartial::Fresh(r) => r,
            FromPartial::None => match self.answer(&mut headers, &mut request_ms).await {
                Ok(r) => r,
                Err(end) => return end,
            },
        };
        let status = resp.status();
        // Besides 200s, a cacheable status is kept only when it can serve again: it has freshness or
        // a validator (an origin's bare 404 page is passed on, not stored: SPEC 4).
        let h = resp.headers();
        let reusable = freshness::lifetime(status, h) > 0
            || h.contains_key(http::header::ETAG)
            || h.contains_key(http::header::LAST_MODIFIED);
        let cacheable = status == StatusCode::OK
            || (freshness::storable(status, h, false)
                && status != StatusCode::PARTIAL_CONTENT
                && reusable);
        if !cacheable {
            return End::Failed(error_status(resp).await);
        }
        let end = self.fill(headers, Prior::fresh(resp), request_ms).await;
        let secs = started.elapsed().as_secs_f64();
        match &end {
            End::Complete(d) => tracing::info!(digest = %d, secs, "transfer complete"),
            End::Failed(e) => tracing::warn!(error = %e, secs, "transfer failed"),
            _ => {}
        }
        end
    }

    /// The upstream's answer to the fill, or how the transfer ends without one: a revalidation's 304
    /// (the stored response is fresh again), or its failure (the stored copy may be served stale). A 304
    /// that does not select the stored response (another ETag: RFC 9111 §4.3.4) updates nothing, and the
    /// object is asked for again, unconditionally: what is stored is not what the upstream now serves.
    async fn answer(
        &self,
        headers: &mut HeaderMap,
        request_ms: &mut u64,
    ) -> Result<Response<Incoming>, End> {
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

    /// Asks upstream (the parents, or the origin) for the target.
    async fn upstream(&self, headers: &HeaderMap) -> Result<Response<Incoming>, FetchError> {
        let client = &self.fetcher.client();
        client
            .fetch(
                Method::GET,
                self.target.url.as_ref(),
                self.target.digest,
                headers,
            )
            .await
    }

    /// What the response's head says: how it is framed, whether it is stored, and for whom.
    fn head_of(&self, status: StatusCode, h: &HeaderMap, storing: bool) -> Head {
        let s = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let ds = freshness::response_directives(h);
        let now = now_ms();
        Head {
            status,
            size: content_length(h),
            content_type: s(http::header::CONTENT_TYPE),
            digest: self.target.digest.or_else(|| Digest::from_headers(h)),
            etag: s(http::header::ETAG),
            last_modified: s(http::header::LAST_MODIFIED),
            headers: headers::capture(h),
            storing,
            fresh: self.target.immutable
                || freshness::lifetime(status, h) > freshness::initial_age(h, now_ms(), now_ms()),
            private: ds.iter().any(|(k, _)| k == "private"),
            vary: freshness::vary_of(h, &self.target.headers),
            upstream_cache_status: s(http::header::HeaderName::from_static("cache-status")),
            age: (h.contains_key(http::header::AGE) || h.contains_key(http::header::DATE))
                .then(|| freshness::initial_age(h, now, now)),
            age_at: now,
        }
    }

    /// Whether the response is to be stored: cacheable, Vary usable, a digest when one is required, and
    /// a request that allows storing. A content coding does not matter: the bytes are stored as they
    /// came, with their Content-Encoding, and a digest is of those bytes (RFC 9530 Repr-Digest; SPEC 4).
    fn storable(&self, status: StatusCode, h: &HeaderMap) -> bool {
        let digest = self.target.digest.or_else(|| Digest::from_headers(h));
        !self.target.no_store
            && freshness::storable(status, h, self.target.authorized())
            && freshness::vary_of(h, &self.target.headers).is_some()
            && !(self.fetcher.config().require_digest && digest.is_none())
    }

    async fn fill(&self, headers: HeaderMap, start: Prior, request_ms: u64) -> End {
        let store = self.fetcher.store();
        let (h, status, held) = (start.headers, start.status, start.held);
        let size = content_length(&h);
        let mut fill = if start.fill.is_some() {
            start.fill
        } else if self.storable(status, &h) {
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.begin_fill(size)).await {
                Ok(Ok(f)) => Some(f),
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "not storing; streaming through");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let head = self.head_of(status, &h, fill.is_some());
        if held == 0 {
            fill = self.keep_partial(fill, &head, &h).await;
        }
        let map = match (fill.as_mut(), size) {
            (Some(f), Some(n)) => f.map(n),
            _ => None,
        };
        if let Some(vary) = head.vary.as_ref().filter(|_| head.storing) {
            // Before the head is published: a client that finds it is not for it asks again.
            self.permit.varies(vary);
        }
        self.flight
            .set_head(head.clone(), fill.as_ref().map(|f| f.file()), map);
        self.flight.held(held, start.rate);
        if fill.is_none() {
            self.fetcher.record_unstored(&self.target.key);
        }
        let sink = Sink {
            hasher: Some(start.hasher),
            fill,
            written: held,
        };
        let answered = Answered {
            h,
            head,
            request_ms,
            response_ms: now_ms(),
        };
        self.body(headers, start.body, sink, answered).await
    }

    /// Reads the body to its end, resuming it when it breaks, then verifies and stores it.
    async fn body(
        &self,
        mut headers: HeaderMap,
        mut body: Incoming,
        mut sink: Sink,
        mut now: Answered,
    ) -> End {
        let (status, size) = (now.head.status, now.head.size);
        let mut attempts = 0u32;
        // Bytes of a restarted transfer still to be compared with those already held.
        let mut compare_until = 0u64;
        loop {
            // A body is complete only when its framing says so: hyper ends a Content-Length body at its
            // length and a chunked one at its last chunk, and reports either cut short as an error; a
            // close-delimited body ends at a clean close. Anything else is broken, and a broken body
            // is never read again: it is resumed from a new response, or the transfer fails.
            let msg = match self.pump(&mut body, &mut sink, &mut compare_until).await {
                BodyEnd::NoReaders => {
                    return End::Failed(FetchError::Internal(
                        "every client left a pass-through transfer".into(),
                    ))
                }
                BodyEnd::Complete if size.is_none_or(|s| s == sink.written) => break,
                BodyEnd::Complete => format!(
                    "body ended at {} of {} bytes",
                    sink.written,
                    size.unwrap_or(0)
                ),
                BodyEnd::Broken(msg) => msg,
            };
            if status != StatusCode::OK {
                return End::Failed(FetchError::Unreachable(format!(
                    "the {status} body broke: {msg}"
                )));
            }
            let v = now.validator();
            let resumed = self
                .resume(&mut headers, &mut attempts, &msg, v.as_deref(), &sink, size)
                .await;
            match resumed {
                Err(e) => return End::Failed(e),
                Ok(Resumed::Continue(b)) => body = b,
                Ok(Resumed::Restart(resp, request_ms)) => {
                    body = self.restart(resp, request_ms, &mut sink, &mut compare_until, &mut now);
                }
            }
        }
        self.finish(sink, &now).await
    }

    /// The body is whole: verify it, release the last byte, store it.
    async fn finish(&self, mut sink: Sink, now: &Answered) -> End {
        let fetcher = &self.fetcher;
        let (head, digest) = (&now.head, now.head.digest);
        let Some(hasher) = sink.hasher.take() else {
            return End::Failed(FetchError::Internal("hasher lost".into()));
        };
        let got = Digest(hasher.finalize().into());
        if let Some(want) = digest {
            if want != got {
                fetcher.record_mismatch(&self.target);
                tracing::error!(expected = %want, got = %got, "digest mismatch; nothing stored");
                return End::Failed(FetchError::DigestMismatch(format!(
                    "expected sha256 {want}, upstream sent {got}"
                )));
            }
        }
        let meta: KeyMeta = freshness::key_meta(freshness::Received {
            status: head.status,
            headers: &now.h,
            immutable: self.target.immutable || self.target.digest.is_some(),
            request_ms: now.request_ms,
            response_ms: now.response_ms,
            vary: head.vary.clone().unwrap_or_default(),
        });
        // The bytes are whole and verified: clients get their last bytes now; new clients keep joining
        // this flight (as hits, when its freshness allows) until the object is stored.
        let Some(fill) = sink.fill.take() else {
            self.flight.verified(got, None);
            return End::Complete(got);
        };
        self.flight.verified(got, Some(meta.clone()));
        // A fill doomed by an unsafe method on its URL stores its bytes but maps no key (the flight
        // was verified above, so an invalidation from now on waits for this commit to end).
        let keys = if self.target.key.starts_with("sha256/") || self.flight.doomed() {
            Vec::new()
        } else {
            fetcher.keys_for(&self.target.key, &meta.vary)
        };
        let ct = head.content_type.clone();
        let store = fetcher.store().clone();
        let r = tokio::task::spawn_blocking(move || {
            let first = keys.first().map(|k| (k.as_str(), meta.clone()));
            fill.commit(&got, first, ct, false)?;
            for k in keys.iter().skip(1) {
                store.map_key(k, &got, meta.clone())?;
            }
            Ok::<_, StoreError>(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "commit failed; object not stored"),
            Err(e) => tracing::error!(error = %e, "commit task failed"),
        }
        End::Complete(got)
    }
}

async fn error_status(resp: Response<Incoming>) -> FetchError {
    let status = resp.status();
    let headers = Box::new(headers::end_to_end(resp.headers()));
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let limited = http_body_util::Limited::new(resp.into_body(), ERROR_BODY_MAX);
    let body =
        match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
    FetchError::Status {
        status,
        content_type,
        headers,
        body,
    }
}

mod body;
mod restart;
