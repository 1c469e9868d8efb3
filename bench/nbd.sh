#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# NBD export benchmark: the same images served by vdiskd, nbdkit and qemu-nbd,
# measured with the same clients in one run.
#
#   raw file:  vdiskd (writeback with io_uring and with aio=threads, and
#              cache.direct=on), nbdkit file plugin,
#              qemu-nbd cache=none (aio=native) and cache=writeback
#   qcow2:     vdiskd, qemu-nbd (writeback)
#   null:      vdiskd null-co, nbdkit null, qemu-nbd null-co (protocol overhead
#              only; nbdkit with the noextents filter so nbdcopy reads it too)
#   multi-conn: raw file served by vdiskd from one thread and from two
#              iothreads (iothread.0=io0,iothread.1=io1: connections dealt to
#              the threads, one libvdisk queue each), nbdkit, qemu-nbd; with
#              several clients at once (fio nbd engine with 4 jobs, one
#              connection each; nbdcopy with 4 connections)
#   slow null: the same with 1 ms added to every request (nbdkit: delay filter),
#              a stand-in for a slow backend: a server that bounds requests in
#              flight per connection (qemu-nbd: 16; nbdkit: 16 threads) cannot
#              use a deeper client queue
#
# Tests: fio's nbd engine, 4k randread at QD1, QD32 and QD128 and randwrite at
# QD1 and QD32 (one connection), and nbdcopy 1 MiB sequential reads of the
# whole image to null: with 1 and 4 connections (nbdcopy's start-up time is
# included: use images of 1 GiB or more for meaningful MiB/s; --threads is
# set to the connection count, since nbdcopy opens no more connections than
# threads, whose default is the CPU count).  The multi-conn group runs
# randread-4jobs-qd32 and randwrite-4jobs-qd32 (fio, 4 jobs x QD8, one
# connection each) and seqread-4conn.  Prints IOPS
# and MiB/s per server and the ratios of vdiskd to the others.
#
# Usage: bench/nbd.sh [-t SECONDS] [-s SIZE_MB] [-r ROUNDS] [-o RESULTS.md]
#   VDISK_BUILD  build directory holding daemon/vdiskd (default <repo>/build)
#   RUNTIME/-t   seconds per fio run (default 10)
#   SIZE_MB/-s   image size in MiB (default 1024); the raw image is filled with
#                random data (holes would let nbdcopy skip the reads)
#   REPEAT/-r    rounds over all servers (default 1; RUNS is an alias); each
#                number reported is the median of its rounds, and servers
#                alternate within a round, so background load hits them alike
#   RAW_OUT      if set, a copy of the raw per-round figures is written there
#   ONLY         space-separated server names to run (default: all)
#   VDISKD_BEFORE another vdiskd binary (e.g. an older build) to run as the extra
#                servers before-raw and before-null, for a before/after comparison
#                under the same load
#
# Besides IOPS, the fio tests report the server's CPU time per request (user +
# system of the server process, /proc/PID/stat, over the fio run including its
# 1 s ramp, divided by IOPS x (runtime + 1)): it is far less sensitive to other
# load on the machine than IOPS, and shows what each server spends per request.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BUILD=${VDISK_BUILD:-$repo/build}
VDISKD=$BUILD/daemon/vdiskd
VDISKD_BEFORE=${VDISKD_BEFORE:-}
RUNTIME=${RUNTIME:-10}
SIZE_MB=${SIZE_MB:-1024}
OUT=""
ONLY=${ONLY:-}
REPEAT=${REPEAT:-${RUNS:-1}}
RAW_OUT=${RAW_OUT:-}

while getopts "t:s:o:r:h" opt; do
	case $opt in
	t) RUNTIME=$OPTARG ;;
	s) SIZE_MB=$OPTARG ;;
	r) REPEAT=$OPTARG ;;
	o) OUT=$OPTARG ;;
	h) sed -n '3,50p' "$0"; exit 0 ;;
	*) exit 2 ;;
	esac
done

for tool in fio nbdcopy nbdinfo qemu-img qemu-nbd nbdkit python3; do
	command -v $tool >/dev/null || { echo "nbd.sh: $tool is required" >&2; exit 2; }
done
[ -x "$VDISKD" ] || { echo "nbd.sh: $VDISKD not found (set VDISK_BUILD)" >&2; exit 2; }

