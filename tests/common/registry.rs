//! Container registries for the image tests: Debian's `docker-registry` (distribution 2.8) on a loopback
//! port with its storage in a temporary directory, a front in this process that every pull goes through
//! (it counts requests, can lie about blob bytes, can stop answering, and can ask for bearer tokens it
//! hands out itself), a small OCI image layout built from a few files, `skopeo`, and a `Site`: the
//! registry with one image pushed, its front, and a cistern node mirroring it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{free_port, get, random_bytes, request, sha256_hex, Node};

/// `docker-registry` running on a loopback port; killed when dropped.
pub struct DistRegistry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// None (and a SKIPPED line) where a program is missing, unless `CISTERN_REQUIRE_REGISTRY` is set
/// (`.ci/run` installs them and sets it: there the tests must run).
pub fn programs_present() -> bool {
    let missing: Vec<&str> = ["/usr/bin/docker-registry", "/usr/bin/skopeo"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CISTERN_REQUIRE_REGISTRY").is_none(),
        "{missing:?} not installed (apt-get install docker-registry skopeo)"
    );
    eprintln!("SKIPPED: {missing:?} not installed (apt-get install docker-registry skopeo)");
    false
}

impl DistRegistry {
    pub async fn start() -> DistRegistry {
        DistRegistry::start_with("").await
    }

