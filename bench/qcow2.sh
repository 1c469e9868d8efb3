#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# bench/qcow2.sh — the block layer against QEMU's: `vdisk bench --image`
# against `qemu-img bench`, and `vdisk convert` against `qemu-img convert`,
# on the same files.
#
# Bench cases (4 KiB requests unless noted, queue depth 32, each for every
# format in FORMATS and cache mode in CACHES, aio=AIO).  Both tools get the
# same request stream: COUNT requests, each STEP bytes after the previous
# (qemu-img bench -c/-S, vdisk bench --count/--stride), IOPS = requests /
# time from the first submission to the last completion.
#   read 4k step 4k        reads of a fully allocated image (random data)
#   read 4k step 1M        the same, 1 MiB apart (a new L2 slice each time)
#   write 4k step 64k new  into an empty image: with qcow2 (64 KiB clusters)
#                          every write allocates a cluster and copies the
#                          rest of it (COW); raw: a sparse file
#   write 4k step 64k old  the same into already allocated clusters
#   write 64k seq new      64 KiB sequential writes into an empty image
# An empty image is created afresh (by qemu-img) before every run.
#
# Convert cases, when `vdisk convert` exists (skipped with a note
# otherwise): qcow2->raw, raw->qcow2, raw->qcow2 -c (zlib) and, when qemu-img
# can write zstd, raw->qcow2 -c with compression_type=zstd, of a CONVERT_SIZE
# image that is half data (1 MiB of random data, then a 1 MiB hole, ...),
# default cache modes (target unsafe) for both; each vdisk output is checked
# with qemu-img compare (untimed).  Besides the wall time, the CPU time
# (user + system, all threads including io_uring's workers, /usr/bin/time)
# of each run is recorded: on a shared, loaded machine the wall time swings
# with the load, the CPU time much less.
#
# Every case runs RUNS times per tool, alternating which goes first; the
# medians are printed with ours/qemu ratios and appended to RESULTS.
#
# Environment (all optional):
#   VDISK        vdisk binary             (default: build/tools/vdisk)
#   QEMU_IMG     qemu-img binary          (default: qemu-img from PATH)
#   BENCH_DIR    where the images go      (default: /var/tmp)
#   SIZE         bench image size         (default: 1G)
#   CONVERT_SIZE convert source size      (default: 2G)
#   RUNS         runs per case and tool   (default: 3)
#   COUNT        requests per read run    (default: 65536; write runs cover
#                the image once: SIZE / 64k requests)
#   FORMATS      formats to bench         (default: "raw qcow2"; qcow2 is
#                skipped with a note when vdisk cannot open qcow2 yet)
#   CACHES       cache modes              (default: "none writeback")
#   AIO          io_uring, native, threads (default: io_uring)
#   ONLY         only cases whose name matches this extended regex
#   RESULTS      Markdown file to append to (default: bench/RESULTS.md; "-": none)
#
# Exit status: 0 when every run worked, 1 when some failed (their rows say
# so), 2 on a usage or setup problem.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$ROOT/build/tools/vdisk}
QEMU_IMG=${QEMU_IMG:-$(command -v qemu-img || echo qemu-img)}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
SIZE=${SIZE:-1G}
CONVERT_SIZE=${CONVERT_SIZE:-2G}
RUNS=${RUNS:-3}
COUNT=${COUNT:-65536}
FORMATS=${FORMATS:-raw qcow2}
CACHES=${CACHES:-none writeback}
AIO=${AIO:-io_uring}
ONLY=${ONLY:-}
RESULTS=${RESULTS:-$ROOT/bench/RESULTS.md}
DEPTH=32
CLUSTER=65536
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

die() {
	echo "qcow2.sh: $*" >&2
	exit 2
}

note() {
	echo "qcow2.sh: $*" >&2
	NOTES+=("$*")
}

mib() { # 512M / 2G -> MiB
	case $1 in
	*G) echo $((${1%G} * 1024)) ;;
	*M) echo "${1%M}" ;;
	esac
}

