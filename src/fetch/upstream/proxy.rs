//! `upstream.proxy` (SPEC 2): origin traffic through a site's HTTP proxy. Plain-http origins are asked in
//! absolute form on a connection to the proxy; https origins through a `CONNECT` tunnel, with TLS to the
//! origin (its name verified) inside it. The proxy resolves names, so the address check is the proxy's;
//! the host-pattern check still applies before anything is sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;

use super::connect::{self, ReqBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of a proxy's answer to CONNECT that are read before giving up on it.
const MAX_CONNECT_HEAD: usize = 16 << 10;

/// The connector that proxies wrap: plain TCP, TLS when the target is https.
pub type Inner = connect::Https;

/// Connects to one fixed address (a parent or an HTTP proxy) whatever the request's URI, and marks the
/// connection as proxied so that requests on it go out in absolute form (RFC 9112 §3.2.2).
#[derive(Clone)]
pub struct ProxyConnector {
    inner: Inner,
    target: Uri,
}

impl ProxyConnector {
    pub fn new(inner: Inner, target: Uri) -> Self {
        ProxyConnector { inner, target }
    }
}

/// A connection as hyper's pool sees it: the stream, and what to tell the pool about it (whether
/// requests on it go out in absolute form, to a proxy).
pub struct Wrapped<T> {
    io: T,
    proxied: bool,
}

impl<T> Connection for Wrapped<T> {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Wrapped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Wrapped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

type Stream = <Inner as tower_service::Service<Uri>>::Response;

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = Wrapped<Stream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let fut = self.inner.call(self.target.clone());
        Box::pin(async move {
            Ok(Wrapped {
                io: fut.await?,
                proxied: true,
            })
        })
    }
}

/// The two clients that go through the proxy.
#[derive(Clone)]
pub struct ProxyClients {
    pub http: Client<ProxyConnector, ReqBody>,
    pub https: Client<TunnelConnector, ReqBody>,
}

impl ProxyClients {
    pub fn new(proxy: Uri, tls: rustls::ClientConfig, connect_timeout: Duration) -> ProxyClients {
        let to_proxy = connect::connector(tls.clone(), Some(connect_timeout));
        let http = Client::builder(TokioExecutor::new())
            .http1_title_case_headers(true)
            .build(ProxyConnector::new(to_proxy, proxy.clone()));
        let tunnel = TunnelConnector {
            proxy,
            tls: connect::stream_connector(tls),
            connect_timeout,
        };
        let https = Client::builder(TokioExecutor::new())
            .http1_title_case_headers(true)
            .build(tunnel);
        ProxyClients { http, https }
    }
}

/// Opens a CONNECT tunnel through the proxy to the request's origin and speaks TLS inside it.
#[derive(Clone)]
pub struct TunnelConnector {
    proxy: Uri,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

/// A TLS stream to the origin inside a CONNECT tunnel: requests on it go in origin form.
pub type Tunnel = Wrapped<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = Tunnel;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tunnel, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = dst
                .host()
                .ok_or("no host in the URL")?
                .trim_matches(['[', ']'])
                .to_string();
            let port = dst.port_u16().unwrap_or(443);
            let proxy_host = this
                .proxy
                .host()
                .ok_or("upstream.proxy has no host")?
                .to_string();
            let proxy_port = this.proxy.port_u16().unwrap_or(80);
            let mut tcp = tokio::time::timeout(
                this.connect_timeout,
                TcpStream::connect((proxy_host.as_str(), proxy_port)),
            )
            .await
            .map_err(|_| format!("proxy {proxy_host}:{proxy_port}: connect timed out"))??;
            let _ = tcp.set_nodelay(true);
            let target = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            tcp.write_all(req.as_bytes()).await?;
            let head = tokio::time::timeout(this.connect_timeout, read_head(&mut tcp))
                .await
                .map_err(|_| format!("proxy {proxy_host}:{proxy_port}: no answer to CONNECT"))??;
            let status = head.split_whitespace().nth(1).unwrap_or("");
            if status != "200" {
                return Err(format!(
                    "proxy refused CONNECT {target}: {}",
                    head.lines().next().unwrap_or("")
                )
                .into());
            }
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = this.tls.connect(name, tcp).await?;
            Ok(Wrapped {
                io: TokioIo::new(tls),
                proxied: false,
            })
        })
    }
}

/// Reads the proxy's response head byte by byte (nothing of the tunnel after it may be consumed).
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 || head.len() > MAX_CONNECT_HEAD {
            return Err(std::io::Error::other(
                "the proxy closed or sent an overlong answer to CONNECT",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}
