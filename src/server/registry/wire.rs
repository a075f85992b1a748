//! The registry API's own answers (SPEC 9, OCI distribution spec): errors as
//! `{"errors":[{"code","message"}]}`, `Docker-Distribution-API-Version` on every `/v2/` answer, and
//! `Docker-Content-Digest` on every blob and manifest answer whose digest is known.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::server::body::{full, Body};
use crate::store::Digest;

pub const API_VERSION: &str = "registry/2.0";

/// An error in the distribution spec's form.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message.into()}]});
    let mut r = Response::new(full(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    versioned(r)
}

/// `GET /v2/`: 200 `{}`.
pub fn base() -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(b"{}")));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    versioned(r)
}

/// Adds `Docker-Distribution-API-Version`.
pub fn versioned(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    r
}

/// A blob or manifest answer: `Docker-Content-Digest` when the digest is known (asked by digest, or a
/// stored tag; an answer fetched by tag carries the registry's own); errors pass as they are. The
/// `Content-Type` is the stored one (the registry's media type).
pub fn object(mut r: Response<Body>, digest: Option<Digest>) -> Response<Body> {
    let ok = r.status().is_success() || r.status() == StatusCode::NOT_MODIFIED;
    if let (true, Some(d)) = (ok, digest) {
        if let Ok(v) = HeaderValue::from_str(&format!("sha256:{d}")) {
            r.headers_mut().insert("docker-content-digest", v);
        }
    }
    versioned(r)
}

/// Marks an answer served from a stale stored tag (SPEC 4's stale Cache-Status).
pub fn stale(mut r: Response<Body>) -> Response<Body> {
    if r.status().is_success() {
        let v = HeaderValue::from_static("cistern; hit; ttl=-1; detail=stale");
        r.headers_mut().insert("cache-status", v);
    }
    r
}
