//! The GET path: a stored response, a fill in flight to join, or a new fill, decided for a request in
//! one place (SPEC 4, "One fetch per object", "Freshness").

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::freshness::{self, RequestCc, Reuse};
use super::key::{variant_key, vary_for};
use super::uplink::{Class, Priority};
use super::{collapse, transfer, FetchError, Fetcher, HitKind, Lookup, Target};
use super::{End, Flight, FlightReader, Joined};
use crate::store::{now_ms, Digest, Hit, KeyMeta};

/// Variants of a key looked at when the key's own mapping is gone.
const MAX_VARIANTS: usize = 64;

/// What the stored response can do for a request.
enum Stored {
    Serve(Digest, Option<KeyMeta>, HitKind),
    Revalidate(crate::store::KeyEntry),
    None,
}

impl Fetcher {
    /// The GET path: a hit, or a transfer to stream from (started or joined). Every reuse, of a stored
    /// response or of a transfer in flight, goes through the same freshness decision.
    pub async fn get(&self, t: &Target, req: &RequestCc) -> Result<Lookup, FetchError> {
        if let Some(d) = t.digest {
            if let Some(hit) = self.digest_hit(t, d).await {
                return hit;
            }
        }
        if let Some(l) = self.served_while_committing(t).await {
            return Ok(l);
        }
        let stale = match self.reuse_stored(t, req) {
            Stored::Serve(d, meta, how) => return self.hit(d, meta, how).await,
            Stored::Revalidate(e) => Some(e),
            Stored::None => None,
        };
        if req.only_if_cached {
            return Err(FetchError::NotCached);
        }
        if stale.is_none() && self.mismatch_held(t) {
            return Err(FetchError::DigestMismatch(
                "the last transfer of this object failed verification; retrying after a minute"
                    .into(),
            ));
        }
        let Some((flight, joined, reader)) = self.follow_or_lead(t, stale.clone()).await else {
            return Ok(Lookup::Pass);
        };
        if let Some(e) = stale {
            if let Some(answer) = self.verdict(t, e, &flight).await {
                return answer;
            }
        }
        Ok(Lookup::Flight {
            flight,
            joined,
            reader,
        })
    }

    /// A target whose digest is known: stored bytes with the digest (counting those verified and being
    /// stored) answer the content-addressed form. A URL gets them only once it has answered them itself
    /// (its key maps to them): a digest that a manifest gave a URL says what the URL must answer, not
    /// that it does (SPEC 6); otherwise the URL is fetched and its bytes verified against the digest.
    async fn digest_hit(&self, t: &Target, d: Digest) -> Option<Result<Lookup, FetchError>> {
        if let Some(f) = self.collapse().committing_digest(d) {
            f.wait_end().await;
        }
        let store = self.store();
        let answered =
            t.key == format!("sha256/{d}") || store.lookup(&t.key).is_some_and(|e| e.digest == d);
        if answered && store.contains(&d) {
            return Some(self.hit(d, None, HitKind::Fresh).await);
        }
        None
    }

    /// A transfer that has every byte verified and is storing them: served from as a hit when the
    /// reuse rule allows (`Flight::joinable`); otherwise its commit is awaited, so that the decision
    /// on the stored response sees it.
    async fn served_while_committing(&self, t: &Target) -> Option<Lookup> {
        let f = self.committing(t).filter(|_| !t.authorized())?;
        if f.joinable(&t.headers) == Some(Joined::Verified) {
            let reader = f.reader(0, None);
            return Some(Lookup::Flight {
                flight: f,
                joined: Joined::Verified,
                reader,
            });
        }
        f.wait_end().await;
        None
    }

