#!/usr/bin/env python3
"""A simulated site (SPEC 10): 1 top gateway, 8 middle gateways and 64 leaves (73 cistern processes on
127.0.x.y loopback addresses). The leaves form 8 groups of 8 site peers; each group's parent is one
middle node, and every middle's parent is the top. Clients at the leaves (asyncio, bounded concurrency)
ask for a few objects of an origin run here that counts its requests.

Checks, and prints: each object crosses the origin link once (counted at the origin) and each middle
node's link once (its `cistern_upstream_fetches_total` and the requests it served, from its /metrics);
wall time, time to first byte (median, p99), peak memory (VmHWM) per node and in total. Exits 1 when a
check fails. Bounded in time (--timeout); not run by CI.

Usage: benches/site-sim.py [--bin target/release/cistern] [--clients 5000] [--objects 20]
                           [--size 262144] [--concurrency 400] [--timeout 300]
Linux only (the whole 127.0.0.0/8 answers on loopback).
"""
import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIDDLES = 8
GROUP = 8


def free_port_everywhere(ips):
    """A TCP port free on every address of `ips`."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        ok = True
        for ip in ips[1:]:
            try:
                with socket.socket() as s:
                    s.bind((ip, port))
            except OSError:
                ok = False
                break
        if ok:
            return port
    sys.exit("no port free on every address")


class Origin:
    """An HTTP/1.1 origin with `objects` fixed bodies; counts GETs per path."""

    def __init__(self, objects, size):
        self.bodies = {f"/obj/{i}.bin": os.urandom(size) for i in range(objects)}
        self.gets = {p: 0 for p in self.bodies}

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                method, target, _ = line.split(" ", 2)
                path = re.sub(r"^https?://[^/]+", "", target)
                body = self.bodies.get(path)
                if body is None:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    if method == "GET":
                        self.gets[path] += 1
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nCache-Control: max-age=3600\r\n"
                        b"ETag: \"%s\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                        % (len(body), path.encode())
                    )
                    if method == "GET":
                        writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


def node_config(d, node_id, listen, origin, parents, peers):
    os.makedirs(d, exist_ok=True)
    lines = [
        "[node]", f'id = "{node_id}"',
        "[server]", f'listen = "{listen}"',
        "[store]", f'dir = "{d}/data"', 'min_free = "0"',
        "[upstream]", f'allowed_origins = ["{origin}"]', f"parents = {parents!r}".replace("'", '"'),
        "[peers]", f"members = {peers!r}".replace("'", '"'),
        "[[origins]]", 'name = "o"', f'url = "http://{origin}"',
        "[log]", 'level = "warn"',
    ]
    path = os.path.join(d, "cistern.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


async def wait_up(addr, deadline):
    host, port = addr.rsplit(":", 1)
    while time.time() < deadline:
        try:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await w.drain()
            data = await r.read()
            w.close()
            if b" 200 " in data.split(b"\r\n", 1)[0]:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    sys.exit(f"{addr} did not come up")


async def fetch(addr, path, timeout=120):
    """GET `path` at `addr`; returns (status, body length, seconds to the first body byte)."""
    host, port = addr.rsplit(":", 1)
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(host, int(port))
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        first = await asyncio.wait_for(r.read(65536), timeout)
        ttfb = time.perf_counter() - t0
        n = len(first)
        while True:
            chunk = await asyncio.wait_for(r.read(1 << 20), timeout)
            if not chunk:
                break
            n += len(chunk)
        return status, n, ttfb
    finally:
        w.close()


async def text(addr, path):
    host, port = addr.rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    w.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    return data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def metric(body, name):
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def main(a):
    tmp = tempfile.mkdtemp(prefix="site-sim-")
    origin = Origin(a.objects, a.size)
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    origin_addr = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    top_ip = "127.0.1.1"
    mid_ips = [f"127.0.2.{i + 1}" for i in range(MIDDLES)]
    leaf_ips = [[f"127.0.{3 + g}.{i + 1}" for i in range(GROUP)] for g in range(MIDDLES)]
    port = free_port_everywhere([top_ip] + mid_ips + [ip for g in leaf_ips for ip in g])
    url = lambda ip: f"http://{ip}:{port}"
    nodes = []  # (role, addr, conf)
    nodes.append(("top", f"{top_ip}:{port}", node_config(f"{tmp}/top", "top", f"{top_ip}:{port}", origin_addr, [], [])))
    for m, ip in enumerate(mid_ips):
        nodes.append((f"mid{m}", f"{ip}:{port}", node_config(f"{tmp}/mid{m}", f"mid{m}", f"{ip}:{port}", origin_addr, [url(top_ip)], [])))
    for g, group in enumerate(leaf_ips):
        members = [url(ip) for ip in group]
        for i, ip in enumerate(group):
            nodes.append((f"leaf{g}.{i}", f"{ip}:{port}", node_config(
                f"{tmp}/leaf{g}-{i}", f"leaf{g}-{i}", f"{ip}:{port}", origin_addr, [url(mid_ips[g])], members)))
    procs = []
    try:
        for role, addr, conf in nodes:
            p = subprocess.Popen(["nice", "-n", "5", a.bin, "serve", "--config", conf],
                                 stdout=subprocess.DEVNULL, stderr=open(conf + ".log", "w"))
            procs.append(p)
        deadline = time.time() + 60
        await asyncio.gather(*(wait_up(addr, deadline) for _, addr, _ in nodes))
        print(f"{len(procs)} nodes up; {a.clients} clients, {a.objects} objects of {a.size} bytes")
        leaves = [addr for role, addr, _ in nodes if role.startswith("leaf")]
        sem = asyncio.Semaphore(a.concurrency)
        rng = random.Random(1)
        asks = [(rng.choice(leaves), rng.randrange(a.objects)) for _ in range(a.clients)]
        # The objects asked in each group: what its middle node should fetch, once each.
        group_of = {addr: int(role[4:].split(".")[0]) for role, addr, _ in nodes if role.startswith("leaf")}
        wanted = [set() for _ in range(MIDDLES)]
        for addr, k in asks:
            wanted[group_of[addr]].add(k)
        ttfbs, failures = [], []

        async def client(addr, k):
            async with sem:
                try:
                    status, n, ttfb = await fetch(addr, f"/o/o/obj/{k}.bin")
                    if status != 200 or n != a.size:
                        failures.append(f"{addr} obj {k}: {status}, {n} bytes")
                    else:
                        ttfbs.append(ttfb)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    failures.append(f"{addr} obj {k}: {e!r}")

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(ad, k) for ad, k in asks)), a.timeout)
        wall = time.perf_counter() - t0
        ok = True
        print(f"wall time {wall:.2f} s; {len(ttfbs)} ok, {len(failures)} failed")
        for f in failures[:5]:
            print("  failed:", f)
        ok &= not failures
        if ttfbs:
            ttfbs.sort()
            p99 = ttfbs[min(len(ttfbs) - 1, int(len(ttfbs) * 0.99))]
            print(f"time to first byte: median {statistics.median(ttfbs) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        over = {p: n for p, n in origin.gets.items() if n > 1}
        asked = sum(1 for n in origin.gets.values() if n)
        print(f"origin: {sum(origin.gets.values())} GETs for {asked} objects asked"
              + (f"; more than once: {over}" if over else " (each once)"))
        ok &= not over
        await asyncio.sleep(0.5)
        for m, (role, addr, _) in enumerate(nodes[1:1 + MIDDLES]):
            body = await text(addr, "/metrics")
            fetches = metric(body, "cistern_upstream_fetches_total")
            served = metric(body, "cistern_requests_total")
            want = len(wanted[m])
            line = f"{role}: {fetches:.0f} upstream transfers, {served:.0f} requests served, {want} objects asked in its group"
            if fetches != want or served != want:
                line += "  <-- more than once per object"
                ok = False
            print(line)
        hwm = [(role, vm_hwm_kib(p.pid)) for (role, _, _), p in zip(nodes, procs)]
        by = lambda prefix: [k for r, k in hwm if r.startswith(prefix)]
        for prefix in ("top", "mid", "leaf"):
            v = by(prefix)
            print(f"peak memory {prefix}: max {max(v) / 1024:.1f} MiB, mean {statistics.mean(v) / 1024:.1f} MiB over {len(v)}")
        print(f"peak memory total: {sum(k for _, k in hwm) / 1024:.1f} MiB")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/cistern")
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--objects", type=int, default=20)
    ap.add_argument("--size", type=int, default=256 * 1024)
    ap.add_argument("--concurrency", type=int, default=400)
    ap.add_argument("--timeout", type=float, default=300)
    sys.exit(asyncio.run(main(ap.parse_args())))
