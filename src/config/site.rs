//! The site's shared resources: the uplink budget (`[uplink]`, SPEC 4 "Uplink budget") and the sibling
//! caches that share the work (`[peers]`, SPEC 10).

use serde::{Deserialize, Serialize};

use super::window::Window;
use super::{check_url, invalid, ByteSize, ConfigError, Span};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Uplink {
    /// Bytes per second over every upstream transfer together; 0 = no cap.
    pub max_rate: ByteSize,
    /// Cap for background work (prefetch, background revalidation); 0 = `max_rate`.
    pub background_rate: ByteSize,
    /// When background work may use the uplink (`Mon-Fri 22:00-06:00`); empty = always.
    pub windows: Vec<String>,
    /// The IANA zone the windows are written in.
    pub timezone: String,
    /// Not a configuration key (no file or variable sets it): the wall clock the windows are read
    /// against, for a program embedding cistern (the integration tests move it instead of waiting).
    #[serde(skip)]
    pub clock: WallClock,
}

/// The time the uplink windows are read at; None = the system clock.
#[derive(Clone, Default)]
pub struct WallClock(pub Option<std::sync::Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>>);

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "injected"
        } else {
            "system"
        })
    }
}

impl Default for Uplink {
    fn default() -> Self {
        Uplink {
            max_rate: ByteSize(0),
            background_rate: ByteSize(0),
            windows: Vec::new(),
            timezone: "UTC".into(),
            clock: WallClock::default(),
        }
    }
}

impl Uplink {
    /// The windows, parsed (validated at load, so this cannot fail on a loaded config).
    pub fn parsed_windows(&self) -> Vec<Window> {
        self.windows
            .iter()
            .filter_map(|w| Window::parse(w).ok())
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for w in &self.windows {
            Window::parse(w).map_err(|e| invalid("uplink.windows", e))?;
        }
        if jiff::tz::TimeZone::get(&self.timezone).is_err() {
            return Err(invalid(
                "uplink.timezone",
                format!(
                    "`{}` is not an IANA time zone (e.g. Europe/Berlin, UTC)",
                    self.timezone
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Peers {
    /// Member URLs (`http://gw-a:8080`); this node may be listed.
    pub members: Vec<String>,
    /// `name:port`: every A/AAAA record of the name is a member, re-resolved every `refresh`.
    pub dns: String,
    pub refresh: Span,
    /// This node's member URL; empty = the member whose address is one of this node's.
    #[serde(rename = "self")]
    pub self_url: String,
    /// A DNS server asked for `dns` instead of the system resolver: set by tests (which cannot change
    /// the system's), never read from a file.
    #[serde(skip)]
    pub resolver: Option<std::net::SocketAddr>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            members: Vec::new(),
            dns: String::new(),
            refresh: Span::secs(10),
            self_url: String::new(),
            resolver: None,
        }
    }
}

impl Peers {
    /// Whether the site has peers: members listed, or a DNS name.
    pub fn enabled(&self) -> bool {
        !self.members.is_empty() || !self.dns.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for m in &self.members {
            check_url("peers.members", m)?;
        }
        if !self.self_url.is_empty() {
            check_url("peers.self", &self.self_url)?;
        }
        if !self.dns.is_empty() {
            let ok = self
                .dns
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(invalid(
                    "peers.dns",
                    format!("`{}` is not name:port", self.dns),
                ));
            }
            if !self.members.is_empty() {
                return Err(invalid(
                    "peers.dns",
                    "set peers.members or peers.dns, not both",
                ));
            }
        }
        if self.refresh.0.is_zero() {
            return Err(invalid("peers.refresh", "must be more than 0s"));
        }
        Ok(())
    }
}
