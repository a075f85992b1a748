//! cistern: an on-premises, verified, collapsing cache and nested-gateway proxy for OTA device updates.
//!
//! Modules, each owning its state; data flows one way: `server` -> `fetch` -> `store`, and `fetch` ->
//! upstream. `ops` only reads what the others expose. This file wires them into a running gateway.

// First, so that every module below can use `failpoint!`.
#[macro_use]
mod failpoint;

pub mod config;
pub mod fetch;
pub mod ops;
pub mod relay;
pub mod server;
pub mod store;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;

use config::Config;
use fetch::policy::OriginPolicy;
use fetch::upstream::{ClientConfig, UpstreamClient};
use fetch::Director;
use fetch::{FetchConfig, Fetcher};
use store::{Store, StoreConfig};

pub fn store_config(cfg: &Config) -> StoreConfig {
    StoreConfig {
        dir: cfg.store.dir.clone(),
        max_size: cfg.store.max_size.0,
        min_free: cfg.store.min_free.0,
        max_object_size: cfg.store.max_object_size.0,
        max_filling: cfg.store.max_filling.0,
        max_keys_per_object: cfg.store.max_keys_per_object,
    }
}

/// Opens the store of a config (blocking; recovers it).
pub fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    match Store::open(&store_config(cfg)) {
        Ok(s) => Ok(s),
        // Already names the directory and the fix: a prefix would only push the fix off screen.
        Err(e @ store::StoreError::NotWritable { .. }) => Err(e.into()),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("opening store {}", cfg.store.dir.display())))
        }
    }
}

/// Adds the IoT Edge trust bundle to the upstream trust (a child trusts its parent through it): written
/// with `upstream.ca_file`'s own roots to `<store>/edge-trust.pem`, which becomes the CA file.
async fn trust_edge_bundle(cfg: &mut Config, w: &server::edge::Workload) {
    match w.trust_bundle().await {
        Ok(pem) => {
            let mut all = match &cfg.upstream.ca_file {
                None => String::new(),
                Some(f) => std::fs::read_to_string(f).unwrap_or_default(),
            };
            all.push('\n');
            all.push_str(&pem);
            let path = cfg.store.dir.join("edge-trust.pem");
            let written =
                std::fs::create_dir_all(&cfg.store.dir).and_then(|_| std::fs::write(&path, all));
            match written {
                Ok(()) => cfg.upstream.ca_file = Some(path),
                Err(e) => tracing::warn!(error = %e, "cannot write the IoT Edge trust bundle"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "IoT Edge trust bundle unavailable; using the configured trust only")
        }
    }
}

/// Opens the status relay beside the store, with its next hop: `status.forward_to`, else the parents.
async fn open_relay(cfg: &Config, director: &Arc<Director>) -> anyhow::Result<relay::Relay> {
    let s = &cfg.status;
    let next_hop = if !s.forward_to.is_empty() {
        let token = if !s.forward_token.is_empty() {
            Some(s.forward_token.clone())
        } else if let Some(f) = &s.forward_token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("status.forward_token_file {}", f.display()))?;
            Some(t.trim().to_string())
        } else {
            None
        };
        Some(relay::NextHop::Url {
            url: s.forward_to.parse().context("status.forward_to")?,
            token,
        })
    } else if director.has_parents() {
        // The relay asks the director the fetch path asks: both see the same parents up or down.
        Some(relay::NextHop::Parents(director.clone()))
    } else {
        None
    };
    let rc = relay::RelayConfig {
        node_id: cfg.node.id.clone(),
        batch_size: s.batch_size,
        max_queue: s.max_queue.0,
        max_store: s.max_store.0,
        max_report: s.max_report.0,
        history_per_device: s.history_per_device,
        max_backoff: s.max_backoff.0,
        dedup_entries: s.dedup_entries,
    };
    let dir = cfg.store.dir.clone();
    tokio::task::spawn_blocking(move || relay::Relay::open(&dir, rc, next_hop))
        .await?
        .with_context(|| {
            format!(
                "opening the status queue {}",
                cfg.store.dir.join("status.redb").display()
            )
        })
}

