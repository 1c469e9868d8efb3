#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# bench/vhost-user-blk.sh — vdiskd's vhost-user-blk export against
# qemu-storage-daemon's, measured with the same client in the same run.
#
# Client: `vdisk bench --driver=virtio-blk-vhost-user` (our libvdisk driver,
# one thread and one virtqueue per job).  Back ends, each exporting the same
# node: a null node (null-co, read-zeroes=off: protocol overhead only) and the
# same raw file (O_DIRECT: cache.direct=on, io_uring in both daemons).  The
# ceiling: `vdisk bench --driver=io_uring --direct=1` on that file directly.
# Both daemons serve from their main thread unless IOTHREADS is set.
#
# Cases: 4k randread at QD1 and QD32 and 4k randwrite at QD32, with 1 and 2
# queues (2 jobs, each with its own queue, QD per job).  Every run starts a
# fresh daemon; the targets alternate within each round (RUNS rounds), and
# each number reported is the median over rounds.  Prints IOPS, mean and
# p50 latency and the ratios vdiskd/qsd and vdiskd/io_uring.
#
# The -poll cases repeat 4k randread QD1 with polled completion on both
# sides: the client on poll queues (--poll=1, it spins on the used rings),
# vdiskd with poll-us=POLLED_US (it spins on the avail rings) and
# qemu-storage-daemon on an iothread with poll-max-ns=POLLED_US*1000 (its
# main loop does not poll).  The io_uring ceiling stays event-driven there:
# a virtio-blk disk has no poll queues for IORING_SETUP_IOPOLL.
#
# Environment (all optional):
#   VDISK_BUILD  build directory (default <repo>/build)
#   BENCH_DIR    where the test file goes (default /var/tmp)
#   SIZE         test file size (default 1G)
#   RUNS         rounds (default 3)
#   RUNTIME      seconds per run (default 3)
#   ONLY         only cases whose name matches this extended regex
#   POLL_US      poll-us for vdiskd's export (default 0)
#   POLL_MAX_US  poll-max-us for vdiskd's export (default 0: no adaptive polling)
#   POLLED_US    the daemons' polling window in the -poll cases (default 100)
#   IOTHREADS    N > 0: vdiskd serves virtqueue i from iothread i mod N
#                (iothread.0=io0,...); qemu-storage-daemon gets one iothread
#                (7.2 takes no list for vhost-user-blk: all its queues there)
#
# Exit status: 0 ok, 1 a run failed, 2 usage/setup problem.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${VDISK_BUILD:-$ROOT/build}
VDISK=$BUILD/tools/vdisk
VDISKD=$BUILD/daemon/vdiskd
BENCH_DIR=${BENCH_DIR:-/var/tmp}
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-3}
ONLY=${ONLY:-}
POLL_US=${POLL_US:-0}
POLL_MAX_US=${POLL_MAX_US:-0}
IOTHREADS=${IOTHREADS:-0}
POLLED_US=${POLLED_US:-100}
PY=/usr/bin/python3

for t in "$VDISK" "$VDISKD"; do
	[ -x "$t" ] || { echo "vhost-user-blk.sh: $t not found (set VDISK_BUILD)" >&2; exit 2; }
done
command -v qemu-storage-daemon >/dev/null || { echo "vhost-user-blk.sh: qemu-storage-daemon is required" >&2; exit 2; }

work=$(mktemp -d "$BENCH_DIR/vdisk-vub-bench.XXXXXX")
pid=""
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

