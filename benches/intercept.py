#!/usr/bin/env python3
"""HTTPS hits through interception, cistern beside Squid with ssl-bump, in one run.

A stored 1 MiB object fetched by 64 clients at once through each proxy (`--proxy`, CONNECT to an https
origin), every request on a connection of its own: a new CONNECT tunnel and a new TLS session (curl
with `Connection: close` and no session id cache), so each hit pays the proxy's TLS handshake as a
device downloading one update file does. Both proxies terminate TLS with the same site CA (made with
`cistern ca init`) and verify the origin against the same origin CA. Prints requests/s and MB/s of each,
their ratio, and the per-handshake cost (median of `time_appconnect - time_connect` over sequential
requests of a 1-byte stored object: the CONNECT round trip plus the TLS handshake with the proxy).
Exits 1 when cistern is below --min-ratio of Squid (default 1.5).

  cistern  release build, server.intercept with the site CA, the origin allowed by its address.
  squid    Debian's squid-openssl, one process (-N), `ssl_bump bump all` with the same CA
           (generate-host-certificates, security_file_certgen), a ufs cache_dir of 2 GB, cache_mem 64 MB
           (its default object limit in memory, 512 KB: the 1 MiB hit is read from the cache_dir, as
           cistern reads its store), refresh_pattern caching everything for a day.

The origin is nginx on 127.0.0.2:443 (a loopback address of its own, so that the CONNECT target is
port 443 as both proxies require) with a certificate for that address. Clients are curl processes;
they skip verifying the proxies' certificates (`-k`, the same for both), since Squid's mimicked
certificate for an address-literal host carries no address name; the handshakes are complete either way.

Usage: benches/intercept.py [--bin target/release/cistern] [--requests 20] [--min-ratio 1.5]
Needs root (port 443), nginx, openssl, curl and squid-openssl (apt-get install nginx-light openssl
curl squid-openssl).
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ORIGIN = "127.0.0.2"
OBJECT = 1 << 20
CONNS = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, proc, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"a server exited at start (port {port})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {host}:{port}")


def run(cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def origin(d):
    """nginx on 127.0.0.2:443 with a certificate of an origin CA, serving f1m and tiny for a day."""
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", f"{d}/origin-ca.key", "-out", f"{d}/origin-ca.pem", "-days", "2",
         "-subj", "/CN=bench origin CA", "-addext", "basicConstraints=critical,CA:TRUE"])
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", f"{d}/origin.key", "-out", f"{d}/origin.csr", "-subj", f"/CN={ORIGIN}"])
    with open(f"{d}/origin.ext", "w") as f:
        f.write(f"subjectAltName=IP:{ORIGIN}\n")
    run(["openssl", "x509", "-req", "-in", f"{d}/origin.csr", "-CA", f"{d}/origin-ca.pem", "-CAkey",
         f"{d}/origin-ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{d}/origin.ext",
         "-out", f"{d}/origin.pem"])
    os.makedirs(f"{d}/www")
    with open(f"{d}/www/f1m", "wb") as f:
        f.write(os.urandom(OBJECT))
    with open(f"{d}/www/tiny", "wb") as f:
        f.write(b"x")
    conf = f"""user root; worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen {ORIGIN}:443 ssl; ssl_certificate {d}/origin.pem;
  ssl_certificate_key {d}/origin.key; root {d}/www; add_header Cache-Control "max-age=86400"; }} }}
"""
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = subprocess.Popen([nginx, "-c", f"{d}/nginx.conf"], stderr=subprocess.DEVNULL)
    wait_port(ORIGIN, 443, p)
    return p


def cistern(d, binary):
    run([binary, "ca", "init", "--out", f"{d}/site"])
    port = free_port()
    with open(f"{d}/cistern.toml", "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
allow_connect = true
intercept = true
intercept_ca_cert = "{d}/site/ca.pem"
intercept_ca_key = "{d}/site/ca.key"
max_connections = 10000
[store]
dir = "{d}/cistern-data"
min_free = "0"
[upstream]
allowed_origins = ["{ORIGIN}"]
ca_file = "{d}/origin-ca.pem"
[log]
level = "warn"
""")
    p = subprocess.Popen([binary, "serve", "--config", f"{d}/cistern.toml"],
                         stderr=open(f"{d}/cistern.log", "w"))
    wait_port("127.0.0.1", port, p)
    return p, port


