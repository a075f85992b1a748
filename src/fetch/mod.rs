//! Getting objects: from the store when it holds them fresh, else through exactly one upstream transfer
//! per object that every asking client streams from (collapsing), with verification, resume and
//! revalidation (SPEC 4). Calls `store` and the upstream; called by `server`.

mod collapse;
mod error;
pub mod flight;
pub(crate) mod framing;
pub mod freshness;
pub mod headers;
pub mod key;
pub mod parents;
pub mod policy;
pub mod prefetch;
mod proxy;
mod rate;
mod sink;
mod transfer;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Response, Uri};
use hyper::body::Incoming;
use serde::Serialize;

use crate::store::{now_ms, Digest, Hit, KeyMeta, Store};
pub use error::FetchError;
pub use flight::{End, Flight, FlightReader, Head, Joined};
use freshness::{RequestCc, Reuse};
use policy::OriginPolicy;
use upstream::UpstreamClient;

/// How long a key answers 502 after a digest mismatch before it is fetched again (SPEC 4).
const MISMATCH_HOLD: Duration = Duration::from_secs(60);
/// How long a key is remembered as streamed through unstored, and how many are remembered.
const UNSTORED_FOR: Duration = Duration::from_secs(600);
const UNSTORED_MAX: usize = 10_000;

/// Fetch settings, from `[upstream]` and `[node]`.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub node_id: String,
    pub retries: u32,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Bytes per second below which a transfer counts as broken (`upstream.min_rate`).
    pub min_rate: u64,
    pub max_transfers: usize,
    pub require_digest: bool,
    pub strip_query: Vec<String>,
}

/// What a client asks for, resolved by `server` from one of the SPEC 3 forms.
#[derive(Clone, Debug)]
pub struct Target {
    /// The cache key (SPEC 3), or `sha256/<hex>` for the content-addressed form.
    pub key: String,
    /// Where the object is fetched from; None when no upstream is known.
    pub url: Option<Uri>,
    /// The digest the bytes must have, when known before fetching.
    pub digest: Option<Digest>,
    /// The mapping never goes stale (digest URL, manifest, immutable named origin).
    pub immutable: bool,
    /// The request said `Cache-Control: no-store`: nothing of its answer is stored.
    pub no_store: bool,
    /// The request fields of the client that asked (end-to-end ones travel upstream; Vary selects by
    /// them).
    pub headers: HeaderMap,
}

impl Target {
    /// The request carries credentials (URL forms only: content by digest is the same for everyone).
    pub fn authorized(&self) -> bool {
        !self.key.starts_with("sha256/") && self.headers.contains_key(http::header::AUTHORIZATION)
    }
}

/// The answer to a GET. Short-lived (matched at once), so its variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Lookup {
    /// Served from the store. `ttl` is the freshness left (negative when served stale).
    Hit {
        hit: Hit,
        meta: Option<KeyMeta>,
        how: HitKind,
    },
    /// No transfer this request may share (its response varies on `*`, or is private): the request
    /// passes through, uncached.
    Pass,
    /// Streamed from a transfer in flight; `joined` says how the client came to it. `reader` was
    /// attached when the client joined (at byte 0), so that no byte it may need is let go before it
    /// positions the reader (`FlightReader::seek`) or drops it.
    Flight {
        flight: Arc<Flight>,
        joined: Joined,
        reader: FlightReader,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HitKind {
    Fresh,
    Revalidated,
    Stale,
}

/// Counters ops reads.
#[derive(Default, Debug)]
pub struct FetchStats {
    pub transfers: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub collapsed: AtomicU64,
    pub resumes: AtomicU64,
    pub digest_mismatches: AtomicU64,
    pub errors_unreachable: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_status: AtomicU64,
    pub errors_broken: AtomicU64,
    pub revalidations: AtomicU64,
    pub stale_served: AtomicU64,
}

/// One transfer in flight, as the dashboard shows it.
#[derive(Serialize, Debug, Clone)]
pub struct InFlight {
    pub key: String,
    pub bytes: u64,
    pub size: Option<u64>,
    pub clients: usize,
}

#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    client: UpstreamClient,
    cfg: FetchConfig,
    /// Transfers in flight: the "one fetch per object" table.
    collapse: collapse::Collapse,
    /// Keys whose last transfer failed verification, and when.
    mismatches: Mutex<HashMap<String, Instant>>,
    /// Keys whose last transfer was streamed through without being stored (too big, no room, not
    /// cacheable), and when: a range of one goes upstream as a range (SPEC 4).
    unstored: Mutex<HashMap<String, Instant>>,
    stats: FetchStats,
    /// Slots for upstream transfers (`upstream.max_transfers`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Prefetch jobs and the mappings staged manifests made.
    jobs: prefetch::Jobs,
}

