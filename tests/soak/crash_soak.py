#!/usr/bin/env python3
"""Crash soak for cistern: SIGKILL at random moments under load, then the store and the status relay
checked against what clients were told (SPEC 4 "Atomic and durable", SPEC 5 "202 only after the
reports are durably written").

Each cycle starts `cistern serve` on a fresh port over one persistent store, recovers it, checks it,
runs fan-out downloads (several clients on a few objects, some with Range) from a slow local origin,
status posts, and pins, unpins and invalidations (a POST to a stored URL, RFC 9111 section 4.4), and
kills the process with SIGKILL at a random moment (now and then during its start, before it is
ready). After each restart:
  - no temp file is left; every blob under sha256/ hashes to its name and its .meta parses and
    describes it; the admin listing and the files agree; sampled objects are served whole and right;
  - every report that was answered 202 is in its device's history, once;
  - every acknowledged pin or unpin holds, and no acknowledged invalidation is undone.
During the load, every body that a client received complete (its whole Content-Length, or the whole
range of its Content-Range) must equal the origin's bytes. At the end every acknowledged report is
checked again and the node is stopped with SIGTERM, which must exit 0.

Standard library only. Exit status 0 when nothing was lost or corrupt, 1 otherwise.

    tests/soak/crash_soak.py [--cycles 200] [--max-seconds 600] [--bin target/release/cistern]
"""

import argparse
import base64
import hashlib
import http.client
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RATE = 6 << 20  # origin bytes per second per response: kills land in the middle of transfers
NEW_PER_CYCLE = 4  # objects no cycle asked for before
OLD_PER_CYCLE = 2  # objects of earlier cycles: hits, or fetched again once evicted
DOWNLOADERS = 8
POSTERS = 3
DEVICES_PER_CYCLE = 10
PINNABLE = 8  # small sideloaded objects whose pin is switched on and off
INVALIDATED = 4  # origin objects stored, then invalidated by a POST
HTTP_TIMEOUT = 10


# ---- the origin ------------------------------------------------------------------------------


def size_of(name):
    """16 KiB to 3 MiB, fixed per name."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return (16 << 10) + h % (3 << 20)


@lru_cache(maxsize=64)
def content(name):
    """The bytes the origin serves for a name (deterministic)."""
    return hashlib.shake_256(name.encode()).digest(size_of(name))


class OriginHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of /<name>, with Range (`a-b`, `a-`) and a strong ETag, paced at RATE."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def do_POST(self):
        """An unsafe request: answered 200, so that cistern invalidates what it stored for the URL."""
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def answer(self, body):
        name = self.path.lstrip("/")
        data = content(name)
        digest = hashlib.sha256(data).digest()
        etag = '"%s"' % digest.hex()
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if rng.startswith("bytes=") and (if_range is None or if_range == etag):
            a, _, b = rng[6:].partition("-")
            if a.isdigit() and int(a) < len(data):
                start, status = int(a), 206
                if b.isdigit():
                    end = min(int(b), len(data) - 1)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Cache-Control", "max-age=86400")
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))
        if digest[0] % 2 == 0:
            # Half of the objects say their digest (RFC 9530), the others are hashed as they come.
            self.send_header("Repr-Digest", "sha-256=:%s:" % base64.b64encode(digest).decode())
        self.end_headers()
        if body:
            self.pace(data[start : end + 1])

    def pace(self, data):
        step = 64 << 10
        try:
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                time.sleep(step / RATE)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class OriginServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A killed node resets its idle connections to the origin: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def start_origin():
    srv = OriginServer(("127.0.0.1", 0), OriginHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# ---- the node --------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """cistern processes, one after another, on one store directory."""

    def __init__(self, binary, work, origin_port):
        self.binary, self.work, self.origin_port = binary, work, origin_port
        self.data = work / "data"
        self.log = open(work / "cistern.log", "ab")
        self.proc, self.port = None, None

    def spawn(self):
        self.port = free_port()
        conf = self.work / "cistern.toml"
        conf.write_text(
            "[node]\nid = \"soak\"\n"
            '[server]\nlisten = "127.0.0.1:%d"\nshutdown_grace = "2s"\n'
            '[store]\ndir = "%s"\nmin_free = "0"\nmax_size = "40MiB"\n'
            '[upstream]\nallowed_origins = []\nidle_timeout = "5s"\nretries = 3\n'
            '[[origins]]\nname = "t"\nurl = "http://127.0.0.1:%d"\n'
            "[status]\nhistory_per_device = 10000\n"
            '[log]\nlevel = "warn"\n' % (self.port, self.data, self.origin_port)
        )
        env = {
            k: v for k, v in os.environ.items() if k != "FAILPOINTS" and not k.startswith("CISTERN_")
        }
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=env,
        )

    def wait_ready(self, secs=30):
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                why = "cistern exited at start with %s (see %s)"
                raise SystemExit(why % (self.proc.returncode, self.log.name))
            try:
                if request(self.port, "GET", "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit("cistern not ready within %ds (see %s)" % (secs, self.log.name))

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        """SIGTERM: a graceful stop must exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()
            return "no exit within 30 s"