check_setup() {
	local f c
	[ -x "$VDISK" ] || die "vdisk not found at '$VDISK' (build it first; or set VDISK=)"
	[ -x "$QEMU_IMG" ] || die "qemu-img not found (apt-get install qemu-utils; or set QEMU_IMG=)"
	command -v "$PY" >/dev/null || die "python3 is needed to read the results"
	[ -d "$BENCH_DIR" ] || die "BENCH_DIR '$BENCH_DIR' is not a directory"
	[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a whole number >= 1, not '$RUNS'"
	[[ $COUNT =~ ^[1-9][0-9]*$ ]] || die "COUNT must be a whole number >= 1, not '$COUNT'"
	[[ $SIZE =~ ^[1-9][0-9]*[MG]$ ]] || die "SIZE must look like 512M or 1G, not '$SIZE'"
	[[ $CONVERT_SIZE =~ ^[1-9][0-9]*[MG]$ ]] || die "CONVERT_SIZE must look like 512M or 2G, not '$CONVERT_SIZE'"
	[ $(($(mib "$SIZE") % 2)) -eq 0 ] || die "SIZE must be a whole number of 2 MiB"
	[ $(($(mib "$CONVERT_SIZE") % 2)) -eq 0 ] || die "CONVERT_SIZE must be a whole number of 2 MiB"
	for f in $FORMATS; do
		[[ $f =~ ^(raw|qcow2)$ ]] || die "FORMATS: '$f' is not raw or qcow2"
	done
	for c in $CACHES; do
		[[ $c =~ ^(none|writeback|writethrough|directsync|unsafe)$ ]] || die "CACHES: invalid cache mode '$c'"
	done
	[[ $AIO =~ ^(io_uring|native|threads)$ ]] || die "AIO must be io_uring, native or threads, not '$AIO'"
	"$QEMU_IMG" bench --help >/dev/null 2>&1 || die "'$QEMU_IMG bench' does not work"
	[ -x /usr/bin/time ] || die "/usr/bin/time is needed for the CPU times (apt-get install time)"
}

check_space() {
	local need_mib avail_kib
	need_mib=$(($(mib "$SIZE") * 4 + $(mib "$CONVERT_SIZE") * 3))
	avail_kib=$(df -Pk "$BENCH_DIR" | awk 'NR == 2 { print $4 }')
	[ "$avail_kib" -gt $((need_mib * 1024)) ] ||
		die "$BENCH_DIR has $((avail_kib / 1024)) MiB free, the images need up to $need_mib MiB"
}

# ---- images --------------------------------------------------------------------------

# Fully written images of SIZE: raw with random data, and the qcow2 of it.
make_bench_images() {
	FULL_RAW=$WORK/full.raw
	FULL_QCOW2=$WORK/full.qcow2
	EMPTY=$WORK/empty.img
	echo "writing $SIZE of random data to $FULL_RAW ..." >&2
	dd if=/dev/urandom of="$FULL_RAW" bs=1M count="$(mib "$SIZE")" iflag=fullblock conv=fsync status=none ||
		die "cannot write $FULL_RAW"
	"$QEMU_IMG" convert -f raw -O qcow2 -o cluster_size=$CLUSTER "$FULL_RAW" "$FULL_QCOW2" ||
		die "cannot convert $FULL_RAW to qcow2"
	sync "$FULL_QCOW2"
}

# Half data: 1 MiB of random data, then a 1 MiB hole, to the end.
make_convert_images() {
	CONV_RAW=$WORK/conv.raw
	CONV_QCOW2=$WORK/conv.qcow2
	CONV_OUT=$WORK/conv.out
	echo "writing a half-full $CONVERT_SIZE image to $CONV_RAW ..." >&2
	"$PY" - "$CONV_RAW" "$(mib "$CONVERT_SIZE")" <<'EOF' || die "cannot write $CONV_RAW"
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(0, mib, 2):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
    f.truncate(mib << 20)
    os.fsync(f.fileno())
EOF
	"$QEMU_IMG" convert -f raw -O qcow2 "$CONV_RAW" "$CONV_QCOW2" || die "cannot convert $CONV_RAW to qcow2"
	# On disk before the first run: its writeback would otherwise slow whichever tool runs first.
	sync "$CONV_QCOW2"
}

# The image a run works on: full ones are shared, empty ones are new each run.
image_for() { # fmt full|empty
	if [ "$2" = full ]; then
		[ "$1" = raw ] && echo "$FULL_RAW" || echo "$FULL_QCOW2"
		return
	fi
	rm -f "$EMPTY"
	if [ "$1" = raw ]; then
		truncate -s "$SIZE" "$EMPTY"
	else
		"$QEMU_IMG" create -q -f qcow2 -o cluster_size=$CLUSTER "$EMPTY" "$SIZE"
	fi
	echo "$EMPTY"
}

# ---- cases ---------------------------------------------------------------------------

# bench|name|fmt|cache|image(full/empty)|rw|bs|step|count
# convert|name|src fmt|dst fmt|extra args (the source is the half-full image of src fmt)
all_cases() {
	local fmt cache writes
	writes=$(($(mib "$SIZE") * 1024 * 1024 / CLUSTER))
	for fmt in $FORMATS; do
		for cache in $CACHES; do
			echo "bench|$fmt $cache: read 4k step 4k|$fmt|$cache|full|read|4096|4096|$COUNT"
			echo "bench|$fmt $cache: read 4k step 1M|$fmt|$cache|full|read|4096|1048576|$COUNT"
			echo "bench|$fmt $cache: write 4k step 64k new|$fmt|$cache|empty|write|4096|65536|$writes"
			echo "bench|$fmt $cache: write 4k step 64k old|$fmt|$cache|full|write|4096|65536|$writes"
			echo "bench|$fmt $cache: write 64k seq new|$fmt|$cache|empty|write|65536|65536|$writes"
		done
	done
	echo "convert|convert qcow2 -> raw|qcow2|raw|"
	echo "convert|convert raw -> qcow2|raw|qcow2|"
	echo "convert|convert raw -> qcow2 -c|raw|qcow2|-c"
	if [ "${HAVE_ZSTD:-0}" = 1 ]; then
		echo "convert|convert raw -> qcow2 -c zstd|raw|qcow2|-c -o compression_type=zstd"
	fi
}

selected_cases() {
	if [ -n "$ONLY" ]; then
		all_cases | awk -F'|' -v re="$ONLY" '$2 ~ re' || true
	else
		all_cases
	fi
}

# ---- one run ------------------------------------------------------------------------

run_vdisk_bench() { # out fmt cache image rw bs step count
	"$VDISK" bench --image="$4" --format="$2" --cache="$3" --aio="$AIO" --rw="$5" --bs="$6" --stride="$7" \
		--iodepth=$DEPTH --count="$8" --output=json >"$1" 2>"$1.err"
}

run_qemu_bench() { # out fmt cache image rw bs step count
	local w=()
	[ "$5" = write ] && w=(-w --pattern=165) # non-zero data, as vdisk bench writes
	"$QEMU_IMG" bench -f "$2" -t "$3" -i "$AIO" -c "$8" -d $DEPTH -s "$6" -S "$7" "${w[@]}" "$4" \
		>"$1" 2>"$1.err"
}

run_vdisk_convert() { # out src_fmt src dst_fmt extra
	local t0
	rm -f "$CONV_OUT"
	t0=$(date +%s.%N)
	# shellcheck disable=SC2086 # $5 is zero or more options
	/usr/bin/time -f "%U %S" -o "$1.cpu" "$VDISK" convert -f "$2" -O "$4" $5 "$3" "$CONV_OUT" >"$1.err" 2>&1 ||
		return 1
	echo "$t0 $(date +%s.%N) $(cat "$1.cpu")" >"$1"
	# Fast but wrong would not count: the copy must read back as the source (not timed).
	"$QEMU_IMG" compare -q -f "$2" -F "$4" "$3" "$CONV_OUT" >>"$1.err" 2>&1 ||
		{ echo "vdisk convert output differs from its source (qemu-img compare)" >>"$1.err"; return 1; }
}

run_qemu_convert() { # out src_fmt src dst_fmt extra
	local t0
	rm -f "$CONV_OUT"
	t0=$(date +%s.%N)
	# shellcheck disable=SC2086
	/usr/bin/time -f "%U %S" -o "$1.cpu" "$QEMU_IMG" convert -f "$2" -O "$4" $5 "$3" "$CONV_OUT" >"$1.err" 2>&1 ||
		return 1
	echo "$t0 $(date +%s.%N) $(cat "$1.cpu")" >"$1"
}

# The value of one run: IOPS for bench, "wall,cpu" seconds for convert.
extract() { # kind tool out count
	"$PY" - "$@" <<'EOF'
import json, re, sys

kind, tool, path, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
text = open(path).read()
if kind == "convert":
    t0, t1, user, system = map(float, text.split())
    print(f"{t1 - t0:.3f},{user + system:.3f}")
elif tool == "vdisk":
    d = json.loads(text)
    if d["ios"] != int(count):
        sys.exit(f"vdisk did {d['ios']} requests, not {count}")
    print(d["iops"])
else:
    m = re.search(r"Run completed in ([0-9.]+) seconds", text)
    if not m:
        sys.exit("no 'Run completed in' line from qemu-img bench")
    print(int(count) / max(float(m.group(1)), 0.001))
EOF
}

# One run of one tool; appends "case<TAB>tool<TAB>value" (or fail<TAB>why) to $RAW.
measure() { # kind name tool count cmd args...
	local kind=$1 name=$2 tool=$3 count=$4 out=$WORK/out val
	shift 4
	sync # dirty pages of an earlier run must not be written back during this one
	if "$@" && val=$(extract "$kind" "$tool" "$out" "$count" 2>>"$out.err"); then
		printf '%s\t%s\t%s\t%s\n' "$kind" "$name" "$tool" "$val" >>"$RAW"
		echo "$val"
	else
		printf '%s\t%s\t%s\tfail\t%s\n' "$kind" "$name" "$tool" "$(tail -n 1 "$out.err" 2>/dev/null | tr '\t' ' ')" >>"$RAW"
		echo "failed: $(tail -n 1 "$out.err" 2>/dev/null)"
	fi
}

bench_run() { # tool name fmt cache image rw bs step count
	local img
	img=$(image_for "$3" "$5")
	if [ "$1" = vdisk ]; then
		measure bench "$2" vdisk "$9" run_vdisk_bench "$WORK/out" "$3" "$4" "$img" "$6" "$7" "$8" "$9"
	else
		measure bench "$2" qemu "$9" run_qemu_bench "$WORK/out" "$3" "$4" "$img" "$6" "$7" "$8" "$9"
	fi
}

convert_run() { # tool name src_fmt dst_fmt extra
	local src=$CONV_RAW
	[ "$3" = qcow2 ] && src=$CONV_QCOW2
	if [ "$1" = vdisk ]; then
		measure convert "$2" vdisk 0 run_vdisk_convert "$WORK/out" "$3" "$src" "$4" "$5"
	else
		measure convert "$2" qemu 0 run_qemu_convert "$WORK/out" "$3" "$src" "$4" "$5"
	fi
}

# ---- what can run --------------------------------------------------------------------

# qcow2 through vdisk: the qcow2 format may not be built (or working) yet.
check_vdisk_qcow2() {
	[[ " $FORMATS " == *" qcow2 "* ]] || return 0
	"$QEMU_IMG" create -q -f qcow2 "$WORK/probe.qcow2" 1M || die "qemu-img cannot create a qcow2 image"
	if ! "$VDISK" bench --image="$WORK/probe.qcow2" --format=qcow2 --rw=read --count=1 --output=json \
		>"$WORK/probe" 2>"$WORK/probe.err"; then
		note "qcow2 bench cases skipped: vdisk cannot read qcow2 yet ($(tail -n 1 "$WORK/probe.err"))"
		FORMATS=${FORMATS//qcow2/}
	fi
}

# zstd: qemu-img may be built without it.
HAVE_ZSTD=0
check_zstd() {
	if "$QEMU_IMG" create -q -f qcow2 -o compression_type=zstd "$WORK/zstd.qcow2" 1M >/dev/null 2>&1; then
		HAVE_ZSTD=1
	else
		note "convert -c zstd case skipped: this qemu-img cannot create zstd-compressed qcow2"
	fi
}

HAVE_CONVERT=1
check_vdisk_convert() {
	if ! "$VDISK" convert --help >/dev/null 2>&1; then
		note "convert cases skipped: 'vdisk convert --help' fails (no vdisk convert in this build)"
		HAVE_CONVERT=0
	fi
}

run_cases() {
	local n=0 total kind name a b c d e f g run ours theirs order tool val
	total=$(selected_cases | grep -c . || true)
	[ "$total" -gt 0 ] || die "no case matches ONLY='$ONLY'"
	while IFS='|' read -r kind name a b c d e f g; do
		n=$((n + 1))
		if [ "$kind" = convert ] && [ "$HAVE_CONVERT" = 0 ]; then
			continue
		fi
		if [ "$kind" = convert ] && [ -z "${CONV_RAW:-}" ]; then
			make_convert_images
		fi
		if [ "$kind" = bench ] && [ -z "${FULL_RAW:-}" ]; then
			make_bench_images
		fi
		for run in $(seq 1 "$RUNS"); do
			# Alternate who goes first, so drift in the device hurts both alike.
			if [ $((run % 2)) -eq 1 ]; then order="vdisk qemu"; else order="qemu vdisk"; fi
			for tool in $order; do
				if [ "$kind" = bench ]; then
					val=$(bench_run "$tool" "$name" "$a" "$b" "$c" "$d" "$e" "$f" "$g")
				else
					val=$(convert_run "$tool" "$name" "$a" "$b" "$c")
				fi
				if [ "$tool" = vdisk ]; then ours=$val; else theirs=$val; fi
			done
			echo "[$n/$total] $name run $run/$RUNS: vdisk $ours | qemu $theirs" >&2
		done
	done < <(selected_cases)
}

# ---- report ----------------------------------------------------------------------------

report() { # header meta...
	"$PY" - "$RAW" "$RESULTS" "$@" <<'EOF'
import statistics, sys

raw, results, header = sys.argv[1], sys.argv[2], sys.argv[3]
meta = sys.argv[4:]
order, runs, kinds = [], {}, {}
for line in open(raw):
    kind, name, tool, val, *why = line.rstrip("\n").split("\t")
    if name not in runs:
        order.append(name)
        runs[name] = {"vdisk": [], "qemu": [], "vdisk cpu": [], "qemu cpu": [], "err": {}}
        kinds[name] = kind
    if val == "fail":
        runs[name]["err"][tool] = why[0] if why else "?"
    elif kind == "convert":
        wall, cpu = val.split(",")
        runs[name][tool].append(float(wall))
        runs[name][tool + " cpu"].append(float(cpu))
    else:
        runs[name][tool].append(float(val))

def med(v):
    return statistics.median(v) if v else None

def fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"

def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}"

tables = {
    "bench": (["case", "vdisk IOPS", "qemu IOPS", "IOPS vdisk/qemu"], 0),
    "convert": (["case", "vdisk s", "qemu s", "time vdisk/qemu", "vdisk CPU s", "qemu CPU s", "CPU vdisk/qemu",
                 "vdisk best s", "qemu best s", "best vdisk/qemu"], 2),
}
out_tables, notes, failed = [], [], False
for kind, (cols, digits) in tables.items():
    rows = []
    for name in order:
        if kinds[name] != kind:
            continue
        r = runs[name]
        o, q = med(r["vdisk"]), med(r["qemu"])
        row = [name, fmt(o, digits), fmt(q, digits), ratio(o, q)]
        if kind == "convert":
            oc, qc = med(r["vdisk cpu"]), med(r["qemu cpu"])
            ob, qb = min(r["vdisk"], default=None), min(r["qemu"], default=None)
            row += [fmt(oc, digits), fmt(qc, digits), ratio(oc, qc), fmt(ob, digits), fmt(qb, digits), ratio(ob, qb)]
        rows.append(row)
        for tool, msg in r["err"].items():
            failed = True
            notes.append(f"{name}: {tool} failed: {msg}")
    if rows:
        out_tables.append((cols, rows))

for cols, rows in out_tables:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(cols))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
for n in notes:
    print("note:", n)

if results != "-":
    with open(results, "a") as f:
        f.write(f"\n## {header}\n\n")
        f.write("Recorded by `bench/qcow2.sh`: the block layer (`vdisk bench --image`, one thread,\n"
                "queue depth 32 coroutines) against `qemu-img bench` on the same images, both\n"
                "issuing the same COUNT requests STEP bytes apart (`--count`/`--stride`, `-c`/`-S`);\n"
                "IOPS = requests / time to the last completion, median of RUNS runs alternating\n"
                "which tool goes first. \"new\" writes go to an empty image created before each run\n"
                "(qcow2, 64 KiB clusters: every 4 KiB write allocates a cluster and copies the rest\n"
                "of it), \"old\" ones to allocated clusters. IOPS vdisk/qemu above 1: vdisk faster.\n"
                "Convert rows: seconds (median) of `vdisk convert` and `qemu-img convert` on a\n"
                "half-full image, wall and CPU (user + system, all threads); time vdisk/qemu\n"
                "below 1: vdisk faster. \"best\" is the fastest run of each tool: on a VM whose host\n"
                "backs fresh page-cache pages lazily some runs of either tool take several times\n"
                "longer, all of it in the kernel, and that noise only ever adds time.\n\n")
        for m in meta:
            f.write(f"- {m}\n")
        for cols, rows in out_tables:
            f.write("\n| " + " | ".join(cols) + " |\n")
            f.write("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|\n")
            for row in rows:
                f.write("| " + " | ".join(row) + " |\n")
        if notes:
            f.write("\n" + "".join(f"- {n}\n" for n in notes))
    print(f"appended to {results}", file=sys.stderr)
sys.exit(1 if failed else 0)
EOF
}

