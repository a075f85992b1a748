//! The accept loop (the mini-redis shape): a semaphore bounds connections, accept errors back off, each
//! connection is served by hyper with bounded headers and timeouts, and shutdown stops accepting and
//! lets connections in flight finish within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::App;

/// Request head bound: request line plus headers (431 beyond it).
const MAX_HEAD_BYTES: usize = 64 << 10;
/// A client has this long to send a request head (also the keep-alive idle bound).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound sockets, opened before serving so that bind errors are reported at start.
pub struct Listeners {
    pub plain: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(addr: &str) -> std::io::Result<Listeners> {
        let plain = if addr.is_empty() {
            None
        } else {
            Some(TcpListener::bind(addr).await?)
        };
        Ok(Listeners { plain })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Serves until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    // Every connection task holds a clone of `done_tx`; when all are gone, `done_rx` yields None.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(app.cfg.server.max_connections));
    let Some(listener) = listeners.plain else {
        shutdown.await;
        return;
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(5); x }
                Err(e) => {
                    // EMFILE and friends: wait rather than spin (mini-redis does the same).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        app.stats
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let app = app.clone();
        let svc = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(app.handle(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(sock), svc)
            .with_upgrades();
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
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
            drop(permit);
            drop(done);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    tokio::select! {
        _ = done_rx.recv() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}
