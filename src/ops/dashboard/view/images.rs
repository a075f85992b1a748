//! The stored container images (SPEC 9) as the dashboard lists them: the entries of
//! `GET /v1/admin/images` (`server::stored_images`), formatted for a person.

use serde::Serialize;

use super::bytes;
use crate::server::ImageEntry;

/// Images listed at most (in order of registry, repository and tag).
const IMAGES_SHOWN: usize = 50;

/// One stored tag of an image.
#[derive(Serialize)]
pub struct ImageRow {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// The manifest (or index) the tag names, `sha256:<hex>`.
    pub digest: String,
    /// "linux/amd64, linux/arm64"; empty when the manifests do not say.
    pub platforms: String,
    /// The manifests, configs and layers it references.
    pub size: String,
}

/// The rows shown, and how many of how many ("3", "the first 50 of 72").
pub fn images(all: Vec<ImageEntry>) -> (Vec<ImageRow>, String) {
    let shown = if all.len() > IMAGES_SHOWN {
        format!("the first {IMAGES_SHOWN} of {}", all.len())
    } else {
        format!("{}", all.len())
    };
    let rows = all
        .into_iter()
        .take(IMAGES_SHOWN)
        .map(|i| ImageRow {
            registry: i.registry,
            repository: i.repository,
            tag: i.tag,
            digest: i.digest,
            platforms: i.platforms.join(", "),
            size: bytes(i.size),
        })
        .collect();
    (rows, shown)
}
