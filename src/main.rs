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
        #[arg(long)]
        config: Option<PathBuf>,
        /// Remove the objects that fail.
        #[arg(long)]
        repair: bool,
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
        #[arg(long)]
        config: Option<PathBuf>,
    },
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

fn import(
    files: Vec<PathBuf>,
    sha256: Option<String>,
    pin: bool,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    use sha2::Digest as _;
    let cfg = load(config)?;
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

fn verify(config: Option<PathBuf>, repair: bool) -> anyhow::Result<bool> {
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
        Cmd::Verify { config, repair } => verify(config, repair),
        Cmd::Doctor { config } => doctor(config),
        Cmd::Import {
            files,
            sha256,
            pin,
            config,
        } => import(files, sha256, pin, config).map(|_| true),
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
