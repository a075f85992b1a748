//! The admin API (SPEC 5, 6): sideload, purge, list, unpin, verify, and the status relay's set-aside
//! reports (retry, drop). Authentication happens before this.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};

use super::body::{empty, full, Body};
use super::error::{relay_error, ApiError};
use super::App;
use crate::relay::AsideOp;
use crate::store::{Digest, StoreError};

/// Largest JSON request body accepted by admin endpoints.
const MAX_JSON: usize = 4 << 20;

pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_start_matches("/v1/admin").to_string();
    let method = req.method().clone();
    let r = match (method.clone(), path.as_str()) {
        // HEAD also serves clients as a cheap check of their token before a long upload.
        (Method::GET | Method::HEAD, "/content") => Ok(json(StatusCode::OK, &app.store.list())),
        (Method::GET | Method::HEAD, "/images") => {
            let images = super::registry::images::list(&app.store).await;
            Ok(json(StatusCode::OK, &images))
        }
        (Method::POST, "/verify") => verify(app, req).await,
        (Method::POST, "/relay/retry") => set_aside(app, AsideOp::Requeue, "requeued").await,
        (Method::DELETE, "/relay/set-aside") => set_aside(app, AsideOp::Drop, "dropped").await,
        (_, "/relay/retry") => Err(not_allowed("POST")),
        (_, "/relay/set-aside") => Err(not_allowed("DELETE")),
        (Method::POST, "/prefetch") => prefetch(app, req).await,
        (Method::PUT, "/uplink") => uplink(app, req).await,
        (_, "/uplink") => Err(not_allowed("PUT")),
        (Method::GET, p) if p.starts_with("/prefetch/") => app
            .fetcher
            .prefetch_job(&p["/prefetch/".len()..])
            .map(|j| json(StatusCode::OK, &j))
            .ok_or_else(|| {
                ApiError::not_found("no such prefetch job (the newest 100 ended jobs are kept)")
            }),
        (m, p) if p.starts_with("/content/sha256/") => {
            let d = parse_digest(&p["/content/sha256/".len()..]);
            match (m, d) {
                (_, Err(e)) => Err(e),
                (Method::PUT, Ok(d)) => sideload(app, req, d).await,
                (Method::DELETE, Ok(d)) => purge(app, d).await,
                _ => Err(not_allowed("PUT, DELETE")),
            }
        }
        (Method::DELETE, p) if p.starts_with("/pins/") => {
            match parse_digest(&p["/pins/".len()..]) {
                Ok(d) => app
                    .store
                    .set_pin(&d, false)
                    .map(|_| no_content())
                    .map_err(store_error),
                Err(e) => Err(e),
            }
        }
        _ => Err(ApiError::not_found(format!(
            "no admin endpoint {method} /v1/admin{path}"
        ))),
    };
    r.unwrap_or_else(ApiError::into_response)
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.to_ascii_lowercase()
        .parse()
        .map_err(|e: crate::store::BadDigest| ApiError::bad_request("bad-digest", e.to_string()))
}

fn not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("allowed: {allow}"),
    )
}

pub fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn no_content() -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(d) => ApiError::not_found(format!("object {d} is not stored")),
        StoreError::NoRoom(n) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "no-room",
            format!("no room in the store for {n} bytes"),
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store",
            other.to_string(),
        ),
    }
}

async fn purge(app: &App, d: Digest) -> Result<Response<Body>, ApiError> {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.purge(&d))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(store_error)?;
    Ok(no_content())
}

/// `PUT /v1/admin/content/sha256/<hex>`: stores the body when it hashes to the name (201), else 422.
async fn sideload(
    app: &App,
    req: Request<Incoming>,
    want: Digest,
) -> Result<Response<Body>, ApiError> {
    // `?pin=true` (an extension of SPEC 6, used by `cistern import --pin --server`).
    let pin = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "pin=true"));
    let len = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    let r = store_upload(app, &mut body, want, pin, len).await;
    // An answer given before the whole body is read (already stored, no room, a failed write) makes
    // the connection close under a client still sending, which then sees a broken pipe instead of the
    // answer: read the rest first. Only clients holding the admin token get here.
    while let Some(Ok(_)) = body.frame().await {}
    r
}

async fn store_upload(
    app: &App,
    body: &mut Incoming,
    want: Digest,
    pin: bool,
    len: Option<u64>,
) -> Result<Response<Body>, ApiError> {
    if app.store.contains(&want) {
        if pin {
            app.store.set_pin(&want, true).map_err(store_error)?;
        }
        return Ok(json(
            StatusCode::CREATED,
            &serde_json::json!({"sha256": want, "stored": true}),
        ));
    }
    let store = app.store.clone();
    let mut fill = tokio::task::spawn_blocking(move || store.begin_fill(len))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(store_error)?;
    let mut hasher = Sha256::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request("body", format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        hasher.update(&data);
        let (f, r) = tokio::task::spawn_blocking(move || {
            let r = fill.write(&data);
            (fill, r)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        fill = f;
        r.map_err(store_error)?;
    }
    let got = Digest(hasher.finalize().into());
    if got != want {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "digest-mismatch",
            format!("the body hashes to {got}, not {want}; nothing stored"),
        ));
    }
    tokio::task::spawn_blocking(move || fill.commit(&got, None, None, pin))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(store_error)?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"sha256": got, "stored": true}),
    ))
}

