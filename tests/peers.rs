//! Site peers (SPEC 10): five nodes on 127.0.0.2..6 sharing one cache. Each object crosses the origin
//! link once and is stored on one node only (its owner); a member that stops moves only its objects, and
//! serves them from its disk again when it is back; nodes that disagree on the members do not loop; a
//! node whose peers are all down works alone; members from DNS (a dnsmasq the test runs) follow the
//! records.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

/// Objects in the CI test; `PEERS_OBJECTS=1000` for a larger run by hand.
fn objects_n() -> usize {
    std::env::var("PEERS_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
/// Requests in flight at once.
const CONCURRENCY: usize = 16;

/// A free port on a loopback address of its own (127.0.0.`last`).
fn free_addr(last: u8) -> SocketAddr {
    let l = std::net::TcpListener::bind(("127.0.0.".to_string() + &last.to_string(), 0)).unwrap();
    l.local_addr().unwrap()
}

fn path(i: usize) -> String {
    format!("/fw/{i}.bin")
}

/// Fresh for an hour: served from a store without asking again.
fn fresh() -> Behaviour {
    Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    }
}

/// Object `i` came whole and right.
fn assert_object(i: usize, got: &Got) {
    got.assert_whole(&format!("object {i}"), &body(i));
}

fn body(i: usize) -> Bytes {
    random_bytes(2048 + i, i as u64 + 1)
}

/// A node at `addr` whose peers are `members`, named `peer-<n>`.
async fn peer_node(origin: &Origin, addr: SocketAddr, members: &[String], n: usize) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), origin, "");
    cfg.node.id = format!("peer-{n}");
    cfg.server.listen = addr.to_string();
    cfg.peers.members = members.to_vec();
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    node
}

/// `n` nodes on 127.0.0.2.., each listing all of them as members.
async fn site(origin: &Origin, n: usize) -> (Vec<Node>, Vec<String>) {
    let addrs: Vec<SocketAddr> = (0..n).map(|i| free_addr(2 + i as u8)).collect();
    let members: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        nodes.push(peer_node(origin, *a, &members, i).await);
    }
    (nodes, members)
}

/// Asks for each of `objects` at the node `pick` gives, CONCURRENCY at a time; every answer must be the
/// object's bytes.
async fn ask_all(nodes: &[&Node], objects: &[usize], pick: impl Fn(usize) -> usize) {
    let end = Instant::now() + Duration::from_secs(60);
    for chunk in objects.chunks(CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let url = nodes[pick(i) % nodes.len()].url(&format!("/o/t{}", path(i)));
            set.spawn(async move { (i, get(&url).await) });
        }
        while let Some(r) = set.join_next().await {
            let (i, got) = r.unwrap();
            assert_object(i, &got);
        }
        assert!(Instant::now() < end, "the requests took over a minute");
    }
}

/// Which nodes hold each object (by digest hex).
fn holders(nodes: &[&Node]) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (n, node) in nodes.iter().enumerate() {
        for b in node.blobs() {
            out.entry(b).or_default().push(n);
        }
    }
    out
}

