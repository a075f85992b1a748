//! The pull side of the container registry API under `/v2/` (SPEC 9): which registry a request is for
//! (`?ns=`, a first path segment naming a configured registry, else the first registry; on a child with
//! no registries, its parent's `/v2/`), the path checked against the distribution spec's grammar, then
//! blobs and manifests served as objects of the data plane: by digest they are content-addressed
//! targets (verified, collapsed, streamed, resumed, the same object as `/v1/content/sha256/<hex>`); by
//! tag the stored answer is reused for `tag_ttl`, then revalidated (`fetch::registry`).

pub(super) mod images;
mod login;
mod name;
pub(super) mod stage;
mod wire;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use sha2::Digest as _;

use super::respond::{self, Ask};
use super::{error, App, Body};
use crate::config::Registry;
use crate::fetch::freshness::RequestCc;
use crate::fetch::registry::TagState;
use crate::fetch::{End, FetchError, Lookup, Target};
use crate::store::Digest;
use name::{Object, Reference, Refusal};

/// `tag_ttl` of a child that forwards to its parent (it has no `[[registries]]` of its own): the
/// registries' default.
const CHILD_TAG_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// Where a `/v2/` request goes.
#[derive(Clone, Copy)]
enum Upstream<'a> {
    /// A configured registry; the repository path is relative to it.
    Registry(&'a Registry),
    /// The parent's own `/v2/` (a child gateway without registries), path and query as asked.
    Parent,
}

impl App {
    /// Answers a request under `/v2/`, and the cache key it used (for the access log).
    pub(super) async fn registry(
        &self,
        mut req: Request<Incoming>,
    ) -> (Response<Body>, Option<String>) {
        if let Some(r) = self.gate(&req) {
            return (r, None);
        }
        let uri = req.uri().clone();
        let rest = uri.path().strip_prefix("/v2").unwrap_or("");
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (up, rest) = match self.choose(rest, uri.query()) {
            Ok(c) => c,
            Err(why) => {
                return (
                    wire::error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", why),
                    None,
                )
            }
        };
        let object = match name::parse(rest) {
            Ok(o) => o,
            Err(e) => return (refused(e), None),
        };
        // The client's credentials are for cistern (`pull_token`), never for the registry. A child
        // presents its own `pull_token` to its parent's `/v2/` (`fetch::upstream`), on every request.
        let mut headers = std::mem::take(req.headers_mut());
        headers.remove(http::header::AUTHORIZATION);
        headers.remove(http::header::COOKIE);
        let (repo, what) = match object {
            Object::Base => return (wire::base(), None),
            Object::Token => {
                let r = wire::error(StatusCode::NOT_FOUND, "UNSUPPORTED", "no pull token is set");
                return (r, None);
            }
            Object::Blob { repo, digest } => (repo, Err(digest)),
            Object::Manifest { repo, reference } => (repo, Ok(reference)),
        };
        self.serve(req, &up, &repo, what, &uri, headers).await
    }

    /// What is answered before the path is looked at: a login when `pull_token` is set, and 405 for
    /// pushes and deletes.
    fn gate(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        if let Some(token) = &self.pull_token {
            let realm = self.realm(req);
            if req.uri().path() == "/v2/token" {
                return Some(login::token(token, req.headers(), &realm));
            }
            if !login::authorized(token, req.headers()) {
                return Some(login::challenge(&realm));
            }
        }
        let m = req.method();
        if m == Method::GET || m == Method::HEAD {
            return None;
        }
        let mut r = wire::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{m} is not served: cistern is a pull-through mirror"),
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        Some(r)
    }

    /// Serves a blob (`Err(digest)`) or a manifest of `repo` from `up`; the answer and its key.
    async fn serve(
        &self,
        req: Request<Incoming>,
        up: &Upstream<'_>,
        repo: &str,
        what: Result<Reference, Digest>,
        uri: &Uri,
        headers: HeaderMap,
    ) -> (Response<Body>, Option<String>) {
        let kind = match &what {
            Err(_) => "blobs",
            Ok(_) => "manifests",
        };
        let tail = match &what {
            Err(d) | Ok(Reference::Digest(d)) => format!("sha256:{d}"),
            Ok(Reference::Tag(t)) => t.clone(),
        };
        let Some(url) = upstream_url(up, repo, kind, &tail, uri) else {
            let r = wire::error(StatusCode::BAD_REQUEST, "NAME_INVALID", "cannot forward");
            return (r, None);
        };
        match what {
            Err(d) | Ok(Reference::Digest(d)) => {
                let key = format!("sha256/{d}");
                let t = target(key.clone(), url, Some(d), headers);
                let r = self.by_digest(req, t).await;
                (wire::object(r, Some(d)), Some(key))
            }
            Ok(Reference::Tag(_)) => {
                let ttl = match up {
                    Upstream::Registry(r) => r.tag_ttl.0,
                    Upstream::Parent => CHILD_TAG_TTL,
                };
                let key = tag_key(up, &url, uri, &headers);
                let r = self.by_tag(req, key.clone(), url, ttl, headers).await;
                (r, Some(key))
            }
        }
    }

