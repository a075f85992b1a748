//! Test harness: an in-process origin that can be slow, break mid-body, lie about digests, ignore Range
//! or be down; cistern nodes on OS-chosen loopback ports; a small client; and waits on conditions.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Digest as _;

pub type Body = BoxBody<Bytes, std::io::Error>;

mod binary;
mod origin;
mod raw;
pub mod registry;
mod tls;
pub mod upstream_auth;
#[allow(unused_imports)]
pub use binary::*;
pub use origin::*;
#[allow(unused_imports)]
pub use raw::*;
#[allow(unused_imports)]
pub use tls::*;

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

    /// A 200 with exactly `want` as its body (`what` names it in the failure, with the body sent).
    pub fn assert_whole(&self, what: &str, want: &[u8]) {
        assert_eq!(
            self.status,
            200,
            "{what}: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(self.body == want, "{what}: wrong bytes");
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Got {
    request_body(method, url, headers, Bytes::new()).await
}

/// A new HTTP/1.1 connection to the authority of `uri`, its driver spawned.
pub async fn connect_to<B>(uri: &http::Uri) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn request_body(method: &str, url: &str, headers: &[(&str, &str)], body: Bytes) -> Got {
    let uri: http::Uri = url.parse().unwrap();
    let mut sender = connect_to(&uri).await;
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    // The URL's authority, unless the caller names a Host of its own.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", uri.authority().unwrap().as_str());
    }
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

/// A request to the admin API of a node without a token, sent as the CLI sends it: `Content-Type:
/// application/octet-stream` on a sideload (PUT), `application/json` on any other request that changes
/// state (a web page cannot send either without a CORS preflight: SPEC 6).
pub async fn admin_request(method: &str, url: &str, body: Bytes) -> Got {
    let ct = match method {
        "GET" | "HEAD" => None,
        "PUT" => Some("application/octet-stream"),
        _ => Some("application/json"),
    };
    let h: Vec<(&str, &str)> = ct.map(|ct| ("content-type", ct)).into_iter().collect();
    request_body(method, url, &h, body).await
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
