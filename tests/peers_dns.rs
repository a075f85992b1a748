//! Site peers from DNS (SPEC 10 `peers.dns`): a dnsmasq run by the test on a loopback port answers for
//! the site's name from a hosts file; the nodes ask it directly (`peers.resolver`, a field only tests
//! set: the system resolver's configuration is not the test's to change). A record removed while
//! clients run: that member leaves, and only the objects it owned move.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

const NAME: &str = "peers.site.test";
const NODES: usize = 4;
const OBJECTS: usize = 80;

/// dnsmasq on 127.0.0.1:<port>, answering NAME from `hosts` only; killed on drop.
struct Dns {
    child: Child,
    addr: SocketAddr,
    hosts: std::path::PathBuf,
}

impl Dns {
    fn start(dir: &std::path::Path, ips: &[String]) -> Dns {
        let hosts = dir.join("hosts");
        let addr = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // Written before the start: a SIGHUP before dnsmasq handles it would end it.
        std::fs::write(&hosts, records(ips)).unwrap();
        Dns {
            child: Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .args(["--listen-address=127.0.0.1", "--user=root", "--pid-file="])
                .arg(format!("--port={}", addr.port()))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            addr,
            hosts,
        }
    }

    /// Writes the records and has dnsmasq read them again (SIGHUP).
    fn set(&self, ips: &[String]) {
        std::fs::write(&self.hosts, records(ips)).unwrap();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }
}

fn records(ips: &[String]) -> String {
    ips.iter().map(|ip| format!("{ip} {NAME}\n")).collect()
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One port free on 127.0.0.2 .. 127.0.0.(1+n).
fn common_port(n: usize) -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let free =
            (3..2 + n).all(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:{port}")).is_ok());
        if free {
            return port;
        }
    }
}

fn path(i: usize) -> String {
    format!("/dns/{i}.bin")
}

fn body(i: usize) -> Bytes {
    random_bytes(1024 + i, 7000 + i as u64)
}

async fn members(node: &Node) -> (usize, serde_json::Value) {
    let p = get(&node.url("/v1/peers")).await.json();
    (p["members"].as_array().map_or(0, |m| m.len()), p)
}

async fn wait_members(nodes: &[&Node], n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    for node in nodes {
        loop {
            let (got, p) = members(node).await;
            if got == n {
                break;
            }
            assert!(Instant::now() < end, "{} members expected: {p}", n);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn ask(node: &Node, i: usize) {
    let got = get(&node.url(&format!("/o/t{}", path(i)))).await;
    got.assert_whole(&format!("object {i}"), &body(i));
}

/// Which node holds object `i`, waiting for its commit; panics unless exactly one does.
async fn holder(nodes: &[&Node], i: usize) -> usize {
    let hex = sha256_hex(&body(i));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let at: Vec<usize> = (0..nodes.len())
            .filter(|&n| nodes[n].blobs().contains(&hex))
            .collect();
        if at.len() == 1 {
            return at[0];
        }
        assert!(Instant::now() < end, "object {i} held by {at:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_follow_the_dns_records_and_a_removed_one_moves_only_its_keys() {
    if !have("dnsmasq", "CISTERN_REQUIRE_DNSMASQ") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ips: Vec<String> = (0..NODES).map(|i| format!("127.0.0.{}", 2 + i)).collect();
    let dns = Dns::start(tmp.path(), &ips);
    let origin = Origin::start().await;
    for i in 0..OBJECTS {
        let b = Behaviour {
            cache_control: Some("max-age=3600".into()),
            ..Default::default()
        };
        origin.put(&path(i), body(i), b);
    }
    let port = common_port(NODES);
    let mut nodes = Vec::new();
    for (n, ip) in ips.iter().enumerate() {
        let dir = tmp.path().join(format!("n{n}"));
        let mut cfg = config(&dir, &origin, "");
        cfg.node.id = format!("dns-peer-{n}");
        cfg.server.listen = format!("{ip}:{port}");
        cfg.peers.dns = format!("{NAME}:{port}");
        cfg.peers.refresh = cistern::config::Span::secs(1);
        cfg.peers.resolver = Some(dns.addr);
        nodes.push(Node::start_with(cfg).await);
    }
    let all: Vec<&Node> = nodes.iter().collect();
    wait_members(&all, NODES).await;
    for n in &all {
        let (_, p) = members(n).await;
        let me = p["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["self"] == true)
            .count();
        assert_eq!(me, 1, "each node finds itself among the addresses: {p}");
    }
    for i in 0..OBJECTS {
        ask(all[(i * 3) % NODES], i).await;
    }
    let mut owner = Vec::new();
    for i in 0..OBJECTS {
        assert_eq!(origin.gets(&path(i)), 1, "object {i}");
        owner.push(holder(&all, i).await);
    }

    // Clients keep asking at the first three while the last node's record goes.
    let gone = NODES - 1;
    let urls: Vec<Vec<String>> = (0..OBJECTS)
        .map(|i| {
            all[..gone]
                .iter()
                .map(|n| n.url(&format!("/o/t{}", path(i))))
                .collect()
        })
        .collect();
    let clients = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(4);
        let mut k = 0usize;
        while Instant::now() < end {
            let i = k % OBJECTS;
            let got = get(&urls[i][k % urls[i].len()]).await;
            assert_eq!(got.status, 200);
            assert!(got.body == body(i));
            k += 1;
        }
        k
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    dns.set(&ips[..gone]);
    wait_members(&all, gone).await;
    let asked = clients.await.unwrap();
    assert!(asked > OBJECTS, "the clients asked only {asked} times");
    for i in 0..OBJECTS {
        ask(all[(i + 1) % gone], i).await;
    }
    for (i, &o) in owner.iter().enumerate() {
        let want = if o == gone { 2 } else { 1 };
        assert_eq!(origin.gets(&path(i)), want, "object {i} (owner {o})");
    }
    // The node that left counts every object it holds as moved; those that stay count at most the
    // objects that came to them from it (stored before their own view changed), none of their own.
    let held = owner.iter().filter(|&&o| o == gone).count() as u64;
    assert!(held > 0);
    let mut came = [0u64; NODES];
    for i in (0..OBJECTS).filter(|&i| owner[i] == gone) {
        came[holder(&all[..gone], i).await] += 1;
    }
    for (n, node) in all.iter().enumerate() {
        let (_, p) = members(node).await;
        let moved = p["keys_moved"].as_u64().unwrap();
        match n == gone {
            true => assert_eq!(moved, held, "node {n}: {p}"),
            false => assert!(moved <= came[n], "node {n} ({} came): {p}", came[n]),
        }
    }
    for n in &mut nodes {
        n.stop().await;
    }
}
