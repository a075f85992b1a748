//! Container images in prefetch jobs (SPEC 6, 9): `{"images": ["mcr.microsoft.com/azureiotedge-agent:1.5",
//! "registry.example.net/line/app@sha256:<hex>"], "platforms": ["linux/amd64"]}`. Each image's manifest
//! (an index: those of its manifests whose platform is asked, every one when `platforms` is empty) is
//! fetched now, as a client's pull would fetch it, and each manifest, config and layer becomes a file
//! of the job (its URL, digest and size), staged in the background like any other. On a child with no
//! registries those URLs are paths of the parent's `/v2/` (SPEC 6: a child fetches through its parents).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Uri};
use oci_spec::image::{ImageIndex, ImageManifest, MediaType};

use super::name::{parse_digest, valid_name, valid_tag};
use super::{registry_host, same_registry, tag_key, target, upstream_url, Upstream};
use crate::fetch::freshness::RequestCc;
use crate::fetch::prefetch::Wanted;
use crate::fetch::{End, Lookup, Target};
use crate::server::App;
use crate::store::Digest;

/// Docker's media types for what the OCI types describe (registries still serve them).
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Bound on the manifests one image may name (an index's platforms).
const MAX_MANIFESTS: usize = 64;

/// Why a job's images cannot be staged.
#[derive(Debug)]
pub enum StageError {
    /// An image name that does not parse, or names no configured registry.
    Name(String),
    /// A manifest could not be fetched or read.
    Fetch(String),
}

/// An image as a prefetch names it.
struct ImageName<'a> {
    /// A configured registry, or (on a child with no registries) the parent's `/v2/`.
    up: Upstream<'a>,
    /// For the parent: the registry host the image named (sent as `?ns=`).
    ns: Option<String>,
    repo: String,
    /// A tag, or `sha256:<hex>`.
    reference: String,
}

