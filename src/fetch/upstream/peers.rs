//! A site's peers (SPEC 10): the members, which of them is this node, their health, and who owns a
//! key (rendezvous order over the live members, `rendezvous`). Members are named by URL, never by a
//! position: a new list (from `peers.dns`) keeps the health and counts of the members it still names.
//!
//! Health is kept as the director keeps parents': a member that cannot be connected to, times out or
//! answers 5xx is down for 30 s (`super::health::SKIP_FOR`); a `/healthz` probe (every 5 s, run by
//! `fetch::peering`) or any other answer brings it back.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use http::{StatusCode, Uri};
use serde::Serialize;

use super::health::{Clock, Outcome, SKIP_FOR};
use super::rendezvous;

/// How many members ahead of this node one request may try (the owner, then the next when the owner
/// fails on this very request): bounds a request's wait on members going down.
const MAX_PEER_HOPS: usize = 2;

/// One member of the site.
struct Member {
    url: Uri,
    /// The URL as hashed (`Uri`'s own form, the same on every node).
    name: String,
    health: Mutex<Health>,
    sent_ok: AtomicU64,
    sent_5xx: AtomicU64,
    sent_failed: AtomicU64,
    served: AtomicU64,
}

#[derive(Clone)]
struct Health {
    down_until: Option<Instant>,
    last_error: Option<String>,
    /// Unix ms of the last change between up and down (or of joining).
    since_ms: u64,
}