work=$(mktemp -d /tmp/vdisk-nbd-bench.XXXXXX)
server_pid=""
cleanup() {
	[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

raw=$work/disk.raw
qcow2=$work/disk.qcow2
sock=$work/nbd.sock
size=$((SIZE_MB * 1024 * 1024))

echo "# preparing a ${SIZE_MB} MiB raw image (random data) and a fully allocated qcow2 copy" >&2
dd if=/dev/urandom of="$raw" bs=1M count="$SIZE_MB" status=none
qemu-img convert -f raw -O qcow2 "$raw" "$qcow2"
sync # the kernel's writeback of the images must not run during the first tests

# ---- servers -------------------------------------------------------------------------------------

# start NAME: run the server NAME on $sock; sets $uri.
start() {
	rm -f "$sock"
	case $1 in
	vdiskd-raw|before-raw)
		"$([ "$1" = before-raw ] && echo "$VDISKD_BEFORE" || echo "$VDISKD")" --blockdev "driver=file,node-name=f0,filename=$raw" --blockdev driver=raw,node-name=d,file=f0 \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-raw-mq)
		"$VDISKD" --object iothread,id=io0 --object iothread,id=io1 \
			--blockdev "driver=file,node-name=f0,filename=$raw" --blockdev driver=raw,node-name=d,file=f0 \
			--nbd-server "addr.type=unix,addr.path=$sock" \
			--export type=nbd,id=e,node-name=d,writable=on,iothread.0=io0,iothread.1=io1 &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-raw-threads)
		"$VDISKD" --blockdev "driver=file,node-name=f0,filename=$raw,aio=threads" \
			--blockdev driver=raw,node-name=d,file=f0 \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-raw-direct)
		"$VDISKD" --blockdev "driver=file,node-name=f0,filename=$raw,cache.direct=on" \
			--blockdev driver=raw,node-name=d,file=f0 \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-qcow2)
		"$VDISKD" --blockdev "driver=file,node-name=f0,filename=$qcow2" --blockdev driver=qcow2,node-name=d,file=f0 \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-null|before-null)
		"$([ "$1" = before-null ] && echo "$VDISKD_BEFORE" || echo "$VDISKD")" --blockdev "driver=null-co,node-name=d,size=$size,read-zeroes=off" \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	vdiskd-null-1ms)
		"$VDISKD" --blockdev "driver=null-co,node-name=d,size=$size,read-zeroes=off,latency-ns=1000000" \
			--nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=d,writable=on &
		uri="nbd+unix:///d?socket=$sock" ;;
	nbdkit-null-1ms)
		nbdkit -f -U "$sock" --filter=noextents --filter=delay null size="$size" rdelay=1ms wdelay=1ms &
		uri="nbd+unix:///?socket=$sock" ;;
	qemu-nbd-null-1ms)
		qemu-nbd --persistent --shared=8 --socket="$sock" \
			--image-opts "driver=null-co,size=$size,read-zeroes=off,latency-ns=1000000" &
		uri="nbd+unix:///?socket=$sock" ;;
	nbdkit-file)
		nbdkit -f -U "$sock" file "$raw" &
		uri="nbd+unix:///?socket=$sock" ;;
	nbdkit-null)
		nbdkit -f -U "$sock" --filter=noextents null size="$size" &
		uri="nbd+unix:///?socket=$sock" ;;
	qemu-nbd-raw-none)
		qemu-nbd --persistent --shared=8 --socket="$sock" --format=raw --cache=none --aio=native "$raw" &
		uri="nbd+unix:///?socket=$sock" ;;
	qemu-nbd-raw-wb)
		qemu-nbd --persistent --shared=8 --socket="$sock" --format=raw --cache=writeback "$raw" &
		uri="nbd+unix:///?socket=$sock" ;;
	qemu-nbd-qcow2)
		qemu-nbd --persistent --shared=8 --socket="$sock" --format=qcow2 --cache=writeback "$qcow2" &
		uri="nbd+unix:///?socket=$sock" ;;
	qemu-nbd-null)
		qemu-nbd --persistent --shared=8 --socket="$sock" --image-opts "driver=null-co,size=$size,read-zeroes=off" &
		uri="nbd+unix:///?socket=$sock" ;;
	*) echo "unknown server $1" >&2; exit 2 ;;
	esac
	server_pid=$!
	for _ in $(seq 200); do
		[ -S "$sock" ] && nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	echo "nbd.sh: server $1 did not come up" >&2
	exit 1
}

stop() {
	kill "$server_pid" 2>/dev/null || true
	wait "$server_pid" 2>/dev/null || true
	server_pid=""
}

