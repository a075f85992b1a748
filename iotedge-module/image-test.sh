#!/usr/bin/env bash
# Builds the module image with rootful podman from a prebuilt binary and checks the running container
# (README "Container"): /healthz through the mapped port, the image's HEALTHCHECK, the process user
# (uid 10001), the store on a named volume at /data, a payload fetched through it from an origin on this
# host, no colour codes in the logs, a root-owned bind mount refused in one line, a stop within the
# grace, and the cache still there when the container is recreated on the same volume.
#
#   iotedge-module/image-test.sh [--binary target/release/cistern] [--tag localhost/cistern:test]
#
# Installs podman with apt when it is missing. When no registry answers, the Dockerfile's base image
# is made here with debootstrap from the Debian mirror apt uses, trimmed like the official slim image,
# and cached in /var/cache/cistern-image. The Dockerfile's build stage is replaced by the binary
# (`--build-context build=DIR`), so the same Dockerfile still builds from source elsewhere.
# Exit 0 when every check passes, 1 when one fails, 77 when this machine cannot run containers.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/cistern
TAG=localhost/cistern:test
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BIN=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "image-test: unknown argument $1" >&2; exit 2 ;;
  esac
done

CACHE=/var/cache/cistern-image
RUN_ID=cistern-image-test-$$
VOL=$RUN_ID-data
WORK=$(mktemp -d /var/tmp/cistern-image-test.XXXXXX)
ORIGIN_PID=
STARTED=$(date +%s)

skip() { echo "image-test: cannot run containers here: $*" >&2; exit 77; }
fail() { echo "image-test: FAIL: $*" >&2; exit 1; }
say() { echo "image-test: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  # Only what this run made: its containers, its volume, its origin process, its directory.
  timeout 30 podman rm -f -t 0 "$RUN_ID" "$RUN_ID-bind" >/dev/null 2>&1 || true
  timeout 30 podman volume rm -f "$VOL" >/dev/null 2>&1 || true
  if [ -n "$ORIGIN_PID" ]; then kill "$ORIGIN_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || skip "rootful podman needs root (running as uid $(id -u))"
[ -x "$BIN" ] || fail "$BIN: no binary (cargo build --release --bin cistern)"

# --- podman and its configuration --------------------------------------------------------------
if ! command -v podman >/dev/null; then
  say "podman missing: installing podman runc netavark aardvark-dns iptables with apt"
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends \
    podman runc netavark aardvark-dns iptables >"$WORK/apt.log" 2>&1 \
    || skip "apt-get install podman failed (see: tail $WORK/apt.log)"
fi
if [ ! -e /etc/containers/containers.conf ]; then
  # The default ulimits can ask for more than this machine's hard limits allow, and podman's
  # default runtime (crun) may be missing: every container would fail to start.
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  runtime=crun; command -v crun >/dev/null || runtime=runc
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<EOF
# Written by cistern's iotedge-module/image-test.sh: ulimits within this machine's hard limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "$runtime"
EOF
  say "wrote /etc/containers/containers.conf (nofile=$nofile, nproc=$nproc, runtime $runtime)"
fi
timeout 60 podman info >"$WORK/info.log" 2>&1 || skip "podman info failed: $(tail -1 "$WORK/info.log")"

# --- the base image ----------------------------------------------------------------------------
FROM=$(awk 'toupper($1) == "FROM" { img = $2 } END { print img }' iotedge-module/Dockerfile)
case "$FROM" in
  debian:*-slim) SUITE=${FROM#debian:}; SUITE=${SUITE%-slim}; BASE=docker.io/library/$FROM ;;
  *) fail "the Dockerfile's runtime stage is FROM $FROM; this script makes only debian:<suite>-slim" ;;
esac

# The first URI apt uses for `suite` (deb822 .sources or one-line .list), e.g. http://deb.debian.org/debian.
apt_uri() {
  local suite=$1 f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; suites = ""; on = 1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, " "); uri = u[1] }
          if ($i ~ /^Suites:/) { sub(/^Suites:/, "", $i); suites = " " $i " " }
          if ($i ~ /^Enabled:[ \t]*no/) on = 0
        }
        if (on && uri != "" && suites ~ (" " s " ")) { print uri; exit } }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && awk -v s="$suite" '$1 == "deb" { i = 2
        if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
  return 0
}

