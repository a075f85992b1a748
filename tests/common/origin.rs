//! The in-process origin of the tests: files with a behaviour each (slow, breaking mid-body, lying
//! about digests, ignoring Range, redirecting, varying), a log of every request it received, and a
//! switch to stop answering.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use sha2::Digest as _;

use super::Body;

/// How the origin misbehaves for one file.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Bytes per second per response (None = as fast as possible).
    pub rate: Option<u64>,
    /// Break the connection after this many body bytes, for the first `breaks` responses.
    pub break_after: Option<usize>,
    pub breaks: usize,
    /// Send a Repr-Digest that does not match the body.
    pub wrong_digest: bool,
    /// Send the right Repr-Digest.
    pub right_digest: bool,
    /// Answer Range requests with the whole body (200).
    pub ignore_range: bool,
    pub etag: Option<String>,
    pub cache_control: Option<String>,
    pub status: Option<u16>,
    /// Answer 302 to this Location.
    pub location: Option<String>,
    /// Send no Content-Length (a chunked body of unknown length).
    pub chunked: bool,
    /// More response fields, on every answer (200, 304, other statuses).
    pub headers: Vec<(&'static str, String)>,
    /// The body depends on this request field (its value is appended), and the response says
    /// `Vary: <field>`.
    pub vary_body: Option<&'static str>,
    /// Answer every Range request with this status (a resume that fails).
    pub range_status: Option<u16>,
    /// Bytes per body frame (default 16 KiB): small frames at a low rate make a trickle that never
    /// goes idle.
    pub chunk: Option<usize>,
    /// Time before the response head (every request for the file, a 304 included).
    pub head_delay: Option<Duration>,
}

pub struct OriginFile {
    pub body: Bytes,
    pub behaviour: Behaviour,
}

#[derive(Default)]
pub struct OriginLog {
    /// (method, path, request headers) of every request.
    pub requests: Vec<(String, String, HeaderMap)>,
}

pub struct Origin {
    pub addr: SocketAddr,
    files: Arc<Mutex<HashMap<String, OriginFile>>>,
    log: Arc<Mutex<OriginLog>>,
    served_breaks: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    pub bytes_sent: Arc<AtomicUsize>,
    /// Connections that came over TLS (an origin started with `start_tls`).
    pub tls_connections: Arc<AtomicUsize>,
    /// The kernel send buffer of connections accepted from now on (0: autotuned), for tests that
    /// count bytes as a link would: on loopback an autotuned buffer takes megabytes at once, which
    /// `bytes_sent` would count as sent.
    pub send_buffer: Arc<AtomicUsize>,
}

impl Origin {
    pub async fn start() -> Origin {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Origin {
        Self::start_with(addr, None).await
    }

    /// An origin that speaks TLS (with `tls`) and plain HTTP on one port: a connection whose first
    /// byte opens a TLS handshake is TLS, any other plain; the same files and log either way.
    pub async fn start_tls(tls: tokio_rustls::TlsAcceptor) -> Origin {
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(tls)).await
    }