    /// With `auth` (YAML at the top level of its config, e.g. `auth:\n  htpasswd: ...`); it is up
    /// when `/v2/` answers (200, or 401 when it asks for credentials).
    pub async fn start_with(auth: &str) -> DistRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("config.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("storage").display()
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut r = DistRegistry {
            child,
            port,
            _dir: dir,
        };
        let url = format!("http://127.0.0.1:{port}/v2/");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // The check runs in its own task: a connection refused between the probe and the
            // request (the registry still starting) is a retry, not a failed test.
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && tokio::spawn({
                    let url = url.clone();
                    async move { super::get(&url).await }
                })
                .await
                .is_ok_and(|g| [StatusCode::OK, StatusCode::UNAUTHORIZED].contains(&g.status));
            if up {
                return r;
            }
            assert!(
                r.child.try_wait().unwrap().is_none(),
                "docker-registry exited at start"
            );
            assert!(
                std::time::Instant::now() < end,
                "docker-registry did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DistRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the front in front of the registry does.
#[derive(Default)]
pub struct FrontState {
    /// Every request: method and path with query.
    pub log: Mutex<Vec<(String, String)>>,
    /// Every request's `Authorization` ("" without one), in the order of `log` (a front before a
    /// parent gateway shows what its children present).
    pub authorizations: Mutex<Vec<String>>,
    /// Blob bodies come back with one byte changed (same length).
    pub tamper: AtomicBool,
    /// So do manifest bodies.
    pub tamper_manifests: AtomicBool,
    /// Connections are closed without an answer (the registry is unreachable).
    pub down: AtomicBool,
    /// Requests need `Authorization: Bearer <token>`, handed out at `/token` to `user:secret`.
    pub bearer: AtomicBool,
    /// Tokens handed out.
    pub tokens: AtomicUsize,
    /// Requests need `Authorization: Basic` of `user:secret`.
    pub basic: AtomicBool,
    /// The client's `Authorization` goes on to the registry (which asks for credentials itself).
    pub pass_auth: AtomicBool,
    /// Blob GETs are answered 307 to the same path on this address (blob storage elsewhere).
    pub redirect_blobs: Mutex<Option<SocketAddr>>,
}

pub struct Front {
    pub addr: SocketAddr,
    pub state: Arc<FrontState>,
    /// The registry's port behind it.
    port: u16,
}

const TOKEN: &str = "tok-4711";

impl Front {
    pub async fn start(registry_port: u16) -> Front {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(FrontState::default());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        answer(st.clone(), registry_port, addr, req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Front {
            addr,
            state,
            port: registry_port,
        }
    }

    /// The port of the registry behind the front (for pushes, which do not go through it).
    pub fn upstream_port(&self) -> u16 {
        self.port
    }

    /// GET requests for blobs that reached the registry.
    pub fn blob_gets(&self) -> usize {
        self.count(|m, p| m == "GET" && p.contains("/blobs/"))
    }

    pub fn count(&self, f: impl Fn(&str, &str) -> bool) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|(m, p)| f(m, p)).count()
    }
}

async fn answer(
    st: Arc<FrontState>,
    port: u16,
    me: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if st.down.load(Ordering::SeqCst) {
        return Err(std::io::Error::other("down"));
    }
    let method = req.method().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    st.log.lock().unwrap().push((method.clone(), pq.clone()));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let auth = auth.unwrap_or_default().to_string();
    st.authorizations.lock().unwrap().push(auth);
    if st.bearer.load(Ordering::SeqCst) {
        if pq.starts_with("/token") {
            let ok = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                == Some("Basic dXNlcjpzZWNyZXQ=");
            if !ok || !pq.contains("scope=repository%3A") {
                return Ok(status(StatusCode::UNAUTHORIZED));
            }
            st.tokens.fetch_add(1, Ordering::SeqCst);
            let body = format!("{{\"token\":\"{TOKEN}\",\"expires_in\":300}}");
            return Ok(Response::new(Full::new(Bytes::from(body))));
        }
        let authed = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        if !authed && pq != "/v2/" {
            let mut r = status(StatusCode::UNAUTHORIZED);
            let c = format!(
                "Bearer realm=\"http://{me}/token\",service=\"front\",scope=\"repository:x:pull\""
            );
            r.headers_mut()
                .insert("www-authenticate", c.parse().unwrap());
            return Ok(r);
        }
    }
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some("Basic dXNlcjpzZWNyZXQ=");
    if st.basic.load(Ordering::SeqCst) && !basic && pq != "/v2/" {
        let mut r = status(StatusCode::UNAUTHORIZED);
        let c = "Basic realm=\"front\"".parse().unwrap();
        r.headers_mut().insert("www-authenticate", c);
        return Ok(r);
    }
    let storage = *st.redirect_blobs.lock().unwrap();
    if let (Some(to), true) = (storage, method == "GET" && pq.contains("/blobs/")) {
        let mut r = status(StatusCode::TEMPORARY_REDIRECT);
        let at = format!("http://{to}{pq}?sig=1");
        r.headers_mut().insert("location", at.parse().unwrap());
        return Ok(r);
    }
    let tamper = method == "GET"
        && ((st.tamper.load(Ordering::SeqCst) && pq.contains("/blobs/"))
            || (st.tamper_manifests.load(Ordering::SeqCst) && pq.contains("/manifests/")));
    let mut out = Request::builder().method(req.method()).uri(&pq);
    for (k, v) in req.headers() {
        let auth_ok = k != "authorization" || st.pass_auth.load(Ordering::SeqCst);
        if auth_ok && k != "host" {
            out = out.header(k, v);
        }
    }
    let out = out
        .header("host", format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let uri: http::Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
    let mut sender = super::connect_to(&uri).await;
    let resp = sender
        .send_request(out)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = resp.into_parts();
    let mut bytes = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes()
        .to_vec();
    if tamper && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    Ok(Response::from_parts(parts, Full::new(Bytes::from(bytes))))
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{\"errors\":[]}")));
    *r.status_mut() = s;
    r
}

/// An OCI image layout with one image of `layers` (uncompressed tar layers of the given files), tagged
/// `tag`. Returns the digests (hex) of the manifest, the config and each layer.
pub struct Image {
    pub dir: PathBuf,
    pub manifest: String,
    pub config: String,
    pub layers: Vec<String>,
    /// Each layer's size in bytes.
    pub sizes: Vec<u64>,
    /// The manifest's, the config's and the layers' sizes together.
    pub size: u64,
}

pub fn oci_image(dir: &Path, tag: &str, layers: &[&[(&str, Bytes)]]) -> Image {
    oci_image_for(dir, tag, "amd64", layers)
}

/// An image for `linux/<arch>`, as `oci_image`.
pub fn oci_image_for(dir: &Path, tag: &str, arch: &str, layers: &[&[(&str, Bytes)]]) -> Image {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let hex = sha256_hex(b);
        std::fs::write(blobs.join(&hex), b).unwrap();
        (hex, b.len())
    };
    let mut descs = Vec::new();
    for (i, files) in layers.iter().enumerate() {
        let src = tempfile::tempdir().unwrap();
        for (name, body) in *files {
            std::fs::write(src.path().join(name), body).unwrap();
        }
        let tar = dir.join(format!("layer{i}.tar"));
        let ok = Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(src.path())
            .arg(".")
            .status()
            .unwrap();
        assert!(ok.success());
        let bytes = std::fs::read(&tar).unwrap();
        std::fs::remove_file(&tar).unwrap();
        descs.push(put(&bytes));
    }
    let sizes = descs.iter().map(|(_, n)| *n as u64).collect();
    let diff_ids: Vec<String> = descs
        .iter()
        .map(|(h, _)| format!("\"sha256:{h}\""))
        .collect();
    let config = format!(
        "{{\"architecture\":\"{arch}\",\"os\":\"linux\",\"config\":{{}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}}}}",
        diff_ids.join(",")
    );
    let (chex, clen) = put(config.as_bytes());
    let layer_json: Vec<String> = descs
        .iter()
        .map(|(h, n)| {
            format!("{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:{h}\",\"size\":{n}}}")
        })
        .collect();
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:{chex}\",\"size\":{clen}}},\"layers\":[{}]}}",
        layer_json.join(",")
    );
    let (mhex, mlen) = put(manifest.as_bytes());
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{mhex}\",\"size\":{mlen},\"annotations\":{{\"org.opencontainers.image.ref.name\":\"{tag}\"}}}}]}}"
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
    std::fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").unwrap();
    Image {
        dir: dir.to_path_buf(),
        manifest: mhex,
        config: chex,
        size: (mlen + clen) as u64 + descs.iter().map(|(_, n)| *n as u64).sum::<u64>(),
        layers: descs.into_iter().map(|(h, _)| h).collect(),
        sizes,
    }
}

