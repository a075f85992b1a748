//! Forwarding: a background task sends the oldest undelivered reports, in order and in batches
//! (bounded by `batch_size` and by `budget::FORWARD_BATCH` bytes), to the next hop, and removes them
//! only after it answered 2xx; on failure it backs off exponentially with jitter (from 1 s to
//! `status.max_backoff`) and tries again, for as long as it takes.
//!
//! A refusal for good (SPEC 5: a 4xx other than 408 and 429) is about what was sent, so retrying
//! the same batch would wedge the queue behind it. Which report is refused is found by sending the
//! batch split: a refused batch of several reports is sent again as its first half (each success
//! doubles the batch again, up to `batch_size`), so only a report refused on its own is set aside:
//! with the hop's status and the start of its answer, durably, in the transaction that takes it out
//! of the queue (`writer`); the queue moves on. `POST /v1/admin/relay/retry` puts the set-aside
//! reports back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use rand::Rng;

use super::writer::Job;
use super::{budget, Relay};
use crate::fetch::{Ask, Director, Hop, Outcome};
use crate::store::now_ms;

/// Where this node's reports go.
#[derive(Clone, Debug)]
pub enum NextHop {
    /// The parents' `POST /v1/status`, in the order the upstream director gives (the first healthy
    /// one first); what comes of each attempt is recorded with it.
    Parents(Arc<Director>),
    /// `status.forward_to`, with its bearer token.
    Url { url: Uri, token: Option<String> },
}

type HttpsClient = Client<crate::fetch::upstream::connect::Https, Full<Bytes>>;

/// Bytes of a refusing answer kept with the report it refused.
const ANSWER: usize = 1024;

/// What the next hop made of a batch.
enum Sent {
    Delivered,
    /// Refused for good: about what was sent, not worth sending again as it was.
    Refused(Refusal),
    /// No answer, or one that may change (5xx, 408, 429, ...): sent again later.
    Failed(String),
}

/// A next hop's refusal for good.
struct Refusal {
    host: String,
    status: StatusCode,
    /// The start of its answer, as text.
    answer: String,
}

/// A refusal for good: SPEC 5's 4xx other than 408 and 429, less the statuses that speak of the
/// endpoint or of this node's credentials rather than of the reports (401, 403, 404, 405, 407): a
/// wrong `forward_to` or an expired token refuses every report alike, and setting the whole queue
/// aside one report at a time would help no one; those are retried like an outage, and the
/// relay's `lastError` says why.
fn refused_for_good(s: StatusCode) -> bool {
    s.is_client_error() && !matches!(s.as_u16(), 401 | 403 | 404 | 405 | 407 | 408 | 429)
}

/// The oldest undelivered reports, as sent together.
pub(super) struct Outgoing {
    /// (queue seq, report as queued), oldest first.
    pub items: Vec<(u64, Vec<u8>)>,
}

impl Outgoing {
    /// The JSON array to send.
    pub fn body(&self) -> Vec<u8> {
        let len = self.items.iter().map(|(_, v)| v.len() + 1).sum::<usize>() + 1;
        let mut body = Vec::with_capacity(len);
        body.push(b'[');
        for (i, (_, v)) in self.items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(v);
        }
        body.push(b']');
        body
    }

    fn bytes(&self) -> u64 {
        self.items.iter().map(|(_, v)| v.len() as u64).sum()
    }
}

/// How much the forwarder sends next, and how long it waits after a failure.
struct Pace {
    /// Reports in the next batch: `batch_size`, less while a refused batch is being split.
    limit: usize,
    batch_size: usize,
    backoff: Duration,
    max_backoff: Duration,
}

impl Pace {
    /// Waits the backoff with full jitter (so a site's gateways do not retry in step after an
    /// outage), then doubles it.
    async fn wait(&mut self) {
        let wait = rand::thread_rng().gen_range(self.backoff / 2..=self.backoff);
        tokio::time::sleep(wait).await;
        self.backoff = (self.backoff * 2).min(self.max_backoff.max(Duration::from_secs(1)));
    }
}