    async fn start_with(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files: Arc<Mutex<HashMap<String, OriginFile>>> = Default::default();
        let log: Arc<Mutex<OriginLog>> = Default::default();
        let served_breaks: Arc<Mutex<HashMap<String, usize>>> = Default::default();
        let bytes_sent = Arc::new(AtomicUsize::new(0));
        let (f, l, b, s) = (
            files.clone(),
            log.clone(),
            served_breaks.clone(),
            bytes_sent.clone(),
        );
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let c = conns.clone();
        let tls_connections = Arc::new(AtomicUsize::new(0));
        let tc = tls_connections.clone();
        let send_buffer = Arc::new(AtomicUsize::new(0));
        let sndbuf = send_buffer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let bound = sndbuf.load(Ordering::Relaxed);
                if bound > 0 {
                    let _ = socket2::SockRef::from(&sock).set_send_buffer_size(bound);
                }
                let (f, l, b, s) = (f.clone(), l.clone(), b.clone(), s.clone());
                let (tls, tc) = (tls.clone(), tc.clone());
                let h = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (f, l, b, s) = (f.clone(), l.clone(), b.clone(), s.clone());
                        async move {
                            let delay = f
                                .lock()
                                .unwrap()
                                .get(req.uri().path())
                                .and_then(|o| o.behaviour.head_delay);
                            if let Some(d) = delay {
                                tokio::time::sleep(d).await;
                            }
                            Ok::<_, std::convert::Infallible>(serve(req, f, l, b, s))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let mut first = [0u8; 1];
                    match (tls, sock.peek(&mut first).await) {
                        // 0x16: a TLS handshake record.
                        (Some(acceptor), Ok(1)) if first[0] == 0x16 => {
                            if let Ok(s) = acceptor.accept(sock).await {
                                tc.fetch_add(1, Ordering::Relaxed);
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        _ => {
                            let _ = http.serve_connection(TokioIo::new(sock), svc).await;
                        }
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Origin {
            addr,
            files,
            log,
            served_breaks,
            task,
            conns,
            bytes_sent,
            tls_connections,
            send_buffer,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn put(&self, path: &str, body: Bytes, behaviour: Behaviour) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), OriginFile { body, behaviour });
    }

    /// Answers 302 with `Location: to` for `path`.
    pub fn redirect(&self, path: &str, to: &str) {
        let b = Behaviour {
            status: Some(302),
            location: Some(to.to_string()),
            ..Default::default()
        };
        self.put(path, Bytes::new(), b);
    }

    /// GET requests the origin received for a path.
    pub fn gets(&self, path: &str) -> usize {
        self.requests(path)
            .iter()
            .filter(|(m, _)| m == "GET")
            .count()
    }

    /// The methods of every request for `path`, in order.
    pub fn log_methods(&self, path: &str) -> Vec<String> {
        self.requests(path).into_iter().map(|(m, _)| m).collect()
    }

    pub fn requests(&self, path: &str) -> Vec<(String, HeaderMap)> {
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(_, p, _)| p == path)
            .map(|(m, _, h)| (m.clone(), h.clone()))
            .collect()
    }

    /// Drops every open connection (an idle timeout, a NAT forgetting it) and goes on listening.
    pub fn drop_connections(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Stops answering: the listener closes, connections are refused.
    pub fn stop(&self) {
        self.task.abort();
        self.drop_connections();
    }
}

fn serve(
    req: Request<hyper::body::Incoming>,
    files: Arc<Mutex<HashMap<String, OriginFile>>>,
    log: Arc<Mutex<OriginLog>>,
    served_breaks: Arc<Mutex<HashMap<String, usize>>>,
    bytes_sent: Arc<AtomicUsize>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    log.lock().unwrap().requests.push((
        req.method().to_string(),
        path.clone(),
        req.headers().clone(),
    ));
    let files = files.lock().unwrap();
    let Some(file) = files.get(&path) else {
        return resp(
            StatusCode::NOT_FOUND,
            Full::new(Bytes::from_static(b"no such file"))
                .map_err(|n| match n {})
                .boxed(),
        );
    };
    let b = &file.behaviour;
    if let Some(s) = b.status {
        let body = Full::new(Bytes::from_static(b"origin error"))
            .map_err(|n| match n {})
            .boxed();
        let mut r = resp(StatusCode::from_u16(s).unwrap(), body);
        if let Some(l) = &b.location {
            r.headers_mut().insert("location", l.parse().unwrap());
        }
        if let Some(cc) = &b.cache_control {
            r.headers_mut().insert("cache-control", cc.parse().unwrap());
        }
        extra_headers(&mut r, b);
        return r;
    }
    if let (Some(s), true) = (b.range_status, req.headers().contains_key("range")) {
        let body = Full::new(Bytes::from_static(b"no ranges today"))
            .map_err(|n| match n {})
            .boxed();
        return resp(StatusCode::from_u16(s).unwrap(), body);
    }
    let etag = b.etag.clone();
    if let (Some(e), Some(inm)) = (&etag, req.headers().get("if-none-match")) {
        if inm.to_str().unwrap_or("") == e {
            let mut r = resp(
                StatusCode::NOT_MODIFIED,
                Empty::new().map_err(|n| match n {}).boxed(),
            );
            r.headers_mut().insert("etag", e.parse().unwrap());
            if let Some(cc) = &b.cache_control {
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            extra_headers(&mut r, b);
            return r;
        }
    }
    let full_body = match b.vary_body {
        Some(n) => {
            let v = req.headers().get(n).map(|v| v.as_bytes()).unwrap_or(b"-");
            Bytes::from([&file.body[..], v].concat())
        }
        None => file.body.clone(),
    };
    let total = full_body.len();
    let mut start = 0usize;
    let mut end = total;
    let mut status = StatusCode::OK;
    if let Some(r) = req.headers().get("range").and_then(|v| v.to_str().ok()) {
        let if_range_ok = match (req.headers().get("if-range"), &etag) {
            (Some(v), Some(e)) => v.to_str().unwrap_or("") == e,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if !b.ignore_range && if_range_ok {
            if let Some((a, b)) = byte_range(r, total) {
                (start, end) = (a, b);
                status = StatusCode::PARTIAL_CONTENT;
            }
        }
    }
    let mut body_bytes = full_body.slice(start..end);
    let mut break_now = false;
    if let Some(n) = b.break_after {
        let mut sb = served_breaks.lock().unwrap();
        let done = sb.entry(path.clone()).or_default();
        if *done < b.breaks {
            *done += 1;
            break_now = true;
            body_bytes = body_bytes.slice(..n.min(body_bytes.len()));
        }
    }
    let rate = b.rate;
    let chunk = b.chunk.unwrap_or(16 << 10);
    let len = end - start;
    let sent = bytes_sent.clone();
    let stream =
        futures_util::stream::unfold((body_bytes, break_now, false), move |(rest, brk, done)| {
            let sent = sent.clone();
            async move {
                if done {
                    return None;
                }
                if rest.is_empty() {
                    return if brk {
                        Some((
                            Err(std::io::Error::other("origin breaks the connection")),
                            (rest, false, true),
                        ))
                    } else {
                        None
                    };
                }
                let n = chunk.min(rest.len());
                if let Some(r) = rate {
                    tokio::time::sleep(Duration::from_micros((n as u64) * 1_000_000 / r)).await;
                }
                sent.fetch_add(n, Ordering::Relaxed);
                Some((
                    Ok(Frame::data(rest.slice(..n))),
                    (rest.slice(n..), brk, false),
                ))
            }
        });
    let mut r = resp(status, StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    if !b.chunked {
        h.insert("content-length", len.to_string().parse().unwrap());
    }
    h.insert("content-type", "application/x-test".parse().unwrap());
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            "content-range",
            format!("bytes {start}-{}/{total}", end.saturating_sub(1))
                .parse()
                .unwrap(),
        );
    }
    if let Some(e) = &etag {
        h.insert("etag", e.parse().unwrap());
    }
    if let Some(cc) = &b.cache_control {
        h.insert("cache-control", cc.parse().unwrap());
    }
    if let Some(n) = b.vary_body {
        h.insert("vary", n.parse().unwrap());
    }
    extra_headers(&mut r, b);
    let h = r.headers_mut();
    if b.wrong_digest || b.right_digest {
        use base64::Engine;
        let d = if b.wrong_digest {
            sha2::Sha256::digest(b"not the body")
        } else {
            sha2::Sha256::digest(&file.body)
        };
        let v = format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(d)
        );
        h.insert("repr-digest", v.parse().unwrap());
    }
    r
}

/// `bytes=a-` and `bytes=a-b` (b clamped to the end) as [start, end); anything else is answered whole.
fn byte_range(r: &str, total: usize) -> Option<(usize, usize)> {
    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
    let a = a.parse::<usize>().ok()?.min(total);
    let b = match b {
        "" => total,
        b => b.parse::<usize>().ok()?.saturating_add(1),
    };
    Some((a, b.clamp(a, total)))
}

fn extra_headers(r: &mut Response<Body>, b: &Behaviour) {
    for (k, v) in &b.headers {
        r.headers_mut().append(*k, v.parse().unwrap());
    }
}

fn resp(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}
