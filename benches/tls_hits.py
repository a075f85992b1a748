#!/usr/bin/env python3
"""HTTPS hits, cistern beside nginx: one stored 1 MiB object fetched over TLS by wrk with 64 connections.

Both serve the very same bytes with the very same certificate (ECDSA P-256, made here with openssl):
nginx serves cistern's stored blob file as a static file (`ssl_certificate` the same PEM files), so the
figures compare the TLS data paths and nothing else. Prints requests/s and MB/s of each round and the
ratio of the best rounds; exits 1 when cistern is below --min-ratio of nginx (default 0.9).

Usage: benches/tls_hits.py [--bin target/release/cistern] [--secs 10] [--rounds 3] [--min-ratio 0.9]
Needs nginx, wrk, openssl and curl (apt-get install nginx-light wrk openssl curl).
"""
import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


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


def wrk(url, conns, secs):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--timeout", "30s", url]
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
        f.write(f"""user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
{body}
}}
""")
    p = subprocess.Popen(["nginx", "-p", d, "-c", conf, "-g", "daemon off;"])
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/cistern")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--min-ratio", type=float, default=0.9)
    a = ap.parse_args()
    for tool in ("nginx", "wrk", "openssl", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install nginx-light wrk openssl curl)")
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin}: no binary (cargo build --release)")
    root = tempfile.mkdtemp(prefix="cistern-tls-bench-")
    procs = []
    try:
        cert, key = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
        body = os.urandom(1 << 20)
        os.makedirs(os.path.join(root, "www"))
        with open(os.path.join(root, "www", "f.bin"), "wb") as f:
            f.write(body)
        o_port, c_port, n_port = free_port(), free_port(), free_port()
        origin = nginx(root, "origin", f"  server {{ listen 127.0.0.1:{o_port}; root {root}/www; }}")
        procs.append(origin)
        wait_port(o_port, origin)
        conf = os.path.join(root, "cistern.toml")
        with open(conf, "w") as f:
            f.write(f"""[server]
listen = ""
tls_listen = "127.0.0.1:{c_port}"
tls_cert = "{cert}"
tls_key = "{key}"
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
        url_c = f"https://127.0.0.1:{c_port}/o/t/f.bin"
        for _ in range(2):
            got = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-D", "-", url_c],
                                 capture_output=True, text=True).stdout
        if "cistern; hit" not in got:
            sys.exit(f"the object is not a hit through cistern:\n{got}")
        hexd = hashlib.sha256(body).hexdigest()
        blob = os.path.join(root, "data", "sha256", hexd[:2], hexd)
        if not os.path.exists(blob):
            sys.exit(f"no stored blob at {blob}")
        ngx = nginx(root, "nginx-tls", f"""  server {{
    listen 127.0.0.1:{n_port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.3; ssl_session_cache shared:s:10m;
    location = /f.bin {{ alias {blob}; }}
  }}""")
        procs.append(ngx)
        wait_port(n_port, ngx)
        url_n = f"https://127.0.0.1:{n_port}/f.bin"
        best = {"cistern": (0.0, 0.0), "nginx": (0.0, 0.0)}
        print(f"HTTPS hits: 1 MiB x {a.conns} connections, {a.secs} s per round, wrk -t2")
        for r in range(a.rounds):
            for label, url in (("cistern", url_c), ("nginx", url_n)):
                rps, mbps, errors = wrk(url, a.conns, a.secs)
                print(f"  round {r + 1} {label:8} {rps:10.1f} req/s {mbps:9.1f} MB/s  errors {errors}")
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
