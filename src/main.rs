//! The `cistern` command: parses the command line and hands off to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cistern::config::Config;
mod cli;

use cistern::ops::remote::Remote;
use cli::{load, runtime};

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
    ///
    /// Without FILE, checks what `serve` would read ($CISTERN_CONFIG, else /etc/cistern/cistern.toml,
    /// else the built-in defaults), with the environment's CISTERN_* overrides applied.
    CheckConfig {
        /// The config file to check.
        file: Option<PathBuf>,
        /// Print the reference instead: every section and key with its default and meaning (TOML).
        #[arg(long, conflicts_with = "file")]
        defaults: bool,
    },
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
    /// The container's probe: exit 0 when /healthz of the configured listener answers 200 within 2 s.
    Health {
        /// Config file, found as `serve` finds it.
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
    /// The site CA of interception (server.intercept).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a site CA: DIR/ca.pem and DIR/ca.key (mode 0600), ECDSA P-256, 10 years.
    Init {
        /// Directory to write the two files into (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name, as devices will show it.
        #[arg(long, default_value = "cistern site CA")]
        name: String,
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
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    fn remote(&self) -> anyhow::Result<Option<Remote>> {
        match &self.server {
            None => Ok(None),
            Some(s) => Ok(Some(Remote::new(
                s,
                self.token_file.as_deref(),
                self.ca_file.as_deref(),
            )?)),
        }
    }
}

fn init_logs(cfg: &Config) {
    // rustls warns on every handshake whose SNI is an IP address (devices and wrk connect by
    // address): kept to its errors unless RUST_LOG asks otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},rustls=error", cfg.log.level))
    });
    // Colour codes only for a person at a terminal: `iotedge logs`, `docker logs` and journald show
    // them as garbage.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
    use tokio::signal::unix::{signal, SignalKind};
    // Before the start: /readyz answers from inside it, and a SIGTERM from then on (or during the
    // store's recovery) must be a graceful stop, not the signal's default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let gw = cistern::Gateway::start(cfg).await?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
    gw.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    // The crash tests configure fail points through $FAILPOINTS (tests/relay_crash.rs and
    // tests/store_crash.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let result: anyhow::Result<bool> = match cli.cmd {
        Cmd::Serve { config } => runtime()
            .and_then(|rt| rt.block_on(serve(config)))
            .map(|_| true),
        Cmd::CheckConfig { defaults: true, .. } => {
            print!("{}", cistern::config::REFERENCE);
            Ok(true)
        }
        Cmd::CheckConfig { file, .. } => load(file).map(|c| {
            print!("{}", c.redacted_toml());
            true
        }),
        Cmd::Verify {
            config,
            repair,
            remote,
        } => remote.remote().and_then(|r| cli::verify(config, repair, r)),
        Cmd::Prefetch {
            manifest,
            base_url,
            config,
            remote,
        } => remote
            .remote()
            .and_then(|r| cli::prefetch(manifest, base_url, config, r)),
        Cmd::Doctor { config } => cli::doctor(config),
        Cmd::Health { config } => cli::health(config).map(|_| true),
        Cmd::Import {
            files,
            sha256,
            pin,
            config,
            remote,
        } => remote
            .remote()
            .and_then(|r| cli::import(files, sha256, pin, config, r))
            .map(|_| true),
        Cmd::Ca {
            cmd: CaCmd::Init { out, name },
        } => cistern::ops::ca::init(&out, &name)
            .map(|f| print!("{}", cistern::ops::ca::next_steps(&f)))
            .map_err(anyhow::Error::msg)
            .map(|_| true),
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