make_base() {
  local tar=$CACHE/debian-$SUITE-slim.tar root mirror security
  if [ ! -s "$tar" ]; then
    mirror=$(apt_uri "$SUITE" | head -1); mirror=${mirror:-http://deb.debian.org/debian}
    security=$(apt_uri "$SUITE-security" | head -1); security=${security:-http://deb.debian.org/debian-security}
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive timeout 300 \
      apt-get install -y --no-install-recommends debootstrap >>"$WORK/apt.log" 2>&1 \
      || fail "apt-get install debootstrap failed"
    say "making $BASE with debootstrap --variant=minbase $SUITE from $mirror (cached in $tar)"
    root=$WORK/rootfs
    mkdir -p "$CACHE/debs"
    # Once more on a failure: a mirror's hiccup should not fail the run (the packages already
    # fetched are kept in the cache directory).
    local try
    for try in 1 2; do
      rm -rf "$root"
      if timeout 900 debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$root" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1; then break; fi
      grep -E '^(E|W):' "$root/debootstrap/debootstrap.log" 2>/dev/null | tail -3 >&2 || true
      [ "$try" = 2 ] && fail "debootstrap failed: $(tail -1 "$WORK/debootstrap.log")"
      say "debootstrap failed (try $try), once more"
    done
    # Trimmed as the official slim image is: no docs, man pages or locales, now or when apt installs.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/lib/apt/lists/* \
      "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log \
      "$root"/var/log/apt/* "$root"/tmp/* "$root"/root/.bash_history
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    : >"$root/etc/machine-id"
    mkdir -p "$CACHE"
    tar --numeric-owner -C "$root" -cf "$tar.part" . && mv "$tar.part" "$tar"
    rm -rf "$root" "$CACHE/debs"
  fi
  timeout 300 podman import -q --change 'CMD ["bash"]' "$tar" "$BASE" >/dev/null \
    || fail "podman import $tar failed"
}

if ! podman image exists "$BASE"; then
  if ! timeout 60 podman pull -q "$BASE" >/dev/null 2>&1; then make_base; fi
fi
# A trivial container from the base image: where this fails, the machine refuses containers.
timeout 60 podman run --rm --network none "$BASE" true >"$WORK/probe.log" 2>&1 \
  || skip "podman run $BASE true: $(tail -1 "$WORK/probe.log")"

# --- the image ---------------------------------------------------------------------------------
# The build stage's output, as the Dockerfile's COPY --from=build expects it; stripped as there.
mkdir -p "$WORK/build/src/target/release"
strip -o "$WORK/build/src/target/release/cistern" "$BIN"
OLD_ID=$(podman image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
t0=$(now)
timeout 600 podman build -q --format docker -f iotedge-module/Dockerfile \
  --build-context build="$WORK/build" \
  --build-arg VERSION="$("$BIN" --version | awk '{ print $2 }')" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$TAG" . >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log" >&2; fail "podman build failed"; }
say "image $TAG built in $(since "$t0") s"
# The image this tag named before (left dangling by the build) goes: reruns keep one, not one each.
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$(podman image inspect -f '{{.Id}}' "$TAG")" ]; then
  timeout 60 podman rmi "$OLD_ID" >/dev/null 2>&1 || true
fi
SIZE=$(podman image inspect -f '{{.Size}}' "$TAG")
[ "$(podman image inspect -f '{{.Config.User}}' "$TAG")" = 10001:10001 ] || fail "image USER is not 10001:10001"
podman image inspect -f '{{.Config.Healthcheck}}' "$TAG" | grep -q health || fail "image has no HEALTHCHECK"
podman image inspect -f '{{json .Labels}}' "$TAG" | grep -q org.opencontainers.image.version \
  || fail "image has no OCI labels"

# --- an origin on this host, reachable from the container -------------------------------------
HOST_IP=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | head -1 || true)
[ -n "$HOST_IP" ] || fail "this host has no address a container could reach"
ORIGIN_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/origin"
head -c $((4 << 20)) /dev/urandom >"$WORK/origin/payload.bin"
WANT=$(sha256sum "$WORK/origin/payload.bin" | awk '{ print $1 }')
python3 -m http.server "$ORIGIN_PORT" --bind "$HOST_IP" --directory "$WORK/origin" \
  >"$WORK/origin.log" 2>&1 &
ORIGIN_PID=$!
origin_gets() { grep -c 'GET /payload.bin' "$WORK/origin.log" || true; }

# --- run, check, stop, recreate ----------------------------------------------------------------
timeout 30 podman volume create "$VOL" >/dev/null
run() {
  # podman's own stderr goes to a file: without systemd it complains that it cannot set up the
  # HEALTHCHECK's timer (this script runs the check itself with `podman healthcheck run`).
  timeout 60 podman run -d --name "$RUN_ID" -p 127.0.0.1::8080 \
    --mount type=volume,source="$VOL",target=/data \
    -e CISTERN_NODE__ID=image-test \
    -e CISTERN_STORE__MIN_FREE=16MiB \
    -e CISTERN_UPSTREAM__ALLOWED_ORIGINS="$HOST_IP:$ORIGIN_PORT" \
    -e CISTERN_ORIGINS__HOSTFILES__URL="http://$HOST_IP:$ORIGIN_PORT" \
    -e CISTERN_ORIGINS__HOSTFILES__IMMUTABLE=true \
    "$TAG" >/dev/null 2>>"$WORK/podman.log" || { tail -3 "$WORK/podman.log" >&2; fail "podman run failed"; }
  PORT=$(timeout 30 podman port "$RUN_ID" 8080/tcp | head -1 | sed 's/.*://')
  [ -n "$PORT" ] || fail "no host port mapped to 8080"
}
wait_healthy() {
  local t0=$1 end=$(($(date +%s) + 30))
  while [ "$(date +%s)" -lt "$end" ]; do
    if curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$PORT/healthz" 2>/dev/null; then
      HEALTHY_AFTER=$(since "$t0"); return 0
    fi
    [ "$(podman inspect -f '{{.State.Running}}' "$RUN_ID")" = true ] \
      || { podman logs "$RUN_ID" 2>&1 | tail -5 >&2; fail "the container exited"; }
    sleep 0.2
  done
  podman logs "$RUN_ID" 2>&1 | tail -5 >&2
  fail "/healthz did not answer within 30 s"
}
fetch() {
  curl -fsS -m 60 -D "$WORK/headers" -o "$WORK/got" "http://127.0.0.1:$PORT/o/hostfiles/payload.bin" \
    || fail "GET /o/hostfiles/payload.bin through the container failed"
  [ "$(sha256sum "$WORK/got" | awk '{ print $1 }')" = "$WANT" ] || fail "the payload came back altered"
  CACHE_STATUS=$(grep -i '^cache-status:' "$WORK/headers" | tr -d '\r' | cut -d' ' -f2-)
}

t0=$(now); run; wait_healthy "$t0"
timeout 30 podman healthcheck run "$RUN_ID" >/dev/null 2>>"$WORK/podman.log" || fail "podman healthcheck run (cistern health) failed"
PID=$(podman inspect -f '{{.State.Pid}}' "$RUN_ID")
USER_IDS=$(awk '/^Uid:/ { u = $2 } /^Gid:/ { g = $2 } END { print "uid=" u " gid=" g }' "/proc/$PID/status")
[ "$USER_IDS" = "uid=10001 gid=10001" ] || fail "the process runs as $USER_IDS, not uid=10001 gid=10001"
MOUNT=$(podman inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Type}} {{.Name}}{{end}}{{end}}' "$RUN_ID")
[ "$MOUNT" = "volume $VOL" ] || fail "/data is not the named volume $VOL: $MOUNT"
fetch
FIRST_STATUS=$CACHE_STATUS
case "$CACHE_STATUS" in *hit*) fail "first fetch was a hit: $CACHE_STATUS" ;; esac
[ "$(origin_gets)" -eq 1 ] || fail "the origin was asked $(origin_gets) times for one fetch"
timeout 30 podman exec "$RUN_ID" test -f "/data/sha256/${WANT:0:2}/$WANT" || fail "payload not stored on /data"
if podman logs "$RUN_ID" 2>&1 | grep -q $'\e\['; then fail "the logs carry colour codes"; fi

