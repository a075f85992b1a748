//! Upstream authentication to container registries (SPEC 9): a `401` with a `Bearer` challenge is
//! answered by asking the challenge's realm for a token (anonymously, or with the registry's username
//! and password), kept until it expires, one per registry and scope; a `Basic` challenge gets the
//! credentials directly. Only requests to a configured registry's own origin carry them: a redirect to
//! blob storage never does (`send` drops credentials when a redirect leaves the origin). Tokens and
//! passwords live in memory only, in header values marked sensitive, and are never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Uri};

use super::redirect::origin_of;
use super::{empty_body, UpstreamClient};
use crate::fetch::error::FetchError;

/// A token whose answer names no lifetime is kept this long (the distribution spec's default).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);
/// A token is not used in its last seconds: a request must not reach the registry with it expired.
const EARLY: Duration = Duration::from_secs(5);
/// Bound on a token service's answer.
pub const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// Bound on the tokens kept (scopes are repositories: a site pulls a bounded number of them).
const MAX_TOKENS: usize = 4096;

/// A configured registry's origin and credentials.
#[derive(Clone)]
pub struct RegistryCred {
    /// The registry's URL (its origin is what is matched).
    pub url: Uri,
    /// Empty = anonymous.
    pub username: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryCred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never written anywhere.
        f.debug_struct("RegistryCred")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish()
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// The credentials of every configured registry, and the tokens obtained for them.
#[derive(Default)]
pub struct RegistryAuth {
    creds: Vec<RegistryCred>,
    /// (registry index, scope) -> token and when it stops being used.
    tokens: Mutex<HashMap<(usize, String), (HeaderValue, Instant)>>,
    /// Registries that asked for Basic: later requests carry the credentials from the start.
    basic: Mutex<Vec<usize>>,
}

impl RegistryAuth {
    pub fn new(creds: Vec<RegistryCred>) -> RegistryAuth {
        RegistryAuth {
            creds,
            ..RegistryAuth::default()
        }
    }

    /// Which configured registry's origin `url` is on.
    pub fn registry_of(&self, url: &Uri) -> Option<usize> {
        self.creds
            .iter()
            .position(|c| origin_of(&c.url) == origin_of(url))
    }

    /// The `Authorization` a request to `url` carries before any challenge: a token still valid for
    /// its scope, or Basic credentials for a registry that asked for them.
    pub fn authorization(&self, url: &Uri) -> Option<HeaderValue> {
        let i = self.registry_of(url)?;
        let scope = scope_of(url.path())?;
        let now = Instant::now();
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, until)) = tokens.get(&(i, scope)) {
            if now < *until {
                return Some(v.clone());
            }
        }
        drop(tokens);
        let basic = self.basic.lock().unwrap_or_else(|p| p.into_inner());
        basic.contains(&i).then(|| self.basic_value(i)).flatten()
    }

    /// `Basic base64(user:password)`, when the registry has credentials.
    fn basic_value(&self, i: usize) -> Option<HeaderValue> {
        let c = self.creds.get(i)?;
        if c.username.is_empty() {
            return None;
        }
        let raw = format!("{}:{}", c.username, c.password.as_deref().unwrap_or(""));
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {b64}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Remembers that a registry answered a Basic challenge; its credentials, if it has any.
    pub fn use_basic(&self, url: &Uri) -> Option<HeaderValue> {
        let i = self.registry_of(url)?;
        let v = self.basic_value(i)?;
        let mut basic = self.basic.lock().unwrap_or_else(|p| p.into_inner());
        if !basic.contains(&i) {
            basic.push(i);
        }
        Some(v)
    }

    /// The token request for a Bearer challenge to a request for `url`: the realm's URL with
    /// `service` and `scope`, and the registry's credentials as Basic (None: anonymous).
    pub fn token_request(
        &self,
        url: &Uri,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Option<(Uri, Option<HeaderValue>)> {
        let i = self.registry_of(url)?;
        let realm: Uri = realm.parse().ok()?;
        if !matches!(realm.scheme_str(), Some("http" | "https")) || realm.host().is_none() {
            return None;
        }
        let scope = scope.map(str::to_string).or_else(|| scope_of(url.path()));
        let mut query: Vec<String> = realm.query().map(|q| q.to_string()).into_iter().collect();
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        if let Some(s) = service {
            query.push(format!("service={}", enc(s)));
        }
        if let Some(s) = &scope {
            query.push(format!("scope={}", enc(s)));
        }
        let pq = match query.is_empty() {
            true => realm.path().to_string(),
            false => format!("{}?{}", realm.path(), query.join("&")),
        };
        let uri = Uri::builder()
            .scheme(realm.scheme()?.clone())
            .authority(realm.authority()?.clone())
            .path_and_query(pq)
            .build()
            .ok()?;
        Some((uri, self.basic_value(i)))
    }

    /// Keeps the token a token service answered for a request to `url`; the header to send it as.
    pub fn keep_token(&self, url: &Uri, answer: &[u8]) -> Option<HeaderValue> {
        let i = self.registry_of(url)?;
        let scope = scope_of(url.path())?;
        let v: serde_json::Value = serde_json::from_slice(answer).ok()?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())?;
        let life = v
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFE);
        let mut h = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        h.set_sensitive(true);
        let until = Instant::now() + life.saturating_sub(EARLY).max(Duration::from_secs(1));
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, (_, u)| *u > now);
        }
        if tokens.len() < MAX_TOKENS {
            tokens.insert((i, scope), (h.clone(), until));
        }
        Some(h)
    }
}

