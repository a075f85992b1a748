//! What a request did, counted as its response body goes out: bytes served from the store or from
//! upstream as hyper takes them (not the Content-Length when the headers leave), the time to the first
//! byte and the whole duration, and whether the client left before the end. The request's log line is
//! written when the response ends, with those figures.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use super::body::{Body, BodyError};
use super::ServerStats;

/// How a response was made, as the handler that made it knows: a closed set, so that metrics labels
/// stay bounded whatever a request or an upstream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// From the store, fresh.
    Hit,
    /// From the store, stale (upstream unreachable, the copy allows it).
    Stale,
    /// From the store after a 304.
    Revalidated,
    /// From a transfer this request started or joined, stored.
    Miss,
    /// Joined a transfer in flight.
    Collapsed,
    /// Passed through, not stored.
    Bypass,
    /// An error cistern answered itself.
    Error,
    /// cistern's own endpoints (health, status, admin, metrics).
    Own,
}

impl Outcome {
    /// Whether its body bytes count as served from the store (`hitBytes`).
    fn served_from_store(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::Stale | Outcome::Revalidated)
    }

    /// Whether its body bytes count in `/summary` at all (cistern's own pages do not).
    fn is_payload(self) -> bool {
        !matches!(self, Outcome::Own | Outcome::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
            Outcome::Miss => "miss",
            Outcome::Collapsed => "collapsed",
            Outcome::Bypass => "bypass",
            Outcome::Error => "error",
            Outcome::Own => "own",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The labels of the request metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub form: &'static str,
    pub cache_status: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FormLabel {
    pub form: &'static str,
}

/// What the log line and the metrics say of one request, filled in as the response goes out.
pub struct Record {
    pub stats: Arc<ServerStats>,
    pub span: tracing::Span,
    pub form: &'static str,
    pub outcome: Outcome,
    pub key: Option<String>,
    pub status: u16,
    pub cache: String,
    pub started: Instant,
}

/// The response body, counted as hyper takes it.
pub struct Metered {
    inner: Body,
    record: Option<Record>,
    sent: u64,
    first_byte: Option<Duration>,
    /// The Content-Length, when the response has one: hyper stops polling once it is reached.
    length: Option<u64>,
}

impl Metered {
    pub fn new(inner: Body, record: Record, length: Option<u64>) -> Metered {
        Metered {
            inner,
            record: Some(record),
            sent: 0,
            first_byte: None,
            length,
        }
    }

    /// The response ended: `complete` (its last byte was taken), `client-left` (dropped before) or
    /// `aborted` (the body failed: the client's connection is cut).
    fn finish(&mut self, end: &'static str) {
        let Some(r) = self.record.take() else {
            return;
        };
        let took = r.started.elapsed();
        let ttfb = self.first_byte.unwrap_or(took);
        let form = FormLabel { form: r.form };
        r.stats
            .duration
            .get_or_create(&form)
            .observe(took.as_secs_f64());
        r.stats
            .ttfb
            .get_or_create(&form)
            .observe(ttfb.as_secs_f64());
        let _e = r.span.enter();
        tracing::info!(
            form = r.form,
            key = r.key.as_deref().unwrap_or(""),
            status = r.status,
            bytes = self.sent,
            cache = %r.cache,
            ttfb_ms = ttfb.as_millis() as u64,
            ms = took.as_millis() as u64,
            end,
            "request"
        );
    }

    fn count(&mut self, n: usize) {
        let Some(r) = self.record.as_ref() else {
            return;
        };
        if self.first_byte.is_none() {
            self.first_byte = Some(r.started.elapsed());
        }
        self.sent += n as u64;
        if r.outcome.is_payload() {
            let c = match r.outcome.served_from_store() {
                true => &r.stats.hit_bytes,
                false => &r.stats.miss_bytes,
            };
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.count(d.len());
                }
            }
            Poll::Ready(None) => self.finish("complete"),
            Poll::Ready(Some(Err(_))) => self.finish("aborted"),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // hyper drops a body it never polled to its end: a HEAD, a 304, or a client that left.
        let whole = self.inner.is_end_stream() || self.length == Some(self.sent);
        let end = match whole {
            true => "complete",
            false => "client-left",
        };
        self.finish(end);
    }
}
