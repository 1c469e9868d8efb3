#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# FUSE export benchmark: fio through vdiskd's FUSE export and through
# qemu-storage-daemon's FUSE export of the same raw file and the same qcow2
# (a fully allocated copy), in one run.
#
# Both daemons get the same node graph (file -> raw|qcow2, default cache mode:
# writeback on the host page cache, so the export path is what is measured)
# and the same export options (writable=on).  Both exports open the file with
# FOPEN_DIRECT_IO, so the kernel's page cache is never in front of the export;
# fio uses direct=1 on both, which makes the kernel submit requests from a
# deep queue asynchronously instead of one per blocked thread.
#
# Cases (fio, ioengine=io_uring, direct=1, on the mountpoint):
#   4k randread QD1, QD32; 4k randwrite QD1, QD32; 1 MiB sequential read and
#   write at QD8.
# Rounds: each round starts each daemon afresh and runs every case on it;
# daemons alternate within a round so background load hits both alike.  Each
# figure is the median over the rounds; the ratio is vdiskd / qemu-storage-daemon.
# Also reported: the CPU time each daemon used per I/O (user + system, all
# threads, from /proc/PID/stat), which a loaded machine disturbs less than
# throughput; its ratio is qemu-storage-daemon / vdiskd (higher: we use less).
#
# Usage: bench/fuse.sh [-t SECONDS] [-s SIZE_MB] [-r RUNS] [-o RESULTS.md]
#   VDISK_BUILD  build directory holding daemon/vdiskd (default <repo>/build)
#   RUNTIME/-t   seconds per fio case (default 5)
#   SIZE_MB/-s   image size in MiB (default 512; random data)
#   RUNS/-r      rounds (default 3)
#   QSD_AIO      aio= for qemu-storage-daemon's file node (default: its own
#                default, threads; io_uring is the faster choice there)
#   VDISKD_AIO   aio= for vdiskd's file node (default: its own default, io_uring)
#   ONLY         space-separated case names to run (default: all)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BUILD=${VDISK_BUILD:-$repo/build}
VDISKD=$BUILD/daemon/vdiskd
RUNTIME=${RUNTIME:-5}
SIZE_MB=${SIZE_MB:-512}
RUNS=${RUNS:-3}
QSD_AIO=${QSD_AIO:-}
VDISKD_AIO=${VDISKD_AIO:-}
ONLY=${ONLY:-}
OUT=""

while getopts "t:s:r:o:h" opt; do
	case $opt in
	t) RUNTIME=$OPTARG ;;
	s) SIZE_MB=$OPTARG ;;
	r) RUNS=$OPTARG ;;
	o) OUT=$OPTARG ;;
	h) sed -n '3,33p' "$0"; exit 0 ;;
	*) exit 2 ;;
	esac
done

for tool in fio qemu-img qemu-storage-daemon python3; do
	command -v $tool >/dev/null || { echo "fuse.sh: $tool is required" >&2; exit 2; }
done
[ -x "$VDISKD" ] || { echo "fuse.sh: $VDISKD not found (set VDISK_BUILD)" >&2; exit 2; }
[ -e /dev/fuse ] || { echo "fuse.sh: /dev/fuse is required" >&2; exit 2; }

work=$(mktemp -d /tmp/vdisk-fuse-bench.XXXXXX)
mnt=$work/mnt
server_pid=""
stop_server() {
	if [ -n "$server_pid" ]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
		server_pid=""
	fi
	# A daemon that died without unmounting leaves a stale mount.
	if grep -q " $mnt " /proc/self/mountinfo; then
		umount -l "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || true
	fi
}
cleanup() {
	stop_server
	rm -rf "$work"
}
trap cleanup EXIT

raw=$work/disk.raw
qcow2=$work/disk.qcow2
echo "# preparing a ${SIZE_MB} MiB raw image (random data) and a fully allocated qcow2 copy" >&2
dd if=/dev/urandom of="$raw" bs=1M count="$SIZE_MB" status=none
qemu-img convert -f raw -O qcow2 "$raw" "$qcow2"
touch "$mnt"

# name rw bs iodepth
CASES="randread-4k-qd1 randread 4k 1
randread-4k-qd32 randread 4k 32
randwrite-4k-qd1 randwrite 4k 1
randwrite-4k-qd32 randwrite 4k 32
read-1m-qd8 read 1M 8
write-1m-qd8 write 1M 8"