/// The relay's set-aside reports back in the queue, or dropped: `{"<what>": n}`.
async fn set_aside(app: &App, op: AsideOp, what: &str) -> Result<Response<Body>, ApiError> {
    let n = app.relay.set_aside_op(op).await.map_err(relay_error)?;
    Ok(json(StatusCode::OK, &serde_json::json!({ what: n })))
}

/// `POST /v1/admin/prefetch`: stages the files a manifest names (SPEC 6); 202 with the job's id.
async fn prefetch(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let raw = read_json_body(req).await?;
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request("bad-json", e.to_string()))?;
    let images = super::registry::stage::strings(v.get("images"), "images")?;
    let platforms = super::registry::stage::strings(v.get("platforms"), "platforms")?;
    let (mut files, pin) = match images.is_empty() || v.get("files").is_some() {
        true => crate::fetch::prefetch::parse(&v, None)
            .map_err(|e| ApiError::bad_request("bad-manifest", e.to_string()))?,
        false => (
            Vec::new(),
            v.get("pin").and_then(|p| p.as_bool()).unwrap_or(false),
        ),
    };
    if !images.is_empty() {
        use super::registry::stage::StageError;
        match app.image_files(&images, &platforms).await {
            Ok(f) => files.extend(f),
            Err(StageError::Name(e)) => return Err(ApiError::bad_request("bad-manifest", e)),
            Err(StageError::Fetch(e)) => {
                return Err(ApiError::new(StatusCode::BAD_GATEWAY, "upstream", e))
            }
        }
    }
    for f in &files {
        app.fetcher.check(&f.url).map_err(|e| {
            ApiError::new(StatusCode::FORBIDDEN, "origin-not-allowed", e.to_string())
        })?;
    }
    let plan = crate::fetch::prefetch::plan(&v, pin)
        .map_err(|e| ApiError::bad_request("bad-manifest", e.to_string()))?;
    let id = app.fetcher.prefetch(files, plan).await;
    Ok(json(StatusCode::ACCEPTED, &serde_json::json!({"id": id})))
}

/// `PUT /v1/admin/uplink` `{"max_rate": "20MiB", "background_rate": "5MiB"}`: the uplink caps at run
/// time (not persisted); a key left out keeps its value, "0" lifts the cap. Answers the new status.
async fn uplink(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let raw = read_json_body(req).await?;
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request("bad-json", e.to_string()))?;
    let Some(o) = v.as_object() else {
        return Err(ApiError::bad_request("bad-json", "expected a JSON object"));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "max_rate" | "background_rate"))
    {
        return Err(ApiError::bad_request(
            "bad-json",
            format!("unknown key `{k}` (max_rate, background_rate)"),
        ));
    }
    let size = |k: &str| -> Result<Option<u64>, ApiError> {
        let bad = |e: String| ApiError::bad_request("bad-json", format!("{k}: {e}"));
        match o.get(k) {
            None => Ok(None),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(format!("`{n}` is not a byte count"))),
            Some(serde_json::Value::String(s)) => crate::config::ByteSize::parse(s)
                .map(|b| Some(b.0))
                .map_err(bad),
            Some(other) => Err(bad(format!("`{other}` is not a size"))),
        }
    };
    let (max, background) = (size("max_rate")?, size("background_rate")?);
    let uplink = app.fetcher.uplink();
    uplink.set_caps(max, background);
    tracing::info!(?max, ?background, "uplink caps changed");
    Ok(json(StatusCode::OK, &uplink.status()))
}

/// `POST /v1/admin/verify` `{"repair": bool}`: re-hashes every object.
async fn verify(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        #[serde(default)]
        repair: bool,
    }
    let raw = read_json_body(req).await?;
    let ask: Ask = if raw.is_empty() {
        Ask::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| ApiError::bad_request("bad-json", e.to_string()))?
    };
    let store = app.store.clone();
    let checked = store.usage().objects;
    let bad = tokio::task::spawn_blocking(move || store.verify(ask.repair))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let bad: Vec<_> = bad
        .into_iter()
        .map(|(d, p)| serde_json::json!({"sha256": d, "problem": p}))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"checked": checked, "bad": bad, "repaired": ask.repair}),
    ))
}

pub async fn read_json_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    read_body(req, MAX_JSON).await
}

/// Reads a whole request body of at most `max` bytes (413 beyond).
/// A request body must arrive within this long (a client that trickles one holds a connection).
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("request body over {max} bytes"),
        )
    };
    let mut body = req.into_body();
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(too_large());
    }
    // Copied as it comes: each frame of a body that trickles in a byte at a time is a slice that
    // would keep a whole read buffer of the connection alive.
    let mut buf = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request("bad-body", e.to_string()))?;
            if let Ok(d) = frame.into_data() {
                if buf.len() + d.len() > max {
                    return Err(too_large());
                }
                buf.extend_from_slice(&d);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(r) => r.map(|_| buf.freeze()),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_DEADLINE.as_secs()
            ),
        )),
    }
}
