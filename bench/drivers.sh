#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# bench/drivers.sh — `vdisk bench` against fio, engine by engine, on one file.
#
# For each case (driver/engine pair x workload) it runs our tool and fio
# alternately RUNS times, takes the medians of IOPS and p99 latency, prints a
# table with ours/fio ratios and appends a dated section to bench/RESULTS.md.
#
# Environment (all optional):
#   VDISK      vdisk binary            (default: build/tools/vdisk)
#   FIO        fio binary              (default: /usr/bin/fio)
#   BENCH_DIR  where the test file goes (default: /var/tmp)
#   SIZE       test file size          (default: 1G)
#   RUNS       runs per case and tool  (default: 3)
#   RUNTIME    seconds per run         (default: 5)
#   RAMP       warm-up seconds per run, not measured (default: 0)
#   ONLY       only cases whose name matches this extended regex
#   RESULTS    Markdown file to append to (default: bench/RESULTS.md; "-": none)
#
# Exit status: 0 when every run worked, 1 when some failed (their rows say
# so), 2 on a usage or setup problem (missing fio, vdisk or python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$ROOT/build/tools/vdisk}
FIO=${FIO:-/usr/bin/fio}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-0}
ONLY=${ONLY:-}
RESULTS=${RESULTS:-$ROOT/bench/RESULTS.md}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

die() {
	echo "drivers.sh: $*" >&2
	exit 2
}

