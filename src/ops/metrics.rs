//! `/metrics` in OpenMetrics text, through `prometheus-client`: the request families and histograms
//! that `server` keeps, and a snapshot of the counters and gauges that `fetch`, `store` and `relay`
//! expose, taken at each scrape. Every label set is bounded: forms and request outcomes are closed
//! sets, upstream error kinds are fixed, parents come from the configuration.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::Ops;

/// The content types of the two expositions: OpenMetrics for a scraper that asks for it (Prometheus
/// does), the Prometheus text format 0.0.4 for anything else (curl, `promtool check metrics`).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One scrape, in the format `accept` prefers, with its content type.
pub fn scrape(ops: &Ops, accept: &str) -> (&'static str, String) {
    let om = render(ops);
    match accept.contains("application/openmetrics-text") {
        true => (OPENMETRICS, om),
        false => (TEXT, text_format(&om)),
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: the same samples; a counter family is named
/// with its `_total` suffix in HELP and TYPE, and `# UNIT` and `# EOF` are left out.
fn text_format(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_string(),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One scrape's OpenMetrics text.
fn render(ops: &Ops) -> String {
    let mut reg = Registry::default();
    let s = &ops.server;
    reg.register(
        "cistern_requests",
        "Requests by form and by what the request did (cache_status)",
        s.requests_total.clone(),
    );
    reg.register_with_unit(
        "cistern_request_duration",
        "Time from the request head to the last body byte taken, by form",
        Unit::Seconds,
        s.duration.clone(),
    );
    reg.register_with_unit(
        "cistern_time_to_first_byte",
        "Time from the request head to the first body byte taken, by form",
        Unit::Seconds,
        s.ttfb.clone(),
    );
    reg.register_collector(Box::new(Snapshot::take(ops)));
    if let Some(p) = super::peers::PeerMetrics::take(ops) {
        reg.register_collector(Box::new(p));
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// A value with its name, help and unit.
#[derive(Debug)]
struct Value {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    v: u64,
}

/// What the other modules expose, read once per scrape.
#[derive(Debug)]
struct Snapshot {
    counters: Vec<Value>,
    gauges: Vec<Value>,
    upstream_errors: Vec<(&'static str, u64)>,
    parents: Vec<(String, bool)>,
    /// Bytes read from upstream by uplink class (SPEC 4).
    uplink: [(&'static str, u64); 2],
}

fn v(name: &'static str, help: &'static str, unit: Option<Unit>, v: u64) -> Value {
    Value {
        name,
        help,
        unit,
        v,
    }
}

impl Snapshot {
    fn take(ops: &Ops) -> Snapshot {
        let f = ops.fetcher.stats();
        let r = ops.relay.stats();
        let u = ops.store.usage();
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let b = || Some(Unit::Bytes);
        let counters = vec![
            v(
                "cistern_hit",
                "Body bytes sent from the store",
                b(),
                ld(&ops.server.hit_bytes),
            ),
            v(
                "cistern_miss",
                "Body bytes sent from upstream transfers",
                b(),
                ld(&ops.server.miss_bytes),
            ),
            v(
                "cistern_upstream",
                "Bytes fetched from upstream",
                b(),
                ld(&f.bytes_fetched),
            ),
            v(
                "cistern_upstream_fetches",
                "Upstream transfers started",
                None,
                ld(&f.transfers),
            ),
            v(
                "cistern_collapsed",
                "Clients that joined a transfer in flight",
                None,
                ld(&f.collapsed),
            ),
            v(
                "cistern_digest_mismatches",
                "Payloads that failed verification",
                None,
                ld(&f.digest_mismatches),
            ),
            v(
                "cistern_resumes",
                "Broken transfers resumed or restarted",
                None,
                ld(&f.resumes),
            ),
            v(
                "cistern_revalidations",
                "Conditional requests for stale objects",
                None,
                ld(&f.revalidations),
            ),
            v(
                "cistern_stale_served",
                "Stale copies served because upstream failed",
                None,
                ld(&f.stale_served),
            ),
            v(
                "cistern_evictions",
                "Objects evicted for room",
                None,
                ld(&ops.store.stats().evictions),
            ),
            v(
                "cistern_connections",
                "Client connections accepted",
                None,
                ld(&ops.server.connections),
            ),
            v(
                "cistern_status_accepted",
                "Status reports accepted",
                None,
                ld(&r.accepted),
            ),
            v(
                "cistern_status_duplicates",
                "Status reports dropped as already accepted",
                None,
                ld(&r.duplicates),
            ),
            v(
                "cistern_status_conflicts",
                "Status reports accepted as conflicts: another report under a (deviceId, reportId) \
                 already accepted (since the status store was created)",
                None,
                ops.relay.conflicts_total(),
            ),
            v(
                "cistern_status_forwarded",
                "Status reports delivered to the next hop",
                None,
                ld(&r.forwarded),
            ),
            v(
                "cistern_status_relay_errors",
                "Failed forwarding attempts",
                None,
                ld(&r.errors),
            ),
        ];
        let gauges = vec![
            v("cistern_store", "Bytes of stored objects", b(), u.bytes),
            v("cistern_store_objects", "Stored objects", None, u.objects),
            v(
                "cistern_store_free",
                "Free bytes on the store's filesystem",
                b(),
                u.free,
            ),
            v(
                "cistern_transfers_in_flight",
                "Upstream transfers in progress",
                None,
                ops.fetcher.in_flight().len() as u64,
            ),
            v(
                "cistern_status_queue_depth",
                "Status reports not yet delivered",
                None,
                ops.relay.queue_depth(),
            ),
            v(
                "cistern_status_oldest_undelivered",
                "Age of the oldest undelivered status report",
                Some(Unit::Seconds),
                ops.relay.oldest_age_secs().unwrap_or(0),
            ),
            v(
                "cistern_status_set_aside",
                "Status reports the next hop refused for good, set aside",
                None,
                ops.relay.set_aside_count(),
            ),
        ];
        let upstream_errors = vec![
            ("unreachable", ld(&f.errors_unreachable)),
            ("timeout", ld(&f.errors_timeout)),
            ("status", ld(&f.errors_status)),
            ("broken", ld(&f.errors_broken)),
        ];
        let parents = ops
            .fetcher
            .parents_health()
            .into_iter()
            .map(|p| (p.url, p.healthy))
            .collect();
        use crate::fetch::uplink::Class;
        let up = ops.fetcher.uplink();
        Snapshot {
            counters,
            gauges,
            upstream_errors,
            parents,
            uplink: [
                ("foreground", up.bytes(Class::Foreground)),
                ("background", up.bytes(Class::Background)),
            ],
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for c in &self.counters {
            let m = enc.encode_descriptor(c.name, c.help, c.unit.as_ref(), MetricType::Counter)?;
            ConstCounter::new(c.v).encode(m)?;
        }
        for g in &self.gauges {
            let m = enc.encode_descriptor(g.name, g.help, g.unit.as_ref(), MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(g.v).unwrap_or(i64::MAX)).encode(m)?;
        }
        let mut fam = enc.encode_descriptor(
            "cistern_upstream_errors",
            "Upstream failures by kind",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in &self.upstream_errors {
            let labels = [("kind", *kind)];
            ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
        }
        let mut fam = enc.encode_descriptor(
            "cistern_uplink",
            "Bytes read from upstream, by class: foreground (a client waits), background (prefetch)",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (class, n) in &self.uplink {
            let labels = [("class", *class)];
            ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
        }
        let mut fam = enc.encode_descriptor(
            "cistern_parent_up",
            "Whether a parent is taken as healthy (1) or skipped (0)",
            None,
            MetricType::Gauge,
        )?;
        for (url, up) in &self.parents {
            let labels = [("parent", url.as_str())];
            ConstGauge::new(i64::from(*up)).encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
