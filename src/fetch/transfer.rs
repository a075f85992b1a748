//! One upstream transfer, run as its own task so that no client's departure stops it: request (or
//! revalidate), hash and write the bytes as they arrive, resume a broken body with Range + If-Range, and
//! at the end verify and commit, or give up leaving nothing stored (SPEC 4).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fetch::uplink::Metered;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::Digest as _;
use tokio::sync::OwnedSemaphorePermit;

use super::collapse::Permit;
use super::flight::{End, Flight, Head};
use super::framing::{content_length, strong_date};
use super::sink::Sink;
use super::upstream::PeerAnswer;
use super::{freshness, headers, FetchError, Fetcher, Target};
use crate::store::{now_ms, Digest, KeyEntry, KeyMeta, Room, StoreError};
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
    /// The last answer came from a peer (SPEC 10): streamed, not stored.
    pub from_peer: AtomicBool,
}

/// The steps of a fill, in the shape of Varnish's `vbf_stp_*` (cache_fetch.c): each step is one
/// method that returns the next, and every way a fill ends is `Done` with its `End`, reached only
/// through `Transfer::steps`. A fill: waits for a slot, asks upstream (resuming a partial kept across a
/// restart, or revalidating), takes the answer (whether to store it, the head published), reads the
/// body, resumes it when it breaks, and verifies and commits it.
enum Step {
    /// Take one of `upstream.max_transfers` slots.
    Slot,
    /// Ask upstream: resume a kept partial, revalidate the stored copy, or request afresh.
    Ask,
    /// Upstream answered with a response to take (`fetch` in Varnish's terms).
    Take(Box<Prior>, u64, HeaderMap),
    /// The body's bytes are arriving.
    Body(Box<Reading>),
    /// The body broke (the reason said): resume it, or fail.
    Resume(Box<Reading>, String),
    /// Every byte arrived: verify, release the last byte to readers, commit.
    Verify(Box<Reading>),
    /// The fill ended.
    Done(End),
}

/// A fill's body phase: what its reading, resuming and verifying steps carry between them.
pub(super) struct Reading {
    /// The request fields sent upstream (a resume adds Range and If-Range to them).
    headers: HeaderMap,
    body: Metered,
    sink: Sink,
    /// The response whose bytes are being taken.
    now: Answered,
    /// Resumes so far.
    attempts: u32,
    /// Bytes of a restarted transfer still to be compared with those already held.
    compare_until: u64,
}

impl Transfer {
    pub async fn run(self) {
        let span = tracing::info_span!("transfer", key = %self.target.key);
        let flight = self.flight.clone();
        let permit = self.permit.clone();
        let fetcher = self.fetcher.clone();
        let end = tracing::Instrument::instrument(self.steps(), span).await;
        if let End::Failed(e) = &end {
            fetcher.count_error(e);
        }
        flight.finish(end);
        drop(permit);
    }