start_server() { # server image fmt
	local server=$1 image=$2 fmt=$3 aio=""
	case $server in
	vdiskd)
		[ -n "$VDISKD_AIO" ] && aio=",aio=$VDISKD_AIO"
		"$VDISKD" --blockdev "driver=file,node-name=f0,filename=$image$aio" \
			--blockdev "driver=$fmt,node-name=n0,file=f0" \
			--export "type=fuse,id=e0,node-name=n0,mountpoint=$mnt,writable=on" \
			>"$work/server.log" 2>&1 &
		;;
	qsd)
		[ -n "$QSD_AIO" ] && aio=",aio=$QSD_AIO"
		qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$image$aio" \
			--blockdev "driver=$fmt,node-name=n0,file=f0" \
			--export "type=fuse,id=e0,node-name=n0,mountpoint=$mnt,writable=on" \
			>"$work/server.log" 2>&1 &
		;;
	esac
	server_pid=$!
	for _ in $(seq 100); do
		if grep -q " $mnt " /proc/self/mountinfo && [ "$(stat -c %s "$mnt")" != 0 ]; then
			return 0
		fi
		kill -0 "$server_pid" 2>/dev/null || break
		sleep 0.1
	done
	echo "fuse.sh: $server did not mount $mnt:" >&2
	cat "$work/server.log" >&2
	exit 1
}

# CPU time (user + system, every thread) the daemon has used, in clock ticks.
cpu_ticks() {
	awk '{ print $14 + $15 }' "/proc/$1/stat"
}

results=$work/results.txt
: >"$results"
for round in $(seq "$RUNS"); do
	for image in raw qcow2; do
		path=$raw
		[ $image = qcow2 ] && path=$qcow2
		# Alternate which daemon goes first.
		servers="vdiskd qsd"
		[ $((round % 2)) = 0 ] && servers="qsd vdiskd"
		for server in $servers; do
			start_server $server "$path" $image
			while read -r name rw bs qd; do
				if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $name "* ]]; then
					continue
				fi
				extra=()
				case $rw in
				randread | randwrite) extra=(--randrepeat=0 --norandommap) ;;
				esac
				cpu0=$(cpu_ticks "$server_pid")
				json=$(nice fio --name=b --filename="$mnt" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" \
					--iodepth="$qd" --runtime="$RUNTIME" --time_based --output-format=json "${extra[@]}")
				cpu1=$(cpu_ticks "$server_pid")
				echo "$json" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
mib = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1048576
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
cpu_us = (int(sys.argv[6]) - int(sys.argv[5])) * 1e6 / int(sys.argv[7]) / max(ios, 1)
print(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "%.1f" % iops, "%.1f" % mib, "%.1f" % cpu_us)
' "$round" "$image" "$server" "$name" "$cpu0" "$cpu1" "$(getconf CLK_TCK)" | tee -a "$results" >&2
			done <<<"$CASES"
			stop_server
		done
	done
done

table=$(python3 - "$results" "$RUNS" "$RUNTIME" "$SIZE_MB" "${QSD_AIO:-threads (default)}" \
	"${VDISKD_AIO:-io_uring (default)}" <<'EOF'
import statistics, sys
from collections import defaultdict
path, runs, runtime, size, aio, vaio = sys.argv[1:]
vals = defaultdict(list)
order = []
for line in open(path):
    rnd, image, server, name, iops, mib, cpu = line.split()
    if (image, name) not in order:
        order.append((image, name))
    vals[(image, name, server)].append((float(iops), float(mib), float(cpu)))
print(f"fio io_uring direct=1 on the mountpoint, {runtime} s per case, {size} MiB images, "
      f"median of {runs} rounds; vdiskd aio={vaio}, qemu-storage-daemon aio={aio}")
print()
print("| image | case | vdiskd | qemu-storage-daemon | ratio | daemon CPU us/IO: vdiskd | qsd | ratio |")
print("|---|---|---|---|---|---|---|---|")
worst = None
for image, name in order:
    seq = "1m" in name
    idx = 1 if seq else 0
    unit = "MiB/s" if seq else "IOPS"
    ours = statistics.median(v[idx] for v in vals[(image, name, "vdiskd")])
    peer = statistics.median(v[idx] for v in vals[(image, name, "qsd")])
    ratio = ours / peer if peer else float("inf")
    worst = ratio if worst is None else min(worst, ratio)
    cpu_ours = statistics.median(v[2] for v in vals[(image, name, "vdiskd")])
    cpu_peer = statistics.median(v[2] for v in vals[(image, name, "qsd")])
    cpu_ratio = cpu_peer / cpu_ours if cpu_ours else float("inf")
    print(f"| {image} | {name} | {ours:.0f} {unit} | {peer:.0f} {unit} | {ratio:.2f}x "
          f"| {cpu_ours:.1f} | {cpu_peer:.1f} | {cpu_ratio:.2f}x |")
print()
print(f"lowest ratio: {worst:.2f}x")
EOF
)
echo
echo "$table"
if [ -n "$OUT" ]; then
	echo "$table" >"$OUT"
fi
