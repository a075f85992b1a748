//! The addresses of `peers.dns` (SPEC 10): the system resolver (`lookup_host`), or, where a test names
//! one (`peers.resolver`, not in the config file), a DNS server asked directly over UDP for A and AAAA
//! records: a minimal RFC 1035 client, enough to read the answers of one name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Every address `name` resolves to, with `port`: from `server` when given, else the system resolver.
pub async fn resolve(
    name: &str,
    port: u16,
    server: Option<SocketAddr>,
) -> Result<Vec<SocketAddr>, String> {
    let Some(server) = server else {
        let found = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("peers.dns {name}: {e}"))?;
        return Ok(found.collect());
    };
    // A server that holds only A records may refuse AAAA (dnsmasq without upstreams does): the name
    // fails only when both fail.
    let (a, aaaa) = (query(server, name, 1).await, query(server, name, 28).await);
    let ips = match (a, aaaa) {
        (Err(e), Err(_)) => return Err(format!("peers.dns {name} at {server}: {e}")),
        (a, aaaa) => a.into_iter().chain(aaaa).flatten(),
    };
    Ok(ips.map(|ip| SocketAddr::new(ip, port)).collect())
}

/// One query for `qtype` (1 = A, 28 = AAAA) records of `name`.
async fn query(server: SocketAddr, name: &str, qtype: u16) -> Result<Vec<IpAddr>, String> {
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    let id: u16 = rand::random();
    let q = encode(id, name, qtype)?;
    sock.send_to(&q, server).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(QUERY_TIMEOUT, sock.recv(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    decode(&buf[..n], id, qtype)
}

/// A query message: header (recursion desired, one question), then the question.
fn encode(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut m = Vec::with_capacity(32 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a DNS name"));
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    Ok(m)
}

/// The addresses in the answer section of a response to query `id`.
fn decode(m: &[u8], id: u16, qtype: u16) -> Result<Vec<IpAddr>, String> {
    let short = || "a truncated answer".to_string();
    let u16_at = |i: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes([
            *m.get(i).ok_or_else(short)?,
            *m.get(i + 1).ok_or_else(short)?,
        ]))
    };
    if u16_at(0)? != id {
        return Err("an answer to another query".into());
    }
    let rcode = u16_at(2)? & 0x000f;
    // NXDOMAIN: the name has no records (every member gone).
    if rcode == 3 {
        return Ok(Vec::new());
    }
    if rcode != 0 {
        return Err(format!("the server answered rcode {rcode}"));
    }
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i).ok_or_else(short)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(m, i).ok_or_else(short)?;
        let (rtype, len) = (u16_at(i)?, u16_at(i + 8)? as usize);
        let data = m.get(i + 10..i + 10 + len).ok_or_else(short)?;
        match (rtype, len) {
            (1, 4) if qtype == 1 => {
                out.push(IpAddr::from([data[0], data[1], data[2], data[3]]));
            }
            (28, 16) if qtype == 28 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(data);
                out.push(IpAddr::from(a));
            }
            _ => {}
        }
        i += 10 + len;
    }
    Ok(out)
}

/// The offset after the (possibly compressed) name at `i`.
fn skip_name(m: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *m.get(i)? as usize;
        match len {
            0 => return Some(i + 1),
            l if l & 0xc0 == 0xc0 => return Some(i + 2),
            l => i += 1 + l,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_a_compressed_name_is_read() {
        let q = encode(7, "peers.site.test", 1).unwrap();
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 2; // two answers
        for ip in [[10, 0, 0, 2], [10, 0, 0, 3]] {
            a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            a.extend_from_slice(&ip);
        }
        let got = decode(&a, 7, 1).unwrap();
        assert_eq!(
            got,
            vec![IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3])]
        );
        assert!(decode(&a, 8, 1).is_err());
        assert!(decode(&a[..a.len() - 2], 7, 1).is_err());
        assert!(encode(1, "a..b", 1).is_err());
    }
}
