//! Forwarding: a background task sends the oldest undelivered reports, in order and in batches, to the
//! next hop, and removes them only after it answered 2xx; on failure it backs off exponentially with
//! jitter (from 1 s to `status.max_backoff`) and tries again, for as long as it takes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use super::Relay;
use crate::store::now_ms;

/// Where this node's reports go.
#[derive(Clone, Debug)]
pub enum NextHop {
    /// The parents' `POST /v1/status`, first healthy one first.
    Parents(Vec<Uri>),
    /// `status.forward_to`, with its bearer token.
    Url { url: Uri, token: Option<String> },
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Tells the forwarder which parents `fetch` currently sees as healthy (by index).
pub type ParentHealth = std::sync::Arc<dyn Fn() -> Vec<bool> + Send + Sync>;

pub fn client(tls: rustls::ClientConfig, connect_timeout: Duration) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// Bytes of one forwarded batch at most (beside `batch_size`), well under a parent's body limit.
const MAX_BATCH_BYTES: usize = 16 << 20;

impl Relay {
    /// The oldest undelivered reports, up to `n`: their queue seqs, the JSON array to send, its bytes.
    pub(super) fn peek(&self, n: usize) -> Result<(Vec<u64>, Vec<u8>, u64), super::DbError> {
        let mut keys = Vec::new();
        let mut body = b"[".to_vec();
        let mut bytes = 0u64;
        for (seq, v) in self.db().peek(n, MAX_BATCH_BYTES)? {
            if !keys.is_empty() {
                body.push(b',');
            }
            body.extend_from_slice(&v);
            bytes += v.len() as u64;
            keys.push(seq);
        }
        body.push(b']');
        Ok((keys, body, bytes))
    }

    /// Removes delivered reports from the queue, durably, through the writer.
    async fn delivered(&self, seqs: Vec<u64>, bytes: u64) -> Result<(), super::RelayError> {
        self.submit(|reply| super::writer::Job::Deliver { seqs, bytes, reply })
            .await
    }

    /// Age in seconds of the oldest undelivered report.
    pub fn oldest_age_secs(&self) -> Option<u64> {
        let v = self.db().oldest_queued().ok()??;
        let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
        let at = v.get("receivedAt")?.as_str()?;
        let t = humantime::parse_rfc3339(at).ok()?;
        Some(t.elapsed().map(|d| d.as_secs()).unwrap_or(0))
    }

    /// Runs the forwarder until the task is dropped.
    pub async fn forward(self, client: HttpsClient, health: ParentHealth) {
        let Some(hop) = self.inner.next_hop.clone() else {
            return;
        };
        let max = self.cfg().max_backoff;
        let mut backoff = Duration::from_secs(1);
        loop {
            let (keys, body, bytes) = match self.peek(self.cfg().batch_size) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "status queue: cannot read the queue");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            if keys.is_empty() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), self.inner.wake.notified()).await;
                continue;
            }
            let n = keys.len();
            match self.send(&client, &hop, &health, Bytes::from(body)).await {
                Ok(()) => {
                    // Forwarded but still queued: a crash here re-forwards it, and the next hop's
                    // dedup counts it once.
                    failpoint!("relay-forward-sent");
                    if let Err(e) = self.delivered(keys, bytes).await {
                        tracing::error!(error = %e, "status queue: cannot remove delivered reports");
                    }
                    failpoint!("relay-after-delete");
                    self.inner
                        .stats
                        .forwarded
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.inner
                        .stats
                        .last_success_ms
                        .store(now_ms(), Ordering::Relaxed);
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    self.inner.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "status relay: forwarding failed");
                    *self
                        .inner
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(e);
                    // Full jitter keeps a site's gateways from retrying in step after an outage.
                    let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(max.max(Duration::from_secs(1)));
                }
            }
        }
    }

    async fn send(
        &self,
        client: &HttpsClient,
        hop: &NextHop,
        health: &ParentHealth,
        body: Bytes,
    ) -> Result<(), String> {
        let targets: Vec<(Uri, Option<String>)> = match hop {
            NextHop::Url { url, token } => vec![(url.clone(), token.clone())],
            NextHop::Parents(ps) => {
                let ok = health();
                let mut order: Vec<usize> = (0..ps.len())
                    .filter(|i| ok.get(*i).copied().unwrap_or(true))
                    .collect();
                order.extend((0..ps.len()).filter(|i| !ok.get(*i).copied().unwrap_or(true)));
                order
                    .into_iter()
                    .filter_map(|i| {
                        let p = &ps[i];
                        let u = Uri::builder()
                            .scheme(p.scheme()?.clone())
                            .authority(p.authority()?.clone())
                            .path_and_query("/v1/status")
                            .build()
                            .ok()?;
                        Some((u, None))
                    })
                    .collect()
            }
        };
        let mut last = String::from("no next hop");
        for (url, token) in targets {
            let mut req = Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::VIA, format!("1.1 {}", self.cfg().node_id));
            if let Some(t) = &token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let Ok(req) = req.body(Full::new(body.clone())) else {
                continue;
            };
            let host = url.authority().map(|a| a.to_string()).unwrap_or_default();
            match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    let _ = resp.into_body().collect().await;
                    return Ok(());
                }
                Ok(Ok(resp)) => last = format!("{host} answered {}", resp.status()),
                Ok(Err(e)) => last = format!("{host}: {e}"),
                Err(_) => last = format!("{host}: no answer in 30 s"),
            }
        }
        Err(last)
    }
}