    /// The one reuse decision for a stored response (RFC 9111 §4.2, SPEC 4).
    fn reuse_stored(&self, t: &Target, req: &RequestCc) -> Stored {
        // A request with credentials may reuse only what says it may be shared (RFC 9111 §3.5).
        // A target whose digest is known is served only bytes with that digest.
        let usable = |e: &crate::store::KeyEntry| {
            (!t.authorized() || freshness::shareable_with_credentials(&e.meta))
                && t.digest.is_none_or(|d| e.digest == d)
        };
        let Some(e) = self.stored(t).filter(usable) else {
            return Stored::None;
        };
        let how = if t.immutable {
            Reuse::Fresh
        } else {
            freshness::reuse(&e.meta, req, now_ms())
        };
        match how {
            Reuse::Fresh => Stored::Serve(e.digest, Some(e.meta), HitKind::Fresh),
            Reuse::Stale => Stored::Serve(e.digest, Some(e.meta), HitKind::Stale),
            Reuse::StaleRevalidating => {
                // Served now; the revalidation runs on as a transfer of its own, as background
                // work: only inside the uplink's windows (SPEC 4).
                if self.uplink().open() {
                    let shared = !t.authorized();
                    Priority::background().sync_scope(|| {
                        drop(self.join_or_start(t, Some(e.clone()), &e.meta.vary, shared))
                    });
                }
                Stored::Serve(e.digest, Some(e.meta), HitKind::Stale)
            }
            Reuse::Revalidate => Stored::Revalidate(e),
        }
    }

    /// A revalidation's verdict for the stored copy `e`: a hit when it is fresh again or may be served
    /// stale, an error, or None when the object came back whole (streamed from the flight).
    async fn verdict(
        &self,
        t: &Target,
        e: crate::store::KeyEntry,
        flight: &Flight,
    ) -> Option<Result<Lookup, FetchError>> {
        match flight.head().await {
            Ok(_) | Err(End::Complete(_)) => None,
            Err(End::Revalidated(d)) => {
                // The key may have been invalidated meanwhile: the copy revalidated is still
                // answered with its own header block.
                let meta = self.stored(t).map_or(e.meta, |e| e.meta);
                Some(self.hit(d, Some(meta), HitKind::Revalidated).await)
            }
            Err(End::ServeStale(d, why)) => {
                if !freshness::stale_on_error(&e.meta, now_ms()) {
                    return Some(Err(FetchError::Unreachable(format!(
                        "{why}; the stored copy may not be served stale (must-revalidate)"
                    ))));
                }
                self.stats().stale_served.fetch_add(1, Ordering::Relaxed);
                Some(self.hit(d, Some(e.meta), HitKind::Stale).await)
            }
            Err(End::Failed(err)) => Some(Err(err)),
        }
    }

    /// The transfer of a target's key (or variant) that has verified its bytes and is storing them.
    fn committing(&self, t: &Target) -> Option<Arc<Flight>> {
        if self.collapse().is_idle() {
            return None;
        }
        let vary = self.base_vary(&t.key);
        self.collapse().committing(&t.key, &t.headers, &vary)
    }

    /// The fields the stored responses of a key vary on (empty when none is stored or none varies).
    fn base_vary(&self, key: &str) -> Vec<(String, Option<String>)> {
        let store = self.store();
        let e = store
            .lookup(key)
            .or_else(|| store.variants(key, 1).into_iter().next());
        e.map(|e| e.meta.vary).unwrap_or_default()
    }

    /// Whether the store holds what a target names (a HEAD on a miss goes upstream as a HEAD): its
    /// digest for the content-addressed form; for a URL, its key's (or variant's) response, and when
    /// the target's digest is known, only if the URL answered that digest (SPEC 6). A fill that has
    /// verified its bytes and is storing them holds them already: its commit may take a while (an
    /// fsync on a busy disk), and the object must not look like a miss meanwhile.
    pub fn holds(&self, t: &Target) -> bool {
        match t.digest {
            Some(d) if t.key.starts_with("sha256/") => {
                self.store().contains(&d) || self.collapse().committing_digest(d).is_some()
            }
            Some(d) => {
                self.stored(t).is_some_and(|e| e.digest == d)
                    || self.committing(t).is_some_and(|f| f.digest() == Some(d))
            }
            None => self.stored(t).is_some() || self.committing(t).is_some(),
        }
    }

    /// The stored response for a target: the key's, or the variant whose Vary matches the request.
    pub(super) fn stored(&self, t: &Target) -> Option<crate::store::KeyEntry> {
        let store = self.store();
        let Some(e) = store.lookup(&t.key) else {
            // The key's own mapping is gone (its newest variant was evicted or purged): the other
            // variants may still be stored.
            return store
                .variants(&t.key, MAX_VARIANTS)
                .into_iter()
                .find(|v| freshness::vary_matches(&v.meta.vary, &t.headers));
        };
        if freshness::vary_matches(&e.meta.vary, &t.headers) {
            return Some(e);
        }
        let v = store.lookup(&variant_key(&t.key, &vary_for(&e.meta.vary, &t.headers)))?;
        freshness::vary_matches(&v.meta.vary, &t.headers).then_some(v)
    }

