//! Test harness: an in-process origin that can be slow, break mid-body, lie about digests, ignore Range
//! or be down; cistern nodes on OS-chosen loopback ports; a small client; and waits on conditions.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Digest as _;

pub type Body = BoxBody<Bytes, std::io::Error>;

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
}

/// Starts the real binary, `cistern serve --config <conf>`, with the fail points `failpoints`
/// (FAILPOINTS syntax; "" for none; they act only in a binary built with `--features failpoints`).
pub fn spawn_cistern(conf: &Path, failpoints: &str) -> std::process::Child {
    use std::process::{Command, Stdio};
    let mut c = Command::new(env!("CARGO_BIN_EXE_cistern"));
    c.args(["serve", "--config"])
        .arg(conf)
        .env_remove("FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !failpoints.is_empty() {
        c.env("FAILPOINTS", failpoints);
    }
    c.spawn().unwrap()
}

/// A loopback port free right now (for processes that must be told their port in a config file).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut out = Vec::with_capacity(n);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    Bytes::from(out)
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

impl Origin {
    pub async fn start() -> Origin {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Origin {
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
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let (f, l, b, s) = (f.clone(), l.clone(), b.clone(), s.clone());
                let h = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (f, l, b, s) = (f.clone(), l.clone(), b.clone(), s.clone());
                        async move { Ok::<_, std::convert::Infallible>(serve(req, f, l, b, s)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
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

    /// Stops answering: the listener closes, connections are refused.
    pub fn stop(&self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
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
    let mut status = StatusCode::OK;
    if let Some(r) = req.headers().get("range").and_then(|v| v.to_str().ok()) {
        let if_range_ok = match (req.headers().get("if-range"), &etag) {
            (Some(v), Some(e)) => v.to_str().unwrap_or("") == e,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if !b.ignore_range && if_range_ok {
            if let Some(a) = r.strip_prefix("bytes=").and_then(|x| x.strip_suffix('-')) {
                start = a.parse().unwrap_or(0);
                status = StatusCode::PARTIAL_CONTENT;
            }
        }
    }
    let mut body_bytes = full_body.slice(start..);
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
    let len = total - start;
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
            format!("bytes {start}-{}/{total}", total - 1)
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

/// A cistern node running in this process.
pub struct Node {
    pub gw: Option<cistern::Gateway>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub cfg: cistern::config::Config,
    _tmp: Option<tempfile::TempDir>,
}

pub fn config(dir: &Path, origin: &Origin, extra: &str) -> cistern::config::Config {
    let text = format!(
        r#"
[node]
id = "test-node"
[server]
listen = "127.0.0.1:0"
[store]
dir = "{dir}"
min_free = "0"
[upstream]
allowed_origins = ["127.0.0.1:{port}"]
connect_timeout = "2s"
idle_timeout = "2s"
retries = 3
[[origins]]
name = "t"
url = "http://127.0.0.1:{port}"
{extra}
"#,
        dir = dir.join("data").display(),
        port = origin.addr.port()
    );
    cistern::config::Config::from_toml_str(&text, "test", &[]).unwrap()
}

impl Node {
    pub async fn start(origin: &Origin, extra: &str) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), origin, extra);
        let mut n = Node::start_with(cfg).await;
        n.dir = tmp.path().to_path_buf();
        n._tmp = Some(tmp);
        n
    }

    pub async fn start_with(cfg: cistern::config::Config) -> Node {
        let dir = cfg.store.dir.parent().unwrap().to_path_buf();
        let gw = cistern::Gateway::start(cfg.clone()).await.unwrap();
        let addr = gw.addr.unwrap();
        Node {
            gw: Some(gw),
            addr,
            dir,
            cfg,
            _tmp: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn data(&self) -> PathBuf {
        self.cfg.store.dir.clone()
    }

    /// Blob files in the store (not `.meta`).
    pub fn blobs(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.data().join("sha256")) {
            for shard in rd.flatten() {
                for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                    let n = f.file_name().to_string_lossy().to_string();
                    if !n.contains('.') {
                        out.push(n);
                    }
                }
            }
        }
        out
    }

    /// Keeps a temporary directory alive as long as the node.
    pub fn keep(&mut self, tmp: tempfile::TempDir) {
        self._tmp = Some(tmp);
    }

    /// Stops the node, keeping its directory; `restart` starts a new one on the same store.
    pub async fn stop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await;
        }
    }

    /// In-process, the stopped node's last tasks may still hold the store's lock for a moment (a new
    /// process would not share them): the start is retried for a few seconds.
    pub async fn restart(&mut self) {
        self.stop().await;
        let end = Instant::now() + Duration::from_secs(10);
        let gw = loop {
            match cistern::Gateway::start(self.cfg.clone()).await {
                Ok(gw) => break gw,
                Err(e) if Instant::now() < end => {
                    eprintln!("restart: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart: {e:#}"),
            }
        };
        self.addr = gw.addr.unwrap();
        self.gw = Some(gw);
    }
}

/// A top gateway and a child whose `upstream.parents` is `parents` (`TOP` stands for the top's URL).
pub async fn top_and_child(origin: &Origin, parents: &str) -> (Node, Node) {
    let top = Node::start(origin, "").await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), origin, "");
    cfg.node.id = "child".into();
    cfg.upstream.parents = parents
        .replace("TOP", &format!("http://{}", top.addr))
        .split(',')
        .map(str::to_string)
        .collect();
    // The child names the origin only through its named origin; its allowlist is otherwise empty.
    cfg.upstream.allowed_origins.clear();
    let mut child = Node::start_with(cfg).await;
    child.keep(tmp);
    (top, child)
}

/// What a client saw.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body ended with an error (the connection was aborted before the end).
    pub aborted: bool,
}

impl Got {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Got {
    request_body(method, url, headers, Bytes::new()).await
}

pub async fn request_body(method: &str, url: &str, headers: &[(&str, &str)], body: Bytes) -> Got {
    let uri: http::Uri = url.parse().unwrap();
    let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    req = req.header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    got(resp).await
}

/// Reads a response whole. A body that ends with an error keeps every byte received before it, so
/// that a test can tell how far a cut-off download got.
async fn got(resp: Response<hyper::body::Incoming>) -> Got {
    let (parts, mut b) = resp.into_parts();
    let mut out = Vec::new();
    let mut aborted = false;
    while let Some(f) = b.frame().await {
        match f {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    Got {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(out),
        aborted,
    }
}

pub async fn get(url: &str) -> Got {
    request("GET", url, &[]).await
}

/// Sends a GET in forward-proxy form (absolute URL) to `proxy`.
pub async fn proxy_get(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> Got {
    proxy_request(proxy, "GET", url, headers, Bytes::new()).await
}

/// Sends a request in forward-proxy form (absolute URL) to `proxy`.
pub async fn proxy_request(
    proxy: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let sock = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(uri.clone())
        .header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    got(resp).await
}

/// Waits until `cond` holds, failing the test after `secs`.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}
