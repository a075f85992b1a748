//! The one place where errors become HTTP answers: `{"error": "<code>", "detail": "<sentence>"}` with a
//! fitting status (SPEC 4). An upstream's own error status and body are passed back as they came.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::body::{full, Body};
use crate::fetch::FetchError;
use crate::relay::RelayError;

/// An error cistern makes itself.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({"error": self.code, "detail": self.detail});
        let mut r = Response::new(full(Bytes::from(body.to_string())));
        *r.status_mut() = self.status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Maps a fetch failure to what the client gets.
pub fn fetch_error_response(e: FetchError) -> Response<Body> {
    use StatusCode as S;
    let (status, code) = match &e {
        FetchError::NotAllowed(_) => (S::FORBIDDEN, "origin-not-allowed"),
        FetchError::AddressRefused(_) => (S::FORBIDDEN, "address-not-allowed"),
        FetchError::RedirectNotAllowed(_) => (S::BAD_GATEWAY, "redirect-not-allowed"),
        FetchError::Unreachable(_) => (S::GATEWAY_TIMEOUT, "upstream-unreachable"),
        FetchError::BadResponse(_) => (S::BAD_GATEWAY, "upstream-bad-response"),
        FetchError::UpstreamTls(_) => (S::BAD_GATEWAY, "upstream-tls"),
        FetchError::Timeout(_) => (S::GATEWAY_TIMEOUT, "upstream-timeout"),
        FetchError::DigestMismatch(_) => (S::BAD_GATEWAY, "digest-mismatch"),
        FetchError::Diverged => (S::BAD_GATEWAY, "upstream-changed"),
        FetchError::NotFound(_) => (S::NOT_FOUND, "not-found"),
        FetchError::NotCached => (S::GATEWAY_TIMEOUT, "not-cached"),
        FetchError::Busy(_) => (S::SERVICE_UNAVAILABLE, "upstream-busy"),
        FetchError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
        FetchError::Status {
            status,
            content_type,
            headers,
            body,
        } => {
            let mut r = Response::new(full(body.clone()));
            *r.status_mut() = *status;
            *r.headers_mut() = (**headers).clone();
            r.headers_mut().remove(http::header::CONTENT_LENGTH);
            if let Some(ct) = content_type
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok())
            {
                r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            r.headers_mut().insert(
                "cache-status",
                HeaderValue::from_static("cistern; fwd=uri-miss"),
            );
            return r;
        }
    };
    ApiError::new(status, code, e.to_string()).into_response()
}

impl From<FetchError> for ApiError {
    fn from(e: FetchError) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream", e.to_string())
    }
}

/// Maps a status relay failure to what the poster (or the admin) gets.
pub fn relay_error(e: RelayError) -> ApiError {
    use StatusCode as S;
    let (status, code) = match &e {
        RelayError::Bad(_) => (S::BAD_REQUEST, "bad-report"),
        RelayError::ReportTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "report-too-large"),
        RelayError::RequestTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "too-large"),
        RelayError::Full(_) => (S::INSUFFICIENT_STORAGE, "queue-full"),
        RelayError::StoreFull { .. } => (S::INSUFFICIENT_STORAGE, "store-full"),
        _ => (S::INTERNAL_SERVER_ERROR, "status-store"),
    };
    ApiError::new(status, code, e.to_string())
}
