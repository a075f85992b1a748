//! The site's peers at run time (SPEC 10): members that are down are probed (`/healthz`, every 5 s), and
//! `peers.dns` is resolved again every `peers.refresh`, each address a member `http://<addr>:<port>`.
//! A change of members counts the stored objects whose owner changed (`keys moved`). The request
//! path itself only reads the membership (`upstream::peers`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use super::upstream::dns;
use super::upstream::peers::Peers;
use super::upstream::rendezvous;
use super::Fetcher;

/// How often members that are down are probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// `[peers]` as the background task needs it.
#[derive(Clone, Debug)]
pub struct PeeringConfig {
    /// `peers.dns` as name and port; None with `peers.members`.
    pub dns: Option<(String, u16)>,
    pub refresh: Duration,
    /// The DNS server asked instead of the system resolver (tests).
    pub resolver: Option<SocketAddr>,
}

/// Runs until aborted: probes, and DNS refreshes when the members come from DNS.
pub async fn run(fetcher: Fetcher, cfg: PeeringConfig) {
    let Some(peers) = fetcher.client().director().peers().cloned() else {
        return;
    };
    let mut probe = tokio::time::interval(PROBE_EVERY);
    let mut every = tokio::time::interval(cfg.refresh);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = probe.tick() => fetcher.client().probe_peers().await,
            _ = every.tick(), if cfg.dns.is_some() => refresh(&fetcher, &peers, &cfg).await,
        }
    }
}

/// Resolves `peers.dns` and takes its addresses as the members; a failed lookup keeps the members
/// there were.
async fn refresh(fetcher: &Fetcher, peers: &Arc<Peers>, cfg: &PeeringConfig) {
    let Some((name, port)) = &cfg.dns else {
        return;
    };
    let addrs = match dns::resolve(name, *port, cfg.resolver).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "peers.dns: keeping the members there were");
            return;
        }
    };
    let urls: Vec<Uri> = addrs
        .iter()
        .filter_map(|a| format!("http://{a}").parse().ok())
        .collect();
    let (before, _) = peers.names();
    if !peers.set(urls) {
        return;
    }
    let (after, _) = peers.names();
    let store = fetcher.store().clone();
    let counted = tokio::task::spawn_blocking(move || {
        let keys = store.list().into_iter().map(|o| match o.keys.first() {
            Some(k) if !k.starts_with("sha256/") => k.clone(),
            _ => o.digest.to_string(),
        });
        rendezvous::moved(&before, &after, keys)
    })
    .await;
    if let Ok(n) = counted {
        tracing::info!(
            moved = n,
            "site peers changed; stored objects with another owner now"
        );
        peers.add_moved(n);
    }
}
