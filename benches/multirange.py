#!/usr/bin/env python3
"""Multi-range answers, cistern beside nginx: 32 connections, each request asking for 150 random 4 KiB
ranges (ascending, as delta downloaders send them) of one stored 256 MiB object, answered 206
multipart/byteranges.

nginx is a proxy_cache in front of the same origin, and answers multipart from its cache file (its range
filter, sendfile per part); cistern answers from its store (a slice of the object's mapping per part).
Both are warmed with one whole GET first, and each is checked to answer a 150-range request with a 206
multipart whose parts hold the origin's bytes. Prints requests/s and MB/s of each round and the ratio
of the best rounds; exits 1 when cistern is below --min-ratio of nginx (default 1.2).

Usage: benches/multirange.py [--bin target/release/cistern] [--secs 10] [--rounds 3] [--min-ratio 1.2]
Needs nginx, wrk and curl (apt-get install nginx-light wrk curl).
"""
import argparse
import http.client
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SIZE = 256 << 20
RANGES = 150
PART = 4096
CONNS = 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"a server exited at start (port {port})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def wrk(url, secs, script):
    cmd = ["wrk", "-t2", f"-c{CONNS}", f"-d{secs}s", "--timeout", "30s", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    rps = mbps = 0.0
    errors = 0
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        elif line.startswith("Transfer/sec:"):
            v = line.split()[1]
            for unit, mult in (("GB", 1e3), ("MB", 1.0), ("KB", 1e-3)):
                if v.endswith(unit):
                    mbps = float(v[: -len(unit)]) * mult * 1.048576
                    break
        elif line.startswith("Non-2xx") or line.startswith("Socket errors"):
            errors += sum(int(x) for x in line.replace(",", " ").split() if x.isdigit())
    return rps, mbps, errors


def nginx(root, name, body):
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/ptmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
{body}
}}
""")
    return subprocess.Popen(["nginx", "-p", d, "-c", conf, "-g", "daemon off;"])


def ranges(rng):
    """150 ascending 4 KiB ranges, at least a part apart (so that neither server merges them)."""
    starts = sorted(rng.sample(range(0, SIZE // PART - 1, 2), RANGES))
    return [(s * PART, s * PART + PART - 1) for s in starts]


def check(port, path, body):
    """One 150-range request: a 206 multipart whose parts are the origin's bytes."""
    asked = ranges(random.Random(7))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path, headers={"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in asked)})
    r = c.getresponse()
    data = r.read()
    ct = r.getheader("Content-Type", "")
    if r.status != 206 or "multipart/byteranges" not in ct:
        sys.exit(f"port {port}: {r.status} {ct}: not a multipart answer")
    got = [(int(a), int(b)) for a, b in re.findall(rb"Content-Range: bytes (\d+)-(\d+)/", data)]
    if got != asked:
        sys.exit(f"port {port}: parts {got[:3]}... are not the ranges asked")
    for a, b in asked[:10]:
        if body[a:b + 1] not in data:
            sys.exit(f"port {port}: the bytes of {a}-{b} are wrong")
    c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/cistern")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=1.2)
    a = ap.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install nginx-light wrk curl)")
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin}: no binary (cargo build --release)")
    root = tempfile.mkdtemp(prefix="cistern-multirange-bench-")
    procs = []
    try:
        body = os.urandom(SIZE)
        os.makedirs(os.path.join(root, "www"))
        with open(os.path.join(root, "www", "f.bin"), "wb") as f:
            f.write(body)
        o_port, c_port, n_port = free_port(), free_port(), free_port()
        origin = nginx(root, "origin", f"  server {{ listen 127.0.0.1:{o_port}; root {root}/www; }}")
        procs.append(origin)
        wait_port(o_port, origin)
        ngx = nginx(root, "nginx-cache", f"""
  proxy_cache_path {root}/nginx-cache/cache levels=1:2 keys_zone=z:10m max_size=20g inactive=1d
                   use_temp_path=off;
  server {{
    listen 127.0.0.1:{n_port};
    location /o/t/ {{
      proxy_pass http://127.0.0.1:{o_port}/;
      proxy_cache z; proxy_cache_valid 200 1d; proxy_cache_key $uri; proxy_cache_lock on;
      proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}""")
        procs.append(ngx)
        conf = os.path.join(root, "cistern.toml")
        with open(conf, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{c_port}"
[store]
dir = "{root}/data"
min_free = "0"
[upstream]
allowed_origins = ["127.0.0.1:{o_port}"]
[[origins]]
name = "t"
url = "http://127.0.0.1:{o_port}"
immutable = true
[log]
level = "warn"
""")
        gw = subprocess.Popen([a.bin, "serve", "--config", conf])
        procs.append(gw)
        wait_port(c_port, gw)
        wait_port(n_port, ngx)
        for port, hit in ((c_port, "cistern; hit"), (n_port, None)):
            url = f"http://127.0.0.1:{port}/o/t/f.bin"
            for _ in range(2):
                got = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", url],
                                     capture_output=True, text=True).stdout
            if hit and hit not in got:
                sys.exit(f"the object is not a hit through cistern:\n{got}")
            time.sleep(0.5)
            check(port, "/o/t/f.bin", body)
        script = os.path.join(root, "ranges.lua")
        with open(script, "w") as f:
            f.write(f"""
local n, part, slots = {RANGES}, {PART}, {SIZE // PART // 2 - 1}
math.randomseed(42)
request = function()
  local picked, starts = {{}}, {{}}
  while #starts < n do
    local s = math.random(0, slots) * 2
    if not picked[s] then picked[s] = true; starts[#starts + 1] = s end
  end
  table.sort(starts)
  local specs = {{}}
  for i, s in ipairs(starts) do specs[i] = (s * part) .. "-" .. (s * part + part - 1) end
  wrk.headers["Range"] = "bytes=" .. table.concat(specs, ",")
  return wrk.format(nil)
end
""")
        best = {"cistern": (0.0, 0.0), "nginx": (0.0, 0.0)}
        print(f"multi-range: {RANGES} x 4 KiB ranges of a stored 256 MiB object per request, "
              f"{CONNS} connections, {a.secs} s per round, wrk -t2")
        for r in range(a.rounds):
            for label, port in (("cistern", c_port), ("nginx", n_port)):
                rps, mbps, errors = wrk(f"http://127.0.0.1:{port}/o/t/f.bin", a.secs, script)
                print(f"  round {r + 1} {label:8} {rps:10.1f} req/s {mbps:9.1f} MB/s  errors {errors}",
                      flush=True)
                if errors:
                    sys.exit(f"{label}: {errors} errors")
                if rps > best[label][0]:
                    best[label] = (rps, mbps)
        ratio = best["cistern"][0] / best["nginx"][0] if best["nginx"][0] else 0.0
        print(f"best: cistern {best['cistern'][0]:.1f} req/s, nginx {best['nginx'][0]:.1f} req/s, "
              f"c/nginx {ratio:.2f}")
        if ratio < a.min_ratio:
            sys.exit(f"cistern is below {a.min_ratio}x nginx")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