/// Waits until every object of `objects` is stored on exactly one of `nodes`; returns where.
async fn stored_once(nodes: &[&Node], objects: &[usize]) -> HashMap<usize, usize> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let h = holders(nodes);
        let at: Vec<Option<&Vec<usize>>> = objects
            .iter()
            .map(|&i| h.get(&sha256_hex(&body(i))))
            .collect();
        if at.iter().all(|a| a.is_some_and(|v| v.len() == 1)) {
            return objects
                .iter()
                .zip(at)
                .map(|(&i, a)| (i, a.unwrap()[0]))
                .collect();
        }
        if Instant::now() > end {
            let bad: Vec<_> = objects
                .iter()
                .zip(&at)
                .filter(|(_, a)| a.is_none_or(|v| v.len() != 1))
                .take(5)
                .collect();
            panic!("objects not stored exactly once: {bad:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pseudo-random node for request `i` of round `round`.
fn scatter(round: usize) -> impl Fn(usize) -> usize {
    move |i| (i * 7919 + round * 104_729) ^ (i >> 3)
}

fn peers_json(node: &Node) -> impl std::future::Future<Output = serde_json::Value> {
    let url = node.url("/v1/peers");
    async move { get(&url).await.json() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_object_crosses_once_lives_on_one_node_and_moves_only_with_its_owner() {
    let origin = Origin::start().await;
    let objects: Vec<usize> = (0..objects_n()).collect();
    for &i in &objects {
        origin.put(&path(i), body(i), fresh());
    }
    let (mut nodes, members) = site(&origin, 5).await;
    let all: Vec<&Node> = nodes.iter().collect();
    // Twice, each time at other nodes: the second round is served by the owners' stores.
    ask_all(&all, &objects, scatter(0)).await;
    ask_all(&all, &objects, scatter(1)).await;
    for &i in &objects {
        if origin.gets(&path(i)) != 1 {
            for (m, h) in origin.requests(&path(i)) {
                eprintln!("{m} {:?} {:?}", h.get("via"), h.get("cistern-peer"));
            }
        }
        assert_eq!(
            origin.gets(&path(i)),
            1,
            "object {i} crossed the origin link again"
        );
    }
    let owner = stored_once(&all, &objects).await;
    let mut per_node = [0usize; 5];
    for n in owner.values() {
        per_node[*n] += 1;
    }
    eprintln!("objects per node: {per_node:?}");
    assert!(
        per_node.iter().all(|&c| c > objects.len() / 10),
        "uneven: {per_node:?}"
    );
    let p = peers_json(&nodes[0]).await;
    assert_eq!(p["members"].as_array().unwrap().len(), 5, "{p}");
    let sent: u64 = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sent_ok"].as_u64().unwrap())
        .sum();
    assert!(sent > 0, "{p}");

    // Node 2 stops: only its objects move, each fetched from the origin once more.
    let gone = 2;
    nodes[gone].stop().await;
    let live: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != gone)
        .map(|(_, x)| x)
        .collect();
    ask_all(&live, &objects, scatter(2)).await;
    ask_all(&live, &objects, scatter(3)).await;
    let moved: Vec<usize> = objects
        .iter()
        .copied()
        .filter(|i| owner[i] == gone)
        .collect();
    for &i in &objects {
        let want = if owner[&i] == gone { 2 } else { 1 };
        assert_eq!(
            origin.gets(&path(i)),
            want,
            "object {i} (owner {})",
            owner[&i]
        );
    }
    let now = stored_once(&live, &moved).await;
    assert_eq!(now.len(), moved.len());
    let m = get(&nodes[0].url("/metrics")).await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    let down = format!("cistern_peer_up{{peer=\"{}/\"}} 0", members[gone]);
    assert!(text.contains(&down), "{down} not in metrics");

    // Back: its objects are served from its disk again, none from the origin.
    nodes[gone].restart().await;
    let end = Instant::now() + Duration::from_secs(15);
    for n in [0, 1, 3, 4] {
        loop {
            let p = peers_json(&nodes[n]).await;
            if p["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["up"] == true)
            {
                break;
            }
            assert!(Instant::now() < end, "node {gone} not seen up again: {p}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let others: Vec<&Node> = [0, 1, 3, 4].iter().map(|&n| &nodes[n]).collect();
    // Asked at nodes that never held them.
    // (`others` is `live`: the node after the one that holds it never did.)
    ask_all(&others, &moved, |i| now[&i] + 1).await;
    for &i in &moved {
        assert_eq!(origin.gets(&path(i)), 2, "object {i} fetched again");
    }
    let p = peers_json(&nodes[gone]).await;
    let served: u64 = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["served"].as_u64().unwrap())
        .sum();
    assert!(served > 0, "node {gone} served nothing from its disk: {p}");
    for n in &mut nodes {
        n.stop().await;
    }
}

/// Two nodes that name each other differently rank members differently: for some keys each takes the
/// other for the owner. A request from a peer never goes to another peer, so asking both at once for
/// such keys ends at the origin, quickly, with neither marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_with_different_member_lists_do_not_loop() {
    use cistern::fetch::key::cache_key;
    use cistern::fetch::upstream::rendezvous::owner;
    let origin = Origin::start().await;
    let (a, b) = (free_addr(2), free_addr(3));
    let a_list = vec![format!("http://{a}"), format!("http://{b}")];
    // B names A with a path: another member name, the same node.
    let b_list = vec![format!("http://{a}/a"), format!("http://{b}")];
    let hashed = |l: &[String]| -> Vec<String> {
        l.iter()
            .map(|u| u.parse::<http::Uri>().unwrap().to_string())
            .collect()
    };
    let (ha, hb) = (hashed(&a_list), hashed(&b_list));
    let crossed: Vec<usize> = (0..400)
        .filter(|&i| {
            let url: http::Uri = format!("{}{}", origin.url(), path(i)).parse().unwrap();
            let k = cache_key(&url, &[]);
            owner(&ha, &k) == Some(ha[1].as_str()) && owner(&hb, &k) == Some(hb[0].as_str())
        })
        .take(20)
        .collect();
    assert!(
        crossed.len() >= 10,
        "too few keys that each takes the other to own"
    );
    for &i in &crossed {
        origin.put(&path(i), body(i), fresh());
    }
    let na = peer_node(&origin, a, &a_list, 0).await;
    let nb = peer_node(&origin, b, &b_list, 1).await;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for &i in &crossed {
        for n in [&na, &nb] {
            let url = n.url(&format!("/o/t{}", path(i)));
            set.spawn(async move { (i, get(&url).await) });
        }
    }
    while let Some(r) = set.join_next().await {
        let (i, got) = r.unwrap();
        assert_object(i, &got);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: requests waited on each other"
    );
    for n in [&na, &nb] {
        let p = peers_json(n).await;
        let all_up = p["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["up"] == true);
        assert!(all_up, "a peer was marked down: {p}");
    }
    for &i in &crossed {
        let gets = origin.gets(&path(i));
        assert!(
            (1..=2).contains(&gets),
            "object {i}: {gets} origin requests"
        );
    }
    // Asked again, each node answers without the origin: one holds it, the other asks it.
    let before: usize = crossed.iter().map(|&i| origin.gets(&path(i))).sum();
    for &i in &crossed {
        for n in [&na, &nb] {
            assert!(get(&n.url(&format!("/o/t{}", path(i)))).await.body == body(i));
        }
    }
    let after: usize = crossed.iter().map(|&i| origin.gets(&path(i))).sum();
    assert_eq!(before, after);
    // A peer is asked only for what this node may fetch itself: another origin is refused here, and
    // no peer hears of it.
    async fn served(nodes: [&Node; 2]) -> u64 {
        let mut n = 0;
        for node in nodes {
            let p = peers_json(node).await;
            n += p["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["served"].as_u64().unwrap())
                .sum::<u64>();
        }
        n
    }
    let before = served([&na, &nb]).await;
    assert!(before > 0, "the peers served each other nothing");
    let other = Origin::start().await;
    // A path that A takes B to own: A would send it to B if it did not check first.
    let x = (0..)
        .map(|j| format!("/x{j}.bin"))
        .find(|p| {
            let url: http::Uri = format!("{}{p}", other.url()).parse().unwrap();
            owner(&ha, &cache_key(&url, &[])) == Some(ha[1].as_str())
        })
        .unwrap();
    other.put(&x, body(1), fresh());
    for n in [&na, &nb] {
        let got = proxy_get(n.addr, &format!("{}{x}", other.url()), &[]).await;
        assert_eq!(got.status, 403, "{}", String::from_utf8_lossy(&got.body));
    }
    assert_eq!(other.gets(&x), 0);
    assert_eq!(served([&na, &nb]).await, before);
}

/// A node whose peers are all down works alone: every object from the origin once, stored here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_peer_down_a_node_works_alone() {
    let origin = Origin::start().await;
    let me = free_addr(2);
    let members = vec![
        format!("http://{me}"),
        format!("http://{}", free_addr(3)),
        format!("http://{}", free_addr(4)),
    ];
    let node = peer_node(&origin, me, &members, 0).await;
    let objects: Vec<usize> = (0..40).collect();
    for &i in &objects {
        origin.put(&path(i), body(i), fresh());
    }
    let started = Instant::now();
    ask_all(&[&node], &objects, |_| 0).await;
    ask_all(&[&node], &objects, |_| 0).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    for &i in &objects {
        assert_eq!(origin.gets(&path(i)), 1, "object {i}");
    }
    stored_once(&[&node], &objects).await;
    let p = peers_json(&node).await;
    let down = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["up"] == false)
        .count();
    assert_eq!(down, 2, "{p}");
    // The dashboard's table of peers.
    let page = get(&node.url("/")).await;
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("Site peers") && html.contains("<td>this node</td>"));
    assert_eq!(html.matches("<td>down</td>").count(), 2, "{html}");
}