check_setup() {
	[ -x "$FIO" ] || die "fio not found at '$FIO' (install the Debian package: apt-get install fio; or set FIO=)"
	[ -x "$VDISK" ] || die "vdisk not found at '$VDISK' (build it first: make; or set VDISK=)"
	command -v "$PY" >/dev/null || die "python3 is needed to read fio's JSON"
	[ -d "$BENCH_DIR" ] || die "BENCH_DIR '$BENCH_DIR' is not a directory"
	[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a whole number >= 1, not '$RUNS'"
	[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a whole number of seconds >= 1, not '$RUNTIME'"
	[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a whole number of seconds, not '$RAMP'"
	[[ $SIZE =~ ^[1-9][0-9]*[MG]$ ]] || die "SIZE must look like 512M or 1G, not '$SIZE'"
}

size_mib() {
	case $SIZE in
	*G) echo $((${SIZE%G} * 1024)) ;;
	*M) echo "${SIZE%M}" ;;
	esac
}

# A fully written file (so that reads hit allocated blocks), in BENCH_DIR.
make_test_file() {
	local avail_kib need_mib
	need_mib=$(size_mib)
	avail_kib=$(df -Pk "$BENCH_DIR" | awk 'NR == 2 { print $4 }')
	[ "$avail_kib" -gt $((need_mib * 1024 + 65536)) ] ||
		die "$BENCH_DIR has $((avail_kib / 1024)) MiB free, the test file needs $need_mib MiB"
	FILE=$(mktemp "$BENCH_DIR/vdisk-bench.XXXXXX")
	echo "writing $SIZE of random data to $FILE ..." >&2
	dd if=/dev/urandom of="$FILE" bs=1M count="$need_mib" iflag=fullblock oflag=direct conv=fsync status=none ||
		die "cannot write $FILE with O_DIRECT (does $BENCH_DIR support direct I/O?)"
}

# Cases: name|vdisk driver|fio engine|rw|iodepth|fio numjobs
# threads has no fio twin: psync with one job per request in flight is the
# closest (N blocking preadv calls in N threads), so the threads driver gets
# num-threads=N.
all_cases() {
	local qd
	for qd in 1 32 128; do
		echo "io_uring randread QD$qd|io_uring|io_uring|randread|$qd|1"
		echo "linux-aio randread QD$qd|linux-aio|libaio|randread|$qd|1"
		echo "posix-aio randread QD$qd|posix-aio|posixaio|randread|$qd|1"
		echo "null randread QD$qd|null|null|randread|$qd|1"
		echo "threads/psync randread QD$qd|threads|psync|randread|$qd|$qd"
	done
	echo "sync/psync randread QD1|sync|psync|randread|1|1"
	echo "io_uring randwrite QD32|io_uring|io_uring|randwrite|32|1"
	echo "linux-aio randwrite QD32|linux-aio|libaio|randwrite|32|1"
	echo "posix-aio randwrite QD32|posix-aio|posixaio|randwrite|32|1"
	echo "null randwrite QD32|null|null|randwrite|32|1"
	echo "threads/psync randwrite QD32|threads|psync|randwrite|32|32"
}

selected_cases() {
	if [ -n "$ONLY" ]; then
		all_cases | grep -E -- "^[^|]*($ONLY)" || true
	else
		all_cases
	fi
}

# Prints "IOPS P99_NS" from a JSON result of vdisk bench or fio.
extract() {
	"$PY" - "$1" "$2" <<'EOF'
import json, sys

kind, path = sys.argv[1], sys.argv[2]
with open(path) as f:
    text = f.read()
data = json.loads(text[text.index("{"):])  # fio may print notes first
if kind == "vdisk":
    print(data["iops"], data["lat_ns"]["p99"])
else:
    job = data["jobs"][0]
    if job.get("error"):
        sys.exit("fio job error %d" % job["error"])
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    print(side["iops"], side["lat_ns"]["percentile"]["99.000000"])
EOF
}

run_vdisk() { # driver rw iodepth out
	local size=() path=(--path="$FILE") extra=()
	[ "$1" = null ] && { path=(); size=(--size="$SIZE"); }
	[ "$1" = threads ] && extra=(--set num-threads="$3") # as many workers as fio has psync jobs
	"$VDISK" bench --driver="$1" "${path[@]}" "${size[@]}" "${extra[@]}" --rw="$2" --bs=4k --iodepth="$3" --numjobs=1 \
		--direct=1 --runtime="${RUNTIME}s" --ramp="${RAMP}s" --output=json >"$4" 2>"$4.err"
}

run_fio() { # engine rw iodepth numjobs out
	local target=(--filename="$FILE") extra=()
	[ "$1" = null ] && target=(--size="$SIZE")
	[ "$1" = io_uring ] && extra=(--fixedbufs=1) # vdisk bench maps its buffers too
	"$FIO" --name=bench --ioengine="$1" "${target[@]}" "${extra[@]}" --rw="$2" --bs=4k --iodepth="$3" \
		--numjobs="$4" --group_reporting --thread --direct=1 --norandommap --time_based \
		--runtime="${RUNTIME}s" --ramp_time="${RAMP}s" --lat_percentiles=1 \
		--output-format=json --output="$5" >"$5.err" 2>&1
}

# One run of one tool; appends "case<TAB>tool<TAB>iops<TAB>p99" (or fail) to $RAW.
measure() { # case tool out cmd...
	local name=$1 tool=$2 out=$3 vals iops p99
	shift 3
	if "$@" && vals=$(extract "$tool" "$out" 2>>"$out.err"); then
		read -r iops p99 <<<"$vals"
		printf '%s\t%s\t%s\t%s\n' "$name" "$tool" "$iops" "$p99" >>"$RAW"
		echo "$vals"
	else
		printf '%s\t%s\tfail\t%s\n' "$name" "$tool" "$(tail -n 1 "$out.err" 2>/dev/null | tr '\t' ' ')" >>"$RAW"
		echo "failed: $(tail -n 1 "$out.err" 2>/dev/null)"
	fi
}

run_cases() {
	local n=0 total name drv eng rw qd jobs run ours fio
	total=$(selected_cases | wc -l)
	[ "$total" -gt 0 ] || die "no case matches ONLY='$ONLY'"
	while IFS='|' read -r name drv eng rw qd jobs; do
		n=$((n + 1))
		for run in $(seq 1 "$RUNS"); do
			# Alternate who goes first, so drift in the device hurts both alike.
			if [ $((run % 2)) -eq 1 ]; then
				ours=$(measure "$name" vdisk "$WORK/o.json" run_vdisk "$drv" "$rw" "$qd" "$WORK/o.json")
				fio=$(measure "$name" fio "$WORK/f.json" run_fio "$eng" "$rw" "$qd" "$jobs" "$WORK/f.json")
			else
				fio=$(measure "$name" fio "$WORK/f.json" run_fio "$eng" "$rw" "$qd" "$jobs" "$WORK/f.json")
				ours=$(measure "$name" vdisk "$WORK/o.json" run_vdisk "$drv" "$rw" "$qd" "$WORK/o.json")
			fi
			echo "[$n/$total] $name run $run/$RUNS: vdisk $ours | fio $fio" >&2
		done
	done < <(selected_cases)
}

# Medians, the table on stdout, the Markdown section into $RESULTS.
report() {
	"$PY" - "$RAW" "$RESULTS" "$@" <<'EOF'
import statistics, sys

raw, results, header = sys.argv[1], sys.argv[2], sys.argv[3]
meta = sys.argv[4:]
cases, runs = [], {}
for line in open(raw):
    name, tool, iops, p99 = line.rstrip("\n").split("\t", 3)
    if name not in runs:
        cases.append(name)
        runs[name] = {"vdisk": [], "fio": [], "err": {}}
    if iops == "fail":
        runs[name]["err"][tool] = p99
    else:
        runs[name][tool].append((float(iops), float(p99)))

def med(samples, i):
    return statistics.median(s[i] for s in samples) if samples else None

def fmt(v, scale=1.0, digits=0):
    if v is None:
        return "—"
    v /= scale
    if digits and v < 10:
        digits = 3  # sub-microsecond latencies (null driver) need more
    return f"{v:,.{digits}f}"

def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}"

cols = ["case", "vdisk IOPS", "fio IOPS", "IOPS vdisk/fio", "vdisk p99 µs", "fio p99 µs", "p99 vdisk/fio"]
rows, notes, failed = [], [], False
for name in cases:
    r = runs[name]
    oi, fi = med(r["vdisk"], 0), med(r["fio"], 0)
    op, fp = med(r["vdisk"], 1), med(r["fio"], 1)
    rows.append([name, fmt(oi), fmt(fi), ratio(oi, fi), fmt(op, 1000, 1), fmt(fp, 1000, 1), ratio(op, fp)])
    for tool, msg in r["err"].items():
        failed = True
        notes.append(f"{name}: {tool} failed: {msg}")

widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
def line(cells):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
print(line(cols))
print("  ".join("-" * w for w in widths))
for row in rows:
    print(line(row))
for n in notes:
    print("note:", n)

if results != "-":
    import os
    new = not os.path.exists(results)
    with open(results, "a") as f:
        if new:
            f.write("# vdisk bench vs fio\n\n"
                    "Recorded by `bench/drivers.sh`. Each case runs `vdisk bench` and fio on the same\n"
                    "fully written file (4 KiB requests, O_DIRECT, one job unless noted), alternating\n"
                    "which tool goes first, RUNS times each; the tables show the medians of IOPS and\n"
                    "of p99 total latency (submission to completion: fio's `lat_ns`, run with\n"
                    "`--lat_percentiles=1`). IOPS vdisk/fio above 1 means vdisk is faster; p99\n"
                    "vdisk/fio below 1 means vdisk's tail latency is lower. fio's io_uring engine\n"
                    "runs with `--fixedbufs=1` (vdisk bench maps its buffers); `threads` (with\n"
                    "num-threads = queue depth) is compared with fio's psync engine using one job\n"
                    "per request in flight.\n")
        f.write(f"\n## {header}\n\n")
        for m in meta:
            f.write(f"- {m}\n")
        f.write("\n| " + " | ".join(cols) + " |\n")
        f.write("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|\n")
        for row in rows:
            f.write("| " + " | ".join(row) + " |\n")
        if notes:
            f.write("\n" + "".join(f"- {n}\n" for n in notes))
    print(f"\nappended to {results}", file=sys.stderr)
sys.exit(1 if failed else 0)
EOF
}

describe_machine() {
	local cpu fs commit
	cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
	fs=$(stat -f -c %T "$BENCH_DIR" 2>/dev/null || echo unknown)
	commit=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
	echo "machine: $(nproc) CPUs (${cpu:-unknown CPU}), Linux $(uname -r)"
	echo "file: $SIZE on $BENCH_DIR ($fs)"
	echo "runs: $RUNS per tool and case, ${RUNTIME}s each, ramp ${RAMP}s"
	echo "tools: $("$VDISK" --version) (commit $commit), $("$FIO" --version)"
}

cleanup() {
	rm -rf "$WORK"
	if [ -n "$FILE" ]; then rm -f "$FILE"; fi
}

main() {
	local status=0 meta=()
	check_setup
	WORK=$(mktemp -d)
	FILE=
	trap cleanup EXIT
	RAW=$WORK/raw.tsv
	: >"$RAW"
	make_test_file
	run_cases
	mapfile -t meta < <(describe_machine)
	report "$(date '+%Y-%m-%d %H:%M') — ${ONLY:+ONLY=$ONLY, }RUNS=$RUNS RUNTIME=${RUNTIME}s" "${meta[@]}" || status=$?
	return "$status"
}

main "$@"
