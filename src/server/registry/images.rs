//! `GET /v1/admin/images` (SPEC 9): the images whose tags are stored, each with its registry,
//! repository, tag, manifest digest, platforms and size, read from the stored manifests with the
//! `oci-spec` types (an image manifest, or an index / Docker manifest list and the manifests of it
//! that are stored). The dashboard's table of images reads the same [`list`] (`server::stored_images`).

use std::collections::BTreeSet;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Serialize;

use crate::store::{Digest, Store};

/// Bound on a manifest read for the listing (the distribution spec's registries cap them at 4 MiB).
const MAX_MANIFEST: u64 = 4 << 20;

/// One stored tag.
#[derive(Serialize, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageEntry {
    /// The registry's host, or `parent` on a child that asks its parent's `/v2/`.
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// The manifest (or index) the tag named when it was last fetched or renewed.
    pub digest: String,
    pub platforms: Vec<String>,
    /// Bytes of the manifests, configs and layers the image references (stored or not).
    pub size: u64,
}

/// Every stored tag, in order of registry, repository and tag.
pub async fn list(store: &Store) -> Vec<ImageEntry> {
    let mut seen = BTreeSet::new();
    for o in store.list() {
        for key in &o.keys {
            if let Some((registry, repository, tag)) = tag_of(key) {
                seen.insert((registry, repository, tag, o.digest));
            }
        }
    }
    let mut out = Vec::new();
    for (registry, repository, tag, d) in seen {
        let (platforms, size) = describe(store, &d).await;
        out.push(ImageEntry {
            registry,
            repository,
            tag,
            digest: format!("sha256:{d}"),
            platforms,
            size,
        });
    }
    out
}

/// `(registry, repository, tag)` of a tag's key (`<host>/v2/<repo>/manifests/<tag>#accept=<hash>`).
pub fn tag_of(key: &str) -> Option<(String, String, String)> {
    let (url, _) = key.split_once("#accept=")?;
    let (registry, rest) = url.split_once("/v2/")?;
    let (repo, tag) = rest.rsplit_once("/manifests/")?;
    let tag = tag.split('?').next().unwrap_or(tag);
    let registry = registry.trim_start_matches('/');
    Some((registry.to_string(), repo.to_string(), tag.to_string()))
}

/// The platforms and size of the image (or index) stored as `d`.
async fn describe(store: &Store, d: &Digest) -> (Vec<String>, u64) {
    let Some(bytes) = read(store, d).await else {
        return (Vec::new(), 0);
    };
    if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes) {
        if !index.manifests().is_empty() {
            let mut platforms = Vec::new();
            let mut size = bytes.len() as u64;
            for m in index.manifests() {
                size += m.size();
                let p = m.platform().as_ref().map(|p| {
                    platform(
                        &p.os().to_string(),
                        &p.architecture().to_string(),
                        p.variant(),
                    )
                });
                platforms.extend(p.filter(|p| p != "unknown/unknown"));
                if let Some(child) = parse_digest(m.digest().as_ref()) {
                    size += image_size(store, &child).await.unwrap_or(0);
                }
            }
            return (platforms, size);
        }
    }
    let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else {
        return (Vec::new(), bytes.len() as u64);
    };
    let size =
        bytes.len() as u64 + m.config().size() + m.layers().iter().map(|l| l.size()).sum::<u64>();
    let config = parse_digest(m.config().digest().as_ref());
    let platforms = match config {
        Some(c) => read(store, &c)
            .await
            .and_then(|b| serde_json::from_slice::<ImageConfiguration>(&b).ok())
            .map(|c| {
                platform(
                    &c.os().to_string(),
                    &c.architecture().to_string(),
                    c.variant(),
                )
            })
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    (platforms, size)
}

/// The config and layers of a stored image manifest.
async fn image_size(store: &Store, d: &Digest) -> Option<u64> {
    let b = read(store, d).await?;
    let m = serde_json::from_slice::<ImageManifest>(&b).ok()?;
    Some(m.config().size() + m.layers().iter().map(|l| l.size()).sum::<u64>())
}

fn platform(os: &str, arch: &str, variant: &Option<String>) -> String {
    match variant {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    }
}

fn parse_digest(s: &str) -> Option<Digest> {
    s.strip_prefix("sha256:")?.parse().ok()
}

/// A stored manifest's bytes (read from its file: listing counts no hit).
async fn read(store: &Store, d: &Digest) -> Option<Vec<u8>> {
    if store.size_of(d)? > MAX_MANIFEST {
        return None;
    }
    tokio::fs::read(store.blob_path(d)).await.ok()
}

#[cfg(test)]
mod tests {
    use super::tag_of;

    #[test]
    fn tags_from_keys() {
        assert_eq!(
            tag_of("mcr.microsoft.com/v2/azureiotedge-agent/manifests/1.5#accept=00ff"),
            Some((
                "mcr.microsoft.com".into(),
                "azureiotedge-agent".into(),
                "1.5".into()
            ))
        );
        assert_eq!(
            tag_of("parent/v2/mcr/line/app/manifests/2?ns=x#accept=00"),
            Some(("parent".into(), "mcr/line/app".into(), "2".into()))
        );
        assert_eq!(tag_of("sha256/00"), None);
        assert_eq!(tag_of("x.example/v2/a/manifests/1"), None);
    }
}