describe_machine() {
	local cpu fs commit n
	cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
	fs=$(stat -f -c %T "$BENCH_DIR" 2>/dev/null || echo unknown)
	commit=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
	echo "machine: $(nproc) CPUs (${cpu:-unknown CPU}), Linux $(uname -r)"
	echo "images: $SIZE on $BENCH_DIR ($fs); reads: $COUNT requests; writes: $(($(mib "$SIZE") * 16)) requests;" \
		"aio=$AIO; convert source: $CONVERT_SIZE, half data"
	echo "runs: $RUNS per tool and case; load average (1/5/15 min) at the start: $LOAD_START, at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "tools: $("$VDISK" --version) (commit $commit), $("$QEMU_IMG" --version | head -n 1)"
	for n in "${NOTES[@]}"; do
		echo "$n"
	done
}

cleanup() {
	rm -rf "$WORK"
}

main() {
	local status=0 meta=()
	NOTES=()
	check_setup
	check_space
	WORK=$(mktemp -d "$BENCH_DIR/vdisk-qcow2-bench.XXXXXX")
	trap cleanup EXIT
	RAW=$WORK/raw.tsv
	: >"$RAW"
	check_vdisk_qcow2
	check_vdisk_convert
	check_zstd
	LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
	run_cases
	mapfile -t meta < <(describe_machine)
	report "$(date '+%Y-%m-%d %H:%M') — qcow2.sh: block layer vs qemu-img — ${ONLY:+ONLY=$ONLY, }RUNS=$RUNS SIZE=$SIZE" \
		"${meta[@]}" || status=$?
	return "$status"
}

main "$@"