def squid(d):
    """squid-openssl with ssl-bump, the site CA copied for its user (proxy)."""
    s = f"{d}/squid"
    os.makedirs(s)
    shutil.copy(f"{d}/site/ca.pem", f"{s}/ca.pem")
    shutil.copy(f"{d}/site/ca.key", f"{s}/ca.key")
    shutil.copy(f"{d}/origin-ca.pem", f"{s}/origin-ca.pem")
    certgen = "/usr/lib/squid/security_file_certgen"
    run([certgen, "-c", "-s", f"{s}/ssl_db", "-M", "16MB"])
    port = free_port()
    with open(f"{s}/squid.conf", "w") as f:
        f.write(f"""http_port 127.0.0.1:{port} ssl-bump tls-cert={s}/ca.pem tls-key={s}/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {certgen} -s {s}/ssl_db -M 16MB
sslcrtd_children 8 startup=2 idle=1
ssl_bump bump all
tls_outgoing_options cafile={s}/origin-ca.pem
http_access allow all
cache_dir ufs {s}/cache 2000 16 256
maximum_object_size 1 GB
cache_mem 64 MB
refresh_pattern . 1440 100% 1440
pid_filename {s}/squid.pid
cache_log {s}/cache.log
access_log none
coredump_dir {s}
""")
    os.chmod(d, 0o711)
    run(["chown", "-R", "proxy:proxy", s])
    run(["squid", "-N", "-z", "-f", f"{s}/squid.conf"])
    p = subprocess.Popen(["squid", "-N", "-f", f"{s}/squid.conf"], stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, p)
    return p, port


def curl(port, path, extra=()):
    return ["curl", "-sk", "--proxy", f"http://127.0.0.1:{port}", "--no-sessionid",
            "-H", "Connection: close", *extra, f"https://{ORIGIN}/{path}"]


def warm(port):
    for _ in range(3):
        for path in ("f1m", "tiny"):
            subprocess.run(curl(port, path, ["-o", "/dev/null"]), check=True)
    head = subprocess.run(curl(port, "f1m", ["-D", "-", "-o", "/dev/null"]), check=True,
                          capture_output=True, text=True).stdout
    return [line for line in head.splitlines() if line.lower().startswith(("cache-status", "x-cache:"))]


def load(port, requests):
    """64 curl processes at once, each `requests` sequential 1 MiB hits, each on a new connection."""
    base = curl(port, "f1m", ["-w", "%{http_code}\\n"])
    url = base.pop()
    # One process, `requests` URLs: curl opens a connection (tunnel, TLS session) per URL.
    argv = base + sum((["-o", "/dev/null", url] for _ in range(requests)), [])
    t = time.time()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(CONNS)]
    codes = [p.communicate()[0].split() for p in procs]
    wall = time.time() - t
    ok = sum(c == "200" for cs in codes for c in cs)
    n = CONNS * requests
    return n / wall, n * OBJECT / wall / 1e6, n - ok


def handshake_ms(port, n=60):
    out = []
    for _ in range(n):
        r = subprocess.run(curl(port, "tiny", ["-o", "/dev/null", "-w", "%{time_connect} %{time_appconnect}"]),
                           capture_output=True, text=True, check=True).stdout.split()
        out.append((float(r[1]) - float(r[0])) * 1000)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/cistern")
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per client")
    ap.add_argument("--min-ratio", type=float, default=1.5)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="cistern-intercept-bench-")
    procs = []
    try:
        procs.append(origin(d))
        c, cport = cistern(d, os.path.abspath(a.bin))
        procs.append(c)
        s, sport = squid(d)
        procs.append(s)
        results = {}
        for name, port in (("cistern", cport), ("squid", sport)):
            print(f"{name}: warm, second answer {warm(port)}")
            hs = handshake_ms(port)
            rps, mbs, errors = load(port, a.requests)
            results[name] = (rps, mbs, errors, hs)
            print(f"{name:8} 1MiB x{CONNS}c new TLS session each: {rps:8.1f} req/s {mbs:8.1f} MB/s "
                  f"errors {errors}  handshake (CONNECT + TLS) median {hs:.2f} ms")
        ratio = results["cistern"][0] / results["squid"][0]
        print(f"cistern/squid: {ratio:.2f}x requests/s (needs {a.min_ratio}x)")
        return 0 if ratio >= a.min_ratio and not any(r[2] for r in results.values()) else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
