//! The upstream director (SPEC 3 "Chains", SPEC 5's "first healthy parent"): for what is to be sent, the
//! next hops in order, and what this node knows of their health. Members are named by their URL, never
//! by a position in a list. A site's peers (SPEC 10, `peers`) are another kind of hop: for an object,
//! the member that owns it comes first when it is another live member and the request did not come
//! from a peer.
//!
//! Health is passive: a parent that cannot be connected to, times out or answers 503 is skipped for
//! 30 s (`SKIP_FOR`); 502 and 504 are about the object or the parent's own upstream, not the parent, and
//! change nothing; any other answer shows it up. The fetch path (fills, pass-through, forwarded
//! methods) and the relay's forwarder record into the one director that `Gateway::start` builds, so
//! both agree on who is down.
//!
//! This file depends on nothing else of cistern: the relay may hold a director without reaching into
//! the fetch path.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use http::{StatusCode, Uri};
use serde::Serialize;

pub use super::health::{Clock, Outcome, SKIP_FOR};
use super::peers::Peers;

/// A next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    /// A parent gateway, by its configured URL.
    Parent(Uri),
    /// A member of the site's peers (SPEC 10), by its URL.
    Peer(Uri),
    /// The origin itself (no parents, or `upstream.allow_direct` when every parent failed).
    Origin,
}

/// What is to be sent, as far as the choice of next hop goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    /// An object; `origin`: an origin URL is known, so the origin is a possible hop. `peer`: the key
    /// that decides its owner among the peers (the digest's hex, else the cache key), when it may go
    /// to a peer (None: no peers, or the request came from one).
    Object { origin: bool, peer: Option<&'a str> },
    /// Status reports (SPEC 5): to parents only.
    Status,
}

/// A parent's health as ops shows it.
#[derive(Serialize, Debug, Clone)]
pub struct ParentHealth {
    pub url: String,
    pub healthy: bool,
    pub last_error: Option<String>,
    pub seconds_since_ok: Option<u64>,
}

pub struct Director {
    /// In order of preference.
    parents: Vec<Member>,
    allow_direct: bool,
    clock: Clock,
    /// The site's peers, when `[peers]` names any.
    peers: Option<Arc<Peers>>,
}

struct Member {
    url: Uri,
    health: Mutex<Health>,
}

#[derive(Default, Clone)]
struct Health {
    down_until: Option<Instant>,
    last_error: Option<String>,
    last_ok: Option<Instant>,
}

impl Member {
    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn healthy(&self, now: Instant) -> bool {
        self.health().down_until.is_none_or(|t| now >= t)
    }
}

impl std::fmt::Debug for Director {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Director")
            .field("parents", &self.parent_urls())
            .field("allow_direct", &self.allow_direct)
            .finish()
    }
}

impl Director {
    /// From `upstream.parents` (in order of preference) and `upstream.allow_direct`.
    pub fn new(parents: &[String], allow_direct: bool) -> Result<Director, String> {
        Director::with_clock(parents, allow_direct, Arc::new(Instant::now))
    }

    pub fn with_clock(
        parents: &[String],
        allow_direct: bool,
        clock: Clock,
    ) -> Result<Director, String> {
        let mut members: Vec<Member> = Vec::new();
        for p in parents {
            let url: Uri = p
                .parse()
                .map_err(|_| format!("upstream.parents: `{p}` is not a URL"))?;
            if members.iter().any(|m| m.url == url) {
                continue;
            }
            members.push(Member {
                url,
                health: Mutex::new(Health::default()),
            });
        }
        Ok(Director {
            parents: members,
            allow_direct,
            clock,
            peers: None,
        })
    }

    /// The director with the site's peers (SPEC 10).
    pub fn with_peers(mut self, peers: Arc<Peers>) -> Director {
        self.peers = Some(peers);
        self
    }

    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    pub fn has_parents(&self) -> bool {
        !self.parents.is_empty()
    }

    /// The parents' URLs, in order of preference.
    pub fn parent_urls(&self) -> Vec<Uri> {
        self.parents.iter().map(|m| m.url.clone()).collect()
    }

    /// The next hops for `ask`, in the order to try them: for an object that may go to a peer, the live
    /// members that rank ahead of this node for its key (the owner first; none when this node owns
    /// it); then the healthy parents in order of preference
    /// (every parent when all are being skipped: asking beats failing without asking), then the origin
    /// when it may be asked (an object with an origin URL, and no parents or `allow_direct`).
    pub fn hops(&self, ask: Ask) -> Vec<Hop> {
        let now = (self.clock)();
        let mut order: Vec<Hop> = match (&self.peers, ask) {
            (Some(p), Ask::Object { peer: Some(k), .. }) => {
                p.ahead(k).into_iter().map(Hop::Peer).collect()
            }
            _ => Vec::new(),
        };
        let peers = order.len();
        order.extend(
            self.parents
                .iter()
                .filter(|m| m.healthy(now))
                .map(|m| Hop::Parent(m.url.clone())),
        );
        if order.len() == peers {
            order.extend(self.parent_urls().into_iter().map(Hop::Parent));
        }
        let direct = self.parents.is_empty() || self.allow_direct;
        if matches!(ask, Ask::Object { origin: true, .. }) && direct {
            order.push(Hop::Origin);
        }
        order
    }

    /// Records what came of sending to `hop`. The origin has no health kept.
    pub fn record(&self, hop: &Hop, outcome: Outcome) {
        let url = match (hop, &self.peers) {
            (Hop::Parent(url), _) => url,
            (Hop::Peer(url), Some(p)) => return p.record(url, &outcome),
            _ => return,
        };
        let Some(m) = self.parents.iter().find(|m| &m.url == url) else {
            return;
        };
        let now = (self.clock)();
        let why = match outcome {
            Outcome::Answered(s) if s == StatusCode::SERVICE_UNAVAILABLE => format!("answered {s}"),
            Outcome::Answered(s) if matches!(s.as_u16(), 502 | 504) => return,
            Outcome::Answered(_) => {
                let mut h = m.health();
                h.down_until = None;
                h.last_ok = Some(now);
                return;
            }
            Outcome::Failed(why) => why,
        };
        let host = url.authority().map(|a| a.as_str()).unwrap_or_default();
        tracing::warn!(parent = %host, error = %why, "parent skipped for 30 s");
        let mut h = m.health();
        h.down_until = Some(now + SKIP_FOR);
        h.last_error = Some(why);
    }

    /// Every parent's health, in order of preference.
    pub fn health(&self) -> Vec<ParentHealth> {
        let now = (self.clock)();
        self.parents
            .iter()
            .map(|m| {
                let h = m.health().clone();
                ParentHealth {
                    url: m.url.to_string(),
                    healthy: h.down_until.is_none_or(|t| now >= t),
                    last_error: h.last_error,
                    seconds_since_ok: h
                        .last_ok
                        .map(|t| now.saturating_duration_since(t).as_secs()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "director_tests.rs"]
mod tests;
