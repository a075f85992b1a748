//! Getting objects: from the store when it holds them fresh, else through exactly one upstream transfer
//! per object that every asking client streams from (collapsing), with verification, resume and
//! revalidation (SPEC 4). Calls `store` and the upstream; called by `server`.

pub mod flight;
pub mod freshness;
pub mod key;
pub mod parents;
pub mod policy;
pub mod prefetch;
mod proxy;
mod transfer;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use hyper::body::Incoming;
use serde::Serialize;

use crate::store::{now_ms, Digest, Hit, KeyMeta, Store};
pub use flight::{End, Flight, FlightReader, Head};
use policy::OriginPolicy;
use upstream::UpstreamClient;

/// How long a key answers 502 after a digest mismatch before it is fetched again (SPEC 4).
const MISMATCH_HOLD: Duration = Duration::from_secs(60);
/// How long a key is remembered as streamed through unstored, and how many are remembered.
const UNSTORED_FOR: Duration = Duration::from_secs(600);
const UNSTORED_MAX: usize = 10_000;

/// Why an object could not be had. Cloned to every client of a failed transfer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("origin {0} is not in upstream.allowed_origins")]
    NotAllowed(String),
    #[error("{0} resolves to an address cistern may not connect to")]
    AddressRefused(String),
    #[error("redirect refused: {0}")]
    RedirectNotAllowed(String),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream {0} did not answer in time")]
    Timeout(String),
    #[error("upstream answered {status}")]
    Status {
        status: StatusCode,
        content_type: Option<String>,
        body: Bytes,
    },
    #[error("payload digest mismatch: {0}")]
    DigestMismatch(String),
    #[error("the upstream transfer changed content mid-way")]
    Diverged,
    #[error("{0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Fetch settings, from `[upstream]` and `[node]`.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub node_id: String,
    pub retries: u32,
    pub idle_timeout: Duration,
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
    /// The Via of the request that asked (it travels upstream with this node appended).
    pub via: Option<String>,
}

/// The answer to a GET.
pub enum Lookup {
    /// Served from the store. `ttl` is the freshness left (negative when served stale).
    Hit {
        hit: Hit,
        meta: Option<KeyMeta>,
        how: HitKind,
    },
    /// Streamed from a transfer in flight; `leader` is false for clients that joined one. `reader` was
    /// attached when the client joined (at byte 0), so that no byte it may need is let go before it
    /// positions the reader (`FlightReader::seek`) or drops it.
    Flight {
        flight: Arc<Flight>,
        leader: bool,
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
    /// Transfers in flight by key: the "one fetch per object" table.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Keys whose last transfer failed verification, and when.
    mismatches: Mutex<HashMap<String, Instant>>,
    /// Keys whose last transfer was streamed through without being stored (too big, no room, not
    /// cacheable), and when: a range of one goes upstream as a range (SPEC 4).
    unstored: Mutex<HashMap<String, Instant>>,
    stats: FetchStats,
    /// Prefetch jobs and the mappings staged manifests made.
    jobs: prefetch::Jobs,
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
                cfg,
                flights: Mutex::new(HashMap::new()),
                mismatches: Mutex::new(HashMap::new()),
                unstored: Mutex::new(HashMap::new()),
                stats: FetchStats::default(),
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
        lock(&self.inner.flights)
            .iter()
            .map(|(k, f)| InFlight {
                key: k.clone(),
                bytes: f.written(),
                size: f.size(),
                clients: f.reader_count(),
            })
            .collect()
    }