impl App {
    /// The files of the images a prefetch job names; an error names the image at fault.
    pub(in crate::server) async fn image_files(
        &self,
        images: &[String],
        platforms: &[String],
    ) -> Result<Vec<Wanted>, StageError> {
        let names = images
            .iter()
            .map(|i| self.image_name(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StageError::Name)?;
        let mut out: Vec<Wanted> = Vec::new();
        for (image, name) in images.iter().zip(names) {
            let files = self.files_of(&name, platforms).await;
            for w in files.map_err(|e| StageError::Fetch(format!("{image}: {e}")))? {
                if !out.iter().any(|o| o.digest == w.digest) {
                    out.push(w);
                }
            }
        }
        Ok(out)
    }

    /// `[host/]repo[:tag|@sha256:<hex>]`: the host names a configured registry (by host, or by its
    /// `name`), else the first registry. On a child with no registries, the parent's `/v2/` is asked,
    /// with the host as `?ns=` (SPEC 6: a child asked to prefetch fetches through its parents).
    fn image_name<'a>(&'a self, image: &str) -> Result<ImageName<'a>, String> {
        let (rest, reference) = match image.rsplit_once('@') {
            Some((r, d)) => (r, d.to_string()),
            None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                Some((r, t)) => (r, t.to_string()),
                None => (image, "latest".to_string()),
            },
        };
        let host = match rest.split_once('/') {
            Some((h, repo)) if h.contains(['.', ':']) || h == "localhost" => {
                Some((h.to_ascii_lowercase(), repo))
            }
            _ => None,
        };
        let (up, ns, repo) = self.image_upstream(image, rest, host)?;
        let ok_ref = parse_digest(&reference).is_some() || valid_tag(&reference);
        if !valid_name(repo) || !ok_ref {
            return Err(format!("{image}: not an image name"));
        }
        Ok(ImageName {
            up,
            ns,
            repo: repo.to_string(),
            reference,
        })
    }

    /// Where an image is fetched from, the `ns` a parent is told, and the repository path.
    fn image_upstream<'a, 'i>(
        &'a self,
        image: &str,
        rest: &'i str,
        host: Option<(String, &'i str)>,
    ) -> Result<(Upstream<'a>, Option<String>, &'i str), String> {
        let regs = &self.cfg.registries;
        let Some(first) = regs.first() else {
            if !self.fetcher.has_parents() {
                return Err("images are staged on a gateway with [[registries]] or parents".into());
            }
            return Ok(match host {
                Some((h, repo)) => (Upstream::Parent, Some(h), repo),
                None => (Upstream::Parent, None, rest),
            });
        };
        let r = match host {
            Some((h, repo)) => {
                let r = regs
                    .iter()
                    .find(|r| registry_host(r).is_some_and(|rh| same_registry(&rh, &h)))
                    .ok_or(format!("{image}: registry {h} is not configured"))?;
                (r, repo)
            }
            None => match rest.split_once('/') {
                Some((n, repo)) if regs.iter().any(|r| r.name == n) => {
                    (regs.iter().find(|r| r.name == n).unwrap_or(first), repo)
                }
                _ => (first, rest),
            },
        };
        Ok((Upstream::Registry(r.0), None, r.1))
    }

    /// The manifests, configs and layers of one image.
    async fn files_of(
        &self,
        n: &ImageName<'_>,
        platforms: &[String],
    ) -> Result<Vec<Wanted>, String> {
        let (d, bytes, url) = self.manifest(n, &n.reference).await?;
        let mut out = vec![wanted(url, d, bytes.len())];
        let mut manifests = Vec::new();
        match serde_json::from_slice::<ImageIndex>(&bytes) {
            Ok(index) if !index.manifests().is_empty() => {
                for m in index.manifests().iter().take(MAX_MANIFESTS) {
                    let p = m
                        .platform()
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os(), p.architecture()));
                    let wanted_platform = match &p {
                        Some(p) => {
                            p != "unknown/unknown"
                                && (platforms.is_empty() || platforms.contains(p))
                        }
                        None => platforms.is_empty(),
                    };
                    if !wanted_platform {
                        continue;
                    }
                    let (cd, cb, curl) = self.manifest(n, m.digest().as_ref()).await?;
                    out.push(wanted(curl, cd, cb.len()));
                    manifests.push(cb);
                }
            }
            _ => manifests.push(bytes),
        }
        for b in manifests {
            let m: ImageManifest =
                serde_json::from_slice(&b).map_err(|e| format!("not an image manifest: {e}"))?;
            for desc in std::iter::once(m.config()).chain(m.layers()) {
                let d =
                    parse_digest(desc.digest().as_ref()).ok_or("a blob digest is not sha256")?;
                let url = self.url_of(n, "blobs", &format!("sha256:{d}"))?;
                out.push(Wanted {
                    url,
                    digest: d,
                    size: Some(desc.size()),
                });
            }
        }
        Ok(out)
    }

    /// Fetches a manifest (by tag or digest) as a pull would; its digest, bytes and by-digest URL.
    async fn manifest(
        &self,
        n: &ImageName<'_>,
        reference: &str,
    ) -> Result<(Digest, Bytes, Uri), String> {
        let url = self.url_of(n, "manifests", reference)?;
        let mut h = HeaderMap::new();
        let accept = format!(
            "{}, {}, {DOCKER_LIST}, {DOCKER_MANIFEST}",
            MediaType::ImageIndex,
            MediaType::ImageManifest
        );
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_str(&accept).map_err(|e| e.to_string())?,
        );
        let t: Target = match parse_digest(reference) {
            Some(d) => target(format!("sha256/{d}"), url, Some(d), h),
            None => {
                let key = tag_key(&n.up, &url, &url, &h);
                let ttl = match n.up {
                    Upstream::Registry(r) => r.tag_ttl.0,
                    Upstream::Parent => super::CHILD_TAG_TTL,
                };
                self.tag_target(key, url, ttl, h).await.0
            }
        };
        let d = self.fetched(&t).await?;
        let hit = self.store.open_object(&d).map_err(|e| e.to_string())?;
        let by_digest = self.url_of(n, "manifests", &format!("sha256:{d}"))?;
        // The job stages the manifest by its digest URL, which a registry answers only for the right
        // `Accept` (the job's requests carry none): the bytes are stored and verified, so that URL's key
        // maps to them now, and the job finds them stored.
        let key = crate::fetch::key::cache_key(&by_digest, &self.cfg.upstream.strip_query);
        self.store
            .map_key(&key, &d, crate::store::KeyMeta::immutable())
            .map_err(|e| e.to_string())?;
        Ok((d, hit.bytes, by_digest))
    }

    /// Fetches a target to its end; the digest stored.
    async fn fetched(&self, t: &Target) -> Result<Digest, String> {
        match self.fetcher.get(t, &RequestCc::default()).await {
            Ok(Lookup::Hit { hit, .. }) => Ok(hit.digest),
            Ok(Lookup::Flight { flight, .. }) => match flight.wait_end().await {
                // A transfer ends once its commit to disk has ended.
                End::Complete(d) | End::Revalidated(d) | End::ServeStale(d, _) => {
                    match self.store.contains(&d) {
                        true => Ok(d),
                        false => Err("fetched but not stored (no room in the store?)".into()),
                    }
                }
                End::Failed(e) => Err(e.to_string()),
            },
            Ok(Lookup::Pass) => Err("the registry's answer cannot be cached".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The URL of a blob or manifest: on the registry, or (for the parent) the path of its `/v2/`
    /// with the registry host as `?ns=`.
    fn url_of(&self, n: &ImageName<'_>, kind: &str, tail: &str) -> Result<Uri, String> {
        let path = format!("/v2/{}/{kind}/{tail}", n.repo);
        let asked = match &n.ns {
            Some(ns) => {
                let ns =
                    percent_encoding::utf8_percent_encode(ns, percent_encoding::NON_ALPHANUMERIC);
                format!("{path}?ns={ns}")
            }
            None => path,
        };
        let asked: Uri = asked.parse().map_err(|_| "not an image name".to_string())?;
        upstream_url(&n.up, &n.repo, kind, tail, &asked)
            .ok_or_else(|| "cannot build the registry URL".to_string())
    }
}

/// A member that must be a list of strings (absent: empty).
pub fn strings(
    v: Option<&serde_json::Value>,
    at: &str,
) -> Result<Vec<String>, crate::server::ApiError> {
    let bad = || {
        crate::server::ApiError::bad_request("bad-manifest", format!("{at}: not a list of strings"))
    };
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

fn wanted(url: Uri, digest: Digest, len: usize) -> Wanted {
    Wanted {
        url,
        digest,
        size: Some(len as u64),
    }
}