file=$work/disk.raw
sock=$work/vub.sock
results=$work/results.jsonl
echo "# preparing $SIZE of random data in $file" >&2
bytes=$($PY -c "import sys; s=sys.argv[1].upper(); m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
head -c "$bytes" /dev/urandom >"$file"
sync "$file" # no writeback of it during the runs

# start TARGET NODE QUEUES POLLED: a daemon exporting NODE (null or file) with
# QUEUES queues on $sock; POLLED=1: the daemon busy-polls its virtqueues.
start() {
	local target=$1 node=$2 queues=$3 polled=$4 bd objs=() it="" poll_us=$POLL_US
	rm -f "$sock"
	if [ "$IOTHREADS" -gt 0 ]; then
		for ((i = 0; i < IOTHREADS; i++)); do
			objs+=(--object "iothread,id=io$i")
			[ "$target" = vdiskd ] && it+=",iothread.$i=io$i"
		done
		[ "$target" = vdiskd ] || { objs=(--object iothread,id=io0); it=",iothread=io0"; }
	fi
	if [ "$polled" = 1 ]; then
		poll_us=$POLLED_US
		[ "$target" = vdiskd ] || { objs=(--object "iothread,id=io0,poll-max-ns=$((POLLED_US * 1000))"); it=",iothread=io0"; }
	fi
	if [ "$target" = vdiskd ]; then
		if [ "$node" = null ]; then
			bd="driver=null-co,node-name=n0,size=$bytes,read-zeroes=off"
		else
			bd="driver=file,node-name=n0,filename=$file,cache.direct=on"
		fi
		"$VDISKD" "${objs[@]}" --blockdev "$bd" --export "type=vhost-user-blk,id=e0,node-name=n0,writable=on,num-queues=$queues,poll-us=$poll_us,poll-max-us=$POLL_MAX_US,addr.type=unix,addr.path=$sock$it" 2>>"$work/daemon.log" &
	else
		if [ "$node" = null ]; then
			bd="driver=null-co,node-name=n0,size=$bytes,read-zeroes=off"
		else
			bd="driver=file,node-name=n0,filename=$file,cache.direct=on,aio=io_uring,locking=off"
		fi
		qemu-storage-daemon "${objs[@]}" --blockdev "$bd" --export "type=vhost-user-blk,id=e0,node-name=n0,writable=on,num-queues=$queues,addr.type=unix,addr.path=$sock$it" 2>>"$work/daemon.log" &
	fi
	pid=$!
	for _ in $(seq 200); do
		[ -S "$sock" ] && return 0
		sleep 0.02
	done
	echo "vhost-user-blk.sh: $target did not come up" >&2
	cat "$work/daemon.log" >&2
	exit 2
}

stop() {
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	pid=""
}

# bench CASE TARGET NODE RW QD QUEUES POLLED: one measurement, appended to $results.
failed=0
bench() {
	local case=$1 target=$2 node=$3 rw=$4 qd=$5 queues=$6 polled=$7 out client_poll=()
	local args=(--rw="$rw" --bs=4k --iodepth="$qd" --numjobs="$queues" --runtime="${RUNTIME}s" --output=json)
	if [ "$target" = io_uring ]; then
		out=$(nice "$VDISK" bench --driver=io_uring --path="$file" --direct=1 "${args[@]}") || out=""
	else
		[ "$polled" = 1 ] && client_poll=(--poll=1)
		start "$target" "$node" "$queues" "$polled"
		out=$(nice "$VDISK" bench --driver=virtio-blk-vhost-user --path="$sock" --size="$bytes" "${client_poll[@]}" "${args[@]}") || out=""
		stop
	fi
	if [ -z "$out" ]; then
		echo "vhost-user-blk.sh: $case $target failed" >&2
		failed=1
		return
	fi
	printf '{"case":"%s","target":"%s","node":"%s","res":%s}\n' "$case" "$target" "$node" "$out" >>"$results"
}

cases=()
for q in 1 2; do
	for w in "randread 1" "randread 32" "randwrite 32"; do
		set -- $w
		cases+=("$1-qd$2-q$q:$1:$2:$q:0")
	done
done
for q in 1 2; do
	cases+=("randread-qd1-q$q-poll:randread:1:$q:1")
done

for ((r = 1; r <= RUNS; r++)); do
	echo "# round $r/$RUNS" >&2
	for c in "${cases[@]}"; do
		IFS=: read -r name rw qd q polled <<<"$c"
		[ -n "$ONLY" ] && ! [[ $name =~ $ONLY ]] && continue
		for node in null file; do
			bench "$name" vdiskd "$node" "$rw" "$qd" "$q" "$polled"
			bench "$name" qsd "$node" "$rw" "$qd" "$q" "$polled"
		done
		bench "$name" io_uring file "$rw" "$qd" "$q" 0
	done
done

$PY - "$results" "$RUNS" "$RUNTIME" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs, runtime = sys.argv[2], sys.argv[3]
med = {}
for r in rows:
    k = (r["case"], r["node"], r["target"])
    med.setdefault(k, []).append(r["res"])
def m(k, f):
    v = med.get(k)
    return statistics.median(f(x) for x in v) if v else None
cases = list(dict.fromkeys(r["case"] for r in rows))
print(f"vhost-user-blk export: medians of {runs} rounds x {runtime} s, 4k requests, "
      "client vdisk bench --driver=virtio-blk-vhost-user")
print()
print("| case | node | vdiskd IOPS | qsd IOPS | vdiskd/qsd | io_uring IOPS | vdiskd/io_uring | "
      "vdiskd lat mean/p50 us | qsd lat mean/p50 us |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for c in cases:
    for node in ("null", "file"):
        v = m((c, node, "vdiskd"), lambda x: x["iops"])
        q = m((c, node, "qsd"), lambda x: x["iops"])
        u = m((c, "file", "io_uring"), lambda x: x["iops"]) if node == "file" else None
        lat = lambda t: (f'{m((c, node, t), lambda x: x["lat_ns"]["mean"]) / 1000:.1f}/'
                         f'{m((c, node, t), lambda x: x["lat_ns"]["p50"]) / 1000:.1f}') if med.get((c, node, t)) else "-"
        fmt = lambda x: f"{x:,.0f}" if x else "-"
        print(f"| {c} | {node} | {fmt(v)} | {fmt(q)} | {v / q:.2f} |" if v and q else f"| {c} | {node} | {fmt(v)} | {fmt(q)} | - |",
              f"{fmt(u)} | {v / u:.2f} |" if v and u else "- | - |", f"{lat('vdiskd')} | {lat('qsd')} |")
EOF
exit $failed
