//! Which upstreams cistern may contact (SPEC 2, "never an open proxy"): host patterns checked before any
//! connection, and the address check applied after DNS resolution to the very addresses connected to.

use std::collections::HashSet;
use std::net::IpAddr;

/// One `allowed_origins` entry: `*.example.com`, `example.com`, `127.0.0.1:8081`, `[::1]:8080`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostPattern {
    /// Lower-case host without trailing dot; for a wildcard, the suffix after `*.`.
    host: String,
    wildcard: bool,
    /// None = ports 80 and 443.
    port: Option<u16>,
}

impl HostPattern {
    fn parse(p: &str) -> Option<HostPattern> {
        let p = p.trim().to_ascii_lowercase();
        let (wildcard, rest) = match p.strip_prefix("*.") {
            Some(r) => (true, r.to_string()),
            None => (false, p.clone()),
        };
        let (host, port) = split_host_port(&rest)?;
        Some(HostPattern {
            host: normalise_host(&host),
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        let host_ok = host == self.host
            || (self.wildcard && host.len() > self.host.len() && host.ends_with(&self.host) && {
                let cut = host.len() - self.host.len();
                host.as_bytes()[cut - 1] == b'.'
            });
        port_ok && host_ok
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, `v6` (bare IPv6 literal).
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if tail.is_empty() => None,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((s.to_string(), None));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((s.to_string(), None)),
    }
}

/// The port of a URL, the scheme's default when it names none.
pub fn port_of(u: &http::Uri) -> u16 {
    u.port_u16().unwrap_or(if u.scheme_str() == Some("https") {
        443
    } else {
        80
    })
}

/// The host (and port) of a URL, for logs and errors: never the query, which may hold a SAS `sig`.
pub fn host_of(u: &http::Uri) -> String {
    u.authority().map(|a| a.to_string()).unwrap_or_default()
}

pub fn normalise_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// The allowlist and the address rules, built once from the config.
#[derive(Debug, Default)]
pub struct OriginPolicy {
    patterns: Vec<HostPattern>,
    /// This node's own interface addresses (refused unless named).
    own_addrs: HashSet<IpAddr>,
}

impl OriginPolicy {
    /// `patterns` are `upstream.allowed_origins`; `literal_hosts` the hosts of named origins and parents,
    /// which count as literal patterns on their own port.
    pub fn new(patterns: &[String], literal_hosts: &[(String, u16)]) -> OriginPolicy {
        let mut ps: Vec<HostPattern> = patterns
            .iter()
            .filter_map(|p| HostPattern::parse(p))
            .collect();
        for (h, port) in literal_hosts {
            ps.push(HostPattern {
                host: normalise_host(h),
                wildcard: false,
                port: Some(*port),
            });
        }
        let own_addrs = if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        OriginPolicy {
            patterns: ps,
            own_addrs,
        }
    }

    /// The host-pattern check, made before anything else.
    pub fn host_allowed(&self, host: &str, port: u16) -> bool {
        let h = normalise_host(host);
        let h = h.trim_matches(['[', ']']);
        self.patterns.iter().any(|p| p.matches(h, port))
    }

    /// The address check for a URL whose host is the address literal `ip`, on `port`: the refused
    /// ranges, unless a pattern names this very address on this very port (SPEC 2). The exemption
    /// belongs to the pattern that named it: `127.0.0.1:8081` lets 127.0.0.1 port 8081 through, not
    /// port 80, and never a name that resolves to 127.0.0.1.
    pub fn literal_allowed(&self, ip: IpAddr, port: u16) -> bool {
        let named = self.patterns.iter().any(|p| {
            !p.wildcard
                && p.host.trim_matches(['[', ']']).parse::<IpAddr>().ok() == Some(ip)
                && p.matches(&p.host, port)
        });
        named || self.addr_allowed(ip)
    }

    /// The address check made on every address DNS returned for a name, before connecting to it: the
    /// refused ranges (an IPv6 form of an IPv4 address judged as that address) and this node's own
    /// addresses. No pattern exempts a name's addresses: a hostile DNS, or a rebinding one, could
    /// otherwise point any allowed name at a loopback service.
    pub fn addr_allowed(&self, ip: IpAddr) -> bool {
        let ip = embedded_v4(ip);
        let refused = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                o[0] == 0
                    || o[0] == 127
                    || (o[0] == 169 && o[1] == 254)
                    || v4.is_multicast()
                    || v4.is_broadcast()
            }
            IpAddr::V6(v6) => {
                v6.is_unspecified()
                    || v6.is_loopback()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.is_multicast()
            }
        };
        !(refused || self.own_addrs.contains(&ip))
    }
}

