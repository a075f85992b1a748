//! CONNECT tunnels (SPEC 3): only with `server.allow_connect`, only to port 443 of allowed origins, not
//! cached. The address check still applies: the tunnel connects to a checked address. A tunnel keeps
//! its connection's place under `server.max_connections`, closes when the process stops (the drain
//! waits for it) and after `upstream.idle_timeout` with no byte either way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::{empty, Body};
use super::error::ApiError;
use super::intercept;
use super::listener::ConnHold;
use super::App;

pub async fn tunnel(
    app: Arc<App>,
    req: Request<Incoming>,
    authority: Authority,
    peer: SocketAddr,
) -> Response<Body> {
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
    if port != 443 || !app.fetcher.policy().host_allowed(&host, port) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin-not-allowed",
            format!("{host}:{port} is not an allowed origin on port 443"),
        )
        .into_response();
    }
    // Interception (SPEC 3, "HTTPS payloads"): terminated here; the address check comes with each
    // request inside, as for the forward-proxy form.
    if let Some(icp) = app.intercept.clone().filter(|i| i.takes(&host)) {
        return intercept::terminate(app, icp, req, &authority, peer);
    }
    let addr = match checked_addr(&app, &host, port).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let upstream =
        match tokio::time::timeout(app.cfg.upstream.connect_timeout.0, TcpStream::connect(addr))
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
    let hold = req.extensions().get::<ConnHold>().cloned();
    let idle = app.cfg.upstream.idle_timeout.0;
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => pipe(TokioIo::new(up), upstream, idle, hold).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::OK;
    r
}

/// The address a tunnel to `host` connects to: resolved (or given by `upstream.connect_to`) and
/// checked (SPEC 2).
async fn checked_addr(app: &App, host: &str, port: u16) -> Result<SocketAddr, ApiError> {
    let name = host.trim_matches(['[', ']']);
    let given = app.cfg.upstream.connect_to.iter();
    if let Some((_, a)) = given
        .into_iter()
        .find(|(h, _)| h.eq_ignore_ascii_case(name))
    {
        return Ok(*a);
    }
    let policy = app.fetcher.policy();
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((name, port)).await {
        Ok(a) => a
            .filter(|a| match name.parse() {
                // An address literal: exempt only where a pattern names it on this port.
                Ok(literal) => a.ip() == literal && policy.literal_allowed(literal, port),
                Err(_) => policy.addr_allowed(a.ip()),
            })
            .collect(),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                format!("{host}: {e}"),
            ))
        }
    };
    addrs.first().copied().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "address-not-allowed",
            format!("{host} resolves to an address cistern may not connect to"),
        )
    })
}

/// Copies both ways until either side closes, no byte has moved for `idle`, or the process stops.
/// `hold` (the connection's place under `server.max_connections` and in the shutdown drain) is kept
/// until then.
async fn pipe<C>(client: C, mut upstream: TcpStream, idle: Duration, hold: Option<ConnHold>)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Activity {
        io: client,
        started,
        last: &last,
    };
    let mut stop = hold.as_ref().map(|h| h.stopping());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = &mut copy => break,
            _ = stopped(stop.as_mut()) => {
                tracing::debug!("closing a CONNECT tunnel: stopping");
                break;
            }
            _ = tokio::time::sleep(tick) => {
                let moved = Duration::from_millis(last.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(moved) >= idle {
                    tracing::debug!(idle_secs = idle.as_secs(), "closing an idle CONNECT tunnel");
                    break;
                }
            }
        }
    }
    drop(hold);
}

/// Resolves when the process is stopping (never without a receiver).
async fn stopped(stop: Option<&mut tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(s) => {
            while !*s.borrow() {
                if s.changed().await.is_err() {
                    return;
                }
            }
        }
        None => std::future::pending().await,
    }
}

/// The client side of a tunnel, noting when a byte last moved either way.
struct Activity<'a, T> {
    io: T,
    started: Instant,
    last: &'a AtomicU64,
}

impl<T> Activity<'_, T> {
    fn moved(&self, n: usize) {
        if n > 0 {
            let ms = self.started.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        self.moved(buf.filled().len() - before);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.moved(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
