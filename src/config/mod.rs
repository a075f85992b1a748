//! The configuration tree (SPEC section 2): one TOML file, every key defaulted in one place, unknown keys
//! rejected, every key overridable by `CISTERN_<SECTION>__<KEY>`. Validated once at start; the rest of the
//! code receives typed values. This module calls no other cistern module.

mod env;
mod path;
mod reference;
mod site;
mod status;
mod units;
mod window;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use reference::REFERENCE;
pub use site::{Peers, Uplink, WallClock};
pub use status::Status;
pub use units::{ByteSize, Span};
pub use window::Window;

/// What can be wrong with a configuration; each message names the file, key or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        msg: msg.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: Node,
    pub server: Server,
    pub store: Store,
    pub upstream: Upstream,
    pub origins: Vec<Origin>,
    /// Container registries served under `/v2/` (SPEC 9); the first is the default.
    pub registries: Vec<Registry>,
    pub uplink: Uplink,
    pub peers: Peers,
    pub status: Status,
    pub log: Log,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Node {
    /// Names this node in `Via` and in the relay; empty means "derive from the environment".
    pub id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: String,
    pub tls_listen: String,
    #[serde(with = "path")]
    pub tls_cert: Option<PathBuf>,
    #[serde(with = "path")]
    pub tls_key: Option<PathBuf>,
    #[serde(with = "path")]
    pub client_ca: Option<PathBuf>,
    pub allowed_clients: Vec<ipnet::IpNet>,
    pub admin_token: String,
    #[serde(with = "path")]
    pub admin_token_file: Option<PathBuf>,
    pub max_connections: usize,
    pub allow_connect: bool,
    /// With `allow_connect`: CONNECTs to allowed origins (of `intercept_hosts` when set) are
    /// terminated with a certificate signed by `intercept_ca_cert`/`intercept_ca_key` and cached.
    pub intercept: bool,
    /// PEM: the CA (root or intermediate) that signs the per-host certificates.
    #[serde(with = "path")]
    pub intercept_ca_cert: Option<PathBuf>,
    /// PEM: its private key; must not be readable by group or others.
    #[serde(with = "path")]
    pub intercept_ca_key: Option<PathBuf>,
    /// Host patterns to intercept; empty = every allowed origin. Others are tunnelled.
    pub intercept_hosts: Vec<String>,
    /// Ranges one request may ask for (a `multipart/byteranges` answer); a larger set gets 200 with
    /// the whole body (SPEC 4).
    pub max_ranges: usize,
    /// When set, `/v2/` (container images) needs it: Bearer, or Basic with any user (SPEC 9).
    pub pull_token: String,
    #[serde(with = "path")]
    pub pull_token_file: Option<PathBuf>,
    pub shutdown_grace: Span,
    /// The kernel send buffer of each client connection; "0" leaves it to the kernel's autotuning.
    /// Beyond SPEC 2: a bounded buffer keeps what is in flight small and cache-hot, which on a LAN
    /// serves more bytes per CPU second; raise it for clients far away (it caps a connection's
    /// throughput at about twice this size per round trip).
    pub send_buffer: ByteSize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "0.0.0.0:8080".into(),
            tls_listen: String::new(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            allowed_clients: Vec::new(),
            admin_token: String::new(),
            admin_token_file: None,
            max_connections: 10_000,
            allow_connect: false,
            intercept: false,
            intercept_ca_cert: None,
            intercept_ca_key: None,
            intercept_hosts: Vec::new(),
            max_ranges: 200,
            pull_token: String::new(),
            pull_token_file: None,
            shutdown_grace: Span::secs(10),
            send_buffer: ByteSize(256 << 10),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    pub dir: PathBuf,
    pub max_size: ByteSize,
    pub min_free: ByteSize,
    pub max_object_size: ByteSize,
    /// Room that fills in flight may reserve together; 0 = half of what the store may use.
    pub max_filling: ByteSize,
    /// Keys (URLs, query strings, variants) that may map to one object; past it, the oldest go.
    pub max_keys_per_object: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            dir: PathBuf::from("./cistern-data"),
            max_size: ByteSize(0),
            min_free: ByteSize(1 << 30),
            max_object_size: ByteSize(0),
            max_filling: ByteSize(0),
            max_keys_per_object: 10_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub parents: Vec<String>,
    pub allow_direct: bool,
    pub allowed_origins: Vec<String>,
    pub origin_scheme: String,
    #[serde(with = "path")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "path")]
    pub client_cert: Option<PathBuf>,
    #[serde(with = "path")]
    pub client_key: Option<PathBuf>,
    pub proxy: String,
    pub connect_timeout: Span,
    pub idle_timeout: Span,
    pub retries: u32,
    /// Per second, averaged over a minute (or over `idle_timeout` when shorter): a slower transfer is
    /// a failure (retry / resume), so that a trickling upstream cannot hold a reservation for ever.
    pub min_rate: ByteSize,
    /// Upstream transfers at once; a miss beyond it waits for a slot up to `connect_timeout`, then 503.
    pub max_transfers: u32,
    pub strip_query: Vec<String>,
    pub require_digest: bool,
    /// Not a configuration key (no file or variable sets it): names that a program embedding cistern
    /// (the integration tests) resolves itself, as curl's `--connect-to` does: `(host, address)`, the
    /// address taken as the checked result of resolving `host` on any port.
    #[serde(skip)]
    pub connect_to: Vec<(String, SocketAddr)>,
}

impl Default for Upstream {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Upstream {
            parents: Vec::new(),
            allow_direct: false,
            allowed_origins: s(&[
                "*.adu.microsoft.com",
                "*.blob.core.windows.net",
                "*.azureedge.net",
                "*.delivery.mp.microsoft.com",
                "*.download.windowsupdate.com",
            ]),
            origin_scheme: "http".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            proxy: String::new(),
            connect_to: Vec::new(),
            connect_timeout: Span::secs(10),
            idle_timeout: Span::secs(60),
            retries: 5,
            min_rate: ByteSize(4 << 10),
            max_transfers: 256,
            strip_query: s(&[
                "sig", "se", "st", "sp", "sv", "sr", "spr", "skoid", "sktid", "skt", "ske", "sks",
                "skv", "ss", "srt",
            ]),
            require_digest: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub immutable: bool,
}

/// A container registry pulled through `/v2/` (SPEC 9).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Names the registry in a `/v2/<name>/...` path; same grammar as an origin's name.
    pub name: String,
    /// Its base URL, e.g. `https://mcr.microsoft.com`.
    pub url: String,
    /// For the registry's Basic or token authentication; empty = anonymous.
    #[serde(default)]
    pub username: String,
    /// The password (or token) for `username`, read at start; never logged or stored.
    #[serde(default, with = "path")]
    pub password_file: Option<PathBuf>,
    /// How long a manifest fetched by tag is reused before it is revalidated.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: Span,
}

fn default_tag_ttl() -> Span {
    Span::secs(300)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: String,
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Where `serve` looks for its configuration when `--config` is not given (SPEC 1).
pub fn default_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CISTERN_CONFIG") {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    let etc = PathBuf::from("/etc/cistern/cistern.toml");
    etc.exists().then_some(etc)
}

impl Config {
    /// Loads the file (or the defaults when `path` is None), applies the process environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &vars)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "built-in defaults".to_string()),
        };
        Self::from_toml_str(&text, &name, vars)
    }

    pub fn from_toml_str(
        text: &str,
        name: &str,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: name.into(),
                    msg: one_line(&e.to_string()),
                })?;
        env::apply(&mut tree, vars)?;
        let mut cfg: Config = Config::deserialize(tree).map_err(|e| ConfigError::Parse {
            path: name.into(),
            msg: one_line(&e.to_string()),
        })?;
        cfg.fill_derived();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fills the defaults that come from the environment rather than from constants (SPEC 2, SPEC 8).
    fn fill_derived(&mut self) {
        if self.node.id.is_empty() {
            let raw = std::env::var("IOTEDGE_DEVICEID")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|s| s.trim().to_string())
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "cistern".to_string());
            self.node.id = raw
                .chars()
                .map(|c| if is_tchar(c) { c } else { '-' })
                .collect();
        }
        if self.upstream.parents.is_empty() {
            if let Ok(parent) = std::env::var("IOTEDGE_PARENTHOSTNAME") {
                if !parent.is_empty() {
                    self.upstream.parents.push(format!("https://{parent}:8443"));
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id.is_empty() || !self.node.id.chars().all(is_tchar) {
            return Err(invalid(
                "node.id",
                format!("`{}` is not an HTTP token", self.node.id),
            ));
        }
        for (key, v) in [
            ("server.listen", &self.server.listen),
            ("server.tls_listen", &self.server.tls_listen),
        ] {
            if !v.is_empty() && v.parse::<SocketAddr>().is_err() {
                return Err(invalid(key, format!("`{v}` is not an address:port")));
            }
        }
        if !self.server.tls_listen.is_empty()
            && (self.server.tls_cert.is_none() || self.server.tls_key.is_none())
            && std::env::var("IOTEDGE_WORKLOADURI").is_err()
        {
            return Err(invalid(
                "server.tls_listen",
                "needs server.tls_cert and server.tls_key",
            ));
        }
        self.validate_intercept()?;
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.store.max_keys_per_object == 0 {
            return Err(invalid("store.max_keys_per_object", "must be at least 1"));
        }
        if self.upstream.max_transfers == 0 {
            return Err(invalid("upstream.max_transfers", "must be at least 1"));
        }
        if !matches!(self.upstream.origin_scheme.as_str(), "http" | "https") {
            return Err(invalid(
                "upstream.origin_scheme",
                "must be \"http\" or \"https\"",
            ));
        }
        for p in &self.upstream.parents {
            check_url("upstream.parents", p)?;
        }
        if !self.upstream.proxy.is_empty() {
            check_url("upstream.proxy", &self.upstream.proxy)?;
        }
        for pat in &self.upstream.allowed_origins {
            if pat.is_empty() || pat.contains(['/', '@', ' ', '?', '#']) {
                return Err(invalid(
                    "upstream.allowed_origins",
                    format!("`{pat}` is not a host pattern"),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for o in &self.origins {
            if !valid_origin_name(&o.name) {
                return Err(invalid(
                    "origins.name",
                    format!("`{}` must match [a-z0-9][a-z0-9._-]{{0,62}}", o.name),
                ));
            }
            if !seen.insert(o.name.clone()) {
                return Err(invalid(
                    "origins.name",
                    format!("`{}` is named twice", o.name),
                ));
            }
            check_url(&format!("origins.{}.url", o.name), &o.url)?;
        }
        self.validate_registries()?;
        self.uplink.validate()?;
        self.peers.validate()?;
        if !self.status.forward_to.is_empty() {
            check_url("status.forward_to", &self.status.forward_to)?;
        }
        if self.status.batch_size == 0 {
            return Err(invalid("status.batch_size", "must be at least 1"));
        }
        self.validate_status_bounds()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        Ok(())
    }

    /// `server.intercept` needs CONNECT and a CA; its host patterns are host patterns.
    fn validate_intercept(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for pat in &s.intercept_hosts {
            if pat.is_empty() || pat.contains(['/', '@', ' ', '?', '#']) {
                return Err(invalid(
                    "server.intercept_hosts",
                    format!("`{pat}` is not a host pattern"),
                ));
            }
        }
        if !s.intercept {
            return Ok(());
        }
        if !s.allow_connect {
            return Err(invalid(
                "server.intercept",
                "needs server.allow_connect = true",
            ));
        }
        if s.intercept_ca_cert.is_none() || s.intercept_ca_key.is_none() {
            return Err(invalid(
                "server.intercept",
                "needs server.intercept_ca_cert and server.intercept_ca_key (`cistern ca init` makes a pair)",
            ));
        }
        Ok(())
    }

    /// Registries are named like origins, once each, with a URL; a password needs a user name.
    fn validate_registries(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for r in &self.registries {
            if !valid_origin_name(&r.name) {
                return Err(invalid(
                    "registries.name",
                    format!("`{}` must match [a-z0-9][a-z0-9._-]{{0,62}}", r.name),
                ));
            }
            if !seen.insert(r.name.clone()) {
                return Err(invalid(
                    "registries.name",
                    format!("`{}` is named twice", r.name),
                ));
            }
            check_url(&format!("registries.{}.url", r.name), &r.url)?;
            if r.password_file.is_some() && r.username.is_empty() {
                return Err(invalid(
                    &format!("registries.{}.password_file", r.name),
                    "needs a username",
                ));
            }
        }
        Ok(())
    }

    /// The admin token, from `admin_token` or `admin_token_file`; None when admin is loopback-only.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        secret(
            &self.server.admin_token,
            self.server.admin_token_file.as_deref(),
            "server.admin_token_file",
        )
    }

    /// `server.pull_token`, inline or from `pull_token_file`; None = `/v2/` needs no login.
    pub fn pull_token(&self) -> Result<Option<String>, ConfigError> {
        secret(
            &self.server.pull_token,
            self.server.pull_token_file.as_deref(),
            "server.pull_token_file",
        )
    }

    /// The config as `check-config` prints it: effective values, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for s in [
            &mut c.server.admin_token,
            &mut c.server.pull_token,
            &mut c.status.forward_token,
        ] {
            if !s.is_empty() {
                *s = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }
}

fn secret(inline: &str, file: Option<&Path>, key: &str) -> Result<Option<String>, ConfigError> {
    if !inline.is_empty() {
        return Ok(Some(inline.to_string()));
    }
    let Some(file) = file else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(file)
        .map_err(|e| invalid(key, format!("{}: {e}", file.display())))?;
    let t = t.trim().to_string();
    Ok((!t.is_empty()).then_some(t))
}

fn check_url(key: &str, v: &str) -> Result<(), ConfigError> {
    match v.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Ok(()),
        _ => Err(invalid(key, format!("`{v}` is not an http(s) URL"))),
    }
}

/// RFC 9110 §5.6.2 token characters.
pub fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

pub fn valid_origin_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