    async fn hit(
        &self,
        d: Digest,
        meta: Option<KeyMeta>,
        how: HitKind,
    ) -> Result<Lookup, FetchError> {
        let hit = self.open(d).await?;
        Ok(Lookup::Hit { hit, meta, how })
    }

    /// Opens a stored object; a first mapping (which touches every page) happens on a blocking thread.
    async fn open(&self, d: Digest) -> Result<Hit, FetchError> {
        let store = self.store().clone();
        let r = if store.is_mapped(&d) {
            store.open_object(&d)
        } else {
            tokio::task::spawn_blocking(move || store.open_object(&d))
                .await
                .map_err(|e| FetchError::Internal(e.to_string()))?
        };
        r.map_err(|e| FetchError::Internal(e.to_string()))
    }

    /// Joins the transfer in flight that may serve this request, or starts one. A follower that
    /// joined before the head arrived and finds the response not for it (another variant) asks again,
    /// and then finds (or starts) its own variant's fill; None when it still cannot share one (`Vary:
    /// *`, private): the request then passes through.
    async fn follow_or_lead(
        &self,
        t: &Target,
        stale: Option<crate::store::KeyEntry>,
    ) -> Option<(Arc<Flight>, Joined, FlightReader)> {
        let vary = match &stale {
            Some(e) => e.meta.vary.clone(),
            None => self.base_vary(&t.key),
        };
        // A request with credentials never shares a transfer, and none joins its own; nor does a
        // request from a peer that this node would send to a peer (SPEC 10: no wait on each other).
        let shared = !t.authorized() && !self.client().peer_disagrees(&t.key, t.digest, &t.headers);
        for _ in 0..2 {
            let (flight, joined, reader) = self.join_or_start(t, stale.clone(), &vary, shared);
            if joined != Joined::InFlight {
                return Some((flight, joined, reader));
            }
            let collapsed = || self.stats().collapsed.fetch_add(1, Ordering::Relaxed);
            if stale.is_some() {
                collapsed();
                return Some((flight, joined, reader));
            }
            match flight.head().await {
                Ok(h) if !h.shareable_with(&t.headers) => continue,
                // Refused for the credentials (or SAS token) of the client that started it: that
                // answer does not decide for this one, which asks with its own (SPEC 4).
                Err(End::Failed(FetchError::Status { status, .. }))
                    if matches!(status.as_u16(), 401 | 403) =>
                {
                    drop(reader);
                    return Some(self.join_or_start(t, stale, &vary, false));
                }
                _ => {
                    collapsed();
                    return Some((flight, joined, reader));
                }
            }
        }
        None
    }

    /// Joins the transfer in flight under the request's selector when its response may be reused
    /// for this request, else starts one (which replaces it in the table for later clients).
    fn join_or_start(
        &self,
        t: &Target,
        stale: Option<crate::store::KeyEntry>,
        vary: &[(String, Option<String>)],
        shared: bool,
    ) -> (Arc<Flight>, Joined, FlightReader) {
        let asked = self
            .collapse()
            .ask(&t.key, &t.headers, vary, stale.is_some(), shared);
        let (flight, permit) = match asked {
            collapse::Ask::Follow(f, joined) => {
                if Priority::current().class() == Class::Foreground {
                    f.priority().raise();
                }
                let reader = f.reader(0, None);
                return (f, joined, reader);
            }
            collapse::Ask::Lead(f, permit) => (f, permit),
        };
        let reader = flight.reader(0, None);
        self.stats().transfers.fetch_add(1, Ordering::Relaxed);
        let job = transfer::Transfer {
            fetcher: self.clone(),
            flight: flight.clone(),
            target: t.clone(),
            stale,
            permit: Arc::new(permit),
            from_peer: Default::default(),
        };
        let running = self.running();
        let priority = flight.priority().clone();
        tokio::spawn(priority.scope(async move {
            job.run().await;
            drop(running);
        }));
        (flight, Joined::Leader, reader)
    }
}