impl Member {
    fn new(url: Uri) -> Member {
        Member {
            name: url.to_string(),
            url,
            health: Mutex::new(Health {
                down_until: None,
                last_error: None,
                since_ms: crate::store::now_ms(),
            }),
            sent_ok: AtomicU64::new(0),
            sent_5xx: AtomicU64::new(0),
            sent_failed: AtomicU64::new(0),
            served: AtomicU64::new(0),
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn up(&self, now: Instant) -> bool {
        self.health().down_until.is_none_or(|t| now >= t)
    }
}

/// The membership as of one refresh.
struct Members {
    list: Vec<Arc<Member>>,
    /// Index of this node in `list`, when it is a member.
    me: Option<usize>,
}

/// A member as `GET /v1/peers` and the metrics show it.
#[derive(Serialize, Debug, Clone)]
pub struct PeerStatus {
    pub url: String,
    #[serde(rename = "self")]
    pub is_self: bool,
    pub up: bool,
    /// Unix seconds since which it has been up (or down).
    pub since: u64,
    pub last_error: Option<String>,
    /// Requests sent to it, by result: `ok`, `5xx`, `failed` (no answer).
    pub sent_ok: u64,
    pub sent_5xx: u64,
    pub sent_failed: u64,
    /// Requests it sent here (carrying `Cistern-Peer`) that this node served.
    pub served: u64,
}

/// The site's peers as this node sees them.
pub struct Peers {
    members: RwLock<Arc<Members>>,
    /// `peers.self`, or the rule that picks this node out of a list.
    me: SelfRule,
    clock: Clock,
    /// Keys of this node's store whose owner changed, summed over membership changes.
    moved: AtomicU64,
    /// Requests from peers this node could not tell the sender of.
    served_unknown: AtomicU64,
}

/// How this node finds itself in a member list.
#[derive(Clone, Debug, Default)]
pub struct SelfRule {
    /// `peers.self`, when set.
    pub url: Option<Uri>,
    /// The addresses this node listens on (with their ports).
    pub listen: Vec<std::net::SocketAddr>,
    /// This node's interface addresses.
    pub local: Vec<IpAddr>,
}

impl SelfRule {
    /// This node's index in `list`: `peers.self`; else the member whose address:port is a listen
    /// address; else the one whose address is this node's and whose port is a listen port.
    fn find(&self, list: &[Arc<Member>]) -> Option<usize> {
        if let Some(u) = &self.url {
            return list.iter().position(|m| &m.url == u);
        }
        let addr = |m: &Member| -> Option<(IpAddr, u16)> {
            let host = m.url.host()?.trim_matches(['[', ']']);
            Some((host.parse().ok()?, super::port_of(&m.url)))
        };
        let exact = list.iter().position(|m| {
            addr(m).is_some_and(|(ip, port)| {
                self.listen.iter().any(|l| l.ip() == ip && l.port() == port)
            })
        });
        exact.or_else(|| {
            list.iter().position(|m| {
                addr(m).is_some_and(|(ip, port)| {
                    self.local.contains(&ip) && self.listen.iter().any(|l| l.port() == port)
                })
            })
        })
    }
}

impl Peers {
    /// From member URLs (`peers.members`, or none yet when they come from DNS).
    pub fn new(members: &[String], me: SelfRule, clock: Clock) -> Result<Peers, String> {
        let mut urls = Vec::new();
        for m in members {
            let u: Uri = m
                .parse()
                .map_err(|_| format!("peers.members: `{m}` is not a URL"))?;
            urls.push(u);
        }
        let p = Peers {
            members: RwLock::new(Arc::new(Members {
                list: Vec::new(),
                me: None,
            })),
            me,
            clock,
            moved: AtomicU64::new(0),
            served_unknown: AtomicU64::new(0),
        };
        p.set(urls);
        Ok(p)
    }

    fn now(&self) -> Arc<Members> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the member list (a DNS refresh); members still named keep their health and counts.
    /// Returns whether the list changed.
    pub fn set(&self, urls: Vec<Uri>) -> bool {
        let old = self.now();
        let mut list: Vec<Arc<Member>> = Vec::new();
        for u in urls {
            if list.iter().any(|m| m.url == u) {
                continue;
            }
            match old.list.iter().find(|m| m.url == u) {
                Some(m) => list.push(m.clone()),
                None => list.push(Arc::new(Member::new(u))),
            }
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let same =
            list.len() == old.list.len() && list.iter().zip(&old.list).all(|(a, b)| a.url == b.url);
        if same {
            return false;
        }
        let me = self.me.find(&list);
        let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
        tracing::info!(members = ?names, this = ?me.map(|i| names[i]), "site peers");
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Members { list, me });
        true
    }

    /// Every member's URL (as hashed), and this node's.
    pub fn names(&self) -> (Vec<String>, Option<String>) {
        let m = self.now();
        let names: Vec<String> = m.list.iter().map(|x| x.name.clone()).collect();
        let me = m.me.map(|i| names[i].clone());
        (names, me)
    }

    /// The members to ask for `key`, in order: the live members that rank ahead of this node (the
    /// owner first), at most `MAX_PEER_HOPS`. Empty when this node owns the key among the live ones.
    pub fn ahead(&self, key: &str) -> Vec<Uri> {
        let m = self.now();
        let now = (self.clock)();
        let mut out = Vec::new();
        for i in rendezvous::order(&m.list.iter().map(|x| &x.name).collect::<Vec<_>>(), key) {
            if Some(i) == m.me || out.len() == MAX_PEER_HOPS {
                break;
            }
            if m.list[i].up(now) {
                out.push(m.list[i].url.clone());
            }
        }
        out
    }

    fn member(&self, url: &Uri) -> Option<Arc<Member>> {
        self.now().list.iter().find(|m| &m.url == url).cloned()
    }

    /// Records what came of a request to a member: no answer or a 5xx marks it down for 30 s.
    pub fn record(&self, url: &Uri, outcome: &Outcome) {
        let Some(m) = self.member(url) else { return };
        let why = match outcome {
            Outcome::Answered(s) if s.is_server_error() => {
                m.sent_5xx.fetch_add(1, Ordering::Relaxed);
                format!("answered {s}")
            }
            Outcome::Answered(_) => {
                m.sent_ok.fetch_add(1, Ordering::Relaxed);
                self.mark_up(&m);
                return;
            }
            Outcome::Failed(why) => {
                m.sent_failed.fetch_add(1, Ordering::Relaxed);
                why.clone()
            }
        };
        tracing::warn!(peer = %m.name, error = %why, "peer down for 30 s");
        let now = (self.clock)();
        let mut h = m.health();
        if h.down_until.is_none_or(|t| now >= t) {
            h.since_ms = crate::store::now_ms();
        }
        h.down_until = Some(now + SKIP_FOR);
        h.last_error = Some(why);
    }

    fn mark_up(&self, m: &Member) {
        let mut h = m.health();
        if h.down_until.take().is_some() {
            h.since_ms = crate::store::now_ms();
            tracing::info!(peer = %m.name, "peer up");
        }
    }

    /// A probe of `url`'s `/healthz` answered `status`.
    pub fn probed(&self, url: &Uri, status: StatusCode) {
        if let (Some(m), true) = (self.member(url), status.is_success()) {
            self.mark_up(&m);
        }
    }

    /// The members marked down (to probe), this node aside.
    pub fn down(&self) -> Vec<Uri> {
        let m = self.now();
        let now = (self.clock)();
        m.list
            .iter()
            .enumerate()
            .filter(|(i, x)| Some(*i) != m.me && !x.up(now))
            .map(|(_, x)| x.url.clone())
            .collect()
    }

    /// A request carrying `Cistern-Peer` came from `from`: counted for the member at that address.
    pub fn served_from(&self, from: IpAddr) {
        let m = self.now();
        let sender = m.list.iter().enumerate().find(|(i, x)| {
            Some(*i) != m.me
                && x.url
                    .host()
                    .and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
                    == Some(from)
        });
        match sender {
            Some((_, x)) => x.served.fetch_add(1, Ordering::Relaxed),
            None => self.served_unknown.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Adds keys that moved to another owner in a membership change.
    pub fn add_moved(&self, n: u64) {
        self.moved.fetch_add(n, Ordering::Relaxed);
    }

    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Every member, this node included, in URL order.
    pub fn status(&self) -> Vec<PeerStatus> {
        let m = self.now();
        let now = (self.clock)();
        m.list
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let h = x.health().clone();
                let up = Some(i) == m.me || h.down_until.is_none_or(|t| now >= t);
                // Back up by the end of its 30 s: up since then.
                let since_ms = match (up, h.down_until) {
                    (true, Some(_)) => h.since_ms + SKIP_FOR.as_millis() as u64,
                    _ => h.since_ms,
                };
                PeerStatus {
                    url: x.name.clone(),
                    is_self: Some(i) == m.me,
                    up,
                    since: since_ms / 1000,
                    last_error: h.last_error,
                    sent_ok: x.sent_ok.load(Ordering::Relaxed),
                    sent_5xx: x.sent_5xx.load(Ordering::Relaxed),
                    sent_failed: x.sent_failed.load(Ordering::Relaxed),
                    served: x.served.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
