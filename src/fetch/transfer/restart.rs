//! A fill that survives a restart of cistern (SPEC 4, "Resume"): a fill that may be resumed is kept as a
//! partial by the store (its head here, its bytes by the fill); the next fill of its key after a
//! restart resumes it like a broken body, with `Range: bytes=<valid>-` and `If-Range`. Nothing of the
//! hash is kept (sha2's state cannot be): the bytes held are hashed again from the file. A 206 that
//! continues them carries on; a 200 (the validator no longer matches) starts over with the new
//! response; anything else drops the partial and the fill asks as usual.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use crate::fetch::uplink::Metered;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest as _, Sha256};

use super::super::flight::Head;
use super::super::framing::{continues, same_etag};
use super::Transfer;
use crate::store::{now_ms, Fill, PartialRecord};

/// What a partial gave the start of a transfer.
pub(super) enum FromPartial {
    /// No partial, or none usable: ask as usual.
    None,
    /// The upstream no longer serves what the partial holds: this 200 starts the fill over.
    Fresh(Box<http::Response<Metered>>),
    /// Resumed: the fill goes on from the bytes held.
    Resumed(Box<Prior>),
}

/// A fill that starts with bytes already held.
pub(super) struct Prior {
    pub fill: Option<Fill>,
    pub held: u64,
    pub hasher: Sha256,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Metered,
    /// Bytes per second the fill was receiving before the restart.
    pub rate: u64,
}

impl Prior {
    /// The start of a fill with nothing held.
    pub fn fresh(resp: http::Response<Metered>) -> Prior {
        let (parts, body) = resp.into_parts();
        Prior {
            fill: None,
            held: 0,
            hasher: Sha256::new(),
            status: parts.status,
            headers: parts.headers,
            body,
            rate: 0,
        }
    }
}

impl Transfer {
    /// Resumes the partial kept of the target's key, if any (not for a revalidation).
    pub(super) async fn resume_partial(&self, headers: &HeaderMap) -> FromPartial {
        let store = self.fetcher.store().clone();
        if self.stale.is_some() || !store.has_partial(&self.target.key) {
            return FromPartial::None;
        }
        let key = self.target.key.clone();
        let taken = tokio::task::spawn_blocking(move || store.take_partial(&key)).await;
        let Ok(Some((rec, fill))) = taken else {
            return FromPartial::None;
        };
        let v = rec
            .etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or(rec.last_modified.clone());
        // The bytes held are hashed again while the upstream is asked.
        let hashing = rehash(fill.file(), rec.valid);
        let mut asked = headers.clone();
        let range = HeaderValue::from_str(&format!("bytes={}-", rec.valid));
        let (Some(v), Ok(range)) = (v.and_then(|v| HeaderValue::from_str(&v).ok()), range) else {
            return FromPartial::None;
        };
        asked.insert(http::header::RANGE, range);
        asked.insert(http::header::IF_RANGE, v.clone());
        let resp = match self.upstream(&asked).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "resuming a partial fill failed; asking again");
                return FromPartial::None;
            }
        };
        let v = v.to_str().ok();
        match resp.status() {
            StatusCode::PARTIAL_CONTENT
                if continues(resp.headers(), rec.valid, rec.size)
                    && same_etag(resp.headers(), v) =>
            {
                tracing::info!(
                    from = rec.valid,
                    "resuming a partial fill kept across a restart"
                );
                self.fetcher
                    .stats()
                    .resumes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match hashing.await.ok().flatten() {
                    Some(hasher) => FromPartial::Resumed(Box::new(Prior {
                        fill: Some(fill),
                        held: rec.valid,
                        hasher,
                        status: StatusCode::from_u16(rec.status).unwrap_or(StatusCode::OK),
                        headers: header_map(&rec.headers),
                        body: resp.into_body(),
                        rate: rec.rate,
                    })),
                    None => FromPartial::None,
                }
            }
            StatusCode::OK => {
                tracing::info!("a partial fill's validator no longer matches; starting over");
                FromPartial::Fresh(Box::new(resp))
            }
            status => {
                tracing::info!(%status, "a partial fill cannot be resumed; asking again");
                FromPartial::None
            }
        }
    }

    /// Keeps a new fill as a partial that survives a restart, when it can be resumed: a 200 with a
    /// strong validator, one variant. Its record is written now; the fill raises its `valid`.
    pub(super) async fn keep_partial(
        &self,
        fill: Option<Fill>,
        head: &Head,
        h: &HeaderMap,
    ) -> Option<Fill> {
        let mut fill = fill?;
        let strong = head.etag.as_deref().is_some_and(|e| !e.starts_with("W/"))
            || head.last_modified.is_some();
        let plain = head.vary.as_ref().is_some_and(|v| v.is_empty());
        if !(head.status == StatusCode::OK && strong && plain && head.storing) {
            return Some(fill);
        }
        let record = PartialRecord {
            key: self.target.key.clone(),
            status: head.status.as_u16(),
            headers: h
                .iter()
                .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            size: head.size,
            etag: head.etag.clone(),
            last_modified: head.last_modified.clone(),
            digest: head.digest.map(|d| d.to_string()),
            valid: 0,
            rate: 0,
            updated_ms: now_ms(),
        };
        let job = tokio::task::spawn_blocking(move || {
            if let Err(e) = fill.keep_partial(record) {
                tracing::info!(error = %e, "fill not kept as a partial");
            }
            fill
        });
        job.await.ok()
    }
}

/// Hashes the bytes held again, from the file, on a blocking thread.
fn rehash(file: Arc<File>, valid: u64) -> tokio::task::JoinHandle<Option<Sha256>> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < valid {
            let want = ((valid - off) as usize).min(buf.len());
            match file.read_at(&mut buf[..want], off) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    h.update(&buf[..n]);
                    off += n as u64;
                }
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(bytes = valid, ms, "partial fill hashed again");
        Some(h)
    })
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(n, v);
        }
    }
    h
}
