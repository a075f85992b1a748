//! An upstream response body read under the uplink budget: each frame is counted, and held back
//! until the budget lets its bytes pass. While a frame is held the socket is not read, so the sender
//! is slowed by TCP's flow control.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::gather::LowWater;
use super::{Priority, Uplink};

type Wait = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

pub struct Metered {
    inner: Incoming,
    /// None: bytes that do not cross the uplink (a site peer's answer, SPEC 10).
    uplink: Option<Arc<Uplink>>,
    priority: Priority,
    /// The frame read and its wait for the budget, since when.
    held: Option<(Frame<Bytes>, Wait)>,
    held_since: Option<std::time::Instant>,
    /// Time frames spent held back, not yet taken by `take_held_time`.
    held_time: std::time::Duration,
    /// The connection's low-water mark, told how much of the body is still to come.
    low_water: Option<LowWater>,
}

impl Metered {
    /// A response's body metered as the class of the task that opens it (`Priority::current`).
    pub fn new(r: Response<Incoming>, uplink: &Arc<Uplink>) -> Response<Metered> {
        Metered::with(r, Some(uplink.clone()))
    }

    /// A response's body read as it comes, neither counted nor held: it came over the site's own
    /// network.
    pub fn local(r: Response<Incoming>) -> Response<Metered> {
        Metered::with(r, None)
    }

    fn with(r: Response<Incoming>, uplink: Option<Arc<Uplink>>) -> Response<Metered> {
        let low_water = r.extensions().get::<LowWater>().cloned();
        r.map(|inner| Metered {
            inner,
            uplink,
            priority: Priority::current(),
            held: None,
            held_since: None,
            held_time: std::time::Duration::ZERO,
            low_water,
        })
    }

    /// A frame is read and held back by the budget: the upstream is not idle, this node is.
    pub fn held(&self) -> bool {
        self.held.is_some()
    }

    /// Time frames were held back by the budget since the last call (an upstream's pace is
    /// measured without it, `upstream.min_rate`).
    pub fn take_held_time(&mut self) -> std::time::Duration {
        let now = std::time::Instant::now();
        if let Some(since) = self.held_since.as_mut() {
            self.held_time += now - *since;
            *since = now;
        }
        std::mem::take(&mut self.held_time)
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((_, wait)) = this.held.as_mut() {
            ready!(wait.as_mut().poll(cx));
            if let Some(since) = this.held_since.take() {
                this.held_time += since.elapsed();
            }
            return Poll::Ready(this.held.take().map(|(f, _)| Ok(f)));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(f)) => f,
            other => return Poll::Ready(other),
        };
        if let Some(w) = &this.low_water {
            // Under a cap, bytes are read as they come: the budget meters them in small steps and
            // the kernel's buffers hold no more than the cap's own bound (`recv_buffer`).
            let capped = this.uplink.as_ref().is_some_and(|u| u.is_capped());
            w.expect(match capped {
                true => None,
                false => this.inner.size_hint().exact(),
            });
        }
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        let Some(uplink) = this.uplink.as_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let class = this.priority.class();
        let window_shut = this.priority.windowed() && !uplink.open();
        if n == 0 || (!window_shut && uplink.count(class, n)) {
            return Poll::Ready(Some(Ok(frame)));
        }
        // Only a frame that has to wait takes its own handles on the budget and the class.
        let (uplink, priority) = (uplink.clone(), this.priority.clone());
        let mut wait: Wait = Box::pin(async move {
            if window_shut {
                uplink.until_let_through(&priority).await;
                if uplink.count(priority.class(), n) {
                    return;
                }
            }
            uplink.wait(priority.class(), n).await
        });
        if wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.held = Some((frame, wait));
        this.held_since = Some(std::time::Instant::now());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref();
        let n = held
            .and_then(|(f, _)| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + n);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}
