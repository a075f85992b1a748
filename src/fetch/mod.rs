//! Getting objects: from the store when it holds them fresh, else through exactly one upstream transfer
//! per object that every asking client streams from (collapsing), with verification, resume and
//! revalidation (SPEC 4). Calls `store` and the upstream; called by `server`.

mod collapse;
mod error;
pub mod flight;
pub(crate) mod framing;
pub mod freshness;
pub mod headers;
mod jobs;
pub mod key;
mod lookup;
pub mod peering;
pub mod policy;
pub mod prefetch;
mod rate;
pub mod registry;
mod sink;
mod transfer;
pub mod uplink;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fetch::uplink::Metered;
use http::{HeaderMap, Method, Response, Uri};
use serde::Serialize;

use crate::store::{Digest, Hit, KeyMeta, Store};
pub use error::FetchError;
pub use flight::{End, Flight, FlightReader, Head, Joined};
use key::variant_key;
use policy::OriginPolicy;
use upstream::UpstreamClient;
pub use upstream::{Ask, Director, Hop, Outcome};

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
    /// Upstream transfers running (each holds a [`Running`]): the shutdown waits for them.
    running: Arc<tokio::sync::watch::Sender<usize>>,
    /// Slots for upstream transfers (`upstream.max_transfers`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Prefetch jobs and the mappings staged manifests made.
    jobs: jobs::Jobs,
    /// Tags being revalidated: one upstream HEAD per tag at a time (`registry`).
    tag_checks: registry::TagChecks,
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
                tag_checks: registry::TagChecks::default(),
                mismatches: Mutex::new(HashMap::new()),
                unstored: Mutex::new(HashMap::new()),
                stats: FetchStats::default(),
                running: Arc::new(tokio::sync::watch::Sender::new(0)),
                slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_transfers)),
                cfg,
                jobs: jobs::Jobs::default(),
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

    pub fn parents_health(&self) -> Vec<upstream::ParentHealth> {
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

    /// Counts a transfer as running until the value is dropped.
    fn running(&self) -> Running {
        self.inner.running.send_modify(|n| *n += 1);
        Running(self.inner.running.clone())
    }

    /// Waits up to `within` for the transfers still running (no client may be waiting for them: a
    /// background revalidation, a fill whose clients left) to end, so that a stop does not throw away
    /// what they were about to store. False when some were still running.
    pub async fn drain(&self, within: Duration) -> bool {
        let mut rx = self.inner.running.subscribe();
        let idle = tokio::time::timeout(within, rx.wait_for(|n| *n == 0)).await;
        matches!(idle, Ok(Ok(_)))
    }

    /// What the GET path (`lookup.rs`), the transfers (`transfer.rs`) and the prefetch jobs reach
    /// through the fetcher: the store, the upstream client, the transfer slots, the jobs.
    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The node's uplink budget (SPEC 4).
    pub fn uplink(&self) -> &Arc<uplink::Uplink> {
        self.client().uplink()
    }

    /// The site's peers (SPEC 10), when `[peers]` names any.
    pub fn peers(&self) -> Option<&Arc<upstream::peers::Peers>> {
        self.client().director().peers()
    }

    /// A request carrying `Cistern-Peer` arrived from `from`: counted as served for that member.
    pub fn served_peer(&self, from: std::net::IpAddr) {
        if let Some(p) = self.peers() {
            p.served_from(from);
        }
    }

    fn client(&self) -> &UpstreamClient {
        &self.inner.client
    }

    fn slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.slots
    }

    fn jobs(&self) -> &jobs::Jobs {
        &self.inner.jobs
    }

    fn collapse(&self) -> &collapse::Collapse {
        &self.inner.collapse
    }

    /// Whether the last transfer of a target failed verification less than a minute ago. A hold is
    /// for the key and the digest it was expected to have: a manifest that names a wrong digest for a
    /// URL holds back requests expecting that digest, not devices asking the URL without one.
    fn mismatch_held(&self, t: &Target) -> bool {
        lock(&self.inner.mismatches)
            .get(&hold_key(t))
            .is_some_and(|at| at.elapsed() < MISMATCH_HOLD)
    }

    fn record_mismatch(&self, t: &Target) {
        self.inner
            .stats
            .digest_mismatches
            .fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.inner.mismatches);
        m.retain(|_, at| at.elapsed() < MISMATCH_HOLD);
        m.insert(hold_key(t), Instant::now());
    }

    /// Requests that are not cached (HEAD on a miss, requests with Authorization, ranges of objects
    /// not stored): sent upstream with the client's end-to-end fields, the answer passed back.
    pub async fn pass_through(
        &self,
        method: Method,
        t: &Target,
    ) -> Result<Response<Metered>, FetchError> {
        let mut h = headers::end_to_end(&t.headers);
        headers::add_ours(&mut h, &self.inner.cfg.node_id);
        self.inner
            .client
            .fetch_keyed(method, t.url.as_ref(), t.digest, Some(&t.key), &h)
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
    ) -> Result<Response<Metered>, FetchError> {
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
            FetchError::Unreachable(_) | FetchError::UpstreamTls(_) => &s.errors_unreachable,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One running transfer, counted while it lives.
struct Running(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The key of a mismatch hold: the target's key and the digest it expected, if any.
fn hold_key(t: &Target) -> String {
    match t.digest {
        Some(d) => format!("{}\u{1e}{d}", t.key),
        None => t.key.clone(),
    }
}