/// An index of two images, `linux/amd64` and `linux/arm64`, sharing their big layer, tagged `tag` in
/// the layout at `dir`. Returns the index's digest and the two images.
pub fn oci_index(dir: &Path, tag: &str) -> (String, Image, Image) {
    let big: &[(&str, Bytes)] = &[("payload.bin", random_bytes(1 << 20, 11))];
    let amd: &[(&str, Bytes)] = &[("arch", Bytes::from_static(b"amd64\n"))];
    let arm: &[(&str, Bytes)] = &[("arch", Bytes::from_static(b"arm64\n"))];
    let a = oci_image_for(dir, "amd", "amd64", &[big, amd]);
    let b = oci_image_for(dir, "arm", "arm64", &[big, arm]);
    let blobs = dir.join("blobs/sha256");
    let entry = |i: &Image, arch: &str| {
        let size = std::fs::metadata(blobs.join(&i.manifest)).unwrap().len();
        format!(
            "{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{}\",\"size\":{size},\"platform\":{{\"architecture\":\"{arch}\",\"os\":\"linux\"}}}}",
            i.manifest
        )
    };
    let index = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{},{}]}}",
        entry(&a, "amd64"),
        entry(&b, "arm64")
    );
    let hex = sha256_hex(index.as_bytes());
    std::fs::write(blobs.join(&hex), &index).unwrap();
    let top = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"digest\":\"sha256:{hex}\",\"size\":{},\"annotations\":{{\"org.opencontainers.image.ref.name\":\"{tag}\"}}}}]}}",
        index.len()
    );
    std::fs::write(dir.join("index.json"), top).unwrap();
    (hex, a, b)
}

/// A small image: a 1 MiB layer of random bytes and a layer of two small files.
pub fn small_image(dir: &Path, tag: &str, seed: u64) -> Image {
    let big = random_bytes(1 << 20, seed);
    let a: &[(&str, Bytes)] = &[("payload.bin", big)];
    let b: &[(&str, Bytes)] = &[
        ("hello.txt", Bytes::from_static(b"hello\n")),
        ("version", Bytes::from(format!("{seed}\n"))),
    ];
    oci_image(dir, tag, &[a, b])
}

