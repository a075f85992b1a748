//! The upstream registry's own authentication for the image tests: `docker-registry` asking for Basic
//! credentials from an htpasswd file (bcrypt), or for bearer tokens from its `token` auth, which trusts
//! a certificate made here (`rootcertbundle`); the token service it names hands out ES256 JWTs signed
//! with that certificate's key (the certificate in `x5c`) to `user:secret`, and counts them per scope.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use super::registry::{copy, image_of_manifest, programs_present, registry_node_allowing};
use super::registry::{skopeo, small_image, DistRegistry, Front, Image, Site};

/// `htpasswd -nbB user secret`: the registry's one user, its password hashed with bcrypt.
const HTPASSWD: &str = "user:$2y$05$L1FDVL4EGDL6a9zIBG66NeQu1UQlwCrlNOwre.wknn4yfabcNEFnO\n";
/// Basic `user:secret`.
const BASIC: &str = "Basic dXNlcjpzZWNyZXQ=";
const SERVICE: &str = "test-registry";
const ISSUER: &str = "test-issuer";

/// Tokens handed out per scope, and the last one.
type Issued = (Arc<Mutex<HashMap<String, usize>>>, Arc<Mutex<String>>);

/// How the registry asks for credentials.
pub enum RegistryAuth {
    Htpasswd,
    Token,
}

/// A token service for `docker-registry`'s `token` auth; its tasks end with the test's runtime.
pub struct TokenService {
    pub addr: SocketAddr,
    /// Tokens handed out, per scope asked, and the last one (for a search on disk).
    pub issued: Arc<Mutex<HashMap<String, usize>>>,
    pub last: Arc<Mutex<String>>,
}

impl TokenService {
    /// Starts it with a new P-256 key; writes the key's certificate to `cert` for the registry.
    pub async fn start(cert: &Path) -> TokenService {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "token signer");
        let c = p.self_signed(&key).unwrap();
        std::fs::write(cert, c.pem()).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(c.der());
        let signer = Arc::new((signer, x5c));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let issued = Arc::new(Mutex::new(HashMap::new()));
        let last = Arc::new(Mutex::new(String::new()));
        let counts = (issued.clone(), last.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                let (signer, counts) = (signer.clone(), counts.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let answer = token(&signer, &counts, req);
                        async move { Ok::<_, std::io::Error>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        TokenService { addr, issued, last }
    }

    /// Tokens handed out, all scopes together.
    pub fn total(&self) -> usize {
        self.issued.lock().unwrap().values().sum()
    }
}

/// The token service's answer: a JWT granting the scope asked, to `user:secret` only.
fn token(
    signer: &(ring::signature::EcdsaKeyPair, String),
    counts: &Issued,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let authed = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(BASIC);
    let query = req.uri().query().unwrap_or("").to_string();
    let scope = query
        .split('&')
        .find_map(|p| p.strip_prefix("scope="))
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .to_string()
        });
    let (Some(scope), true) = (scope, authed) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    };
    *counts.0.lock().unwrap().entry(scope.clone()).or_default() += 1;
    let mut parts = scope.splitn(3, ':');
    let (kind, name, actions) = (parts.next(), parts.next(), parts.next());
    let actions: Vec<&str> = actions.unwrap_or("").split(',').collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "user", "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
        "iat": now, "jti": format!("{now}-{}", rand::random::<u64>()),
        "access": [{"type": kind, "name": name, "actions": actions}],
    });
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [signer.1]});
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = signer.0.sign(&rng, signed.as_bytes()).unwrap();
    let jwt = format!("{signed}.{}", b64(sig.as_ref()));
    *counts.1.lock().unwrap() = jwt.clone();
    let body = serde_json::json!({"token": jwt, "expires_in": 300});
    Response::new(Full::new(Bytes::from(body.to_string())))
}

/// A `Site` whose registry asks for credentials itself (`auth`); the front passes them on. The node
/// has the registry's `username` and `password_file` when `creds`. The token service, for `Token`.
pub async fn auth_site(auth: RegistryAuth, creds: bool) -> Option<(Site, Option<TokenService>)> {
    if !programs_present() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (yaml, tokens) = match auth {
        RegistryAuth::Htpasswd => {
            let file = tmp.path().join("htpasswd");
            std::fs::write(&file, HTPASSWD).unwrap();
            let y = format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                file.display()
            );
            (y, None)
        }
        RegistryAuth::Token => {
            let cert = tmp.path().join("token-signer.pem");
            let t = TokenService::start(&cert).await;
            let y = format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    \
                 issuer: {ISSUER}\n    rootcertbundle: {}\n",
                t.addr,
                cert.display()
            );
            (y, Some(t))
        }
    };
    let reg = DistRegistry::start_with(&yaml).await;
    let src = small_image(&tmp.path().join("src"), "1", 7);
    let from = format!("oci:{}:1", src.dir.display());
    let to = format!("docker://127.0.0.1:{}/test/app:1", reg.port);
    let anon = copy(&from, &to).await;
    assert!(
        !anon.status.success(),
        "the registry took an anonymous push"
    );
    let args = [
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "user:secret",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend([from, to]);
    let pushed = skopeo(args).await;
    let err = String::from_utf8_lossy(&pushed.stderr);
    assert!(pushed.status.success(), "push: {err}");
    let image = pushed_image_as(reg.port).await;
    if let Some(t) = &tokens {
        t.issued.lock().unwrap().clear();
    }
    let front = Front::start(reg.port).await;
    front.state.pass_auth.store(true, Ordering::SeqCst);
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let extra = match creds {
        true => format!("username = \"user\"\npassword_file = \"{}\"", pw.display()),
        false => String::new(),
    };
    let allowed: Vec<String> = tokens.iter().map(|t| t.addr.to_string()).collect();
    let node = registry_node_allowing(&front, &allowed, &extra).await;
    let site = Site {
        image,
        front,
        node,
        reg,
        tmp,
    };
    Some((site, tokens))
}

/// The pushed image's digests, from its manifest as skopeo reads it with the registry's credentials.
async fn pushed_image_as(port: u16) -> Image {
    let src = format!("docker://127.0.0.1:{port}/test/app:1");
    let args = [
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        "user:secret",
        &src,
    ];
    let o = skopeo(args.iter().map(|a| a.to_string()).collect()).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "inspect: {err}");
    image_of_manifest(&o.stdout)
}
