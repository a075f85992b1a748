//! The status endpoints (SPEC 5): `POST /v1/status` and the read-back of this node's subtree.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::admin::{json, read_body};
use super::body::Body;
use super::error::{relay_error, ApiError};
use crate::relay::{Relay, RelayError};

/// Answers the status paths, or None when the path is not one of them.
pub async fn handle(
    relay: &Relay,
    req: Request<Incoming>,
) -> Result<Response<Body>, Request<Incoming>> {
    let path = req.uri().path().to_string();
    let m = req.method().clone();
    let r = match (m, path.as_str()) {
        (Method::POST, "/v1/status") => accept(relay, req).await,
        (Method::GET, "/v1/devices") => Ok(json(StatusCode::OK, &relay.devices())),
        (Method::GET, "/v1/deployments") => Ok(json(StatusCode::OK, &relay.deployments())),
        (Method::GET, "/v1/relay") => Ok(json(StatusCode::OK, &relay.status())),
        (Method::GET, p) if p.starts_with("/v1/devices/") => {
            let raw = &p["/v1/devices/".len()..];
            let id = percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .to_string();
            relay
                .device(&id)
                .map(|h| json(StatusCode::OK, &h))
                .ok_or_else(|| ApiError::not_found(format!("no reports from device `{id}`")))
        }
        (_, "/v1/status" | "/v1/devices" | "/v1/deployments" | "/v1/relay") => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "POST /v1/status; GET the others",
        )),
        _ => return Err(req),
    };
    Ok(r.unwrap_or_else(ApiError::into_response))
}

async fn accept(relay: &Relay, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let max = relay.max_request();
    let body = read_body(req, max)
        .await
        .map_err(|_| relay_error(RelayError::RequestTooLarge(max)))?;
    let got = relay.accept(&body).await.map_err(relay_error)?;
    // `conflicts` are counted in `accepted` too: a client that knows only SPEC 5's two members sees
    // them kept, which they are.
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"accepted": got.accepted, "duplicates": got.duplicates,
                            "conflicts": got.conflicts}),
    ))
}