    /// This node's token endpoint as a client reached it: `http(s)://<Host>/v2/token` (https when the
    /// request came to the port of `server.tls_listen`).
    fn realm(&self, req: &Request<Incoming>) -> String {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or(req.uri().authority().map(|a| a.as_str()))
            .filter(|h| {
                h.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c))
            })
            .unwrap_or("localhost");
        let port = host.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
        let tls = &self.cfg.server.tls_listen;
        let https = !tls.is_empty()
            && !port.is_empty()
            && tls.rsplit_once(':').map(|(_, p)| p) == Some(port);
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{host}/v2/token")
    }

    /// Which upstream a path is for, and the path after `/v2/` without a registry's name; why none.
    fn choose<'p>(
        &self,
        rest: &'p str,
        query: Option<&str>,
    ) -> Result<(Upstream<'_>, &'p str), String> {
        let regs = &self.cfg.registries;
        let ns = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|p| p.strip_prefix("ns="))
            .map(|v| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .to_ascii_lowercase()
            });
        if regs.is_empty() {
            return match self.fetcher.has_parents() {
                true => Ok((Upstream::Parent, rest)),
                false => Err("no registry is configured".into()),
            };
        }
        if let Some(ns) = ns {
            let named = |r: &&Registry| registry_host(r).is_some_and(|h| same_registry(&h, &ns));
            return match regs.iter().find(named) {
                Some(r) => Ok((Upstream::Registry(r), rest)),
                None => Err(format!("registry {ns} is not configured")),
            };
        }
        if let Some((first, after)) = rest.split_once('/') {
            if let Some(r) = regs.iter().find(|r| r.name == first) {
                if !matches!(
                    name::parse(after),
                    Err(Refusal::NameInvalid(_)) | Ok(Object::Token)
                ) {
                    return Ok((Upstream::Registry(r), after));
                }
            }
        }
        Ok((Upstream::Registry(&regs[0]), rest))
    }

    /// A blob or a manifest by digest. A HEAD on a miss asks the registry's HEAD, except on a node that
    /// children use as their registry (the request has a `Via`): there it starts the fill, so that a
    /// chain of mirrors never answers 404 for a blob its own upstream has (SPEC 9).
    async fn by_digest(&self, req: Request<Incoming>, t: Target) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        if head && t.headers.contains_key(http::header::VIA) && !self.fetcher.holds(&t) {
            return self.fill_for_head(t, false).await;
        }
        self.object(req, t, super::FormKind::Registry).await
    }

    /// A manifest by tag: the stored answer while fresh or revalidated, stale when the registry cannot
    /// be asked, else fetched with the client's `Accept`. A HEAD of a tag not stored fetches and
    /// stores the manifest (it is small): dockerd and containerd resolve a tag by HEAD alone and then
    /// ask by digest, and a tag never stored could not be resolved once the registry is out of reach.
    async fn by_tag(
        &self,
        req: Request<Incoming>,
        key: String,
        url: Uri,
        ttl: std::time::Duration,
        headers: HeaderMap,
    ) -> Response<Body> {
        let (t, stale) = self.tag_target(key, url, ttl, headers).await;
        let digest = t.digest;
        let r = match req.method() == Method::HEAD && digest.is_none() {
            true => self.fill_for_head(t, true).await,
            false => self.object(req, t, super::FormKind::Registry).await,
        };
        let r = wire::object(r, digest);
        match stale {
            true => wire::stale(r),
            false => r,
        }
    }

    /// The target a tag's request is served from (the stored answer's digest when it may answer), and
    /// whether that answer is stale.
    async fn tag_target(
        &self,
        key: String,
        url: Uri,
        ttl: std::time::Duration,
        mut headers: HeaderMap,
    ) -> (Target, bool) {
        let state = self.fetcher.tag_state(&key, &url, ttl, &headers).await;
        let (digest, stale) = match state {
            TagState::Fresh(d) | TagState::Renewed(d) => (Some(d), false),
            TagState::Stale(d) => (Some(d), true),
            TagState::Fetch => (None, false),
        };
        if digest.is_none() {
            // What is stored for the tag is not what it names now: it must not answer.
            headers.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            );
        }
        let mut t = target(key, url, digest, headers);
        t.immutable = digest.is_some();
        (t, stale)
    }

    /// Starts (or joins) the fill of an object and answers a HEAD from it: at its head, or once it is
    /// stored when `stored` (a tag's manifest, small: the client's next request, by digest, is then
    /// answered from the store instead of fetching the manifest again).
    async fn fill_for_head(&self, t: Target, stored: bool) -> Response<Body> {
        let ask = Ask::from_headers(&t.headers, true, self.cfg.server.max_ranges);
        let cc = RequestCc::parse(&t.headers);
        match self.fetcher.get(&t, &cc).await {
            Ok(Lookup::Hit { hit, meta, how }) => respond::hit(hit, meta, how, &ask),
            Ok(Lookup::Flight {
                flight,
                joined,
                reader,
            }) => match flight.head().await {
                Ok(h) => {
                    // Only while storing: a pass-through waits for its readers (this one among them).
                    if stored && h.storing {
                        if let End::Failed(e) = flight.wait_end().await {
                            return error::fetch_error_response(e);
                        }
                    }
                    respond::flight(flight, joined, h, reader, &ask).await
                }
                Err(End::Failed(e)) => error::fetch_error_response(e),
                Err(_) => {
                    error::fetch_error_response(FetchError::Internal("transfer ended oddly".into()))
                }
            },
            Ok(Lookup::Pass) => self.bypass(Method::HEAD, &t).await,
            Err(e) => error::fetch_error_response(e),
        }
    }
}

