//! The CLI's side of the admin API (SPEC 1 `--server`): `import`, `prefetch` and `verify` through a
//! running gateway. The token comes from `--token-file` or `$CISTERN_TOKEN`, never from an argument.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use tokio::io::AsyncReadExt;

use crate::fetch::upstream::connect;

type Body = BoxBody<Bytes, std::io::Error>;

/// A request body held whole in memory.
fn whole(b: Bytes) -> Body {
    Full::new(b).map_err(|n| match n {}).boxed()
}

pub struct Remote {
    base: Uri,
    token: Option<String>,
    client: Client<connect::Https, Body>,
}

impl Remote {
    pub fn new(
        server: &str,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Remote> {
        let base: Uri = server
            .parse()
            .with_context(|| format!("--server `{server}` is not a URL"))?;
        if base.host().is_none() {
            bail!("--server `{server}` has no host");
        }
        let token = match token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("--token-file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("CISTERN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        // The CLI trusts the `--ca-file` it is given (not the config's) and shows no client certificate.
        let trust = connect::Trust {
            ca_file,
            ..Default::default()
        };
        let tls = connect::tls_config(trust).map_err(anyhow::Error::msg)?;
        Ok(Remote {
            base,
            token,
            client: connect::simple_client(tls, None),
        })
    }

    fn url(&self, path: &str) -> anyhow::Result<Uri> {
        let base = self.base.path().trim_end_matches('/');
        Ok(Uri::builder()
            .scheme(self.base.scheme_str().unwrap_or("http"))
            .authority(self.base.authority().map(|a| a.as_str()).unwrap_or(""))
            .path_and_query(format!("{base}{path}"))
            .build()?)
    }

    /// Sends one request. Its `Host` is the `--server` URL's authority, so a gateway without an admin
    /// token, which wants a loopback `Host`, is reached as `http://127.0.0.1:<port>` or
    /// `http://localhost:<port>`; `content_type` is what a state-changing request needs there (SPEC 6).
    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        body: Body,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder().method(method).uri(self.url(path)?);
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = self
            .client
            .request(req.body(body)?)
            .await
            .with_context(|| format!("{}: cannot reach the gateway", self.base))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        if status == StatusCode::UNAUTHORIZED {
            bail!(
                "{}: the admin token is missing or wrong (use --token-file or $CISTERN_TOKEN)",
                self.base
            );
        }
        Ok((status, body))
    }

    pub async fn json(
        &self,
        method: Method,
        path: &str,
        v: &serde_json::Value,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        // A GET or HEAD carries no body (a gateway answers one that does with 400).
        let (s, b) = if matches!(method, Method::GET | Method::HEAD) {
            self.send(method, path, None, whole(Bytes::new())).await?
        } else {
            let body = whole(Bytes::from(v.to_string()));
            self.send(method, path, Some("application/json"), body)
                .await?
        };
        Ok((
            s,
            serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// Uploads a file to `PUT /v1/admin/content/sha256/<hex>`, streamed in 1 MiB pieces.
    pub async fn put_file(
        &self,
        file: &Path,
        hex: &str,
        pin: bool,
        progress: indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        // A gateway that refuses the token answers before reading the body and closes the connection;
        // the upload then breaks off with a broken pipe that hides the answer. Ask first.
        let (status, _) = self
            .send(Method::HEAD, "/v1/admin/content", None, whole(Bytes::new()))
            .await?;
        if !status.is_success() {
            bail!(
                "{}: the gateway's admin API answered {status}{}",
                self.base,
                if status == StatusCode::FORBIDDEN {
                    " (without server.admin_token it answers loopback clients only, asked for by a \
                     loopback name: --server http://127.0.0.1:<port> or http://localhost:<port>)"
                } else {
                    ""
                }
            );
        }
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| file.display().to_string())?;
        let stream = futures_util::stream::unfold((f, progress), |(mut f, pb)| async move {
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    pb.inc(n as u64);
                    Some((Ok(Frame::data(Bytes::from(buf))), (f, pb)))
                }
                Err(e) => Some((Err(e), (f, pb))),
            }
        });
        let path = format!(
            "/v1/admin/content/sha256/{hex}{}",
            if pin { "?pin=true" } else { "" }
        );
        let (status, body) = self
            .send(
                Method::PUT,
                &path,
                Some("application/octet-stream"),
                StreamBody::new(stream).boxed(),
            )
            .await?;
        match status {
            StatusCode::CREATED => Ok(()),
            s => bail!(
                "{}: the gateway answered {s}: {}",
                file.display(),
                String::from_utf8_lossy(&body).trim()
            ),
        }
    }

    /// Posts a manifest and follows the job until it ends; true when every file was stored.
    pub async fn prefetch(&self, manifest: &serde_json::Value) -> anyhow::Result<bool> {
        let (status, v) = self
            .json(Method::POST, "/v1/admin/prefetch", manifest)
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "the gateway refused the manifest ({status}): {}",
                v["detail"].as_str().unwrap_or("")
            );
        }
        let id = v["id"]
            .as_str()
            .context("the gateway answered no job id")?
            .to_string();
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(bar_style());
        loop {
            let (_, job) = self
                .json(
                    Method::GET,
                    &format!("/v1/admin/prefetch/{id}"),
                    &serde_json::Value::Null,
                )
                .await?;
            show(&pb, &job);
            if matches!(job["state"].as_str(), Some("done" | "failed") | None) {
                pb.finish_and_clear();
                report(&job);
                return Ok(job["state"] == "done");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

pub fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// Updates a progress bar from a prefetch job.
pub fn show(pb: &indicatif::ProgressBar, job: &serde_json::Value) {
    let files = job["files"].as_array().cloned().unwrap_or_default();
    let total: u64 = files.iter().filter_map(|f| f["size"].as_u64()).sum();
    let done: u64 = files.iter().filter_map(|f| f["bytes"].as_u64()).sum();
    pb.set_length(total.max(done));
    pb.set_position(done);
    let stored = files.iter().filter(|f| f["state"] == "stored").count();
    pb.set_message(format!("{stored}/{} files", files.len()));
}

/// One line per file of a finished job.
pub fn report(job: &serde_json::Value) {
    for f in job["files"].as_array().cloned().unwrap_or_default() {
        match f["state"].as_str() {
            Some("stored") => println!(
                "stored  {}  {}",
                f["sha256"].as_str().unwrap_or(""),
                f["url"].as_str().unwrap_or("")
            ),
            _ => println!(
                "FAILED  {}  {}: {}",
                f["sha256"].as_str().unwrap_or(""),
                f["url"].as_str().unwrap_or(""),
                f["error"].as_str().unwrap_or("not stored")
            ),
        }
    }
}
