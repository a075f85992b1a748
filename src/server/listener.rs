//! The accept loops (the mini-redis shape): a semaphore bounds connections, accept errors back off, each
//! connection (plain or TLS) is served by hyper with bounded headers and timeouts, and shutdown stops
//! accepting and lets connections in flight finish within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::stall::Stall;
use super::tunnel::Inside;
use super::App;

/// Request head bound: request line plus headers (431 beyond it).
const MAX_HEAD_BYTES: usize = 64 << 10;
/// A client has this long to send a request head (also the keep-alive idle bound, and the bound on
/// the TLS handshake inside an intercepted tunnel).
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that takes no response bytes for this long is disconnected.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A TLS client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound sockets, opened before serving so that bind errors are reported at start.
pub struct Listeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<(TcpListener, TlsAcceptor)>,
}

impl Listeners {
    pub async fn bind(addr: &str, tls: Option<(&str, TlsAcceptor)>) -> std::io::Result<Listeners> {
        let plain = if addr.is_empty() {
            None
        } else {
            Some(TcpListener::bind(addr).await?)
        };
        let tls = match tls {
            Some((a, acceptor)) => Some((TcpListener::bind(a).await?, acceptor)),
            None => None,
        };
        Ok(Listeners { plain, tls })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

/// What every accept loop and connection task shares for shutdown.
#[derive(Clone)]
struct Shutdown {
    /// Turns true when the process is stopping.
    stop: watch::Receiver<bool>,
    /// Held by every connection task: when all clones are gone, the drain is over.
    _done: mpsc::Sender<()>,
}

/// What a connection holds while it lasts, put in each request's extensions so that a CONNECT tunnel,
/// which outlives the HTTP connection it came on, holds it too: the tunnel counts against
/// `server.max_connections`, keeps the shutdown drain waiting, and sees the stop.
#[derive(Clone)]
pub(super) struct ConnHold {
    _permit: Arc<OwnedSemaphorePermit>,
    guard: Shutdown,
}

impl ConnHold {
    fn new(permit: OwnedSemaphorePermit, guard: Shutdown) -> ConnHold {
        ConnHold {
            _permit: Arc::new(permit),
            guard,
        }
    }

    /// Turns true when the process is stopping.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.guard.stop.clone()
    }
}

/// Serves until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let guard = Shutdown {
        stop: stop_rx,
        _done: done_tx,
    };
    let limit = Arc::new(Semaphore::new(app.cfg.server.max_connections));
    let mut loops = Vec::new();
    if let Some(l) = listeners.plain {
        loops.push(tokio::spawn(accept_loop(
            app.clone(),
            l,
            None,
            limit.clone(),
            guard.clone(),
        )));
    }
    if let Some((l, acceptor)) = listeners.tls {
        loops.push(tokio::spawn(accept_loop(
            app.clone(),
            l,
            Some(acceptor),
            limit.clone(),
            guard.clone(),
        )));
    }
    drop(guard);
    shutdown.await;
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    tokio::select! {
        _ = done_rx.recv() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

/// Bounds a client connection's kernel send buffer (`server.send_buffer`; 0 keeps autotuning). With
/// the kernel's default of up to 4 MiB queued per connection, bytes wait long enough to leave the CPU
/// caches before they go out; 256 KiB (the kernel doubles it) served about a quarter more bytes per CPU
/// second to local clients, whether the bytes go out by `sendfile` or by copy.
fn set_send_buffer(sock: &tokio::net::TcpStream, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let size = usize::try_from(bytes).unwrap_or(usize::MAX).min(1 << 30);
    if let Err(e) = socket2::SockRef::from(sock).set_send_buffer_size(size) {
        tracing::debug!(error = %e, "could not set the send buffer size");
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limit: Arc<Semaphore>,
    guard: Shutdown,
) {
    let mut stop = guard.stop.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (sock, peer) = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(5); x }
                Err(e) => {
                    // EMFILE and friends: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        set_send_buffer(&sock, app.cfg.server.send_buffer.0);
        app.stats
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (app, guard, tls) = (app.clone(), guard.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let io = Stall::new(super::zerocopy::Conn::new(sock), STALL_TIMEOUT);
                    connection(app, io, peer, ConnHold::new(permit, guard), None).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let io = Stall::new(TokioIo::new(s), STALL_TIMEOUT);
                            let hold = ConnHold::new(permit, guard);
                            connection(app, io, peer, hold, Some(Arrival::Tls)).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer.ip(), error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(client = %peer.ip(), "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// How a request reached cistern, when not in plain HTTP on a listener: put in its extensions.
#[derive(Clone, Debug)]
pub(super) enum Arrival {
    /// On the TLS listener: the cache-host form asks its origin over https (SPEC 3).
    Tls,
    /// Inside an intercepted CONNECT tunnel to a host.
    Tunnel(Inside),
}

/// Serves the requests inside an intercepted tunnel (after its TLS handshake) as a connection of
/// the listeners: the same bounds, the connection's hold kept until it ends.
pub(super) async fn tunnelled<I>(
    app: Arc<App>,
    io: I,
    peer: SocketAddr,
    hold: ConnHold,
    inside: Inside,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let io = Stall::new(io, STALL_TIMEOUT);
    connection(app, io, peer, hold, Some(Arrival::Tunnel(inside))).await
}

async fn connection<I>(
    app: Arc<App>,
    io: I,
    peer: SocketAddr,
    hold: ConnHold,
    arrival: Option<Arrival>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let guard = hold.guard.clone();
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        req.extensions_mut().insert(hold.clone());
        if let Some(a) = &arrival {
            req.extensions_mut().insert(a.clone());
        }
        async move {
            let mut res = app.handle(req, peer).await;
            super::case::canonical(&mut res);
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // Canonical header case on the wire (SPEC 3): the Delivery Optimization agent looks up
        // `Content-Length` and `Content-Range` by exact case and cannot resume without them. Title
        // case for most names; `case::canonical` spells the exceptions (`ETag`, ...) right.
        .title_case_headers(true)
        // Both: `max_buf_size` alone lets a head larger than it through when it arrives in one read.
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stop = guard.stop.clone();
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepted() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (c, a) = tokio::join!(c, l.accept());
        (c.unwrap(), a.unwrap().0)
    }

    #[tokio::test]
    async fn the_send_buffer_is_bounded_unless_zero() {
        let (_c, s) = accepted().await;
        let before = socket2::SockRef::from(&s).send_buffer_size().unwrap();
        set_send_buffer(&s, 0);
        assert_eq!(
            socket2::SockRef::from(&s).send_buffer_size().unwrap(),
            before
        );
        set_send_buffer(&s, 256 << 10);
        // Linux doubles the value for its bookkeeping.
        let got = socket2::SockRef::from(&s).send_buffer_size().unwrap();
        assert!((256 << 10..=512 << 10).contains(&got), "{got}");
    }
}