fn target(key: String, url: Uri, digest: Option<Digest>, headers: HeaderMap) -> Target {
    Target {
        key,
        url: Some(url),
        digest,
        immutable: digest.is_some(),
        no_store: RequestCc::parse(&headers).no_store,
        headers,
    }
}

/// A refused path in the distribution spec's terms.
fn refused(e: Refusal) -> Response<Body> {
    let bad = StatusCode::BAD_REQUEST;
    match e {
        Refusal::Unsupported => wire::error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "only blobs and manifests are served",
        ),
        Refusal::NameInvalid(n) => wire::error(
            bad,
            "NAME_INVALID",
            format!("invalid repository name `{n}`"),
        ),
        Refusal::DigestInvalid(d) => wire::error(
            bad,
            "DIGEST_INVALID",
            format!("invalid digest `{d}` (sha256 only)"),
        ),
        Refusal::TagInvalid(t) => {
            wire::error(bad, "MANIFEST_INVALID", format!("invalid tag `{t}`"))
        }
    }
}

/// Whether a registry's host is the one `ns` names: itself, or Docker Hub by its short name (containerd
/// sends `ns=docker.io` for the registry at `registry-1.docker.io`).
fn same_registry(host: &str, ns: &str) -> bool {
    const HUB: [&str; 3] = ["docker.io", "registry-1.docker.io", "index.docker.io"];
    host == ns || (HUB.contains(&host) && HUB.contains(&ns))
}

/// A registry's `host[:port]`, lower-cased, as containerd's `ns=` names it.
fn registry_host(r: &Registry) -> Option<String> {
    let u: Uri = r.url.parse().ok()?;
    Some(u.authority()?.as_str().to_ascii_lowercase())
}

/// The URL a blob or manifest is fetched from: `<registry url>/v2/<repo>/<kind>/<tail>`, built from
/// checked parts; for a parent, the path as asked (relative: the upstream client sends it to the
/// parent's own `/v2/`).
fn upstream_url(up: &Upstream<'_>, repo: &str, kind: &str, tail: &str, asked: &Uri) -> Option<Uri> {
    match up {
        Upstream::Parent => asked.path_and_query()?.as_str().parse().ok(),
        Upstream::Registry(r) => {
            let base: Uri = r.url.parse().ok()?;
            let path = format!(
                "{}/v2/{repo}/{kind}/{tail}",
                base.path().trim_end_matches('/')
            );
            crate::fetch::upstream::on_origin_of(&base, path)
        }
    }
}

/// The key of a tag's answer: the manifest URL, and the client's `Accept` (the answer depends on it:
/// a secondary key, SPEC 9).
fn tag_key(up: &Upstream<'_>, url: &Uri, asked: &Uri, h: &HeaderMap) -> String {
    let accept = accept_hash(h);
    match up {
        Upstream::Registry(_) => {
            format!("{}#accept={accept}", crate::fetch::key::cache_key(url, &[]))
        }
        Upstream::Parent => format!(
            "parent{}#accept={accept}",
            asked.path_and_query().map_or("", |p| p.as_str())
        ),
    }
}

/// The media types a client accepts, as a set: dockerd lists them in another order on every start
/// (it ranges over a Go map), and each order must find the same stored tag.
fn accept_hash(h: &HeaderMap) -> String {
    let mut types: Vec<String> = h
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    types.sort();
    types.dedup();
    let sum = sha2::Sha256::digest(types.join(",").as_bytes());
    hex::encode(&sum[..8])
}

#[cfg(test)]
mod tests {
    use super::{accept_hash, same_registry};

    #[test]
    fn the_accepted_types_count_in_any_order() {
        let of = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(http::header::ACCEPT, v.parse().unwrap());
            }
            accept_hash(&h)
        };
        let a = "application/vnd.oci.image.manifest.v1+json";
        let b = "application/vnd.docker.distribution.manifest.v2+json";
        let one = of(&[&format!("{a}, {b}")]);
        assert_eq!(one, of(&[&format!("{b},{a}")]));
        assert_eq!(one, of(&[b, a]));
        assert_ne!(one, of(&[a]));
    }

    #[test]
    fn docker_hub_by_its_short_name() {
        assert!(same_registry("registry-1.docker.io", "docker.io"));
        assert!(same_registry("mcr.microsoft.com", "mcr.microsoft.com"));
        assert!(!same_registry("mcr.microsoft.com", "docker.io"));
        assert!(!same_registry("127.0.0.1:5000", "127.0.0.1:5001"));
    }
}
