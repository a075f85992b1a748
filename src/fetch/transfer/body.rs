//! The upstream body of a fill: live while its bytes arrive, ended when its framing says it is whole,
//! broken otherwise. A broken body is never read again: it is resumed (a Range request guarded by a
//! strong validator, with backoff; a 206 must continue the held bytes under the same ETag, a 200 from
//! byte 0 is compared with them) or the transfer fails.

use std::sync::atomic::Ordering;

use crate::fetch::uplink::Metered;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};

use super::super::framing::{content_length, continues, same_etag};
use super::super::rate::Rate;
use super::super::sink::Sink;
use super::super::FetchError;
use super::{error_status, Answered, Transfer};
use crate::store::{now_ms, StoreError};

/// Bytes gathered from the body before one hash-and-write step on a blocking thread.
const BATCH: usize = 256 << 10;

/// How a broken body goes on.
pub(super) enum Resumed {
    /// A 206 that continues the bytes held.
    Continue(Metered),
    /// A 200 from byte 0, to compare with the bytes held, and when it was asked for.
    Restart(Response<Metered>, u64),
}

/// The first wait before a resume request; it doubles per attempt, up to the max.
const RESUME_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
const RESUME_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// How a body read ended.
pub(super) enum BodyEnd {
    Complete,
    Broken(String),
    NoReaders,
}

impl Transfer {
    /// Asks for the rest of a broken body, guarded by the upstream's validator `v` (RFC 9110
    /// §13.1.5), retrying with backoff until a usable answer or `upstream.retries` breaks in all.
    pub(super) async fn resume(
        &self,
        headers: &mut HeaderMap,
        attempts: &mut u32,
        first: &str,
        v: Option<&str>,
        sink: &Sink,
        size: Option<u64>,
    ) -> Result<Resumed, FetchError> {
        let mut msg = first.to_string();
        loop {
            self.resume_or_fail(attempts, &msg)?;
            let backoff = RESUME_BACKOFF * 2u32.saturating_pow(*attempts - 1);
            tokio::time::sleep(backoff.min(RESUME_BACKOFF_MAX)).await;
            headers.remove(http::header::RANGE);
            headers.remove(http::header::IF_RANGE);
            if let (Some(v), true) = (
                v.and_then(|v| HeaderValue::from_str(v).ok()),
                sink.written > 0,
            ) {
                if let Ok(r) = HeaderValue::from_str(&format!("bytes={}-", sink.written)) {
                    headers.insert(http::header::RANGE, r);
                    headers.insert(http::header::IF_RANGE, v);
                }
            }
            let request_ms = now_ms();
            let resp = match self.upstream(headers).await {
                Ok(r) => r,
                Err(e) => {
                    msg = format!("resume request failed: {e}");
                    continue;
                }
            };
            let stats = &self.fetcher.stats();
            match resp.status() {
                StatusCode::PARTIAL_CONTENT
                    if continues(resp.headers(), sink.written, size)
                        && same_etag(resp.headers(), v) =>
                {
                    tracing::info!(from = sink.written, "resumed with Range");
                    stats.resumes.fetch_add(1, Ordering::Relaxed);
                    return Ok(Resumed::Continue(resp.into_body()));
                }
                StatusCode::OK if content_length(resp.headers()) == size => {
                    tracing::info!(held = sink.written, "upstream restarted from zero");
                    stats.resumes.fetch_add(1, Ordering::Relaxed);
                    return Ok(Resumed::Restart(resp, request_ms));
                }
                status if status.is_client_error() => return Err(error_status(resp).await),
                status => msg = format!("resume answered {status}"),
            }
        }
    }

    /// The upstream started over from byte 0 (a 200 to the resume): its bytes are compared with those
    /// held, and its head (validators, header block, freshness) is what the fill now stores and what
    /// clients that come after are answered with. Clients attached before are cut off at the first
    /// difference; at once when nothing is held to compare with, or the new response is not stored.
    pub(super) fn restart(
        &self,
        resp: Response<Metered>,
        request_ms: u64,
        sink: &mut Sink,
        compare_until: &mut u64,
        now: &mut Answered,
    ) -> Metered {
        let (parts, body) = resp.into_parts();
        let storing = sink.fill.is_some() && self.storable(parts.status, &parts.headers);
        if sink.fill.is_some() && !storing {
            self.flight.stop_storing(0);
            sink.fill = None;
            self.fetcher.record_unstored(&self.target.key);
        }
        *compare_until = sink.written;
        if sink.fill.is_none() {
            // Nothing held to compare with: the clients attached cannot be given a mix.
            self.flight.diverge(0, None);
            *compare_until = 0;
        }
        sink.written = 0;
        if *compare_until == 0 {
            sink.hasher = Some(Sha256::new());
        }
        let head = self.head_of(parts.status, &parts.headers, storing);
        if let Some(vary) = head.vary.as_ref().filter(|_| head.storing) {
            self.permit.varies(vary);
        }
        self.flight.restarted(head.clone());
        *now = Answered {
            h: parts.headers,
            head,
            request_ms,
            response_ms: now_ms(),
        };
        body
    }