# ---- tests ----------------------------------------------------------------------------------------

results=$work/results.txt
: >"$results"

server_ticks() {
	awk '{print $14 + $15}' "/proc/$server_pid/stat"
}

fio_iops() { # rw qd [jobs]: prints IOPS; appends the server's CPU µs per request to $cpu_file
	local t0 t1 iops
	t0=$(server_ticks)
	iops=$(fio --name=b --ioengine=nbd --uri="$uri" --rw="$1" --bs=4k --iodepth="$2" --size="${SIZE_MB}M" \
		--numjobs="${3:-1}" --group_reporting \
		--time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null |
		python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))')
	t1=$(server_ticks)
	python3 -c "import os; print(round(($t1 - $t0) * 1e6 / os.sysconf('SC_CLK_TCK') / max(1, $iops * ($RUNTIME + 1)), 2))" >"$cpu_file"
	echo "$iops"
}
cpu_file=$work/cpu

copy_mibs() { # connections
	local t0 t1
	t0=$(date +%s.%N)
	nbdcopy --connections="$1" --threads="$1" --request-size=1048576 "$uri" null: >/dev/null
	t1=$(date +%s.%N)
	python3 -c "print(round($SIZE_MB / ($t1 - $t0)))"
}

TESTS="randread-qd1 randread-qd32 randread-qd128 randwrite-qd1 randwrite-qd32 seqread-1conn seqread-4conn"

TESTS_MQ="randread-4jobs-qd32 randwrite-4jobs-qd32 seqread-4conn"

run_server() {
	local name=$1 tests=${2:-$TESTS} v
	start "$name"
	local mc
	mc=$(nbdinfo --can multi-conn "$uri" >/dev/null 2>&1 && echo yes || echo no)
	echo "# $name (multi-conn: $mc)" >&2
	for t in $tests; do
		# Write back what the previous tests dirtied first: on 2 CPUs the flusher
		# threads and their disk I/O would otherwise land on whichever test follows.
		sync
		case $t in
		randread-4jobs-qd32) v=$(fio_iops randread 8 4) ;;
		randwrite-4jobs-qd32) v=$(fio_iops randwrite 8 4) ;;
		randread-qd1) v=$(fio_iops randread 1) ;;
		randread-qd32) v=$(fio_iops randread 32) ;;
		randread-qd128) v=$(fio_iops randread 128) ;;
		randwrite-qd1) v=$(fio_iops randwrite 1) ;;
		randwrite-qd32) v=$(fio_iops randwrite 32) ;;
		seqread-1conn) v=$(copy_mibs 1) ;;
		seqread-4conn) v=$(copy_mibs 4) ;;
		esac
		echo "$name $t $v" >>"$results"
		if [[ $t == rand* ]]; then
			echo "$name cpu:$t $(cat "$cpu_file")" >>"$results"
			echo "#   $t: $v (server CPU $(cat "$cpu_file") µs/request)" >&2
		else
			echo "#   $t: $v" >&2
		fi
	done
	echo "$name multi-conn $mc" >>"$results"
	stop
}