    /// The GET path: a hit, or a transfer to stream from (started or joined).
    pub async fn get(&self, t: &Target, revalidate: bool) -> Result<Lookup, FetchError> {
        let store = &self.inner.store;
        if let Some(d) = t.digest {
            if store.contains(&d) {
                if t.key != format!("sha256/{d}")
                    && store.lookup(&t.key).is_none_or(|e| e.digest != d)
                {
                    let _ = store.map_key(&t.key, &d, KeyMeta::immutable());
                }
                let hit = self.open(d).await?;
                return Ok(Lookup::Hit {
                    hit,
                    meta: None,
                    how: HitKind::Fresh,
                });
            }
        }
        let mut stale = None;
        if let Some(e) = store.lookup(&t.key) {
            let fresh = t.immutable || e.meta.ttl(now_ms()).is_none_or(|ttl| ttl > 0);
            if fresh && !(revalidate && e.meta.fresh_for.is_some()) {
                let hit = self.open(e.digest).await?;
                return Ok(Lookup::Hit {
                    hit,
                    meta: Some(e.meta),
                    how: HitKind::Fresh,
                });
            }
            stale = Some(e);
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
        let (flight, leader, reader) = self.join_or_start(t, stale.clone());
        if !leader {
            self.inner.stats.collapsed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(e) = stale {
            // A revalidation flight: wait for its verdict.
            match flight.head().await {
                Ok(_) => {}
                Err(End::Revalidated(d)) => {
                    let hit = self.open(d).await?;
                    let meta = store.lookup(&t.key).map(|e| e.meta);
                    return Ok(Lookup::Hit {
                        hit,
                        meta,
                        how: HitKind::Revalidated,
                    });
                }
                Err(End::ServeStale(d)) => {
                    self.inner
                        .stats
                        .stale_served
                        .fetch_add(1, Ordering::Relaxed);
                    let hit = self.open(d).await?;
                    return Ok(Lookup::Hit {
                        hit,
                        meta: Some(e.meta),
                        how: HitKind::Stale,
                    });
                }
                Err(End::Failed(err)) => return Err(err),
                Err(End::Complete(_)) => {}
            }
        }
        Ok(Lookup::Flight {
            flight,
            leader,
            reader,
        })
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

    fn join_or_start(
        &self,
        t: &Target,
        stale: Option<crate::store::KeyEntry>,
    ) -> (Arc<Flight>, bool, FlightReader) {
        let mut flights = lock(&self.inner.flights);
        if let Some(f) = flights.get(&t.key) {
            let reader = f.reader(0, None);
            return (f.clone(), false, reader);
        }
        let flight = Flight::new();
        let reader = flight.reader(0, None);
        flights.insert(t.key.clone(), flight.clone());
        drop(flights);
        self.inner.stats.transfers.fetch_add(1, Ordering::Relaxed);
        let job = transfer::Transfer {
            fetcher: self.clone(),
            flight: flight.clone(),
            target: t.clone(),
            stale,
        };
        tokio::spawn(job.run());
        (flight, true, reader)
    }

    fn forget_flight(&self, key: &str, flight: &Arc<Flight>) {
        let mut flights = lock(&self.inner.flights);
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
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

    /// Requests that are not cached (HEAD on a miss, requests with Authorization): sent upstream as they
    /// are, the answer passed back.
    pub async fn pass_through(
        &self,
        method: Method,
        t: &Target,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, FetchError> {
        let mut h = self.upstream_headers(t.via.as_deref());
        for name in [
            http::header::RANGE,
            http::header::AUTHORIZATION,
            http::header::IF_RANGE,
        ] {
            if let Some(v) = headers.get(&name) {
                h.insert(name, v.clone());
            }
        }
        self.inner
            .client
            .fetch(method, t.url.as_ref(), t.digest, &h)
            .await
            .inspect_err(|e| self.count_error(e))
    }

    /// Headers of every upstream request: identity coding, and Via with this node appended to the hops
    /// the request already passed (RFC 9110 §7.6.3), so that a loop in a chain is seen.
    fn upstream_headers(&self, prior_via: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        let ours = format!("1.1 {}", self.inner.cfg.node_id);
        let via = match prior_via {
            Some(p) if !p.trim().is_empty() => format!("{p}, {ours}"),
            _ => ours,
        };
        if let Ok(v) = http::HeaderValue::from_str(&via) {
            h.insert(http::header::VIA, v);
        }
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("cistern/", env!("CARGO_PKG_VERSION"))),
        );
        h
    }

    fn count_error(&self, e: &FetchError) {
        let s = &self.inner.stats;
        let c = match e {
            FetchError::Timeout(_) => &s.errors_timeout,
            FetchError::Status { .. } => &s.errors_status,
            FetchError::Unreachable(_) => &s.errors_unreachable,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}
