//! Requests to the site's peers (SPEC 10): what a peer is asked with (the parent's forms, plus
//! `Cistern-Peer: 1`), the mark on its answers, the connections to each member, and the `/healthz`
//! probe of members that are down. Who is asked is the director's (`peers`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri};

use super::parent::own_url;
use super::parent::Parent;
use super::proxy::Inner;
use super::{empty_body, Hop, UpstreamClient};
use crate::store::Digest;

/// Carried by a request from one peer to another: its receiver never sends it on to a peer.
pub const CISTERN_PEER: HeaderName = HeaderName::from_static("cistern-peer");

/// In a response's extensions: it came from this peer (the requester streams it, the owner stores it).
#[derive(Clone, Debug)]
pub struct PeerAnswer(pub Uri);

/// How long a `/healthz` probe of a member may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections to each member, made the first time it is asked.
#[derive(Default)]
pub struct Links(Mutex<HashMap<Uri, Arc<Parent>>>);

impl Links {
    pub fn get(&self, url: &Uri, connector: &Inner) -> Arc<Parent> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(url.clone())
            .or_insert_with(|| Arc::new(Parent::new(url.clone(), connector.clone())))
            .clone()
    }
}

/// The request fields for each kind of hop: `onward` (parents, origin) without `Cistern-Peer`,
/// `peer` with it.
pub struct Sent<'a> {
    pub onward: Cow<'a, HeaderMap>,
    peer: Option<HeaderMap>,
}

impl Sent<'_> {
    pub fn for_hop(&self, hop: &Hop) -> Cow<'_, HeaderMap> {
        match (hop, &self.peer) {
            (Hop::Peer(_), Some(h)) => Cow::Borrowed(h),
            _ => Cow::Borrowed(self.onward.as_ref()),
        }
    }
}

/// The key that names the owner of what is asked (the digest's hex, else the cache key) when it may go
/// to a peer: peers configured, and the request not from one. Without peers: nothing allocated.
pub fn owner_key<'a>(
    peering: bool,
    digest: Option<Digest>,
    key: Option<&str>,
    headers: &'a HeaderMap,
) -> (Option<String>, Sent<'a>) {
    let from_peer = peering && headers.contains_key(CISTERN_PEER);
    if !peering || from_peer {
        let onward = match from_peer {
            true => {
                let mut h = headers.clone();
                h.remove(CISTERN_PEER);
                Cow::Owned(h)
            }
            false => Cow::Borrowed(headers),
        };
        return (None, Sent { onward, peer: None });
    }
    let k = match (digest, key) {
        (Some(d), _) => Some(d.to_string()),
        (None, Some(k)) => Some(k.to_string()),
        (None, None) => None,
    };
    let mut peer = headers.clone();
    peer.insert(CISTERN_PEER, HeaderValue::from_static("1"));
    let onward = Cow::Borrowed(headers);
    (
        k,
        Sent {
            onward,
            peer: Some(peer),
        },
    )
}

/// Marks an answer from a peer.
pub fn mark<B>(hop: &Hop, mut r: Response<B>) -> Response<B> {
    if let Hop::Peer(u) = hop {
        r.extensions_mut().insert(PeerAnswer(u.clone()));
    }
    r
}

impl UpstreamClient {
    /// Whether a request from a peer (carrying `Cistern-Peer`) finds this node taking another member
    /// for the owner of `key` (their member lists differ, or are changing). Such a request must not
    /// join a fill of this node that may itself be waiting on that peer: each would wait on the other.
    pub fn peer_disagrees(&self, key: &str, digest: Option<Digest>, headers: &HeaderMap) -> bool {
        let Some(p) = self.director.peers() else {
            return false;
        };
        if !headers.contains_key(CISTERN_PEER) {
            return false;
        }
        let k = match digest {
            Some(d) => Cow::Owned(d.to_string()),
            None => Cow::Borrowed(key),
        };
        !p.ahead(&k).is_empty()
    }

    /// Asks every member marked down for its `/healthz`; one that answers 2xx is up again.
    pub async fn probe_peers(&self) {
        let Some(peers) = self.director.peers() else {
            return;
        };
        for url in peers.down() {
            let Some(target) = own_url(&url, "/healthz") else {
                continue;
            };
            let link = self.peer_links.get(&url, &self.peer_connector);
            let sent = link
                .request(
                    Method::GET,
                    target,
                    true,
                    &HeaderMap::new(),
                    empty_body(),
                    PROBE_TIMEOUT,
                )
                .await;
            if let Ok(r) = sent {
                peers.probed(&url, r.status());
            }
        }
    }
}