/// Runs `skopeo` with a policy that accepts anything (the test's own images), in a blocking task.
pub async fn skopeo(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/skopeo")
            .arg("--insecure-policy")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// `skopeo copy` of `src` to `dst`, TLS verification off on both sides (plain HTTP on loopback).
pub async fn copy(src: &str, dst: &str) -> std::process::Output {
    let args = [
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--retry-times=0",
        src,
        dst,
    ];
    skopeo(args.iter().map(|s| s.to_string()).collect()).await
}

/// The registry with one image pushed as `test/app:1`, the front every pull goes through, and a
/// cistern node with that registry (named `local`) and `extra` config.
pub struct Site {
    pub image: Image,
    pub front: Front,
    pub node: Node,
    pub reg: DistRegistry,
    pub tmp: tempfile::TempDir,
}

pub async fn site(extra: &str) -> Option<Site> {
    if !programs_present() {
        return None;
    }
    let reg = DistRegistry::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = small_image(&tmp.path().join("src"), "1", 7);
    let pushed = copy(
        &format!("oci:{}:1", src.dir.display()),
        &format!("docker://127.0.0.1:{}/test/app:1", reg.port),
    )
    .await;
    assert!(
        pushed.status.success(),
        "push: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    // The registry holds what skopeo pushed (it compresses the layers): its digests are the image's.
    let image = pushed_image(reg.port, "test/app", "1").await;
    let front = Front::start(reg.port).await;
    let node = registry_node(&front, extra).await;
    Some(Site {
        image,
        front,
        node,
        reg,
        tmp,
    })
}

/// The digests of an image as the registry at `port` holds it.
pub async fn pushed_image(port: u16, repo: &str, tag: &str) -> Image {
    let url = format!("http://127.0.0.1:{port}/v2/{repo}/manifests/{tag}");
    let g = request(
        "GET",
        &url,
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await;
    assert_eq!(g.status, StatusCode::OK);
    image_of_manifest(&g.body)
}

/// The digests and sizes of an image, from its manifest's bytes.
pub fn image_of_manifest(body: &[u8]) -> Image {
    let hex = |v: &serde_json::Value| {
        v.as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };
    let m: serde_json::Value = serde_json::from_slice(body).unwrap();
    let size = body.len() as u64
        + m["config"]["size"].as_u64().unwrap()
        + m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>();
    Image {
        dir: std::path::PathBuf::new(),
        size,
        manifest: sha256_hex(body),
        config: hex(&m["config"]["digest"]),
        sizes: m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .collect(),
        layers: m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| hex(&l["digest"]))
            .collect(),
    }
}

pub async fn registry_node(front: &Front, extra: &str) -> Node {
    registry_node_allowing(front, &[], extra).await
}

/// A node as `registry_node`, with `allowed` as its `upstream.allowed_origins` (a token service on a
/// loopback address of its own must be named there).
pub async fn registry_node_allowing(front: &Front, allowed: &[String], extra: &str) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = serde_json::to_string(allowed).unwrap();
    let text = format!(
        "[node]\nid = \"top\"\n[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndir = \"{}\"\nmin_free = \"0\"\n\
         [upstream]\nallowed_origins = {allowed}\nconnect_timeout = \"2s\"\nidle_timeout = \"2s\"\nretries = 2\n\
         [[registries]]\nname = \"local\"\nurl = \"http://{}\"\n{extra}\n",
        tmp.path().join("data").display(),
        front.addr
    );
    let cfg = cistern::config::Config::from_toml_str(&text, "test", &[]).unwrap();
    let mut n = Node::start_with(cfg).await;
    n.keep(tmp);
    n
}

/// Pulls `test/app:1` through `node` into a new OCI layout; the layer files it wrote.
pub async fn pull(node: &Node, out: &std::path::Path) -> Result<(), String> {
    let o = copy(
        &format!("docker://{}/test/app:1", node.addr),
        &format!("oci:{}:1", out.display()),
    )
    .await;
    match o.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&o.stderr).to_string()),
    }
}

/// Waits until the object `hex` is stored under `n` keys (the tag's answers are committed).
pub async fn wait_keys(node: &Node, hex: &str, n: usize) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let g = get(&node.url("/v1/admin/content")).await;
        let body = String::from_utf8_lossy(&g.body).to_string();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let list = v
            .as_array()
            .or_else(|| v["objects"].as_array())
            .cloned()
            .unwrap_or_default();
        let keys = list
            .iter()
            .find(|o| o["digest"].as_str().is_some_and(|d| d.ends_with(hex)))
            .and_then(|o| o["keys"].as_array().map(|k| k.len()))
            .unwrap_or(0);
        if keys >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "{hex} not stored under {n} keys: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn same_blobs(image: &Image, out: &std::path::Path) {
    for hex in image.layers.iter().chain([&image.config, &image.manifest]) {
        let got = std::fs::read(out.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(sha256_hex(&got), *hex);
    }
}
