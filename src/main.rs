//! The `cistern` command: parses the command line and hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use cistern::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "cistern",
    version,
    about = "On-premises verified cache and nested-gateway proxy for OTA device updates"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// Config file (default: $CISTERN_CONFIG, else /etc/cistern/cistern.toml, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Parse and validate a config; print the effective config with secrets redacted.
    CheckConfig { file: PathBuf },
    /// Re-hash every stored object and report those whose bytes no longer match their name.
    Verify {
        #[arg(long, conflicts_with = "server")]
        config: Option<PathBuf>,
        /// Remove the objects that fail.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Stage the files a manifest names before devices ask for them; exit 0 only when all are stored.
    Prefetch {
        /// A manifest: {"files": [{url, sha256, size}]}, a Device Update import manifest, or a deployment.
        manifest: PathBuf,
        /// Base URL for import manifests that name files by filename.
        #[arg(long)]
        base_url: Option<String>,
        #[arg(long, conflicts_with = "server")]
        config: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Check config, store, parents (DNS, TCP, TLS, HTTP), proxy, origins and the listener.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Sideload payload files into the store, verified.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The digest the (single) file must have.
        #[arg(long)]
        sha256: Option<String>,
        /// Pin the imported objects (never evicted).
        #[arg(long)]
        pin: bool,
        #[arg(long, conflicts_with = "server")]
        config: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// Working through a running gateway's admin API.
#[derive(clap::Args, Clone)]
struct RemoteArgs {
    /// The gateway, e.g. http://127.0.0.1:8080 (its admin API).
    #[arg(long)]
    server: Option<String>,
    /// File holding the admin token (else $CISTERN_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Extra CA bundle to trust the gateway's certificate.
    #[arg(long, default_value = "")]
    ca_file: String,
}

impl RemoteArgs {
    fn remote(&self) -> anyhow::Result<Option<cistern::ops::remote::Remote>> {
        match &self.server {
            None => Ok(None),
            Some(s) => Ok(Some(cistern::ops::remote::Remote::new(
                s,
                self.token_file.as_deref(),
                &self.ca_file,
            )?)),
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = path.or_else(config::default_path);
    Ok(Config::load(path.as_deref())?)
}

fn init_logs(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load(config)?;
    init_logs(&cfg);
    let gw = cistern::Gateway::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
    gw.shutdown().await;
    Ok(())
}

fn hash_file(path: &std::path::Path) -> anyhow::Result<cistern::store::Digest> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| path.display().to_string())?;
    Ok(cistern::store::Digest(h.finalize().into()))
}

fn import(
    files: Vec<PathBuf>,
    sha256: Option<String>,
    pin: bool,
    config: Option<PathBuf>,
    remote: RemoteArgs,
) -> anyhow::Result<()> {
    use sha2::Digest as _;
    if sha256.is_some() && files.len() != 1 {
        anyhow::bail!(
            "--sha256 names the digest of one file; {} were given",
            files.len()
        );
    }
    let want = match &sha256 {
        Some(s) => Some(
            cistern::store::Digest::parse_any(s)
                .with_context(|| format!("--sha256 `{s}` is not a SHA-256 digest"))?,
        ),
        None => None,
    };
    if let Some(r) = remote.remote()? {
        let rt = runtime()?;
        for f in files {
            let d = match want {
                Some(d) => d,
                None => hash_file(&f)?,
            };
            let len = std::fs::metadata(&f)
                .with_context(|| f.display().to_string())?
                .len();
            let pb = indicatif::ProgressBar::new(len);
            pb.set_style(cistern::ops::remote::bar_style());
            rt.block_on(r.put_file(&f, &d.hex(), pin, pb.clone()))?;
            pb.finish_and_clear();
            println!("{d}  {}", f.display());
        }
        return Ok(());
    }
    let cfg = load(config)?;
    let store = cistern::open_store(&cfg).map_err(|e| {
        if format!("{e:#}").contains("in use") {
            anyhow::anyhow!("{e:#}; a running gateway holds it: use --server URL")
        } else {
            e
        }
    })?;
    for f in files {
        let mut src = std::fs::File::open(&f).with_context(|| format!("{}", f.display()))?;
        let len = src
            .metadata()
            .with_context(|| format!("{}", f.display()))?
            .len();
        let mut fill = store.begin_fill(Some(len))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut src, &mut buf)
                .with_context(|| format!("{}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            fill.write(&buf[..n])?;
        }
        let got = cistern::store::Digest(h.finalize().into());
        if let Some(w) = want {
            if w != got {
                anyhow::bail!("{}: hashes to {got}, not {w}; nothing stored", f.display());
            }
        }
        fill.commit(&got, None, None, pin)?;
        println!("{got}  {}", f.display());
    }
    store.flush()?;
    Ok(())
}

fn verify(config: Option<PathBuf>, repair: bool, remote: RemoteArgs) -> anyhow::Result<bool> {
    if let Some(r) = remote.remote()? {
        let (status, v) = runtime()?.block_on(r.json(
            http::Method::POST,
            "/v1/admin/verify",
            &serde_json::json!({"repair": repair}),
        ))?;
        if !status.is_success() {
            anyhow::bail!(
                "the gateway answered {status}: {}",
                v["detail"].as_str().unwrap_or("")
            );
        }
        let bad = v["bad"].as_array().cloned().unwrap_or_default();
        for b in &bad {
            println!(
                "BAD {}: {}{}",
                b["sha256"].as_str().unwrap_or(""),
                b["problem"].as_str().unwrap_or(""),
                if repair { " (removed)" } else { "" }
            );
        }
        println!("{} objects checked, {} bad", v["checked"], bad.len());
        return Ok(bad.is_empty() || repair);
    }
    let cfg = load(config)?;
    let store = cistern::open_store(&cfg)?;
    let n = store.usage().objects;
    let bad = store.verify(repair);
    for (d, p) in &bad {
        println!("BAD {d}: {p}{}", if repair { " (removed)" } else { "" });
    }
    println!("{n} objects checked, {} bad", bad.len());
    store.flush()?;
    Ok(bad.is_empty() || repair)
}

fn prefetch(
    manifest: PathBuf,
    base_url: Option<String>,
    config: Option<PathBuf>,
    remote: RemoteArgs,
) -> anyhow::Result<bool> {
    let raw = std::fs::read(&manifest).with_context(|| manifest.display().to_string())?;
    let mut v: serde_json::Value = serde_json::from_slice(&raw)
        .with_context(|| format!("{}: not JSON", manifest.display()))?;
    if let (Some(b), Some(obj)) = (base_url, v.as_object_mut()) {
        obj.entry("baseUrl").or_insert(serde_json::Value::String(b));
    }
    let rt = runtime()?;
    if let Some(r) = remote.remote()? {
        return rt.block_on(r.prefetch(&v));
    }
    let (files, pin) = cistern::fetch::prefetch::parse(&v, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
    let mut cfg = load(config)?;
    // No listener: this process only fetches into the store (a running gateway would hold it).
    cfg.server.listen = String::new();
    cfg.server.tls_listen = String::new();
    rt.block_on(async move {
        let gw = cistern::Gateway::start(cfg).await.map_err(|e| {
            if format!("{e:#}").contains("in use") {
                anyhow::anyhow!("{e:#}; a running gateway holds it: use --server URL")
            } else {
                e
            }
        })?;
        for f in &files {
            gw.fetcher
                .check(&f.url)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let id = gw.fetcher.prefetch(files, pin);
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(cistern::ops::remote::bar_style());
        let ok = loop {
            let job = serde_json::to_value(gw.fetcher.prefetch_job(&id)).unwrap_or_default();
            cistern::ops::remote::show(&pb, &job);
            if job["state"] != "running" {
                pb.finish_and_clear();
                cistern::ops::remote::report(&job);
                break job["state"] == "done";
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        };
        gw.shutdown().await;
        Ok(ok)
    })
}

fn doctor(config: Option<PathBuf>) -> anyhow::Result<bool> {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL  config: {e:#} -> fix the file, then run `cistern check-config`");
            return Ok(false);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let checks = rt.block_on(cistern::ops::doctor::run(&cfg));
    for c in &checks {
        println!("{c}");
    }
    Ok(checks.iter().all(|c| c.ok))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<bool> = match cli.cmd {
        Cmd::Serve { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(serve(config)))
            .map(|_| true),
        Cmd::CheckConfig { file } => Config::load(Some(&file))
            .map(|c| {
                print!("{}", c.redacted_toml());
                true
            })
            .map_err(Into::into),
        Cmd::Verify {
            config,
            repair,
            remote,
        } => verify(config, repair, remote),
        Cmd::Prefetch {
            manifest,
            base_url,
            config,
            remote,
        } => prefetch(manifest, base_url, config, remote),
        Cmd::Doctor { config } => doctor(config),
        Cmd::Import {
            files,
            sha256,
            pin,
            config,
            remote,
        } => import(files, sha256, pin, config, remote).map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cistern: {e:#}");
            ExitCode::from(1)
        }
    }
}