/// A gateway started in this process: its address and the handle that stops it.
pub struct Gateway {
    pub addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    pub store: Store,
    pub fetcher: Fetcher,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Binds, opens the store and starts serving in the background.
    pub async fn start(cfg: Config) -> anyhow::Result<Gateway> {
        let mut cfg = cfg;
        let workload = server::edge::Workload::from_env();
        if let Some(w) = &workload {
            trust_edge_bundle(&mut cfg, w).await;
        }
        let cfg = Arc::new(cfg);
        let intercept = interception(&cfg)?;
        let listeners = bind(&cfg, workload.as_ref()).await?;
        let c2 = cfg.clone();
        let store = tokio::task::spawn_blocking(move || open_store(&c2)).await??;
        // One director for the process: fills and the relay's forwarder choose parents by it.
        let director = Director::new(&cfg.upstream.parents, cfg.upstream.allow_direct)
            .map_err(anyhow::Error::msg)?;
        let director = Arc::new(site_peers(&cfg, &listeners, director)?);
        let client = upstream_client(&cfg, director.clone())?;
        let fetcher = Fetcher::new(store.clone(), client, fetch_config(&cfg));
        // Prefetch jobs a restart interrupted carry on.
        fetcher.resume_jobs();
        let relay = open_relay(&cfg, &director).await?;
        let forwarder = start_forwarder(&cfg, &relay)?;
        let stats = Arc::new(server::ServerStats::default());
        let ops = Arc::new(ops::Ops {
            node_id: cfg.node.id.clone(),
            store: store.clone(),
            fetcher: fetcher.clone(),
            server: stats.clone(),
            relay: relay.clone(),
            samples: ops::dashboard::samples::Samples::default(),
        });
        let sampler = tokio::spawn(ops::dashboard::samples::run(ops.clone()));
        let peering = tokio::spawn(fetch::peering::run(fetcher.clone(), peering_config(&cfg)));
        let app = Arc::new(server::App {
            cfg: cfg.clone(),
            fetcher: fetcher.clone(),
            store: store.clone(),
            relay: relay.clone(),
            admin_token: cfg.admin_token()?,
            pull_token: cfg.pull_token()?,
            own: Some(ops),
            stats,
            ready: AtomicBool::new(true),
            intercept,
        });
        let (addr, tls_addr) = (listeners.local_addr(), listeners.tls_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = Serving {
            app,
            listeners,
            grace: cfg.server.shutdown_grace.0,
            store: store.clone(),
            fetcher: fetcher.clone(),
            relay,
            background: vec![forwarder, sampler, peering],
        };
        let task = tokio::spawn(serving.run(stopped));
        tracing::info!(addr = ?addr, node = %cfg.node.id, store = %cfg.store.dir.display(), "cistern serving");
        Ok(Gateway {
            addr,
            tls_addr,
            store,
            fetcher,
            stop,
            task,
        })
    }

    /// Stops accepting, lets transfers finish within the grace period, flushes the index.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The director with `[peers]` (SPEC 10), when it names any: this node is `peers.self`, else the
/// member at one of its listen addresses, else the one at one of its interface addresses.
fn site_peers(
    cfg: &Config,
    listeners: &server::Listeners,
    director: Director,
) -> anyhow::Result<Director> {
    let p = &cfg.peers;
    if !p.enabled() {
        return Ok(director);
    }
    let me = fetch::upstream::peers::SelfRule {
        url: (!p.self_url.is_empty())
            .then(|| p.self_url.parse().ok())
            .flatten(),
        listen: [listeners.local_addr(), listeners.tls_addr()]
            .into_iter()
            .flatten()
            .collect(),
        local: if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default(),
    };
    let clock: fetch::upstream::director::Clock = Arc::new(std::time::Instant::now);
    let peers =
        fetch::upstream::peers::Peers::new(&p.members, me, clock).map_err(anyhow::Error::msg)?;
    Ok(director.with_peers(Arc::new(peers)))
}

/// `[peers]` as the background task (probes, DNS refresh) needs it.
fn peering_config(cfg: &Config) -> fetch::peering::PeeringConfig {
    let p = &cfg.peers;
    let dns = p
        .dns
        .rsplit_once(':')
        .and_then(|(h, port)| Some((h.to_string(), port.parse().ok()?)));
    fetch::peering::PeeringConfig {
        dns,
        refresh: p.refresh.0,
        resolver: p.resolver,
    }
}

/// `server.intercept`: the site CA, loaded and checked (a key readable by others, a key that does not
/// match, a certificate that is not a CA: no start, one line naming the file).
fn interception(cfg: &Config) -> anyhow::Result<Option<Arc<server::intercept::Interception>>> {
    let s = &cfg.server;
    if !s.intercept {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&s.intercept_ca_cert, &s.intercept_ca_key) else {
        anyhow::bail!(
            "server.intercept needs server.intercept_ca_cert and server.intercept_ca_key"
        );
    };
    let minter = server::mint::Minter::load(cert, key)?;
    let icp = server::intercept::Interception::new(minter, &s.intercept_hosts);
    Ok(Some(Arc::new(icp)))
}

/// The listeners of `[server]`: plain, and TLS with the configured certificate files or, under IoT
/// Edge without them, the workload API's certificate, renewed.
async fn bind(
    cfg: &Config,
    workload: Option<&server::edge::Workload>,
) -> anyhow::Result<server::Listeners> {
    let s = &cfg.server;
    let tls = if s.tls_listen.is_empty() {
        None
    } else {
        let acceptor = match (workload, &s.tls_cert, &s.tls_key) {
            (Some(w), None, _) => {
                let resolver = server::edge::renewing_resolver(w.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("server.tls_listen: {e}"))?;
                server::edge::acceptor(resolver).map_err(anyhow::Error::msg)?
            }
            (_, Some(cert), Some(key)) => server::tls_acceptor(cert, key, s.client_ca.as_deref())
                .map_err(anyhow::Error::msg)?,
            _ => anyhow::bail!("server.tls_listen needs server.tls_cert and server.tls_key"),
        };
        Some((s.tls_listen.as_str(), acceptor))
    };
    server::Listeners::bind(&s.listen, tls)
        .await
        .with_context(|| {
            format!(
                "server.listen {} / tls_listen {}: cannot bind",
                s.listen, s.tls_listen
            )
        })
}

/// The upstream client of `[upstream]`: the allowlist (every named origin's and parent's host a
/// literal pattern on its port), the director's parents, TLS and the site proxy.
fn upstream_client(cfg: &Config, director: Arc<Director>) -> anyhow::Result<UpstreamClient> {
    let literal: Vec<(String, u16)> = cfg
        .origins
        .iter()
        .map(|o| &o.url)
        .chain(cfg.registries.iter().map(|r| &r.url))
        .chain(cfg.upstream.parents.iter())
        .chain(cfg.peers.members.iter())
        .filter_map(|u| u.parse::<http::Uri>().ok())
        .map(|uri| {
            let host = uri.host().unwrap_or_default().to_string();
            (host, fetch::upstream::port_of(&uri))
        })
        .collect();
    let policy = Arc::new(OriginPolicy::new(&cfg.upstream.allowed_origins, &literal));
    let u = &cfg.upstream;
    let client_cfg = ClientConfig {
        connect_timeout: u.connect_timeout.0,
        idle_timeout: u.idle_timeout.0,
        ca_file: u.ca_file.clone(),
        proxy: u.proxy.clone(),
        client_cert: u.client_cert.clone(),
        client_key: u.client_key.clone(),
        connect_to: u.connect_to.clone(),
        recv_buffer: fetch::uplink::recv_buffer(&cfg.uplink),
        peer_source: cfg
            .server
            .listen
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| cfg.peers.enabled() && !ip.is_unspecified()),
    };
    let client = UpstreamClient::new(&client_cfg, policy, director).map_err(anyhow::Error::msg)?;
    let uplink = Arc::new(fetch::uplink::Uplink::new(&cfg.uplink));
    client
        .with_registries(registry_creds(cfg)?)
        .with_uplink(uplink)
        .with_pull_token(cfg.pull_token()?.as_deref())
        .map_err(anyhow::Error::msg)
}

/// Each `[[registries]]` entry's URL and credentials, its password read from `password_file`.
fn registry_creds(cfg: &Config) -> anyhow::Result<Vec<fetch::upstream::registry::RegistryCred>> {
    let mut out = Vec::new();
    for r in &cfg.registries {
        let password = match &r.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| {
                        format!("registries.{}.password_file {}", r.name, p.display())
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        let url = r
            .url
            .parse()
            .with_context(|| format!("registries.{}.url", r.name))?;
        out.push(fetch::upstream::registry::RegistryCred {
            url,
            username: r.username.clone(),
            password,
        });
    }
    Ok(out)
}

fn fetch_config(cfg: &Config) -> FetchConfig {
    let u = &cfg.upstream;
    FetchConfig {
        node_id: cfg.node.id.clone(),
        retries: u.retries,
        idle_timeout: u.idle_timeout.0,
        connect_timeout: u.connect_timeout.0,
        min_rate: u.min_rate.0,
        max_transfers: u.max_transfers as usize,
        require_digest: u.require_digest,
        strip_query: u.strip_query.clone(),
    }
}

/// The relay's forwarder, on a client of its own with the upstream's trust and client certificate.
fn start_forwarder(
    cfg: &Config,
    relay: &relay::Relay,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use fetch::upstream::connect;
    let tls = connect::tls_config(connect::Trust {
        ca_file: cfg.upstream.ca_file.as_deref(),
        client_cert: cfg.upstream.client_cert.as_deref(),
        client_key: cfg.upstream.client_key.as_deref(),
    })
    .map_err(anyhow::Error::msg)?;
    let client = connect::simple_client(tls, Some(cfg.upstream.connect_timeout.0));
    Ok(tokio::spawn(relay.clone().forward(client)))
}

/// A started gateway's parts, run until the stop: the listeners serve, the index is flushed every
/// 30 s; at the stop, connections and then transfers drain within the grace period, the background
/// tasks end and everything is flushed.
struct Serving {
    app: Arc<server::App>,
    listeners: server::Listeners,
    grace: std::time::Duration,
    store: store::Store,
    fetcher: Fetcher,
    relay: relay::Relay,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Serving {
    async fn run(self, stopped: tokio::sync::oneshot::Receiver<()>) {
        let periodic = self.store.clone();
        let flush_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                tick.tick().await;
                let s = periodic.clone();
                let _ = tokio::task::spawn_blocking(move || s.flush()).await;
            }
        });
        let stop_at = Arc::new(std::sync::OnceLock::new());
        let at = stop_at.clone();
        let stopping = async move {
            let _ = stopped.await;
            let _ = at.set(std::time::Instant::now());
        };
        let grace = self.grace;
        server::serve(self.app, self.listeners, stopping, grace).await;
        // Transfers no client waits for any more end within what is left of the grace period.
        let spent = stop_at.get().map_or(grace, |t| t.elapsed());
        if !self.fetcher.drain(grace.saturating_sub(spent)).await {
            tracing::warn!("transfers still running at the end of the shutdown grace period");
            // Cut off with the runtime: each keeps what it holds, to resume after the restart.
            self.store.keep_partials_at_stop();
        }
        flush_task.abort();
        for t in self.background {
            t.abort();
        }
        self.relay.flush().await;
        let store = self.store;
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
}