impl Relay {
    /// The oldest undelivered reports, up to `n` and `budget::FORWARD_BATCH` bytes of body (a first
    /// report larger than that goes alone).
    pub(super) fn outgoing(&self, n: usize) -> Result<Outgoing, super::DbError> {
        let items = self.db().peek(n, budget::FORWARD_BATCH)?;
        Ok(Outgoing { items })
    }

    /// Age in seconds of the oldest undelivered report.
    pub fn oldest_age_secs(&self) -> Option<u64> {
        let v = self.db().oldest_queued().ok()??;
        let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
        let at = v.get("receivedAt")?.as_str()?;
        let t = humantime::parse_rfc3339(at).ok()?;
        Some(t.elapsed().map(|d| d.as_secs()).unwrap_or(0))
    }

    /// Runs the forwarder until the task is dropped.
    pub async fn forward(self, client: HttpsClient) {
        let Some(hop) = self.inner.next_hop.clone() else {
            return;
        };
        let mut pace = Pace {
            limit: self.cfg().batch_size,
            batch_size: self.cfg().batch_size,
            backoff: Duration::from_secs(1),
            max_backoff: self.cfg().max_backoff,
        };
        loop {
            let out = match self.outgoing(pace.limit) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "status queue: cannot read the queue");
                    pace.wait().await;
                    continue;
                }
            };
            if out.items.is_empty() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), self.inner.wake.notified()).await;
                continue;
            }
            let body = Bytes::from(out.body());
            match self.send(&client, &hop, body).await {
                Sent::Delivered => self.on_delivered(out, &mut pace).await,
                Sent::Refused(r) if out.items.len() > 1 => {
                    let n = out.items.len();
                    self.note_error(format!(
                        "{} refused a batch of {n} reports with {}; sending it split",
                        r.host, r.status
                    ));
                    pace.limit = n / 2;
                }
                Sent::Refused(r) => self.on_refused(out, r, &mut pace).await,
                Sent::Failed(e) => {
                    tracing::warn!(error = %e, retry_in_ms = pace.backoff.as_millis() as u64, "status relay: forwarding failed");
                    self.note_error(e);
                    pace.wait().await;
                }
            }
        }
    }

    async fn on_delivered(&self, out: Outgoing, pace: &mut Pace) {
        let (n, bytes) = (out.items.len(), out.bytes());
        let seqs = out.items.into_iter().map(|(s, _)| s).collect();
        // Forwarded but still queued: a crash here re-forwards it, and the next hop's dedup counts
        // it once.
        failpoint!("relay-forward-sent");
        if let Err(e) = self
            .submit(|reply| Job::Deliver { seqs, bytes, reply })
            .await
        {
            tracing::error!(error = %e, "status queue: cannot remove delivered reports");
        }
        failpoint!("relay-after-delete");
        let s = &self.inner.stats;
        s.forwarded.fetch_add(n as u64, Ordering::Relaxed);
        s.last_success_ms.store(now_ms(), Ordering::Relaxed);
        pace.backoff = Duration::from_secs(1);
        pace.limit = (pace.limit * 2).min(pace.batch_size);
    }

    /// One report refused for good: set aside with the refusal; while that cannot be written, it
    /// stays queued and is sent again after the backoff.
    async fn on_refused(&self, out: Outgoing, r: Refusal, pace: &mut Pace) {
        let Some((seq, report)) = out.items.into_iter().next() else {
            return;
        };
        let refusal = refusal_record(&report, &r);
        let what = format!(
            "{} refused report {} with {}",
            r.host,
            pair_text(&report),
            r.status
        );
        let job = |reply| Job::SetAside {
            seq,
            report,
            refusal,
            reply,
        };
        match self.submit(job).await {
            Ok(()) => {
                tracing::warn!(answer = %r.answer, "status relay: {what}; set aside");
                self.inner.stats.set_aside.fetch_add(1, Ordering::Relaxed);
                self.note_error(format!("{what}; set aside"));
                pace.limit = pace.batch_size;
            }
            Err(e) => {
                tracing::error!(error = %e, "status relay: {what}; cannot set it aside");
                self.note_error(format!("{what}; cannot set it aside: {e}"));
                pace.wait().await;
            }
        }
    }

    fn note_error(&self, e: String) {
        let s = &self.inner.stats;
        s.errors.fetch_add(1, Ordering::Relaxed);
        *s.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    async fn send(&self, client: &HttpsClient, hop: &NextHop, body: Bytes) -> Sent {
        let targets: Vec<(Uri, Option<String>, Option<Hop>)> = match hop {
            NextHop::Url { url, token } => vec![(url.clone(), token.clone(), None)],
            NextHop::Parents(d) => d
                .hops(Ask::Status)
                .into_iter()
                .filter_map(|h| Some((status_url(&h)?, None, Some(h))))
                .collect(),
        };
        let mut last = String::from("no next hop");
        for (url, token, parent) in targets {
            let mut req = Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::VIA, format!("1.1 {}", self.cfg().node_id));
            if let Some(t) = &token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let Ok(req) = req.body(Full::new(body.clone())) else {
                continue;
            };
            let host = url.authority().map(|a| a.to_string()).unwrap_or_default();
            let sent = tokio::time::timeout(Duration::from_secs(30), client.request(req)).await;
            if let (NextHop::Parents(d), Some(h)) = (hop, &parent) {
                d.record(h, outcome(&host, &sent));
            }
            match sent {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    let _ = resp.into_body().collect().await;
                    return Sent::Delivered;
                }
                Ok(Ok(resp)) if refused_for_good(resp.status()) => {
                    let status = resp.status();
                    let answer = answer_text(resp.into_body()).await;
                    return Sent::Refused(Refusal {
                        host,
                        status,
                        answer,
                    });
                }
                Ok(Ok(resp)) => last = format!("{host} answered {}", resp.status()),
                Ok(Err(e)) => last = format!("{host}: {e}"),
                Err(_) => last = format!("{host}: no answer in 30 s"),
            }
        }
        Sent::Failed(last)
    }
}