/// The index key of one variant of a key's response (RFC 9111 §4.1): the key and the request fields the
/// response varies on, with their values.
pub fn variant_key(key: &str, vary: &[(String, Option<String>)]) -> String {
    let mut k = key.to_string();
    for (n, v) in vary {
        k.push('\u{1f}');
        k.push_str(n);
        if let Some(v) = v {
            k.push('=');
            k.push_str(v);
        }
    }
    k
}

/// The request's values for the fields a stored response varies on.
pub(crate) fn vary_for(
    stored: &[(String, Option<String>)],
    req: &HeaderMap,
) -> Vec<(String, Option<String>)> {
    let names: Vec<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    let mut fake = HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&names.join(", ")) {
        fake.insert(http::header::VARY, v);
    }
    freshness::vary_of(&fake, req).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fetcher {
    pub fn new(store: Store, client: UpstreamClient, cfg: FetchConfig) -> Fetcher {
        Fetcher {
            inner: Arc::new(Inner {
                store,
                client,
                collapse: collapse::Collapse::default(),
                mismatches: Mutex::new(HashMap::new()),
                unstored: Mutex::new(HashMap::new()),
                stats: FetchStats::default(),
                slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_transfers)),
                cfg,
                jobs: prefetch::Jobs::default(),
            }),
        }
    }

    pub fn stats(&self) -> &FetchStats {
        &self.inner.stats
    }

    pub fn policy(&self) -> &OriginPolicy {
        self.inner.client.policy()
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    /// Checks a URL against the allowlist before anything else happens (403 otherwise).
    pub fn check(&self, url: &Uri) -> Result<(), FetchError> {
        self.inner.client.check(url)
    }

    pub fn parents_health(&self) -> Vec<parents::ParentHealth> {
        self.inner.client.parents_health()
    }

    pub fn in_flight(&self) -> Vec<InFlight> {
        self.inner
            .collapse
            .in_flight()
            .into_iter()
            .map(|(key, f)| InFlight {
                key,
                bytes: f.written(),
                size: f.size(),
                clients: f.reader_count(),
            })
            .collect()
    }

    /// The GET path: a hit, or a transfer to stream from (started or joined). Every reuse, of a stored
    /// response or of a transfer in flight, goes through the same freshness decision.
    pub async fn get(&self, t: &Target, req: &RequestCc) -> Result<Lookup, FetchError> {
        let store = &self.inner.store;
        if let Some(d) = t.digest {
            // Bytes with this digest that are verified and being stored count as stored.
            if let Some(f) = self.inner.collapse.committing_digest(d) {
                f.wait_end().await;
            }
            // Stored bytes with the digest answer the content-addressed form. A URL gets them only
            // once it has answered them itself (its key maps to them): a digest that a manifest gave
            // a URL says what the URL must answer, not that it does (SPEC 6). Otherwise the URL is
            // fetched below and its bytes verified against the digest.
            let answered = t.key == format!("sha256/{d}")
                || store.lookup(&t.key).is_some_and(|e| e.digest == d);
            if answered && store.contains(&d) {
                return self.hit(d, None, HitKind::Fresh).await;
            }
        }
        // A transfer that has every byte verified and is storing them: a fresh response is served
        // from it as a hit; otherwise the commit is awaited, so that the freshness decision below sees
        // the stored response.
        let committing = self.committing(t).filter(|_| !t.authorized());
        if let Some(f) = committing {
            if f.joinable(&t.headers) == Some(Joined::Verified) {
                let reader = f.reader(0, None);
                return Ok(Lookup::Flight {
                    flight: f,
                    joined: Joined::Verified,
                    reader,
                });
            }
            f.wait_end().await;
        }
        let mut stale = None;
        // A request with credentials may reuse only what says it may be shared (RFC 9111 §3.5).
        // A target whose digest is known is served only bytes with that digest.
        let usable = |e: &crate::store::KeyEntry| {
            (!t.authorized() || freshness::shareable_with_credentials(&e.meta))
                && t.digest.is_none_or(|d| e.digest == d)
        };
        if let Some(e) = self.stored(t).filter(usable) {
            let how = if t.immutable {
                Reuse::Fresh
            } else {
                freshness::reuse(&e.meta, req, now_ms())
            };
            match how {
                Reuse::Fresh => return self.hit(e.digest, Some(e.meta), HitKind::Fresh).await,
                Reuse::Stale => return self.hit(e.digest, Some(e.meta), HitKind::Stale).await,
                Reuse::StaleRevalidating => {
                    // Served now; the revalidation runs on as a transfer of its own.
                    drop(self.join_or_start(t, Some(e.clone()), &e.meta.vary));
                    return self.hit(e.digest, Some(e.meta), HitKind::Stale).await;
                }
                Reuse::Revalidate => stale = Some(e),
            }
        }
        if req.only_if_cached {
            return Err(FetchError::NotCached);
        }
        if stale.is_none() {
            if let Some(at) = lock(&self.inner.mismatches).get(&t.key) {
                if at.elapsed() < MISMATCH_HOLD {
                    return Err(FetchError::DigestMismatch(
                        "the last transfer of this object failed verification; retrying after a minute".into(),
                    ));
                }
            }
        }
        let Some((flight, joined, reader)) = self.follow_or_lead(t, stale.clone()).await else {
            return Ok(Lookup::Pass);
        };
        if let Some(e) = stale {
            // A revalidation flight: wait for its verdict.
            match flight.head().await {
                Ok(_) | Err(End::Complete(_)) => {}
                Err(End::Revalidated(d)) => {
                    let meta = self.stored(t).map(|e| e.meta);
                    return self.hit(d, meta, HitKind::Revalidated).await;
                }
                Err(End::ServeStale(d, why)) => {
                    if !freshness::stale_on_error(&e.meta, now_ms()) {
                        return Err(FetchError::Unreachable(format!(
                            "{why}; the stored copy may not be served stale (must-revalidate)"
                        )));
                    }
                    self.inner
                        .stats
                        .stale_served
                        .fetch_add(1, Ordering::Relaxed);
                    return self.hit(d, Some(e.meta), HitKind::Stale).await;
                }
                Err(End::Failed(err)) => return Err(err),
            }
        }
        Ok(Lookup::Flight {
            flight,
            joined,
            reader,
        })
    }

    /// The transfer of a target's key (or variant) that has verified its bytes and is storing them.
    fn committing(&self, t: &Target) -> Option<Arc<Flight>> {
        let vary = self.base_vary(&t.key);
        self.inner.collapse.committing(&t.key, &t.headers, &vary)
    }

    /// The fields the stored responses of a key vary on (empty when none is stored or none varies).
    fn base_vary(&self, key: &str) -> Vec<(String, Option<String>)> {
        self.inner
            .store
            .lookup(key)
            .map(|e| e.meta.vary)
            .unwrap_or_default()
    }

    /// Whether the store holds what a target names (a HEAD on a miss goes upstream as a HEAD): its
    /// digest for the content-addressed form; for a URL, its key's (or variant's) response, and when
    /// the target's digest is known, only if the URL answered that digest (SPEC 6).
    pub fn holds(&self, t: &Target) -> bool {
        match t.digest {
            Some(d) if t.key.starts_with("sha256/") => self.inner.store.contains(&d),
            Some(d) => self.stored(t).is_some_and(|e| e.digest == d),
            None => self.stored(t).is_some(),
        }
    }

    /// The stored response for a target: the key's, or the variant whose Vary matches the request.
    fn stored(&self, t: &Target) -> Option<crate::store::KeyEntry> {
        let store = &self.inner.store;
        let e = store.lookup(&t.key)?;
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
        let store = self.inner.store.clone();
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
        for _ in 0..2 {
            let (flight, joined, reader) = self.join_or_start(t, stale.clone(), &vary);
            if joined != Joined::InFlight || stale.is_some() {
                return Some((flight, joined, reader));
            }
            self.inner.stats.collapsed.fetch_add(1, Ordering::Relaxed);
            match flight.head().await {
                Ok(h) if !h.shareable_with(&t.headers) => continue,
                _ => return Some((flight, joined, reader)),
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
    ) -> (Arc<Flight>, Joined, FlightReader) {
        // A request with credentials never shares a transfer, and none joins its own.
        let shared = !t.authorized();
        let asked = self
            .inner
            .collapse
            .ask(&t.key, &t.headers, vary, stale.is_some(), shared);
        let (flight, permit) = match asked {
            collapse::Ask::Follow(f, joined) => {
                let reader = f.reader(0, None);
                return (f, joined, reader);
            }
            collapse::Ask::Lead(f, permit) => (f, permit),
        };
        let reader = flight.reader(0, None);
        self.inner.stats.transfers.fetch_add(1, Ordering::Relaxed);
        let job = transfer::Transfer {
            fetcher: self.clone(),
            flight: flight.clone(),
            target: t.clone(),
            stale,
            permit: Arc::new(permit),
        };
        tokio::spawn(job.run());
        (flight, Joined::Leader, reader)
    }

    /// The index keys a response is stored under: the key, and the variant's when it has a Vary.
    fn keys_for(&self, key: &str, vary: &[(String, Option<String>)]) -> Vec<String> {
        let mut keys = vec![key.to_string()];
        if !vary.is_empty() {
            keys.push(variant_key(key, vary));
        }
        keys
    }

    fn record_unstored(&self, key: &str) {
        let mut m = lock(&self.inner.unstored);
        if m.len() >= UNSTORED_MAX {
            m.retain(|_, at| at.elapsed() < UNSTORED_FOR);
        }
        if m.len() < UNSTORED_MAX {
            m.insert(key.to_string(), Instant::now());
        }
    }

    /// Whether the object behind `key` was recently streamed through unstored: a client asking for a
    /// range of it then gets its own upstream request for that range, not a refetch from byte 0.
    pub fn recently_unstored(&self, key: &str) -> bool {
        lock(&self.inner.unstored)
            .get(key)
            .is_some_and(|at| at.elapsed() < UNSTORED_FOR)
    }

    fn record_mismatch(&self, key: &str) {
        self.inner
            .stats
            .digest_mismatches
            .fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.inner.mismatches);
        m.retain(|_, at| at.elapsed() < MISMATCH_HOLD);
        m.insert(key.to_string(), Instant::now());
    }

    /// Requests that are not cached (HEAD on a miss, requests with Authorization, ranges of objects
    /// not stored): sent upstream with the client's end-to-end fields, the answer passed back.
    pub async fn pass_through(
        &self,
        method: Method,
        t: &Target,
    ) -> Result<Response<Incoming>, FetchError> {
        let mut h = headers::end_to_end(&t.headers);
        headers::add_ours(&mut h, &self.inner.cfg.node_id);
        self.inner
            .client
            .fetch(method, t.url.as_ref(), t.digest, &h)
            .await
            .inspect_err(|e| self.count_error(e))
    }

    /// Another method than GET or HEAD on a URL form: passed upstream with its body, uncached; a
    /// successful (2xx, 3xx) answer to an unsafe method invalidates what is stored for the URL and for
    /// its `Location` and `Content-Location` on the same origin (RFC 9111 §4.4).
    pub async fn forward(
        &self,
        method: Method,
        t: &Target,
        strip: &[String],
        body: upstream::ReqBody,
    ) -> Result<Response<Incoming>, FetchError> {
        let Some(url) = &t.url else {
            return Err(FetchError::NotFound("no upstream for this request".into()));
        };
        let mut h = headers::end_to_end(&t.headers);
        headers::add_ours(&mut h, &self.inner.cfg.node_id);
        let resp = self
            .inner
            .client
            .forward(method.clone(), url, &h, body)
            .await
            .inspect_err(|e| self.count_error(e))?;
        let safe = matches!(method, Method::OPTIONS | Method::TRACE);
        let ok = resp.status().is_success() || resp.status().is_redirection();
        if !safe && ok {
            let mut keys = vec![t.key.clone()];
            for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
                let target = resp
                    .headers()
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| upstream::resolve_location(url, v))
                    .filter(|u| u.authority() == url.authority());
                if let Some(u) = target {
                    keys.push(key::cache_key(&u, strip));
                }
            }
            for k in keys {
                self.invalidate(&k).await;
            }
        }
        Ok(resp)
    }

    /// Forgets what is stored for a key. Its fills in flight leave the table and map nothing when
    /// they commit; one already committing is let end first, so that its mapping is undone below.
    async fn invalidate(&self, key: &str) {
        for f in self.inner.collapse.invalidate(key) {
            if f.is_committing() {
                f.wait_end().await;
            }
        }
        self.inner.store.invalidate(key);
    }

    /// The fields of a fill's upstream request: the (first) client's end-to-end fields without its
    /// range and conditions, and ours.
    fn fill_headers(&self, t: &Target) -> HeaderMap {
        let mut h = headers::for_fill(&t.headers);
        headers::add_ours(&mut h, &self.inner.cfg.node_id);
        h
    }

    fn count_error(&self, e: &FetchError) {
        let s = &self.inner.stats;
        let c = match e {
            FetchError::Timeout(_) => &s.errors_timeout,
            FetchError::Status { .. } | FetchError::BadResponse(_) => &s.errors_status,
            FetchError::Unreachable(_) => &s.errors_unreachable,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}
