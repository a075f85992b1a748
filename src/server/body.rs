//! The response body type every handler returns: a whole buffer (a stored object is one zero-copy
//! mapping) or a stream whose error aborts the client's connection, so that a failed transfer can never
//! look like a complete download.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

pub type Body = BoxBody<Bytes, BodyError>;

/// A body that failed mid-way; hyper then closes the connection without finishing the response.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Largest frame of a stored object's body: the bytes sent are counted per frame (`metered`), and
/// `sendfile` takes a slice of a mapping whatever its size.
const SLICE: usize = 4 << 20;

/// Several buffers, one after the other (the parts of a multipart answer and the framing around
/// them), each handed to hyper in slices of at most `SLICE` bytes (zero-copy: each is a view of the
/// same buffer).
pub fn chain(bufs: Vec<Bytes>) -> Body {
    let left = bufs.iter().map(|b| b.len() as u64).sum();
    Chain {
        bufs: bufs.into(),
        left,
    }
    .boxed()
}

struct Chain {
    bufs: std::collections::VecDeque<Bytes>,
    /// Bytes not yet handed out.
    left: u64,
}

impl hyper::body::Body for Chain {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        loop {
            let Some(front) = self.bufs.front_mut() else {
                return std::task::Poll::Ready(None);
            };
            if front.is_empty() {
                self.bufs.pop_front();
                continue;
            }
            let n = front.len().min(SLICE);
            let frame = front.split_to(n);
            self.left -= n as u64;
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(frame))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}
