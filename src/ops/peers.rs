//! The site's peers as ops shows them (SPEC 10): `GET /v1/peers` and the `cistern_peer_*` metrics, read
//! from the membership the fetch path keeps.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Ops;
use crate::fetch::upstream::peers::PeerStatus;

/// `GET /v1/peers`: whether the site has peers, its members (url, self, up, since, requests sent by
/// result and served), and how many stored objects changed owner with membership changes.
pub fn json(ops: &Ops) -> serde_json::Value {
    match ops.fetcher.peers() {
        None => serde_json::json!({"enabled": false, "members": [], "keys_moved": 0}),
        Some(p) => serde_json::json!({
            "enabled": true,
            "members": p.status(),
            "keys_moved": p.moved(),
        }),
    }
}

/// The peers' metrics, taken at one scrape.
#[derive(Debug)]
pub struct PeerMetrics {
    members: Vec<PeerStatus>,
    moved: u64,
}

impl PeerMetrics {
    /// None without peers: no family is written.
    pub fn take(ops: &Ops) -> Option<PeerMetrics> {
        let p = ops.fetcher.peers()?;
        Some(PeerMetrics {
            members: p.status(),
            moved: p.moved(),
        })
    }
}

impl Collector for PeerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut fam = enc.encode_descriptor(
            "cistern_peer_up",
            "Whether a site peer is taken as up (1) or down (0); this node counts as up",
            None,
            MetricType::Gauge,
        )?;
        for m in &self.members {
            let labels = [("peer", m.url.as_str())];
            ConstGauge::new(i64::from(m.up)).encode(fam.encode_family(&labels)?)?;
        }
        let mut fam = enc.encode_descriptor(
            "cistern_peer_requests",
            "Requests sent to a site peer, by result (ok, 5xx, failed), and served for it (served)",
            None,
            MetricType::Counter,
        )?;
        for m in &self.members {
            let results = [
                ("ok", m.sent_ok),
                ("5xx", m.sent_5xx),
                ("failed", m.sent_failed),
                ("served", m.served),
            ];
            for (result, n) in results {
                let labels = [("peer", m.url.as_str()), ("result", result)];
                ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
            }
        }
        let m = enc.encode_descriptor(
            "cistern_peer_keys_moved",
            "Stored objects whose owner changed with a change of the site's members",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.moved).encode(m)
    }
}
