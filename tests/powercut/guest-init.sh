#!/bin/sh
# The power-cut guest's init, run as PID 1 by /sbin/cistern-init of the guest root (which mounts the
# payload disk read-only at /mnt/payload and execs this file). POSIX sh plus busybox applets.
#
# It brings up the network that qemu's user-mode forward reaches (10.0.2.15), checks and mounts the
# data disk (the store survives the cuts on it), prints the store's files so that the serial log shows
# what a cut left behind, starts the origin (busybox httpd on the guest's loopback, serving the
# payload's origin/ files) and then cistern, in a loop that logs every exit: the host counts a
# "cistern exited" line as a failed restart.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
P=/mnt/payload
BB=/bin/busybox

say() { echo "powercut: $*"; }

say "init start (uptime $(cut -d' ' -f1 /proc/uptime)s)"
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname powercut-guest

modprobe virtio_net 2>/dev/null
$BB ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
$BB ip addr add 10.0.2.15/24 dev eth0
$BB ip link set eth0 up
$BB ip route add default via 10.0.2.2

DATA=$(blkid -L cpc-data 2>/dev/null)
[ -n "$DATA" ] || DATA=/dev/vdb
e2fsck -p "$DATA"
rc=$?
say "fsck $DATA rc=$rc"
if [ $rc -ge 4 ]; then say "FSCK-UNCORRECTED rc=$rc"; fi
if ! mount -t ext4 "$DATA" /data; then
    say "DATA-MOUNT-FAILED"
fi
mkdir -p /data/store

say "store listing begin (type size path)"
find /data/store -printf '%y %s %P\n' | sort -k3
say "store listing end"
df -k /data | tail -n 1 | sed 's/^/powercut: df /'

$BB httpd -p 127.0.0.1:8081 -h "$P/origin"
say "origin started on 127.0.0.1:8081"

n=0
while :; do
    n=$((n + 1))
    say "cistern start $n (uptime $(cut -d' ' -f1 /proc/uptime)s)"
    NO_COLOR=1 RUST_BACKTRACE=1 "$P/cistern" serve --config "$P/cistern.toml"
    rc=$?
    say "cistern exited rc=$rc (start $n)"
    sleep 1
done