def request(port, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT):
    """One request on a fresh connection: (status, headers, body). Raises OSError (and
    http.client's errors, which are OSError or HTTPException) when the body is cut short."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def get_json(port, path):
    status, _, body = request(port, "GET", path)
    if status != 200:
        raise SystemExit("GET %s answered %d: %s" % (path, status, body[:200]))
    return json.loads(body)


# ---- the load --------------------------------------------------------------------------------


class Tally:
    """What the clients saw, across cycles (updated under a lock by the load threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.downloads_complete = 0
        self.downloads_cut = 0
        self.corrupt_downloads = []
        self.acked = {}  # device -> set of reportIds answered 202
        self.reports_acked = 0
        self.posts_cut = 0
        self.unexpected = []  # answers that are neither success nor a cut connection
        self.pins = {}  # digest -> the pin state last acknowledged (absent: unknown)
        self.invalidated = set()  # names whose last acknowledged request was an invalidating POST
        self.catalog_acked = 0

    def ack(self, batch):
        with self.lock:
            for r in batch:
                self.acked.setdefault(r["deviceId"], set()).add(r["reportId"])
            self.reports_acked += len(batch)


def download(port, name, rnd, tally):
    """One GET through the named origin, whole or a range; checks a body that arrived whole."""
    data = content(name)
    headers, want = {}, (0, len(data) - 1)
    mode = rnd.random()
    if mode < 0.25:
        a = rnd.randrange(len(data))
        b = rnd.randrange(a, len(data))
        headers["Range"], want = "bytes=%d-%d" % (a, b), (a, b)
    elif mode < 0.4:
        a = rnd.randrange(len(data))
        headers["Range"], want = "bytes=%d-" % a, (a, len(data) - 1)
    try:
        status, h, body = request(port, "GET", "/o/t/" + name, headers=headers)
    except (OSError, http.client.HTTPException):
        with tally.lock:
            tally.downloads_cut += 1
        return
    if status not in (200, 206):
        with tally.lock:
            tally.unexpected.append("GET %s %s: %d %s" % (name, headers, status, body[:120]))
        return
    if status == 206:
        got = h.get("Content-Range", "")
        if got != "bytes %d-%d/%d" % (want[0], want[1], len(data)):
            with tally.lock:
                tally.corrupt_downloads.append("%s %s: Content-Range %r" % (name, headers, got))
            return
    else:
        want = (0, len(data) - 1)
    ok = body == data[want[0] : want[1] + 1]
    with tally.lock:
        tally.downloads_complete += 1
        if not ok:
            why = "%s %s: %d bytes, not the origin's" % (name, headers, len(body))
            tally.corrupt_downloads.append(why)


def post_reports(port, cycle, poster, rnd, stop, tally):
    n = 0
    while not stop.is_set():
        batch = [
            {
                "reportId": "c%d-p%d-%d-%d" % (cycle, poster, n, k),
                "deviceId": "d%d-%d" % (cycle, rnd.randrange(DEVICES_PER_CYCLE)),
                "state": rnd.choice(["DownloadStarted", "DownloadSucceeded", 4, 255]),
                "resultCode": 500,
            }
            for k in range(rnd.randint(1, 8))
        ]
        n += 1
        try:
            body = json.dumps(batch).encode()
            ct = {"Content-Type": "application/json"}
            status, _, body = request(port, "POST", "/v1/status", body, ct)
        except (OSError, http.client.HTTPException):
            with tally.lock:
                tally.posts_cut += 1
            continue
        v = json.loads(body) if status == 202 else {}
        if status == 202 and v.get("accepted", 0) + v.get("duplicates", 0) == len(batch):
            tally.ack(batch)
        else:
            with tally.lock:
                tally.unexpected.append("POST /v1/status: %d %s" % (status, body[:120]))
        time.sleep(rnd.uniform(0.002, 0.02))


def pinnable(i):
    return hashlib.shake_256(b"pin-%d" % i).digest(4096)


def change_catalog(port, rnd, stop, tally):
    """One client at a time: pins switched on and off (sideload with ?pin=true, DELETE of the pin),
    and objects stored then invalidated by a POST. A state is recorded only once acknowledged; a
    request left unanswered makes it unknown."""
    while not stop.is_set():
        if rnd.random() < 0.5:
            body = pinnable(rnd.randrange(PINNABLE))
            d = hashlib.sha256(body).hexdigest()
            want = rnd.random() < 0.5
            with tally.lock:
                tally.pins.pop(d, None)
            if want:
                ok = catalog_call(port, "PUT", "/v1/admin/content/sha256/%s?pin=true" % d, body, tally)
            else:
                ok = catalog_call(port, "DELETE", "/v1/admin/pins/" + d, None, tally, absent_ok=True)
            if ok:
                with tally.lock:
                    tally.pins[d] = want
                    tally.catalog_acked += 1
        else:
            name = "inv-%d.bin" % rnd.randrange(INVALIDATED)
            with tally.lock:
                tally.invalidated.discard(name)
            if catalog_call(port, "GET", "/o/t/" + name, None, tally) and catalog_call(
                port, "POST", "/o/t/" + name, b"x", tally
            ):
                with tally.lock:
                    tally.invalidated.add(name)
                    tally.catalog_acked += 1
        time.sleep(rnd.uniform(0.005, 0.03))


def catalog_call(port, method, path, body, tally, absent_ok=False):
    """True when answered 2xx (or 404 with `absent_ok`: nothing to unpin). The admin API has no token
    here: a request that changes state carries the content type it then wants, as the CLI's do."""
    headers = {}
    if path.startswith("/v1/admin/") and method not in ("GET", "HEAD"):
        headers["Content-Type"] = "application/octet-stream" if method == "PUT" else "application/json"
    try:
        status, _, answer = request(port, method, path, body, headers)
    except (OSError, http.client.HTTPException):
        return False
    if 200 <= status < 300 or (absent_ok and status == 404):
        return True
    with tally.lock:
        tally.unexpected.append("%s %s: %d %s" % (method, path, status, answer[:120]))
    return False


def run_load(node, cycle, names, rnd, tally, kill_after):
    """Downloads and posts until the process is killed, `kill_after` seconds in."""
    stop = threading.Event()

    def downloader(seed):
        r = random.Random(seed)
        while not stop.is_set():
            download(node.port, r.choice(names), r, tally)

    threads = [threading.Thread(target=downloader, args=(rnd.random(),)) for _ in range(DOWNLOADERS)]
    args = (node.port, random.Random(rnd.random()), stop, tally)
    threads.append(threading.Thread(target=change_catalog, args=args))
    for p in range(POSTERS):
        args = (node.port, cycle, p, random.Random(rnd.random()), stop, tally)
        threads.append(threading.Thread(target=post_reports, args=args))
    for t in threads:
        t.start()
    time.sleep(kill_after)
    node.kill9()
    stop.set()
    for t in threads:
        t.join()


# ---- the checks ------------------------------------------------------------------------------


class Findings:
    def __init__(self):
        self.objects_checked = 0
        self.distinct = set()
        self.corrupt_objects = []
        self.reports_lost = []
        self.duplicated = []
        self.catalog_undone = []


def check_store(node, f, rnd, tally):
    """The files after recovery, and the admin listing against them."""
    tmp = list((node.data / "tmp").iterdir())
    if tmp:
        f.corrupt_objects.append("temp files survived the restart: %s" % [p.name for p in tmp])
    blobs = {}
    for shard in sorted((node.data / "sha256").iterdir()):
        for p in sorted(shard.iterdir()):
            if "." not in p.name:
                blobs[p.name] = p
            elif not (p.suffix in (".meta", ".keys") and p.with_suffix("").exists()):
                f.corrupt_objects.append("stray file %s" % p.name)
    for hexname, p in blobs.items():
        f.objects_checked += 1
        f.distinct.add(hexname)
        with open(p, "rb") as fh:
            got = hashlib.file_digest(fh, "sha256").hexdigest()
        if got != hexname:
            f.corrupt_objects.append("%s hashes to %s" % (hexname, got))
        check_meta(p, hexname, f)
    listed = {o["digest"]: o for o in get_json(node.port, "/v1/admin/content")}
    for d, o in listed.items():
        if d not in blobs or o["size"] != blobs[d].stat().st_size:
            f.corrupt_objects.append("%s listed (size %s) but not on disk whole" % (d, o["size"]))
    for d in set(blobs) - set(listed):
        f.corrupt_objects.append("%s on disk, not listed after recovery" % d)
    check_catalog(listed, tally, f)
    for d in rnd.sample(sorted(listed), min(3, len(listed))):
        check_served(node, listed[d], f, tally)


def check_catalog(listed, tally, f):
    """Acknowledged pins and unpins hold; acknowledged invalidations did not come back."""
    with tally.lock:
        pins, invalidated = dict(tally.pins), set(tally.invalidated)
    for d, want in pins.items():
        o = listed.get(d)
        if (o is None and want) or (o is not None and o["pinned"] != want):
            f.catalog_undone.append("%s: pin acknowledged as %s, now %s" % (d, want, o and o["pinned"]))
    for o in listed.values():
        for key in o["keys"]:
            name = key.rsplit("/", 1)[-1]
            if name in invalidated:
                f.catalog_undone.append("%s: invalidated, back after the restart" % name)


def check_meta(blob, hexname, f):
    try:
        m = json.loads(blob.with_suffix(".meta").read_bytes())
    except (OSError, ValueError) as e:
        f.corrupt_objects.append("%s.meta: %s" % (hexname, e))
        return
    if m.get("digest") != hexname or m.get("size") != blob.stat().st_size:
        why = "%s.meta describes %s (%s bytes)" % (hexname, m.get("digest"), m.get("size"))
        f.corrupt_objects.append(why)


def check_served(node, obj, f, tally):
    """A stored object by digest, and by each of its keys, is served whole and right."""
    d = obj["digest"]
    status, _, body = request(node.port, "GET", "/v1/content/sha256/" + d)
    if status != 200 or hashlib.sha256(body).hexdigest() != d:
        f.corrupt_objects.append("GET by digest %s: %d, %d bytes" % (d, status, len(body)))
    for key in obj["keys"]:
        name = key.rsplit("/", 1)[-1]
        with tally.lock:
            tally.invalidated.discard(name)
        status, h, body = request(node.port, "GET", "/o/t/" + name)
        if status != 200 or body != content(name) or hashlib.sha256(body).hexdigest() != d:
            why = "GET %s (key of %s): %d, %d bytes" % (name, d, status, len(body))
            f.corrupt_objects.append(why)


def check_reports(node, tally, devices, f):
    """Every report answered 202 is in its device's history, once."""
    with tally.lock:
        want = {d: set(tally.acked.get(d, ())) for d in devices}
    for dev, ids in want.items():
        if not ids:
            continue
        hist = [r.get("reportId") for r in get_json(node.port, "/v1/devices/" + dev)]
        if len(hist) != len(set(hist)):
            f.duplicated.append(dev)
        f.reports_lost.extend("%s/%s" % (dev, i) for i in sorted(ids - set(hist)))


# ---- the soak --------------------------------------------------------------------------------


def cycle_once(node, cycle, rnd, tally, f, names_seen):
    """Start (sometimes killed during its start first), check, load, kill."""
    if rnd.random() < 0.1:
        node.spawn()
        time.sleep(rnd.uniform(0, 0.3))
        node.kill9()
    node.spawn()
    node.wait_ready()
    check_store(node, f, rnd, tally)
    check_reports(node, tally, ["d%d-%d" % (cycle - 1, k) for k in range(DEVICES_PER_CYCLE)], f)
    names = ["c%d-%d.bin" % (cycle, i) for i in range(NEW_PER_CYCLE)]
    names += rnd.sample(names_seen, min(OLD_PER_CYCLE, len(names_seen)))
    names_seen.extend(names[:NEW_PER_CYCLE])
    run_load(node, cycle, names, rnd, tally, rnd.uniform(0.05, 1.5))


def final_check(node, tally, f, rnd):
    node.spawn()
    node.wait_ready()
    check_store(node, f, rnd, tally)
    with tally.lock:
        devices = sorted(tally.acked)
    check_reports(node, tally, devices, f)
    return node.stop()


def binary(path):
    if path:
        return Path(path).resolve()
    build = ["cargo", "build", "--release", "--quiet", "--bin", "cistern"]
    subprocess.run(build, cwd=REPO, check=True)
    return REPO / "target" / "release" / "cistern"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=600, help="bound on the soak's time")
    ap.add_argument("--bin", help="cistern binary (default: target/release/cistern, built first)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    rnd = random.Random(seed)
    exe = binary(a.bin)
    work = Path(tempfile.mkdtemp(prefix="cistern-soak-"))
    origin = start_origin()
    node = Node(exe, work, origin.server_address[1])
    tally, f = Tally(), Findings()
    started, names_seen, cycles = time.monotonic(), [], 0
    print("crash soak: %s, seed %d, work dir %s" % (exe, seed, work), flush=True)
    # Room for the final check within the bound.
    while cycles < a.cycles and time.monotonic() - started < a.max_seconds - 15:
        cycle_once(node, cycles, rnd, tally, f, names_seen)
        cycles += 1
        if cycles % 20 == 0:
            print("  %d cycles, %.0f s" % (cycles, time.monotonic() - started), flush=True)
    stopped = final_check(node, tally, f, rnd)
    origin.shutdown()
    ok = report(a, cycles, time.monotonic() - started, tally, f, stopped)
    if ok and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def report(a, cycles, secs, tally, f, stopped):
    bound = "" if cycles == a.cycles else " (stopped by --max-seconds)"
    print("cycles: %d of %d in %.0f s%s" % (cycles, a.cycles, secs, bound))
    print("objects checked: %d re-hashes of %d distinct objects" % (f.objects_checked, len(f.distinct)))
    print("downloads: %d complete, %d cut by a kill" % (tally.downloads_complete, tally.downloads_cut))
    print("reports acknowledged: %d" % tally.reports_acked)
    print("reports lost: %d" % len(f.reports_lost))
    print("pins, unpins and invalidations acknowledged: %d" % tally.catalog_acked)
    print("of those undone by a restart: %d" % len(f.catalog_undone))
    print("corrupt objects: %d" % len(f.corrupt_objects))
    print("corrupt downloads: %d" % len(tally.corrupt_downloads))
    print("unexpected answers: %d" % len(tally.unexpected))
    print("SIGTERM at the end: %s" % ("exit 0" if stopped == 0 else stopped))
    for what, items in [
        ("lost", f.reports_lost),
        ("corrupt", f.corrupt_objects),
        ("corrupt download", tally.corrupt_downloads),
        ("unexpected", tally.unexpected),
        ("report twice in the history of", f.duplicated),
        ("undone", f.catalog_undone),
    ]:
        for i in items[:10]:
            print("  %s: %s" % (what, i))
    bad = f.reports_lost or f.corrupt_objects or f.duplicated or f.catalog_undone
    bad = bad or tally.corrupt_downloads or tally.unexpected
    return cycles > 0 and stopped == 0 and not bad


if __name__ == "__main__":
    sys.exit(main())