impl UpstreamClient {
    /// One request to `url`, no redirect followed, with a configured registry's authorization: a
    /// token or Basic credentials it already holds, else what a `401` challenge asks for (one retry).
    pub(super) async fn send_signed(
        &self,
        method: http::Method,
        url: &Uri,
        headers: &HeaderMap,
    ) -> Result<http::Response<super::super::uplink::Metered>, FetchError> {
        let auth = &self.registries;
        if auth.registry_of(url).is_none() {
            return self.send_once(method, url, headers, empty_body()).await;
        }
        let mut h = headers.clone();
        if let Some(a) = auth.authorization(url) {
            h.insert(http::header::AUTHORIZATION, a);
        }
        let resp = self
            .send_once(method.clone(), url, &h, empty_body())
            .await?;
        if resp.status() != http::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let answer = match challenge(resp.headers()) {
            Some(Challenge::Basic) => auth.use_basic(url),
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                self.fetch_token(url, &realm, service.as_deref(), scope.as_deref())
                    .await?
            }
            None => None,
        };
        let Some(a) = answer else {
            return Ok(resp);
        };
        h.insert(http::header::AUTHORIZATION, a);
        self.send_once(method, url, &h, empty_body()).await
    }

    /// Asks a registry's token service for a token for the request to `url`; None when it gave none
    /// (the registry's 401 then goes back to the client).
    async fn fetch_token(
        &self,
        url: &Uri,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Option<HeaderValue>, FetchError> {
        use http_body_util::BodyExt as _;
        let Some((at, basic)) = self.registries.token_request(url, realm, service, scope) else {
            return Ok(None);
        };
        self.check_address(&at)?;
        let mut h = HeaderMap::new();
        if let Some(b) = basic {
            h.insert(http::header::AUTHORIZATION, b);
        }
        let resp = self
            .send_once(http::Method::GET, &at, &h, empty_body())
            .await?;
        if !resp.status().is_success() {
            tracing::warn!(
                realm = %super::host_of(&at),
                status = %resp.status(),
                "the registry's token service refused a token"
            );
            return Ok(None);
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_ANSWER);
        let bytes = tokio::time::timeout(self.head_timeout, body.collect())
            .await
            .map_err(|_| FetchError::Timeout(super::host_of(&at)))?
            .map_err(|e| FetchError::BadResponse(format!("token service: {e}")))?
            .to_bytes();
        Ok(self.registries.keep_token(url, &bytes))
    }
}

/// The pull scope of a registry API path: `repository:<name>:pull` for `/v2/<name>/blobs/...` and
/// `/v2/<name>/manifests/...`.
pub fn scope_of(path: &str) -> Option<String> {
    let rest = &path[path.find("/v2/")? + "/v2/".len()..];
    let end = ["/blobs/", "/manifests/"]
        .iter()
        .filter_map(|m| rest.rfind(m))
        .max()?;
    Some(format!("repository:{}:pull", &rest[..end]))
}

/// The first challenge of a 401's `WWW-Authenticate` that cistern can answer.
pub fn challenge(h: &HeaderMap) -> Option<Challenge> {
    for v in h.get_all(http::header::WWW_AUTHENTICATE) {
        let Ok(v) = v.to_str() else { continue };
        let v = v.trim();
        let (scheme, params) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let p = auth_params(params);
            let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let realm = get("realm")?;
            return Some(Challenge::Bearer {
                realm,
                service: get("service"),
                scope: get("scope"),
            });
        }
    }
    None
}

/// `k="v", k2=v2` (RFC 9110 §11.2), names lower-cased; quoted values may hold commas.
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((name, after)) = rest.split_once('=') {
        let name = name
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((name, value));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
            ),
        );
        assert_eq!(
            challenge(&h),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="Registry Realm""#),
        );
        assert_eq!(challenge(&h), Some(Challenge::Basic));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer service=x"),
        );
        assert_eq!(challenge(&h), None);
    }

    #[test]
    fn scopes_and_tokens() {
        assert_eq!(
            scope_of("/v2/line/app/blobs/sha256:ab").as_deref(),
            Some("repository:line/app:pull")
        );
        assert_eq!(
            scope_of("/v2/a/manifests/manifests/x").as_deref(),
            Some("repository:a/manifests:pull")
        );
        assert_eq!(scope_of("/v2/"), None);
        let auth = RegistryAuth::new(vec![RegistryCred {
            url: "https://reg.example".parse().unwrap(),
            username: "u".into(),
            password: Some("p".into()),
        }]);
        let blob: Uri = "https://reg.example/v2/a/blobs/sha256:00".parse().unwrap();
        let other: Uri = "https://cdn.example/v2/a/blobs/sha256:00".parse().unwrap();
        assert!(auth.authorization(&blob).is_none());
        let (req, basic) = auth
            .token_request(&blob, "https://auth.example/t?x=1", Some("reg"), None)
            .unwrap();
        assert_eq!(
            req.to_string(),
            "https://auth.example/t?x=1&service=reg&scope=repository%3Aa%3Apull"
        );
        assert_eq!(basic.unwrap().to_str().unwrap(), "Basic dTpw");
        let v = auth
            .keep_token(&blob, br#"{"token":"T1","expires_in":300}"#)
            .unwrap();
        assert!(v.is_sensitive());
        assert_eq!(
            auth.authorization(&blob).unwrap().to_str().unwrap(),
            "Bearer T1"
        );
        let man: Uri = "https://reg.example/v2/a/manifests/1".parse().unwrap();
        assert!(auth.authorization(&man).is_some(), "one token per scope");
        let b: Uri = "https://reg.example/v2/b/manifests/1".parse().unwrap();
        assert!(auth.authorization(&b).is_none(), "another scope");
        assert!(
            auth.authorization(&other).is_none(),
            "never to another origin"
        );
        assert!(auth.keep_token(&blob, b"{}").is_none());
    }
}