t0=$(now)
timeout 30 podman stop -t 15 "$RUN_ID" >/dev/null 2>>"$WORK/podman.log" || fail "podman stop failed"
STOP_SECS=$(since "$t0")
EXIT=$(podman inspect -f '{{.State.ExitCode}}' "$RUN_ID")
case "$EXIT" in 0|143) ;; *) fail "exit code $EXIT after SIGTERM" ;; esac
awk -v s="$STOP_SECS" 'BEGIN { exit !(s < 10) }' || fail "podman stop took $STOP_SECS s (grace 15 s)"

timeout 30 podman rm "$RUN_ID" >/dev/null 2>>"$WORK/podman.log"
t0=$(now); run; wait_healthy "$t0"
fetch
case "$CACHE_STATUS" in *hit*) ;; *) fail "after recreating on $VOL the fetch was not a hit: $CACHE_STATUS" ;; esac
[ "$(origin_gets)" -eq 1 ] || fail "the origin was asked again after the container was recreated"

# A root-owned host directory bind-mounted at /data: one line saying what to do, exit 1.
mkdir -p "$WORK/bind" && chmod 755 "$WORK/bind"
timeout 60 podman run -d --name "$RUN_ID-bind" -v "$WORK/bind:/data" "$TAG" >/dev/null 2>>"$WORK/podman.log" \
  || fail "podman run with a bind mount failed"
BIND_EXIT=$(timeout 30 podman wait "$RUN_ID-bind" 2>>"$WORK/podman.log") || fail "cistern kept running on a root-owned bind mount"
[ "$BIND_EXIT" = 1 ] || fail "exit code $BIND_EXIT on a root-owned bind mount, not 1"
podman logs "$RUN_ID-bind" >"$WORK/bind.log" 2>&1
grep -q 'not writable by uid 10001 (gid 10001): chown -R 10001:10001' "$WORK/bind.log" \
  || fail "a root-owned bind mount did not say what to do: $(tail -1 "$WORK/bind.log")"
[ "$(wc -l <"$WORK/bind.log")" -eq 1 ] || fail "a root-owned bind mount said more than one line"

echo "image:          $TAG, $(awk -v b="$SIZE" 'BEGIN { printf "%.1f MB", b / 1e6 }')"
echo "healthy after:  ${HEALTHY_AFTER} s (podman run to /healthz 200)"
echo "user:           $USER_IDS"
echo "volume:         $VOL at /data; Cache-Status first \"$FIRST_STATUS\", after a recreate \"$CACHE_STATUS\", origin asked once"
echo "stop:           ${STOP_SECS} s with podman stop -t 15, exit code $EXIT"
echo "bind mount:     $(cat "$WORK/bind.log")"
echo "image-test: PASS in $(( $(date +%s) - STARTED )) s"