/// An IPv6 address that stands for an IPv4 one is judged as that IPv4 address: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some stacks) and the
/// NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052), which a site's NAT64 gateway turns into a
/// connection to the embedded address.
fn embedded_v4(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if v6.is_loopback() || v6.is_unspecified() {
        return ip;
    }
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = v6.octets();
        return IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d));
    }
    v6.to_ipv4().map(IpAddr::V4).unwrap_or(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(p: &[&str]) -> OriginPolicy {
        OriginPolicy::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &[])
    }

    #[test]
    fn wildcards_match_any_depth_and_the_apex() {
        let p = policy(&["*.blob.core.windows.net"]);
        assert!(p.host_allowed("x.blob.core.windows.net", 80));
        assert!(p.host_allowed("a.b.blob.core.windows.net", 443));
        assert!(p.host_allowed("blob.core.windows.net", 80));
        assert!(p.host_allowed("X.Blob.Core.Windows.Net.", 80));
        assert!(!p.host_allowed("evilblob.core.windows.net", 80));
        assert!(!p.host_allowed("x.blob.core.windows.net", 8080));
        assert!(!p.host_allowed("blob.core.windows.net.evil.com", 80));
    }

    #[test]
    fn ports_and_literals() {
        let p = policy(&["127.0.0.1:8081", "example.com", "[::1]:9000"]);
        assert!(p.host_allowed("127.0.0.1", 8081));
        assert!(!p.host_allowed("127.0.0.1", 8082));
        assert!(p.host_allowed("example.com", 443));
        assert!(!p.host_allowed("sub.example.com", 80));
        assert!(p.host_allowed("[::1]", 9000));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p.literal_allowed(ip("127.0.0.1"), 8081));
        assert!(p.literal_allowed(ip("::1"), 9000));
        assert!(!p.literal_allowed(ip("127.0.0.2"), 8081));
    }

    #[test]
    fn a_named_loopback_address_is_exempt_on_its_port_only_and_never_for_names() {
        let p = policy(&["127.0.0.1:8081", "*.example.com", "[::1]:9000"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The literal, on the port that named it.
        assert!(p.literal_allowed(ip("127.0.0.1"), 8081));
        // Not on another port (a loopback-only service on port 80 of the gateway).
        assert!(!p.literal_allowed(ip("127.0.0.1"), 80));
        assert!(!p.literal_allowed(ip("::1"), 80));
        // Not as the address a name resolved to (hostile DNS, rebinding), whatever the port.
        assert!(!p.addr_allowed(ip("127.0.0.1")));
        assert!(!p.addr_allowed(ip("::1")));
        // A literal without a port: 80 and 443 only.
        let q = policy(&["127.0.0.1"]);
        assert!(q.literal_allowed(ip("127.0.0.1"), 80));
        assert!(!q.literal_allowed(ip("127.0.0.1"), 8081));
    }

    #[test]
    fn refused_ranges_include_mapped_forms() {
        let p = policy(&["*.example.com"]);
        for a in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::169.254.169.254",
            "::127.0.0.1",
            "::169.254.169.254",
            "::ffff:0.0.0.0",
        ] {
            assert!(!p.addr_allowed(a.parse().unwrap()), "{a} allowed");
        }
        assert!(p.addr_allowed("93.184.216.34".parse().unwrap()));
        assert!(p.addr_allowed("64:ff9b::93.184.216.34".parse().unwrap()));
        assert!(p.addr_allowed("2001:db8::1".parse().unwrap()));
    }
}