# A server of the multi-conn group: results under its mq: name.
run_server_mq() {
	local name=${1#mq:} saved=$results
	results=$work/results-mq.txt
	: >"$results"
	run_server "$name" "$TESTS_MQ"
	sed "s/^$name /$1 /" "$results" >>"$saved"
	results=$saved
}

GROUPS_RAW="vdiskd-raw vdiskd-raw-threads vdiskd-raw-direct nbdkit-file qemu-nbd-raw-none qemu-nbd-raw-wb"
GROUPS_QCOW2="vdiskd-qcow2 qemu-nbd-qcow2"
GROUPS_NULL="vdiskd-null nbdkit-null qemu-nbd-null"
if [ -n "$VDISKD_BEFORE" ]; then
	GROUPS_RAW="before-raw $GROUPS_RAW"
	GROUPS_NULL="before-null $GROUPS_NULL"
fi
GROUPS_SLOW="vdiskd-null-1ms nbdkit-null-1ms qemu-nbd-null-1ms"
GROUPS_MQ="vdiskd-raw-mq mq:vdiskd-raw mq:nbdkit-file mq:qemu-nbd-raw-wb"
for round in $(seq "$REPEAT"); do
	[ "$REPEAT" -gt 1 ] && echo "## round $round of $REPEAT" >&2
	for s in $GROUPS_RAW $GROUPS_QCOW2 $GROUPS_NULL $GROUPS_SLOW; do
		if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $s "* ]]; then
			continue
		fi
		run_server "$s"
	done
	# The multi-conn group: its own tests; mq:NAME is server NAME under those tests.
	for s in $GROUPS_MQ; do
		if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $s "* ]]; then
			continue
		fi
		run_server_mq "$s"
	done
done

# ---- report ---------------------------------------------------------------------------------------

report=$(python3 - "$results" "$RUNTIME" "$SIZE_MB" "$GROUPS_RAW" "$GROUPS_QCOW2" "$GROUPS_NULL" "$REPEAT" \
	"$GROUPS_SLOW" "$GROUPS_MQ" <<'EOF'
import sys, collections, platform, os, subprocess
path, runtime, size_mb = sys.argv[1], sys.argv[2], sys.argv[3]
groups = [("raw file", sys.argv[4].split()), ("qcow2", sys.argv[5].split()), ("null", sys.argv[6].split()),
          ("slow null (1 ms per request)", sys.argv[8].split()),
          ("multi-conn raw file (several clients; vdiskd-raw-mq: 2 iothreads)", sys.argv[9].split())]
rounds = sys.argv[7]
import statistics
res = collections.defaultdict(dict)
vals = collections.defaultdict(list)
for line in open(path):
    name, test, val = line.split()
    if test == "multi-conn":
        res[name][test] = val
    else:
        vals[(name, test)].append(float(val))
for (name, test), v in vals.items():
    m = statistics.median(v)  # median of the rounds
    res[name][test] = f"{m:.2f}" if test.startswith("cpu:") else str(round(m))
all_tests = ["randread-qd1", "randread-qd32", "randread-qd128", "randwrite-qd1", "randwrite-qd32", "seqread-1conn",
             "seqread-4conn", "randread-4jobs-qd32", "randwrite-4jobs-qd32"]
units = {t: ("IOPS" if t.startswith("rand") else "MiB/s") for t in all_tests}
load = open("/proc/loadavg").read().split()[:3]
print(f"NBD export benchmark: {size_mb} MiB image, fio {runtime}s per point, median of {rounds} round(s), "
      f"{os.cpu_count()} CPUs, kernel {platform.release()}, load average at the end {' '.join(load)}")
print()
for title, names in groups:
    names = [n for n in names if n in res]
    if not names:
        continue
    tests = [t for t in all_tests if any(t in res[n] for n in names)]
    print(f"### {title}")
    print()
    print("| test | unit | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for t in tests:
        print(f"| {t} | {units[t]} | " + " | ".join(res[n].get(t, "-") for n in names) + " |")
    for t in tests:
        if t.startswith("rand"):
            print(f"| {t} server CPU | µs/req | " + " | ".join(res[n].get("cpu:" + t, "-") for n in names) + " |")
    print("| multi-conn | | " + " | ".join(res[n].get("multi-conn", "-") for n in names) + " |")
    print()
    base = [n for n in names if n.split(":")[-1].startswith("vdiskd")]
    others = [n for n in names if not n.split(":")[-1].startswith("vdiskd")]
    for b in base[1:]:  # several vdiskd configurations: the first against the others
        ratios = []
        for t in tests:
            try:
                ratios.append(f"{t} {float(res[base[0]][t]) / float(res[b][t]):.2f}")
            except (KeyError, ValueError, ZeroDivisionError):
                pass
        print(f"- {base[0]} / {b} (throughput): " + ", ".join(ratios))
    for b in base:
        for o in others:
            ratios = []
            for t in tests:
                try:
                    ratios.append(f"{t} {float(res[b][t]) / float(res[o][t]):.2f}")
                except (KeyError, ValueError, ZeroDivisionError):
                    pass
            print(f"- {b} / {o} (throughput): " + ", ".join(ratios))
            ratios = []
            for t in tests:
                try:
                    ratios.append(f"{t} {float(res[b]['cpu:' + t]) / float(res[o]['cpu:' + t]):.2f}")
                except (KeyError, ValueError, ZeroDivisionError):
                    pass
            if ratios:
                print(f"- {b} / {o} (server CPU per request, lower is better): " + ", ".join(ratios))
    print()
EOF
)
echo "$report"
[ -n "$RAW_OUT" ] && cp "$results" "$RAW_OUT"
if [ -n "$OUT" ]; then
	echo "$report" >>"$OUT"
fi
