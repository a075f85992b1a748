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
