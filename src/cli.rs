//! The CLI commands other than `serve` (SPEC 1): `import`, `verify`, `prefetch`, `doctor`, `health`;
//! the first three either on the store directly or through a running gateway (`--server`). `main`
//! parses arguments and calls these.

use std::path::PathBuf;

use anyhow::Context;

use cistern::config::{self, Config};
use cistern::ops::remote::Remote;

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = path.or_else(config::default_path);
    Ok(Config::load(path.as_deref())?)
}

fn hash_file(path: &std::path::Path) -> anyhow::Result<cistern::store::Digest> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| path.display().to_string())?;
    Ok(cistern::store::Digest(h.finalize().into()))
}

pub fn import(
    files: Vec<PathBuf>,
    sha256: Option<String>,
    pin: bool,
    config: Option<PathBuf>,
    remote: Option<Remote>,
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
    if let Some(r) = remote {
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

pub fn verify(
    config: Option<PathBuf>,
    repair: bool,
    remote: Option<Remote>,
) -> anyhow::Result<bool> {
    if let Some(r) = remote {
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

pub fn prefetch(
    manifest: PathBuf,
    base_url: Option<String>,
    config: Option<PathBuf>,
    remote: Option<Remote>,
) -> anyhow::Result<bool> {
    let raw = std::fs::read(&manifest).with_context(|| manifest.display().to_string())?;
    let mut v: serde_json::Value = serde_json::from_slice(&raw)
        .with_context(|| format!("{}: not JSON", manifest.display()))?;
    if let (Some(b), Some(obj)) = (base_url, v.as_object_mut()) {
        obj.entry("baseUrl").or_insert(serde_json::Value::String(b));
    }
    let rt = runtime()?;
    if let Some(r) = remote {
        return rt.block_on(r.prefetch(&v));
    }
    let (files, pin) = cistern::fetch::prefetch::parse(&v, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
    let plan = cistern::fetch::prefetch::plan(&v, pin)
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
        let id = gw.fetcher.prefetch(files, plan).await;
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(cistern::ops::remote::bar_style());
        let ok = loop {
            let job = serde_json::to_value(gw.fetcher.prefetch_job(&id)).unwrap_or_default();
            cistern::ops::remote::show(&pb, &job);
            if matches!(job["state"].as_str(), Some("done" | "failed") | None) {
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

pub fn doctor(config: Option<PathBuf>) -> anyhow::Result<bool> {
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
    Ok(!checks.iter().any(|c| c.failed()))
}

/// `cistern health`: prints one line and exits 0 when `/healthz` answers 200, else the error is the
/// one line saying why (exit 1).
pub fn health(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let line = cistern::ops::health::probe(&cfg).map_err(anyhow::Error::msg)?;
    println!("{line}");
    Ok(())
}
