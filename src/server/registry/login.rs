//! `server.pull_token` (SPEC 9): with it set, every `/v2/` request needs the token, as
//! `Authorization: Bearer <token>` or as the password of Basic credentials (any user name). Without it the
//! answer is 401 with `WWW-Authenticate: Bearer realm="<this node>/v2/token",service="cistern"`, and
//! `GET /v2/token` hands the token back to a client that presents it as its Basic password: that is how
//! `docker login` and `podman login` log in. Compared in constant time; never logged.

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use subtle::ConstantTimeEq;

use super::wire;
use crate::server::body::{full, Body};

/// How long a client may keep the token it was handed (it is the configured token: this only tells the
/// client when to ask again).
const TOKEN_LIFE: u64 = 3600;

/// Whether the request carries the token, as Bearer or as a Basic password.
pub fn authorized(token: &str, h: &HeaderMap) -> bool {
    match credentials(h) {
        Some(Given::Bearer(t)) | Some(Given::Basic(t)) => same(&t, token),
        None => false,
    }
}

/// `GET /v2/token`: the token, for Basic credentials whose password is the token; else 401.
pub fn token(token: &str, h: &HeaderMap, realm: &str) -> Response<Body> {
    let ok = matches!(credentials(h), Some(Given::Basic(p)) if same(&p, token))
        || matches!(credentials(h), Some(Given::Bearer(t)) if same(&t, token));
    if !ok {
        return challenge(realm);
    }
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": TOKEN_LIFE});
    let mut r = Response::new(full(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    wire::versioned(r)
}

/// 401 `UNAUTHORIZED` with the Bearer challenge naming this node's token endpoint.
pub fn challenge(realm: &str) -> Response<Body> {
    let mut r = wire::error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "this mirror needs a login (server.pull_token)",
    );
    let c = format!("Bearer realm=\"{realm}\",service=\"cistern\"");
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    r
}

enum Given {
    Bearer(String),
    /// The password of Basic credentials.
    Basic(String),
}

fn credentials(h: &HeaderMap) -> Option<Given> {
    let v = h.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Given::Bearer(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (_, password) = raw.split_once(':')?;
        return Some(Given::Basic(password.to_string()));
    }
    None
}

fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn bearer_or_basic_password() {
        assert!(authorized("s3", &with("Bearer s3")));
        assert!(authorized("s3", &with("bearer s3")));
        // "anyone:s3"
        assert!(authorized("s3", &with("Basic YW55b25lOnMz")));
        assert!(!authorized("s3", &with("Bearer s4")));
        assert!(!authorized("s3", &with("Basic YW55b25lOnM0")));
        assert!(!authorized("s3", &HeaderMap::new()));
        assert!(!authorized("s3", &with("Basic !!!")));
    }
}
