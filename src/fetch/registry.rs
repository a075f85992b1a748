//! Manifests fetched by tag (SPEC 9): a stored answer is reused for the registry's `tag_ttl`, then
//! revalidated with an upstream HEAD whose unchanged `Docker-Content-Digest` renews it without a
//! download; with the upstream unreachable (or answering 5xx) it is served stale, so that a site cut off
//! from the cloud can still start its modules. The answer itself (its bytes by digest, the tag's key)
//! is stored by the ordinary fill; this file only decides whether the stored one may answer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Method, Uri};

use super::{headers, FetchError, Fetcher};
use crate::store::{now_ms, Digest};

/// What the stored answer for a tag can do for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagState {
    /// Fetched less than `tag_ttl` ago: served as it is.
    Fresh(Digest),
    /// Older, and the registry still names the same digest for the tag: renewed and served.
    Renewed(Digest),
    /// Older, and the registry could not be asked: served stale.
    Stale(Digest),
    /// Nothing stored, or the tag now names something else: fetched.
    Fetch,
}

/// The tags whose stored answer is being revalidated, each with a lock: the requests that find a tag
/// expired at once wait for the first one's HEAD and read its outcome from the store, instead of
/// asking the registry each (SPEC 4: collapsed).
#[derive(Default)]
pub struct TagChecks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl TagChecks {
    fn lock_of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key.to_string()).or_default().clone()
    }

    /// Forgets a tag's lock once nobody holds or waits for it.
    fn release(&self, key: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(key).is_some_and(|l| Arc::strong_count(l) == 1) {
            m.remove(key);
        }
    }
}

impl Fetcher {
    /// Whether `/v2/` misses may go to a parent (a child gateway needs no registries of its own).
    pub fn has_parents(&self) -> bool {
        self.client().has_parents()
    }

    /// Decides whether the stored answer under `key` (a tag's, for one `Accept`) may answer a request,
    /// asking the registry at `url` with a HEAD once it is older than `ttl`: one HEAD for all the
    /// requests that find it expired together.
    pub async fn tag_state(
        &self,
        key: &str,
        url: &Uri,
        ttl: Duration,
        client: &HeaderMap,
    ) -> TagState {
        if let Some(fresh) = self.fresh_tag(key, ttl) {
            return fresh;
        }
        let checks = &self.inner.tag_checks;
        let lock = checks.lock_of(key);
        let state = {
            let _one = lock.lock().await;
            // The HEAD of a request that held the lock before may have renewed it.
            match self.fresh_tag(key, ttl) {
                Some(fresh) => fresh,
                None => self.revalidate_tag(key, url, client).await,
            }
        };
        drop(lock);
        checks.release(key);
        state
    }

    /// `Fresh` when the stored answer under `key` is younger than `ttl`; `Fetch` when there is none.
    fn fresh_tag(&self, key: &str, ttl: Duration) -> Option<TagState> {
        let Some(e) = self.store().lookup(key) else {
            return Some(TagState::Fetch);
        };
        if e.meta.status != 200 || !self.store().contains(&e.digest) {
            return Some(TagState::Fetch);
        }
        let age = now_ms().saturating_sub(e.meta.fetched_at);
        (u128::from(age) < ttl.as_millis()).then_some(TagState::Fresh(e.digest))
    }

    /// Asks the registry whether an expired tag still names the stored answer.
    async fn revalidate_tag(&self, key: &str, url: &Uri, client: &HeaderMap) -> TagState {
        let Some(e) = self.store().lookup(key) else {
            return TagState::Fetch;
        };
        if e.meta.status != 200 || !self.store().contains(&e.digest) {
            return TagState::Fetch;
        }
        let mut h = headers::for_fill(client);
        headers::add_ours(&mut h, &self.inner.cfg.node_id);
        self.stats().revalidations.fetch_add(1, Ordering::Relaxed);
        let asked = self.client().fetch(Method::HEAD, Some(url), None, &h).await;
        let named = match asked {
            Ok(r) if r.status().is_server_error() => None,
            Ok(r) if r.status().is_success() => Some(content_digest(r.headers())),
            Ok(_) => return TagState::Fetch,
            Err(
                FetchError::Unreachable(_) | FetchError::Timeout(_) | FetchError::BadResponse(_),
            ) => None,
            Err(_) => return TagState::Fetch,
        };
        match named {
            None => {
                self.stats().stale_served.fetch_add(1, Ordering::Relaxed);
                TagState::Stale(e.digest)
            }
            Some(Some(d)) if d == e.digest => {
                let mut meta = e.meta;
                meta.fetched_at = now_ms();
                if let Err(err) = self.store().refresh_key(key, meta) {
                    tracing::warn!(error = %err, "cannot record a tag's revalidation");
                }
                TagState::Renewed(d)
            }
            Some(_) => TagState::Fetch,
        }
    }
}

/// The digest a registry's answer names for its bytes (`Docker-Content-Digest`), so that a manifest
/// fetched by tag is verified as it arrives, like one fetched by digest. Not for Docker's signed schema 1
/// manifests, whose digest is that of the manifest without its signatures.
pub fn manifest_digest(h: &HeaderMap) -> Option<Digest> {
    let ct = h
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.contains("distribution.manifest.v1") {
        return None;
    }
    content_digest(h)
}

/// The `Docker-Content-Digest` of an answer, when it is a sha256 digest.
pub fn content_digest(h: &HeaderMap) -> Option<Digest> {
    let v = h.get("docker-content-digest")?.to_str().ok()?;
    v.trim().strip_prefix("sha256:")?.parse().ok()
}