    /// Runs the fill's steps to their end.
    async fn steps(self) -> End {
        let started = std::time::Instant::now();
        // The upstream slot, held from the first request to the end of the fill.
        let mut _slot = None;
        let mut step = Step::Slot;
        loop {
            step = match step {
                Step::Slot => match self.slot().await {
                    Ok(slot) => {
                        _slot = Some(slot);
                        Step::Ask
                    }
                    Err(end) => Step::Done(end),
                },
                Step::Ask => self.ask().await,
                Step::Take(prior, request_ms, headers) => {
                    self.take(headers, *prior, request_ms).await
                }
                Step::Body(r) => self.read(r).await,
                Step::Resume(r, why) => self.resume_body(r, why).await,
                Step::Verify(r) => Step::Done(self.finish(r.sink, &r.now).await),
                Step::Done(end) => {
                    let secs = started.elapsed().as_secs_f64();
                    match &end {
                        End::Complete(d) => tracing::info!(digest = %d, secs, "transfer complete"),
                        End::Failed(e) => tracing::warn!(error = %e, secs, "transfer failed"),
                        _ => {}
                    }
                    return end;
                }
            }
        }
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

    /// The request fields of the fill: the client's end-to-end ones, and the stored copy's validators
    /// when this is a revalidation.
    fn request_headers(&self) -> HeaderMap {
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
        headers
    }

    /// Asks upstream: a partial kept across a restart is resumed; otherwise the request goes out
    /// (conditional for a revalidation). Besides 200s, a cacheable status is taken only when it can
    /// serve again: it has freshness or a validator (an origin's bare 404 page is passed on, not
    /// stored: SPEC 4).
    async fn ask(&self) -> Step {
        let mut headers = self.request_headers();
        let mut request_ms = now_ms();
        let resp = match self.resume_partial(&headers).await {
            FromPartial::Resumed(prior) => return Step::Take(prior, request_ms, headers),
            FromPartial::Fresh(r) => *r,
            FromPartial::None => match self.answer(&mut headers, &mut request_ms).await {
                Ok(r) => r,
                Err(end) => return Step::Done(end),
            },
        };
        let (status, h) = (resp.status(), resp.headers());
        let reusable = freshness::lifetime(status, h) > 0
            || h.contains_key(http::header::ETAG)
            || h.contains_key(http::header::LAST_MODIFIED);
        let cacheable = status == StatusCode::OK
            || (freshness::storable(status, h, false)
                && status != StatusCode::PARTIAL_CONTENT
                && reusable);
        if !cacheable {
            return Step::Done(End::Failed(error_status(resp).await));
        }
        Step::Take(Box::new(Prior::fresh(resp)), request_ms, headers)
    }

    /// Asks upstream (the owner among the site's peers, the parents, or the origin) for the target.
    async fn upstream(&self, headers: &HeaderMap) -> Result<Response<Metered>, FetchError> {
        let client = &self.fetcher.client();
        let r = client
            .fetch_keyed(
                Method::GET,
                self.target.url.as_ref(),
                self.target.digest,
                Some(&self.target.key),
                headers,
            )
            .await;
        if let Ok(r) = &r {
            let peer = r.extensions().get::<PeerAnswer>().is_some();
            self.from_peer.store(peer, Ordering::Relaxed);
        }
        r
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
            digest: self
                .target
                .digest
                .or_else(|| Digest::from_headers(h))
                .or_else(|| super::registry::manifest_digest(h)),
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

    /// Whether the response is to be stored: cacheable, Vary usable, a digest when one is required, a
    /// request that allows storing, and not from a peer (its owner stores it: SPEC 10). A content coding does not matter: the bytes are stored as they
    /// came, with their Content-Encoding, and a digest is of those bytes (RFC 9530 Repr-Digest; SPEC 4).
    fn storable(&self, status: StatusCode, h: &HeaderMap) -> bool {
        let digest = self
            .target
            .digest
            .or_else(|| Digest::from_headers(h))
            .or_else(|| super::registry::manifest_digest(h));
        !self.target.no_store
            && !self.from_peer.load(Ordering::Relaxed)
            && freshness::storable(status, h, self.target.authorized())
            && freshness::vary_of(h, &self.target.headers).is_some()
            && !(self.fetcher.config().require_digest && digest.is_none())
    }

    /// Takes upstream's answer: whether it is stored (a fill begun, or the partial's kept), the head
    /// published to the clients waiting, then on to its body.
    async fn take(&self, headers: HeaderMap, start: Prior, request_ms: u64) -> Step {
        let (h, status, held) = (start.headers, start.status, start.held);
        let size = content_length(&h);
        // Whether the object is stored is known before the head goes out (Cache-Status says it):
        // room is reserved now; the file is made after.
        let room = match start.fill {
            None if self.storable(status, &h) => self
                .fetcher
                .store()
                .reserve_room(size)
                .map_err(|e| tracing::info!(error = %e, "not storing; streaming through"))
                .ok(),
            _ => None,
        };
        let storing = start.fill.is_some() || room.is_some();
        let mut head = self.head_of(status, &h, storing);
        if let Some(vary) = head.vary.as_ref().filter(|_| head.storing) {
            // Before the head is published: a client that finds it is not for it asks again.
            self.permit.varies(vary);
        }
        let mut fill = start.fill;
        if let Some(f) = fill.as_mut() {
            let map = size.and_then(|n| f.map(n));
            self.flight.set_head(head.clone(), Some(f.file()), map);
        } else {
            // The head goes to the clients before the fill's file is made: creating and sizing it
            // waits on the filesystem's journal, which a commit's fsync may hold for tens of ms, and
            // at every level of a chain of gateways. No byte is read before the file is attached.
            self.flight.set_head(head.clone(), None, None);
            if let Some(room) = room {
                fill = self.begin_fill(room, size).await;
                head.storing = fill.is_some();
            }
        }
        self.flight.held(held, start.rate);
        if held == 0 {
            fill = self.keep_partial(fill, &head, &h).await;
        }
        if fill.is_none() {
            self.fetcher.record_unstored(&self.target.key);
        }
        let sink = Sink {
            hasher: Some(start.hasher),
            fill,
            written: held,
        };
        let now = Answered {
            h,
            head,
            request_ms,
            response_ms: now_ms(),
        };
        Step::Body(Box::new(Reading {
            headers,
            body: start.body,
            sink,
            now,
            attempts: 0,
            compare_until: 0,
        }))
    }

    /// Makes the fill's file in the room reserved (sized and mapped) and gives it to the flight's
    /// readers; when that fails, the flight goes on as a pass-through.
    async fn begin_fill(&self, room: Room, size: Option<u64>) -> Option<crate::store::Fill> {
        let made = tokio::task::spawn_blocking(move || {
            let mut f = room.fill()?;
            let map = size.and_then(|n| f.map(n));
            Ok::<_, StoreError>((f, map))
        })
        .await;
        match made {
            Ok(Ok((f, map))) => {
                self.flight.attach(f.file(), map);
                return Some(f);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "fill file not made; streaming through"),
            Err(e) => tracing::error!(error = %e, "making the fill file failed"),
        }
        self.flight.stop_storing(0);
        None
    }

    /// Reads the body until it ends or breaks. A body is complete only when its framing says so: hyper
    /// ends a Content-Length body at its length and a chunked one at its last chunk, and reports either
    /// cut short as an error; a close-delimited body ends at a clean close. Anything else is broken, and
    /// a broken body is never read again: it is resumed from a new response, or the fill fails.
    async fn read(&self, mut r: Box<Reading>) -> Step {
        let size = r.now.head.size;
        let Reading {
            body,
            sink,
            compare_until,
            ..
        } = &mut *r;
        let why = match self.pump(body, sink, compare_until).await {
            BodyEnd::NoReaders => {
                return Step::Done(End::Failed(FetchError::Internal(
                    "every client left a pass-through transfer".into(),
                )))
            }
            BodyEnd::Complete if size.is_none_or(|s| s == r.sink.written) => {
                return Step::Verify(r)
            }
            BodyEnd::Complete => format!(
                "body ended at {} of {} bytes",
                r.sink.written,
                size.unwrap_or(0)
            ),
            BodyEnd::Broken(msg) => msg,
        };
        Step::Resume(r, why)
    }

    /// The body broke: a 200's is resumed (a 206 that continues it, or a 200 that restarts it); any
    /// other status's fails the fill.
    async fn resume_body(&self, mut r: Box<Reading>, why: String) -> Step {
        let (status, size) = (r.now.head.status, r.now.head.size);
        if status != StatusCode::OK {
            return Step::Done(End::Failed(FetchError::Unreachable(format!(
                "the {status} body broke: {why}"
            ))));
        }
        let v = r.now.validator();
        let Reading {
            headers,
            attempts,
            sink,
            ..
        } = &mut *r;
        let resumed = self
            .resume(headers, attempts, &why, v.as_deref(), sink, size)
            .await;
        match resumed {
            Err(e) => return Step::Done(End::Failed(e)),
            Ok(Resumed::Continue(b)) => r.body = b,
            Ok(Resumed::Restart(resp, request_ms)) => {
                let Reading {
                    sink,
                    compare_until,
                    now,
                    ..
                } = &mut *r;
                r.body = self.restart(resp, request_ms, sink, compare_until, now);
            }
        }
        Step::Body(r)
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

async fn error_status(resp: Response<Metered>) -> FetchError {
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
mod condfetch;
mod restart;
