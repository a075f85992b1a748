//! CONNECT tunnels (SPEC 3): only with `server.allow_connect`, only to port 443 of allowed origins, not
//! cached. The address check still applies: the tunnel connects to a checked address.

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{empty, Body};
use super::error::ApiError;
use super::App;

pub async fn tunnel(app: &App, req: Request<Incoming>, authority: Authority) -> Response<Body> {
    if !app.cfg.server.allow_connect {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "connect-not-allowed",
            "CONNECT tunnels are off (server.allow_connect)",
        )
        .into_response();
    }
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(443);
    let policy = app.fetcher.policy();
    if port != 443 || !policy.host_allowed(&host, port) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin-not-allowed",
            format!("{host}:{port} is not an allowed origin on port 443"),
        )
        .into_response();
    }
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::net::lookup_host((host.trim_matches(['[', ']']), port)).await {
            Ok(a) => a.filter(|a| policy.addr_allowed(a.ip())).collect(),
            Err(e) => {
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    format!("{host}: {e}"),
                )
                .into_response()
            }
        };
    let Some(addr) = addrs.first().copied() else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "address-not-allowed",
            format!("{host} resolves to an address cistern may not connect to"),
        )
        .into_response();
    };
    let upstream = match tokio::time::timeout(
        app.cfg.upstream.connect_timeout.0,
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => {
            return ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-unreachable",
                format!("cannot connect to {host}:{port}"),
            )
            .into_response()
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let mut client = TokioIo::new(up);
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::OK;
    r
}
