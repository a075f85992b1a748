#!/usr/bin/env bash
# Fan-out of one image layer (SPEC 9): N clients ask for the same cold layer at once, through cistern and
# through Debian's docker-registry in pull-through mode (proxy.remoteurl), both in front of one
# docker-registry holding the image. Prints, for each, the transfers of the layer the upstream registry
# served (from its access log) and the wall time until every client had the whole layer.
#
#   benches/registry-fanout.sh                 # N=32 clients, a 256 MiB layer, target/release/cistern
#   N=8 SIZE_MIB=64 BIN=target/debug/cistern benches/registry-fanout.sh
#
# Needs docker-registry, skopeo, curl and python3 (apt-get install docker-registry skopeo curl).
set -euo pipefail

N=${N:-32}
SIZE_MIB=${SIZE_MIB:-256}
BIN=${BIN:-target/release/cistern}
for p in docker-registry skopeo curl python3; do
  command -v "$p" >/dev/null || { echo "SKIPPED: $p is not installed" >&2; exit 77; }
done
[ -x "$BIN" ] || { echo "$BIN: build it first (cargo build --release)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 200); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "$1 did not answer" >&2; exit 1
}

po=$(free_port); pp=$(free_port); pc=$(free_port)

# The upstream registry, its access log kept to count the layer's transfers.
cat >"$work/origin.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/origin
http:
  addr: 127.0.0.1:$po
EOF
docker-registry serve "$work/origin.yml" >"$work/origin.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$po/v2/"

# One image of one layer of random bytes, pushed with skopeo.
mkdir -p "$work/src/files" "$work/layout/blobs/sha256"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$work/src/files/payload.bin"
tar --sort=name --mtime=@0 --owner=0 --group=0 -cf "$work/layer.tar" -C "$work/src/files" .
python3 - "$work" <<'EOF'
import hashlib, json, os, sys
w = sys.argv[1]
blobs = os.path.join(w, "layout/blobs/sha256")
def put(b):
    h = hashlib.sha256(b).hexdigest()
    open(os.path.join(blobs, h), "wb").write(b)
    return h, len(b)
layer = open(os.path.join(w, "layer.tar"), "rb").read()
lh, ln = put(layer)
cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + lh]}}).encode()
ch, cn = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + ch, "size": cn},
                  "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + lh, "size": ln}]}).encode()
mh, mn = put(man)
idx = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + mh,
       "size": mn, "annotations": {"org.opencontainers.image.ref.name": "1"}}]}
open(os.path.join(w, "layout/index.json"), "w").write(json.dumps(idx))
open(os.path.join(w, "layout/oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$work/layout:1" "docker://127.0.0.1:$po/bench/app:1"
layer=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://127.0.0.1:$po/v2/bench/app/manifests/1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])')
size=$(curl -fsSI "http://127.0.0.1:$po/v2/bench/app/blobs/$layer" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-length"{print $2}')

# The pull-through registry.
cat >"$work/proxy.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/proxy
http:
  addr: 127.0.0.1:$pp
proxy:
  remoteurl: http://127.0.0.1:$po
EOF
docker-registry serve "$work/proxy.yml" >"$work/proxy.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$pp/v2/"

# cistern.
cat >"$work/cistern.toml" <<EOF
[node]
id = "bench"
[server]
listen = "127.0.0.1:$pc"
[store]
dir = "$work/cistern"
min_free = "0"
[upstream]
allowed_origins = []
[log]
level = "warn"
[[registries]]
name = "origin"
url = "http://127.0.0.1:$po"
EOF
"$BIN" serve --config "$work/cistern.toml" >"$work/cistern.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$pc/v2/"

transfers() { grep -c "GET /v2/bench/app/blobs/$layer" "$work/origin.log" || true; }

# N clients at once; every one must get the whole layer.
fan_out() {
  local port=$1 name=$2 before after t0 t1 bad
  before=$(transfers)
  t0=$(date +%s.%N)
  for i in $(seq 1 "$N"); do
    curl -fsS -o /dev/null -w '%{size_download}\n' "http://127.0.0.1:$port/v2/bench/app/blobs/$layer" >"$work/out-$name.$i" &
  done
  wait_clients
  t1=$(date +%s.%N)
  after=$(transfers)
  bad=$(cat "$work/out-$name".* | grep -vcx "$size" || true)
  printf '%-24s %3d clients  %5s upstream transfer(s)  %7.2f s  %s\n' "$name" "$N" "$((after - before))" \
    "$(echo "$t1 - $t0" | bc -l)" "$([ "$bad" = 0 ] && echo 'every client whole' || echo "$bad clients short")"
}
wait_clients() { for j in $(jobs -p); do case " ${pids[*]} " in *" $j "*) ;; *) wait "$j" || true ;; esac; done; }

echo "layer $layer, $size bytes"
fan_out "$pc" cistern
fan_out "$pp" registry-pull-through