    fn resume_or_fail(&self, attempts: &mut u32, msg: &str) -> Result<(), FetchError> {
        *attempts += 1;
        self.fetcher
            .stats()
            .errors_broken
            .fetch_add(1, Ordering::Relaxed);
        if *attempts > self.fetcher.config().retries {
            return Err(FetchError::Unreachable(format!(
                "transfer broke {} times; last: {msg}",
                *attempts
            )));
        }
        tracing::warn!(
            attempt = *attempts,
            error = msg,
            "upstream transfer broke; resuming"
        );
        Ok(())
    }

    /// Moves body bytes into the sink and the flight until the body ends or breaks.
    pub(super) async fn pump(
        &self,
        body: &mut Metered,
        sink: &mut Sink,
        compare_until: &mut u64,
    ) -> BodyEnd {
        let idle = self.fetcher.config().idle_timeout;
        let mut rate = Rate::new(self.fetcher.config().min_rate, idle);
        loop {
            let mut batch: Vec<Bytes> = Vec::new();
            let mut batch_len = 0usize;
            let mut ended = None;
            // Wait for one frame, then take whatever else is ready, up to BATCH. Time a frame is
            // held back by the uplink budget is neither idleness nor slowness of the upstream.
            let first = loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) if body.held() => continue,
                    other => break other,
                }
            };
            rate.paused(body.take_held_time());
            match first {
                Err(_) => {
                    return BodyEnd::Broken(format!(
                        "no byte from upstream for {}s",
                        idle.as_secs()
                    ))
                }
                Ok(None) => ended = Some(BodyEnd::Complete),
                Ok(Some(Err(e))) => ended = Some(BodyEnd::Broken(e.to_string())),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        batch_len += d.len();
                        batch.push(d);
                    }
                }
            }
            while ended.is_none() && batch_len < BATCH {
                match body.frame().now_or_never() {
                    None => break,
                    Some(None) => ended = Some(BodyEnd::Complete),
                    Some(Some(Err(e))) => ended = Some(BodyEnd::Broken(e.to_string())),
                    Some(Some(Ok(f))) => {
                        if let Ok(d) = f.into_data() {
                            batch_len += d.len();
                            batch.push(d);
                        }
                    }
                }
            }
            if !batch.is_empty() {
                self.fetcher
                    .stats()
                    .bytes_fetched
                    .fetch_add(batch_len as u64, Ordering::Relaxed);
                if let Err(e) = self.absorb(batch, sink, compare_until).await {
                    return BodyEnd::Broken(e);
                }
                if let Err(e) = rate.arrived(batch_len as u64) {
                    return BodyEnd::Broken(e);
                }
                if !self.flight.is_storing() {
                    // Later clients make their own request; this one keeps pace with its readers
                    // (time spent waiting for them does not count against the upstream's rate).
                    self.permit.release();
                    let waiting = std::time::Instant::now();
                    if !self.flight.wait_for_readers().await {
                        return BodyEnd::NoReaders;
                    }
                    rate.paused(waiting.elapsed());
                }
            }
            if let Some(e) = ended {
                return e;
            }
        }
    }

    /// Hashes and writes one batch on a blocking thread, then hands it to the readers. While a restarted
    /// transfer re-sends bytes already held, they are compared instead of written.
    async fn absorb(
        &self,
        batch: Vec<Bytes>,
        sink: &mut Sink,
        compare_until: &mut u64,
    ) -> Result<(), String> {
        let held = *compare_until;
        let mut moved = std::mem::take(sink);
        let job = tokio::task::spawn_blocking(move || {
            let r = moved.absorb(held, batch);
            (moved, r)
        });
        let (moved, r) = job.await.map_err(|e| e.to_string())?;
        *sink = moved;
        if let Some(d) = r.diverged {
            tracing::warn!(
                at = d.at,
                "restarted transfer differs from the bytes held; cutting off attached clients"
            );
            *compare_until = 0;
            self.flight.diverge(d.at, d.file);
        } else if sink.written >= *compare_until {
            *compare_until = 0;
        }
        if let Some((at, e)) = r.store_err {
            match e {
                StoreError::NoRoom(_) => {
                    tracing::warn!("store out of room mid-transfer; streaming through")
                }
                other => tracing::error!(error = %other, "store write failed; streaming through"),
            }
            self.flight.stop_storing(at);
        }
        if !r.fresh.is_empty() {
            self.flight.append(r.fresh);
        }
        Ok(())
    }
}