/// A parent's `POST /v1/status`.
fn status_url(hop: &Hop) -> Option<Uri> {
    let Hop::Parent(p) = hop else {
        return None;
    };
    Uri::builder()
        .scheme(p.scheme()?.clone())
        .authority(p.authority()?.clone())
        .path_and_query("/v1/status")
        .build()
        .ok()
}

/// What the director is told of one attempt to deliver to a parent.
fn outcome<T>(
    host: &str,
    sent: &Result<
        Result<http::Response<T>, hyper_util::client::legacy::Error>,
        tokio::time::error::Elapsed,
    >,
) -> Outcome {
    match sent {
        Ok(Ok(resp)) => Outcome::Answered(resp.status()),
        Ok(Err(e)) => Outcome::Failed(format!("{host}: {e}")),
        Err(_) => Outcome::Failed(format!("{host}: no answer in 30 s")),
    }
}

/// The start of a refusing answer (`ANSWER` bytes at most, read for 5 s at most), as text.
async fn answer_text(mut body: hyper::body::Incoming) -> String {
    let mut out = Vec::new();
    let read = async {
        while out.len() < ANSWER {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        out.extend_from_slice(&d);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    out.truncate(ANSWER);
    String::from_utf8_lossy(&out).into_owned()
}

/// `deviceId/reportId` of a queued report, for messages.
fn pair_text(report: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(report).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    format!("{}/{}", s("deviceId"), s("reportId"))
}

/// The set-aside record of a refused report, as `/v1/relay` shows it.
fn refusal_record(report: &[u8], r: &Refusal) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(report).unwrap_or_default();
    let rec = serde_json::json!({
        "deviceId": v.get("deviceId"),
        "reportId": v.get("reportId"),
        "at": super::chrono_now(),
        "hop": r.host,
        "status": r.status.as_u16(),
        "answer": r.answer,
    });
    serde_json::to_vec(&rec).unwrap_or_default()
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
