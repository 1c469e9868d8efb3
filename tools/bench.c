/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk bench — a fio-like benchmark over any libvdisk driver, or over the
 * block layer (--image: a raw or qcow2 node, see bench-block.c).
 *
 * Driver path: one shared instance; NUMJOBS threads, each driving its own queue and
 * keeping IODEPTH requests in flight: enqueue, then loop on
 * vdiskq_do_io(min 1) and re-issue one request per completion.  Buffers come
 * from one memory region (vdisk_alloc_mem_region + vdisk_map_mem_region, so
 * io_uring can use fixed buffers).  Each in-flight request owns a slot that
 * holds its buffer and start time, so the hot path never allocates.
 *
 * Timing: threads start together at t0, count nothing during the ramp, count
 * every completion in [measure_start, end), then stop issuing and drain.
 * The main thread only sleeps (in sigtimedwait, so SIGINT/SIGTERM end the
 * run early), samples CPU use and draws the progress line.
 *
 * --count=N (as qemu-img bench -c) issues N requests in all (split between
 * the jobs), then stops; the measured window ends at the last completion.
 *
 * The file is in sections: options, parsing, latency histogram, the job
 * thread, instance setup, the run, output, main.  What bench-block.c shares
 * with this file is declared in bench.h.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "vdisk.h"

int vd_bench_main(int argc, char **argv);

#define MAX_BS (1ull << 30)
#define MAX_IODEPTH 65536u
#define MAX_NUMJOBS 1024u
#define DEFAULT_NULL_SIZE (1ull << 30)

/* ---- Options ------------------------------------------------------------ */

const char *const vd_bench_rw_names[] = {
	[RW_READ] = "read", [RW_WRITE] = "write", [RW_RANDREAD] = "randread",
	[RW_RANDWRITE] = "randwrite", [RW_RANDRW] = "randrw",
};

/* Properties the benchmark sets itself, and the option that controls each. */
static const struct {
	const char *prop;
	const char *option;
} owned_props[] = {
	{ "path", "--path" },           { "fd", "--path" },
	{ "direct", "--direct" },       { "num-queues", "--numjobs" },
	{ "num-poll-queues", "--poll" }, { "queue-size", "--iodepth" },
	{ "size", "--size" },
};

/* Drivers that need no file or device (their size comes from --size). */
static bool driver_needs_path(const char *driver)
{
	return strcmp(driver, "null") != 0;
}

static bool driver_known(const char *name)
{
	for (const char *const *d = vdisk_list_drivers(); *d; d++)
		if (strcmp(*d, name) == 0)
			return true;
	return false;
}

static void print_driver_list(FILE *out)
{
	const char *const *d = vdisk_list_drivers();

	for (int i = 0; d[i]; i++)
		fprintf(out, "%s%s", i ? ", " : "", d[i]);
}

/* ---- Number parsing ------------------------------------------------------ */

/* Leading decimal digits of s (no sign, no spaces); *end is what follows. */
static bool parse_leading_u64(const char *s, uint64_t *out, const char **end)
{
	unsigned long long n;
	char *e;

	if (!isdigit((unsigned char)s[0]))
		return false;
	errno = 0;
	n = strtoull(s, &e, 10);
	if (errno == ERANGE)
		return false;
	*out = n;
	*end = e;
	return true;
}

/* "4096", "4k", "1M", "2g", "1T": suffixes are powers of 1024. */
static bool parse_size(const char *s, uint64_t *out)
{
	static const char suffixes[] = "kmgt";
	uint64_t n, mult = 1;
	const char *end, *p;

	if (!parse_leading_u64(s, &n, &end))
		return false;
	if (*end) {
		p = strchr(suffixes, tolower((unsigned char)*end));
		if (!p || end[1] != '\0')
			return false;
		mult = 1ull << (10 * (p - suffixes + 1));
	}
	if (n > UINT64_MAX / mult)
		return false;
	*out = n * mult;
	return true;
}

/* "5" and "5s" are seconds, "500ms" milliseconds; result in ns. */
static bool parse_time_ns(const char *s, uint64_t *out)
{
	uint64_t n, mult;
	const char *end;

	if (!parse_leading_u64(s, &n, &end))
		return false;
	if (strcmp(end, "") == 0 || strcmp(end, "s") == 0)
		mult = NS_PER_S;
	else if (strcmp(end, "ms") == 0)
		mult = 1000000;
	else
		return false;
	if (n > (uint64_t)INT64_MAX / 4 / mult) /* leave room for clock arithmetic */
		return false;
	*out = n * mult;
	return true;
}

static bool parse_uint_in(const char *s, unsigned min, unsigned max, unsigned *out)
{
	uint64_t n;
	const char *end;

	if (!parse_leading_u64(s, &n, &end) || *end || n < min || n > max)
		return false;
	*out = (unsigned)n;
	return true;
}

static bool parse_bool_word(const char *s, bool *out)
{
	static const char *const yes[] = { "1", "true", "on", "yes" };
	static const char *const no[] = { "0", "false", "off", "no" };

	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
		if (strcmp(s, yes[i]) == 0) {
			*out = true;
			return true;
		}
		if (strcmp(s, no[i]) == 0) {
			*out = false;
			return true;
		}
	}
	return false;
}

/* ---- Usage and errors ------------------------------------------------------ */

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk bench --driver=DRIVER [--path=FILE] [OPTIONS]\n"
		"       vdisk bench --compare=DRIVER,DRIVER... [--path=FILE] [OPTIONS]\n"
		"       vdisk bench --image=FILE [--format=FMT] [--cache=MODE] [--aio=AIO] [OPTIONS]\n"
		"\n"
		"Measure a libvdisk driver with a fio-like workload: NUMJOBS threads, each\n"
		"with its own queue of one shared instance, each keeping IODEPTH requests of\n"
		"BS bytes in flight for RUNTIME (or until COUNT requests are done).  Reports\n"
		"IOPS, bandwidth, latency (mean, p50, p99, p99.9) and CPU use.\n"
		"With --image the same job runs through the block layer instead: an image\n"
		"node (format over the file protocol) driven by one thread's event loop,\n"
		"with IODEPTH coroutines each issuing one request at a time.\n"
		"\n"
		"Target:\n"
		"  --driver=NAME       driver to measure: ");
	print_driver_list(out);
	fprintf(out,
		"\n"
		"  --path=FILE         file or block device (every driver but null needs one);\n"
		"                      a write workload creates a missing file of --size bytes\n"
		"  --compare=A,B,...   run the same job on each driver, one table at the end\n"
		"  --set [DRIVER:]NAME=VALUE\n"
		"                      set a driver property before starting, e.g.\n"
		"                      --set io_uring:sqpoll=true (repeatable; without DRIVER:\n"
		"                      every driver of the run must have the property)\n"
		"\n"
		"Block layer target (instead of --driver):\n"
		"  --image=FILE        image to measure through the block layer; a write job\n"
		"                      on a missing FILE creates it (--size bytes)\n"
		"  --format=FMT        image format: raw or qcow2 (default: probed)\n"
		"  --cache=MODE        none, writeback, writethrough, directsync or unsafe, as\n"
		"                      QEMU's cache= (default writeback)\n"
		"  --aio=AIO           the file protocol's I/O: io_uring, native (linux-aio,\n"
		"                      needs --cache=none or directsync), threads or sync\n"
		"                      (default io_uring)\n"
		"                      --numjobs must be 1 (a node belongs to one thread);\n"
		"                      --direct, --poll, --set and --compare do not apply\n"
		"\n"
		"Workload:\n"
		"  --rw=MODE           read, write, randread, randwrite, randrw (default randread)\n"
		"  --rwmixread=N       randrw: percentage of reads (default 50)\n"
		"  --bs=SIZE           request size (default 4k); with --direct=1 a multiple of 512\n"
		"  --iodepth=N         requests in flight per job (default 1)\n"
		"  --numjobs=N         threads, each with its own queue (default 1)\n"
		"  --size=SIZE         bytes of the device to use (default: its capacity); for\n"
		"                      the null driver the device size (default 1G)\n"
		"  --stride=SIZE       read/write: step between requests (default BS); offsets\n"
		"                      wrap at --size, as qemu-img bench -S\n"
		"  --direct=0|1        bypass the page cache, O_DIRECT (default 0)\n"
		"  --poll=0|1          use poll queues instead of interrupt-driven ones (default 0)\n"
		"  --runtime=TIME      measured time (default 5s; with --count: a cap, none\n"
		"                      unless given)\n"
		"  --count=N           issue N requests in all, then stop and report (as\n"
		"                      qemu-img bench -c); the time is until the last completes\n"
		"  --ramp=TIME         warm-up before measuring, not counted (default 0)\n"
		"\n"
		"Output:\n"
		"  --output=normal|json  human-readable summary (default), or one JSON object\n"
		"                      (with --compare: {\"results\": [...]})\n"
		"  -h, --help          show this help and exit\n"
		"\n"
		"SIZE (and N) is a number with an optional k, m, g or t suffix (powers of\n"
		"1024).  TIME is a number of seconds, with an optional s or ms suffix.\n"
		"On a terminal a progress line is refreshed on stderr every second; SIGINT\n"
		"ends the measurement early and reports what was measured so far.\n"
		"\n"
		"Exit status: 0 success (--compare: at least one driver succeeded),\n"
		"1 runtime failure, 2 usage error.\n");
}

static int vusage_error(const char *fmt, va_list ap)
{
	fputs("vdisk bench: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputs("\nTry 'vdisk bench --help'.\n", stderr);
	return EXIT_USAGE;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;
	int ret;

	va_start(ap, fmt);
	ret = vusage_error(fmt, ap);
	va_end(ap);
	return ret;
}

int vd_bench_usage_error(const char *fmt, ...)
{
	va_list ap;
	int ret;

	va_start(ap, fmt);
	ret = vusage_error(fmt, ap);
	va_end(ap);
	return ret;
}

static int unknown_driver(const char *name)
{
	fprintf(stderr, "vdisk bench: unknown driver '%s' (known: ", name);
	print_driver_list(stderr);
	fputs(")\nTry 'vdisk bench --help'.\n", stderr);
	return EXIT_USAGE;
}

/* ---- Option parsing ------------------------------------------------------- */

enum {
	OPT_DRIVER = 256, OPT_PATH, OPT_RW, OPT_RWMIXREAD, OPT_BS, OPT_IODEPTH, OPT_NUMJOBS,
	OPT_SIZE, OPT_RUNTIME, OPT_RAMP, OPT_DIRECT, OPT_POLL, OPT_OUTPUT, OPT_STRIDE,
	OPT_COMPARE, OPT_SET, OPT_COUNT, OPT_IMAGE, OPT_FORMAT, OPT_CACHE, OPT_AIO,
	OPT_END_
};
#define N_OPTS (OPT_END_ - OPT_DRIVER)

/* Options given on the command line, for checks of what combines with what. */
struct seen_opts {
	bool given[N_OPTS];
};

static bool seen(const struct seen_opts *s, int id)
{
	return s->given[id - OPT_DRIVER];
}

static const struct option long_options[] = {
	{ "driver", required_argument, NULL, OPT_DRIVER },
	{ "path", required_argument, NULL, OPT_PATH },
	{ "rw", required_argument, NULL, OPT_RW },
	{ "rwmixread", required_argument, NULL, OPT_RWMIXREAD },
	{ "bs", required_argument, NULL, OPT_BS },
	{ "iodepth", required_argument, NULL, OPT_IODEPTH },
	{ "numjobs", required_argument, NULL, OPT_NUMJOBS },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "runtime", required_argument, NULL, OPT_RUNTIME },
	{ "ramp", required_argument, NULL, OPT_RAMP },
	{ "direct", required_argument, NULL, OPT_DIRECT },
	{ "poll", required_argument, NULL, OPT_POLL },
	{ "output", required_argument, NULL, OPT_OUTPUT },
	{ "stride", required_argument, NULL, OPT_STRIDE },
	{ "compare", required_argument, NULL, OPT_COMPARE },
	{ "set", required_argument, NULL, OPT_SET },
	{ "count", required_argument, NULL, OPT_COUNT },
	{ "image", required_argument, NULL, OPT_IMAGE },
	{ "format", required_argument, NULL, OPT_FORMAT },
	{ "cache", required_argument, NULL, OPT_CACHE },
	{ "aio", required_argument, NULL, OPT_AIO },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

static const char *option_name(int id)
{
	for (const struct option *o = long_options; o->name; o++)
		if (o->val == id)
			return o->name;
	return "?";
}

static int bad_value(int id, const char *arg, const char *expected)
{
	return usage_error("invalid --%s '%s': expected %s", option_name(id), arg, expected);
}

static void opts_init(struct bench_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->rw = RW_RANDREAD;
	o->rwmixread = 50;
	o->bs = 4096;
	o->iodepth = 1;
	o->numjobs = 1;
	o->runtime_ns = 5 * NS_PER_S;
	o->cache = "writeback";
	o->aio = "io_uring";
}

static void opts_free(struct bench_opts *o)
{
	free(o->compare_buf);
	for (int i = 0; i < o->n_sets; i++) {
		free(o->sets[i].driver);
		free(o->sets[i].name);
	}
}

static int parse_rw(struct bench_opts *o, const char *arg)
{
	for (size_t i = 0; i < RW_RANDRW + 1; i++) {
		if (strcmp(arg, vd_bench_rw_names[i]) == 0) {
			o->rw = (enum rw_mode)i;
			return 0;
		}
	}
	return bad_value(OPT_RW, arg, "read, write, randread, randwrite or randrw");
}

static int parse_compare(struct bench_opts *o, const char *arg)
{
	char *save = NULL, *tok;

	if (o->compare_buf)
		return usage_error("--compare given twice");
	o->compare_buf = strdup(arg);
	if (!o->compare_buf)
		return usage_error("out of memory");
	for (tok = strtok_r(o->compare_buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (o->n_compare == MAX_COMPARE)
			return usage_error("--compare: at most %d drivers", MAX_COMPARE);
		if (!driver_known(tok))
			return unknown_driver(tok);
		o->compare[o->n_compare++] = tok;
	}
	if (o->n_compare == 0)
		return bad_value(OPT_COMPARE, arg, "a comma-separated list of drivers");
	return 0;
}

static const char *owning_option(const char *prop)
{
	for (size_t i = 0; i < sizeof(owned_props) / sizeof(owned_props[0]); i++)
		if (strcmp(owned_props[i].prop, prop) == 0)
			return owned_props[i].option;
	return NULL;
}

static int parse_set(struct bench_opts *o, const char *arg)
{
	const char *eq = strchr(arg, '='), *colon, *name = arg, *owner;
	struct prop_setting *s;

	if (o->n_sets == MAX_SETS)
		return usage_error("--set: at most %d properties", MAX_SETS);
	if (!eq || eq == arg)
		return bad_value(OPT_SET, arg, "[DRIVER:]NAME=VALUE");
	s = &o->sets[o->n_sets++];
	colon = memchr(arg, ':', (size_t)(eq - arg));
	if (colon) {
		s->driver = strndup(arg, (size_t)(colon - arg));
		if (!s->driver)
			return usage_error("out of memory");
		if (!driver_known(s->driver))
			return unknown_driver(s->driver);
		name = colon + 1;
	}
	if (name == eq)
		return bad_value(OPT_SET, arg, "[DRIVER:]NAME=VALUE");
	s->name = strndup(name, (size_t)(eq - name));
	if (!s->name)
		return usage_error("out of memory");
	s->value = eq + 1;
	owner = owning_option(s->name);
	if (owner)
		return usage_error("--set %s: use %s for this property", s->name, owner);
	return 0;
}

static int parse_size_option(int id, const char *arg, uint64_t *out)
{
	if (!parse_size(arg, out) || *out == 0)
		return bad_value(id, arg, "a size > 0 such as 4096, 4k, 1M or 1G");
	return 0;
}

static int parse_time_option(int id, const char *arg, bool zero_ok, uint64_t *out)
{
	if (!parse_time_ns(arg, out) || (!zero_ok && *out == 0))
		return bad_value(id, arg, zero_ok ? "a time such as 0, 5, 5s or 500ms" : "a time > 0 such as 5, 5s or 500ms");
	return 0;
}

static int parse_bool_option(int id, const char *arg, bool *out)
{
	if (!parse_bool_word(arg, out))
		return bad_value(id, arg, "0 or 1");
	return 0;
}

static int parse_uint_option(int id, const char *arg, unsigned min, unsigned max, unsigned *out)
{
	char expected[64];

	if (parse_uint_in(arg, min, max, out))
		return 0;
	snprintf(expected, sizeof(expected), "a whole number from %u to %u", min, max);
	return bad_value(id, arg, expected);
}

static int parse_output(struct bench_opts *o, const char *arg)
{
	if (strcmp(arg, "json") == 0)
		o->json = true;
	else if (strcmp(arg, "normal") == 0)
		o->json = false;
	else
		return bad_value(OPT_OUTPUT, arg, "normal or json");
	return 0;
}

static int apply_option(struct bench_opts *o, int id, const char *arg)
{
	switch (id) {
	case OPT_DRIVER:
		o->driver = arg;
		return driver_known(arg) ? 0 : unknown_driver(arg);
	case OPT_PATH:
		o->path = arg;
		return arg[0] ? 0 : bad_value(id, arg, "a file or block device");
	case OPT_RW:
		return parse_rw(o, arg);
	case OPT_RWMIXREAD:
		o->rwmixread_set = true;
		return parse_uint_option(id, arg, 0, 100, &o->rwmixread);
	case OPT_BS:
		if (parse_size_option(id, arg, &o->bs))
			return EXIT_USAGE;
		return o->bs <= MAX_BS ? 0 : bad_value(id, arg, "a size of at most 1G");
	case OPT_IODEPTH:
		return parse_uint_option(id, arg, 1, MAX_IODEPTH, &o->iodepth);
	case OPT_NUMJOBS:
		return parse_uint_option(id, arg, 1, MAX_NUMJOBS, &o->numjobs);
	case OPT_SIZE:
		return parse_size_option(id, arg, &o->size);
	case OPT_STRIDE:
		return parse_size_option(id, arg, &o->stride);
	case OPT_RUNTIME:
		o->runtime_set = true;
		return parse_time_option(id, arg, false, &o->runtime_ns);
	case OPT_COUNT:
		if (!parse_size(arg, &o->count) || o->count == 0)
			return bad_value(id, arg, "a number of requests > 0 such as 100000 or 64k");
		return 0;
	case OPT_IMAGE:
		o->image = arg;
		return arg[0] ? 0 : bad_value(id, arg, "an image file");
	case OPT_FORMAT:
		o->format = arg;
		return 0; /* values checked with the block layer's list (vd_bench_block_check_opts) */
	case OPT_CACHE:
		o->cache = arg;
		return 0;
	case OPT_AIO:
		o->aio = arg;
		return 0;
	case OPT_RAMP:
		return parse_time_option(id, arg, true, &o->ramp_ns);
	case OPT_DIRECT:
		return parse_bool_option(id, arg, &o->direct);
	case OPT_POLL:
		return parse_bool_option(id, arg, &o->poll);
	case OPT_OUTPUT:
		return parse_output(o, arg);
	case OPT_COMPARE:
		return parse_compare(o, arg);
	case OPT_SET:
		return parse_set(o, arg);
	}
	return usage_error("internal error: option %d", id);
}

/* The options that only make sense for one target, --image or --driver/--compare. */
static const int block_only_opts[] = { OPT_FORMAT, OPT_CACHE, OPT_AIO };
static const int driver_only_opts[] = { OPT_PATH, OPT_DIRECT, OPT_POLL, OPT_SET };

static int check_target(const struct bench_opts *o, const struct seen_opts *s)
{
	if (!o->driver && o->n_compare == 0 && !o->image)
		return usage_error("--driver, --compare or --image is required");
	if (o->driver && o->n_compare > 0)
		return usage_error("give either --driver or --compare, not both");
	if (o->image && (o->driver || o->n_compare))
		return usage_error("--image runs through the block layer: give it without --%s",
				   o->driver ? "driver" : "compare");
	for (size_t i = 0; i < sizeof(block_only_opts) / sizeof(block_only_opts[0]); i++)
		if (!o->image && seen(s, block_only_opts[i]))
			return usage_error("--%s applies to --image only", option_name(block_only_opts[i]));
	for (size_t i = 0; o->image && i < sizeof(driver_only_opts) / sizeof(driver_only_opts[0]); i++) {
		int id = driver_only_opts[i];

		if (!seen(s, id))
			continue;
		if (id == OPT_DIRECT)
			return usage_error("--direct does not apply to --image: --cache=none or directsync bypasses "
					   "the page cache");
		return usage_error("--%s does not apply to --image (it configures a libvdisk driver)",
				   option_name(id));
	}
	if (o->image && o->numjobs > 1)
		return usage_error("--numjobs=%u: the block layer path runs one thread (a node belongs to one "
				   "thread); use --iodepth, or --driver for several queues", o->numjobs);
	return 0;
}

/* Checks that involve more than one option. */
static int check_combination(const struct bench_opts *o, const struct seen_opts *s)
{
	int ret = check_target(o, s);

	if (ret)
		return ret;
	if (o->image && (ret = vd_bench_block_check_opts(o)))
		return ret;
	if (o->count && o->ramp_ns)
		return usage_error("--ramp does not combine with --count (every request is counted)");
	if (o->direct && o->bs % 512)
		return usage_error("--bs=%" PRIu64 " must be a multiple of 512 with --direct=1", o->bs);
	if (o->direct && o->stride % 512)
		return usage_error("--stride=%" PRIu64 " must be a multiple of 512 with --direct=1", o->stride);
	if (o->stride && rw_is_random(o->rw))
		return usage_error("--stride applies to --rw=read and --rw=write only");
	if (o->rwmixread_set && o->rw != RW_RANDRW)
		return usage_error("--rwmixread applies to --rw=randrw only");
	if (o->size && o->size < o->bs)
		return usage_error("--size=%" PRIu64 " is smaller than --bs=%" PRIu64, o->size, o->bs);
	for (int i = 0; i < (o->driver ? 1 : o->n_compare); i++) {
		const char *d = o->driver ? o->driver : o->compare[i];

		if (!o->path && driver_needs_path(d))
			return usage_error("--path is required for driver '%s'", d);
	}
	return 0;
}

static int parse_args(struct bench_opts *o, int argc, char **argv, bool *help)
{
	struct seen_opts s = { { false } };
	int id, ret;

	opterr = 0;
	optind = 1;
	while ((id = getopt_long(argc, argv, ":h", long_options, NULL)) != -1) {
		if (id == 'h') {
			*help = true;
			return 0;
		}
		if (id == ':')
			return usage_error("option '%s' needs a value", argv[optind - 1]);
		if (id == '?') {
			const char *arg = argv[optind - 1];

			if (optopt)
				return usage_error("unknown option '-%c'", optopt);
			return usage_error("unknown option '%.*s'", (int)strcspn(arg, "="), arg);
		}
		ret = apply_option(o, id, optarg);
		if (ret)
			return ret;
		s.given[id - OPT_DRIVER] = true;
	}
	if (optind < argc)
		return usage_error("unexpected argument '%s'", argv[optind]);
	return check_combination(o, &s);
}

/* ---- Latency histogram ------------------------------------------------------ */
/*
 * Log-linear (HDR-style): exact below 128 ns, then 64 sub-buckets per power
 * of two, so every recorded value is within 1/64 (1.6%) of the truth.
 */
#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)

static unsigned hist_index(uint64_t ns)
{
	unsigned msb, shift;

	if (ns < 2 * HIST_SUB)
		return (unsigned)ns;
	msb = 63u - (unsigned)__builtin_clzll(ns);
	shift = msb - HIST_SUB_BITS;
	return (shift + 1) * HIST_SUB + (unsigned)((ns >> shift) - HIST_SUB);
}

/* Middle of a bucket. */
static uint64_t hist_value(unsigned index)
{
	unsigned shift;
	uint64_t low;

	if (index < 2 * HIST_SUB)
		return index;
	shift = index / HIST_SUB - 1;
	low = (uint64_t)(index % HIST_SUB + HIST_SUB) << shift;
	return low + ((1ull << shift) >> 1);
}

bool vd_bench_stats_init(struct lat_stats *s)
{
	memset(s, 0, sizeof(*s));
	s->min_ns = UINT64_MAX;
	s->hist = calloc(HIST_BUCKETS, sizeof(*s->hist));
	return s->hist != NULL;
}

void vd_bench_stats_record(struct lat_stats *s, uint64_t ns)
{
	s->ios++;
	s->sum_ns += ns;
	if (ns < s->min_ns)
		s->min_ns = ns;
	if (ns > s->max_ns)
		s->max_ns = ns;
	s->hist[hist_index(ns)]++;
}

void vd_bench_stats_free(struct lat_stats *s)
{
	free(s->hist);
	s->hist = NULL;
}

static void stats_merge(struct lat_stats *into, const struct lat_stats *from)
{
	into->ios += from->ios;
	into->sum_ns += from->sum_ns;
	if (from->min_ns < into->min_ns)
		into->min_ns = from->min_ns;
	if (from->max_ns > into->max_ns)
		into->max_ns = from->max_ns;
	for (unsigned i = 0; i < HIST_BUCKETS; i++)
		into->hist[i] += from->hist[i];
}

/* Value at or below which `per100k` / 100000 of the samples lie. */
static uint64_t stats_percentile(const struct lat_stats *s, uint64_t per100k)
{
	uint64_t target = (s->ios * per100k + 99999) / 100000, seen = 0, v;

	if (target == 0)
		target = 1;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += s->hist[i];
		if (seen >= target) {
			v = hist_value(i);
			return v < s->min_ns ? s->min_ns : v > s->max_ns ? s->max_ns : v;
		}
	}
	return s->max_ns;
}

/* ---- Clock, random numbers ------------------------------------------------------ */

int64_t vd_bench_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

uint64_t vd_bench_random(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Uniform in [0, n) without division (Lemire). */
uint64_t vd_bench_random_below(uint64_t *state, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)vd_bench_random(state) * n) >> 64);
}

uint64_t vd_bench_seq_next(uint64_t off, uint64_t step, uint64_t bs, uint64_t size)
{
	uint64_t next = (off + step) % size;

	return next > size - bs ? 0 : next;
}

bool vd_bench_pick_write(const struct bench_opts *o, uint64_t *rng)
{
	switch (o->rw) {
	case RW_WRITE:
	case RW_RANDWRITE:
		return true;
	case RW_RANDRW:
		return vd_bench_random_below(rng, 100) >= o->rwmixread;
	default:
		return false;
	}
}

/* Write workloads write pseudo-random data, not zeroes that compress. */
void vd_bench_fill_random(void *buf, size_t len)
{
	uint64_t state = 0x5eed, *p = buf;

	for (size_t i = 0; i < len / sizeof(*p); i++)
		p[i] = vd_bench_random(&state);
}

uint64_t vd_bench_cpu_us(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
	       (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* ---- Run state ------------------------------------------------------------------ */

struct slot {
	char *buf;
	uint64_t offset;
	int64_t start_ns;
	bool is_write;
};

struct run;

struct job {
	struct run *run;
	int index;
	struct vdiskq *q;
	struct slot *slots;
	struct vdisk_completion *comps;
	uint64_t rng;
	uint64_t next_offset; /* sequential modes */
	uint64_t budget;      /* requests left to issue (--count; else UINT64_MAX) */
	unsigned inflight;
	uint64_t completed;          /* owner thread only */
	int64_t last_counted_ns;     /* completion time of the last counted request */
	_Atomic uint64_t progress;   /* = completed, for the progress line */
	struct lat_stats stats;      /* measured window only */
	bool failed;
	char error[ERR_LEN];
	pthread_t thread;
	bool thread_started;
} __attribute__((aligned(64)));

struct run {
	const struct bench_opts *o;
	const char *driver;
	struct vdisk *v;
	struct vdisk_mem_region region;
	bool have_region;
	uint64_t size;    /* bytes of the device in use */
	uint64_t nblocks; /* size / bs */
	uint64_t stride;
	size_t slot_stride;
	struct job *jobs;

	/* CLOCK_MONOTONIC ns; end may be moved earlier by SIGINT. */
	int64_t t0, measure_start;
	_Atomic int64_t end;
	atomic_bool abort;
	atomic_uint jobs_done; /* job threads that have finished (--count ends the run so) */

	pthread_mutex_t gate_lock;
	pthread_cond_t gate_cond;
	bool gate_open;
};

static int vfail(struct bench_result *res, const char *fmt, va_list ap)
{
	vsnprintf(res->error, sizeof(res->error), fmt, ap);
	res->status = EXIT_RUNTIME;
	return -1;
}

static int fail(struct bench_result *res, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct bench_result *res, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfail(res, fmt, ap);
	va_end(ap);
	return -1;
}

int vd_bench_fail(struct bench_result *res, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfail(res, fmt, ap);
	va_end(ap);
	return -1;
}

/* A libvdisk call failed: keep its message (thread-local, so read it now). */
static int lib_fail(struct bench_result *res, int ret)
{
	const char *msg = vdisk_get_error_msg();

	return fail(res, "%s", msg[0] ? msg : strerror(-ret));
}

/* ---- The job thread ---------------------------------------------------------------- */

static void job_error(struct job *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void job_error(struct job *j, const char *fmt, ...)
{
	va_list ap;

	if (j->failed)
		return;
	va_start(ap, fmt);
	vsnprintf(j->error, sizeof(j->error), fmt, ap);
	va_end(ap);
	j->failed = true;
	atomic_store(&j->run->abort, true);
}

static uint64_t pick_offset(struct job *j)
{
	const struct run *r = j->run;
	uint64_t off;

	if (rw_is_random(r->o->rw))
		return vd_bench_random_below(&j->rng, r->nblocks) * r->o->bs;
	off = j->next_offset;
	j->next_offset = vd_bench_seq_next(off, r->stride, r->o->bs, r->size);
	return off;
}

static void issue(struct job *j, struct slot *s, int64_t now)
{
	size_t bs = (size_t)j->run->o->bs;

	s->offset = pick_offset(j);
	s->is_write = vd_bench_pick_write(j->run->o, &j->rng);
	s->start_ns = now;
	j->budget--;
	if (s->is_write)
		vdiskq_write(j->q, s->offset, s->buf, bs, s, 0);
	else
		vdiskq_read(j->q, s->offset, s->buf, bs, s, 0);
	j->inflight++;
}

/* One reaped batch: when it was reaped and whether to keep issuing. */
struct batch {
	int64_t now;
	bool counted; /* inside the measured window */
	bool stop;
};

static void complete(struct job *j, const struct vdisk_completion *c, const struct batch *b)
{
	struct slot *s = c->user_data;

	j->inflight--;
	if (c->ret < 0) {
		job_error(j, "%s of %" PRIu64 " bytes at offset %" PRIu64 " failed: %s", s->is_write ? "write" : "read",
			  j->run->o->bs, s->offset, c->error_msg ? c->error_msg : strerror(-c->ret));
		return;
	}
	j->completed++;
	if (b->counted) {
		vd_bench_stats_record(&j->stats, (uint64_t)(b->now - s->start_ns));
		j->last_counted_ns = b->now;
	}
	if (!b->stop && !j->failed && j->budget)
		issue(j, s, b->now);
}

static bool wait_for_start(struct run *r)
{
	pthread_mutex_lock(&r->gate_lock);
	while (!r->gate_open)
		pthread_cond_wait(&r->gate_cond, &r->gate_lock);
	pthread_mutex_unlock(&r->gate_lock);
	return !atomic_load(&r->abort);
}

static void job_run(struct job *j)
{
	struct run *r = j->run;
	const int depth = (int)r->o->iodepth;
	struct batch b;
	int n;

	b.now = vd_bench_now_ns();
	for (int i = 0; i < depth && j->budget; i++)
		issue(j, &j->slots[i], b.now);
	while (j->inflight > 0) {
		n = vdiskq_do_io(j->q, j->comps, 1, depth, NULL);
		if (n < 0) {
			job_error(j, "%s", vdisk_get_error_msg());
			break;
		}
		b.now = vd_bench_now_ns();
		b.stop = b.now >= atomic_load_explicit(&r->end, memory_order_relaxed) ||
			 atomic_load_explicit(&r->abort, memory_order_relaxed);
		b.counted = !b.stop && b.now >= r->measure_start;
		for (int i = 0; i < n; i++)
			complete(j, &j->comps[i], &b);
		atomic_store_explicit(&j->progress, j->completed, memory_order_relaxed);
	}
}

static void *job_main(void *arg)
{
	struct job *j = arg;

	if (wait_for_start(j->run))
		job_run(j);
	atomic_fetch_add(&j->run->jobs_done, 1);
	return NULL;
}

/* ---- Instance setup ----------------------------------------------------------------- */

/*
 * The public API has no type query: try the types the value can be read as,
 * moving on while the property answers "wrong type" (-ENOTTY).
 */
static int set_property(struct vdisk *v, const char *name, const char *value)
{
	uint64_t u;
	bool b;
	int ret;

	if (parse_bool_word(value, &b) && (ret = vdisk_set_bool(v, name, b)) != -ENOTTY)
		return ret;
	if (parse_size(value, &u)) {
		if (u <= INT_MAX && (ret = vdisk_set_int(v, name, (int)u)) != -ENOTTY)
			return ret;
		if ((ret = vdisk_set_uint64(v, name, u)) != -ENOTTY)
			return ret;
	}
	return vdisk_set_str(v, name, value);
}

static bool setting_applies(const struct prop_setting *s, const char *driver)
{
	return !s->driver || strcmp(s->driver, driver) == 0;
}

/*
 * Apply the user's --set properties.  In the created state, those that may
 * only be written once connected answer -EBUSY and are left for later.
 */
static int apply_settings(struct run *r, bool connected, bool *deferred, struct bench_result *res)
{
	const struct bench_opts *o = r->o;

	for (int i = 0; i < o->n_sets; i++) {
		const struct prop_setting *s = &o->sets[i];
		int ret;

		if (!setting_applies(s, r->driver) || (connected && !deferred[i]))
			continue;
		ret = set_property(r->v, s->name, s->value);
		if (ret == -EBUSY && !connected) {
			deferred[i] = true;
			continue;
		}
		if (ret < 0) {
			const char *msg = vdisk_get_error_msg();

			return fail(res, "--set %s=%s: %s", s->name, s->value, msg[0] ? msg : strerror(-ret));
		}
	}
	return 0;
}

static int configure_target(struct run *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	int ret;

	if (driver_needs_path(r->driver)) {
		ret = vdisk_set_str(r->v, "path", o->path);
	} else {
		ret = vdisk_set_uint64(r->v, "size", o->size ? o->size : DEFAULT_NULL_SIZE);
		if (ret == 0)
			ret = vdisk_set_bool(r->v, "read-zeroes", false); /* like fio's null engine */
	}
	if (ret == 0)
		ret = vdisk_set_bool(r->v, "direct", o->direct);
	return ret < 0 ? lib_fail(res, ret) : 0;
}

static int get_int_prop(struct run *r, const char *name, int *value, struct bench_result *res)
{
	int ret = vdisk_get_int(r->v, name, value);

	return ret < 0 ? lib_fail(res, ret) : 0;
}

/* Decide how much of the device to use, and check the request geometry. */
static int choose_geometry(struct run *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	uint64_t capacity;
	int align, ret;

	ret = vdisk_get_uint64(r->v, "capacity", &capacity);
	if (ret < 0)
		return lib_fail(res, ret);
	if (get_int_prop(r, "request-alignment", &align, res))
		return -1;
	r->size = o->size ? o->size : capacity;
	if (r->size > capacity) {
		fprintf(stderr, "vdisk bench: %s: '%s' holds %" PRIu64 " bytes, less than --size; using them all\n",
			r->driver, o->path ? o->path : "device", capacity);
		r->size = capacity;
	}
	if (r->size < o->bs)
		return fail(res, "the device holds %" PRIu64 " bytes, less than --bs=%" PRIu64, r->size, o->bs);
	r->stride = o->stride ? o->stride : o->bs;
	if (align > 1 && (o->bs % (unsigned)align || r->stride % (unsigned)align))
		return fail(res, "--bs and --stride must be multiples of the device's request-alignment (%d)", align);
	r->nblocks = r->size / o->bs;
	res->size = r->size;
	return 0;
}

static int configure_queues(struct run *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	int max_queues, ret;

	if (get_int_prop(r, "max-queues", &max_queues, res))
		return -1;
	if (o->numjobs > (unsigned)max_queues)
		return fail(res, "--numjobs=%u: the driver offers at most %d queues for this device", o->numjobs,
			    max_queues);
	ret = vdisk_set_int(r->v, "num-queues", o->poll ? 0 : (int)o->numjobs);
	if (ret == 0)
		ret = vdisk_set_int(r->v, "num-poll-queues", o->poll ? (int)o->numjobs : 0);
	if (ret == 0)
		ret = vdisk_set_int(r->v, "queue-size", (int)o->iodepth);
	return ret < 0 ? lib_fail(res, ret) : 0;
}

static int alloc_buffers(struct run *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	size_t total;
	int align, ret;

	if (get_int_prop(r, "buf-alignment", &align, res))
		return -1;
	if (align < 1)
		align = 1;
	r->slot_stride = ((size_t)o->bs + (size_t)align - 1) / (size_t)align * (size_t)align;
	if (__builtin_mul_overflow(r->slot_stride, (size_t)o->iodepth * o->numjobs, &total))
		return fail(res, "--bs x --iodepth x --numjobs is too large");
	ret = vdisk_alloc_mem_region(r->v, &r->region, total);
	if (ret < 0)
		return lib_fail(res, ret);
	r->have_region = true;
	if (rw_writes(o->rw))
		vd_bench_fill_random(r->region.addr, r->region.len);
	return 0;
}

static int start_instance(struct run *r, struct bench_result *res)
{
	int ret = vdisk_start(r->v);

	if (ret < 0)
		return lib_fail(res, ret);
	ret = vdisk_map_mem_region(r->v, &r->region);
	return ret < 0 ? lib_fail(res, ret) : 0;
}

/* Everything up to started queues; on failure res says why. */
static int open_instance(struct run *r, struct bench_result *res)
{
	bool deferred[MAX_SETS] = { false };
	int ret;

	ret = vdisk_create(r->driver, &r->v);
	if (ret < 0)
		return lib_fail(res, ret);
	if (configure_target(r, res) || apply_settings(r, false, deferred, res))
		return -1;
	ret = vdisk_connect(r->v);
	if (ret < 0)
		return lib_fail(res, ret);
	if (choose_geometry(r, res) || configure_queues(r, res) || apply_settings(r, true, deferred, res) ||
	    alloc_buffers(r, res) || start_instance(r, res))
		return -1;
	return 0;
}

/* ---- Jobs ---------------------------------------------------------------------------- */

static int init_job(struct run *r, int index, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	struct job *j = &r->jobs[index];
	char *base;

	j->run = r;
	j->index = index;
	j->rng = 0x9e3779b97f4a7c15ull * (uint64_t)(index + 1);
	j->next_offset = r->nblocks / o->numjobs * (uint64_t)index * o->bs;
	j->budget = UINT64_MAX;
	if (o->count) /* --count: split between the jobs, the first ones take the remainder */
		j->budget = o->count / o->numjobs + ((uint64_t)index < o->count % o->numjobs);
	j->q = o->poll ? vdisk_get_poll_queue(r->v, index) : vdisk_get_queue(r->v, index);
	if (!j->q)
		return fail(res, "%s", vdisk_get_error_msg());
	if (!o->poll)
		vdiskq_set_completion_fd_enabled(j->q, false); /* we block in do_io */
	j->slots = calloc(o->iodepth, sizeof(*j->slots));
	j->comps = calloc(o->iodepth, sizeof(*j->comps));
	if (!j->slots || !j->comps || !vd_bench_stats_init(&j->stats))
		return fail(res, "out of memory");
	base = (char *)r->region.addr + (size_t)index * o->iodepth * r->slot_stride;
	for (unsigned i = 0; i < o->iodepth; i++)
		j->slots[i].buf = base + i * r->slot_stride;
	return 0;
}

static int init_jobs(struct run *r, struct bench_result *res)
{
	size_t bytes = sizeof(struct job) * r->o->numjobs;

	r->jobs = aligned_alloc(64, (bytes + 63) / 64 * 64);
	if (!r->jobs)
		return fail(res, "out of memory");
	memset(r->jobs, 0, bytes);
	for (unsigned i = 0; i < r->o->numjobs; i++)
		if (init_job(r, (int)i, res))
			return -1;
	return 0;
}

static void free_jobs(struct run *r)
{
	for (unsigned i = 0; r->jobs && i < r->o->numjobs; i++) {
		free(r->jobs[i].slots);
		free(r->jobs[i].comps);
		free(r->jobs[i].stats.hist);
	}
	free(r->jobs);
	r->jobs = NULL;
}

static void open_gate(struct run *r)
{
	pthread_mutex_lock(&r->gate_lock);
	r->gate_open = true;
	pthread_cond_broadcast(&r->gate_cond);
	pthread_mutex_unlock(&r->gate_lock);
}

static int start_threads(struct run *r, struct bench_result *res)
{
	for (unsigned i = 0; i < r->o->numjobs; i++) {
		struct job *j = &r->jobs[i];
		int err = pthread_create(&j->thread, NULL, job_main, j);

		if (err)
			return fail(res, "cannot start job thread %u: %s", i, strerror(err));
		j->thread_started = true;
	}
	return 0;
}

static void join_threads(struct run *r)
{
	for (unsigned i = 0; r->jobs && i < r->o->numjobs; i++)
		if (r->jobs[i].thread_started)
			pthread_join(r->jobs[i].thread, NULL);
}

/* ---- Supervising the run --------------------------------------------------------------- */

static sigset_t stop_signals; /* blocked in every thread; taken with sigtimedwait */

static void block_stop_signals(void)
{
	sigemptyset(&stop_signals);
	sigaddset(&stop_signals, SIGINT);
	sigaddset(&stop_signals, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
}

/* Sleep until deadline; true if SIGINT/SIGTERM arrived meanwhile. */
static bool stop_signal_before(int64_t deadline)
{
	int64_t left = deadline - vd_bench_now_ns();
	struct timespec ts;

	if (left < 0)
		left = 0;
	ts.tv_sec = (time_t)(left / NS_PER_S);
	ts.tv_nsec = (long)(left % NS_PER_S);
	return sigtimedwait(&stop_signals, NULL, &ts) > 0;
}

struct cpu_window {
	int64_t start_ns, end_ns;
	uint64_t start_us, end_us; /* user + system CPU of the process */
	bool started;
};

static void cpu_sample(int64_t *wall, uint64_t *cpu_us)
{
	*cpu_us = vd_bench_cpu_us();
	*wall = vd_bench_now_ns();
}

struct progress {
	bool enabled;
	int64_t last_ns;
	uint64_t last_ios;
};

static uint64_t total_completed(const struct run *r)
{
	uint64_t sum = 0;

	for (unsigned i = 0; i < r->o->numjobs; i++)
		sum += atomic_load_explicit(&r->jobs[i].progress, memory_order_relaxed);
	return sum;
}

static void show_progress(const struct run *r, struct progress *p, int64_t now)
{
	uint64_t ios = total_completed(r);
	double secs = (double)(now - p->last_ns) / NS_PER_S;
	double iops = secs > 0 ? (double)(ios - p->last_ios) / secs : 0;
	bool ramp = now < r->measure_start;
	int64_t total = atomic_load(&r->end) - r->t0;

	if (r->o->count)
		fprintf(stderr, "\r%s: run  %" PRIu64 "/%" PRIu64 " requests  %.0f IOPS  %.1f MB/s\033[K", r->driver, ios,
			r->o->count, iops, iops * (double)r->o->bs / 1e6);
	else
		fprintf(stderr, "\r%s: %s %.0f/%.0fs  %.0f IOPS  %.1f MB/s\033[K", r->driver, ramp ? "ramp" : "run ",
			(double)(now - r->t0) / NS_PER_S, (double)total / NS_PER_S, iops,
			iops * (double)r->o->bs / 1e6);
	p->last_ns = now;
	p->last_ios = ios;
}

static int64_t min64(int64_t a, int64_t b)
{
	return a < b ? a : b;
}

/* How often a --count run looks whether the jobs are done. */
#define COUNT_POLL_NS 2000000

/* Sleep through the run, drawing progress; true if interrupted by a signal. */
static bool supervise(struct run *r, struct cpu_window *cpu)
{
	struct progress p = { .enabled = isatty(STDERR_FILENO), .last_ns = r->t0 };
	int64_t next_tick = r->t0 + NS_PER_S, now, end, wake;
	bool interrupted = false;

	for (;;) {
		now = vd_bench_now_ns();
		end = atomic_load(&r->end);
		if (atomic_load(&r->abort))
			break;
		if (!cpu->started && now >= r->measure_start) {
			cpu_sample(&cpu->start_ns, &cpu->start_us);
			cpu->started = true;
		}
		if (now >= end || atomic_load(&r->jobs_done) == r->o->numjobs)
			break;
		if (p.enabled && now >= next_tick) {
			show_progress(r, &p, now);
			next_tick += NS_PER_S;
		}
		wake = min64(end, p.enabled ? next_tick : end);
		if (!cpu->started)
			wake = min64(wake, r->measure_start);
		if (r->o->count)
			wake = min64(wake, now + COUNT_POLL_NS);
		if (stop_signal_before(wake)) {
			interrupted = true;
			atomic_store(&r->end, vd_bench_now_ns());
		}
	}
	cpu_sample(&cpu->end_ns, &cpu->end_us);
	if (p.enabled)
		fputs("\r\033[K", stderr);
	return interrupted;
}

/* ---- Results ------------------------------------------------------------------------- */

int vd_bench_fill_result(struct bench_result *res, const struct lat_stats *all, int64_t window_ns, uint64_t bs)
{
	if (window_ns <= 0 && all->ios == 0)
		return fail(res, "interrupted before the measurement started");
	if (all->ios == 0)
		return fail(res, "no request completed within --runtime (%.3f s)", (double)window_ns / NS_PER_S);
	if (window_ns <= 0)
		window_ns = 1;
	res->ios = all->ios;
	res->runtime_ns = (uint64_t)window_ns;
	res->iops = (double)all->ios * NS_PER_S / (double)window_ns;
	res->bw_bytes = res->iops * (double)bs;
	res->lat_mean_ns = (double)all->sum_ns / (double)all->ios;
	res->lat_min_ns = all->min_ns;
	res->lat_max_ns = all->max_ns;
	res->p50_ns = stats_percentile(all, 50000);
	res->p99_ns = stats_percentile(all, 99000);
	res->p999_ns = stats_percentile(all, 99900);
	return 0;
}

/*
 * The measured window: from measure_start to the end of the run, or with
 * --count to the last counted completion (the run stops when the requests
 * are done, as qemu-img bench's "Run completed in" time).
 */
static int64_t measured_window(const struct run *r)
{
	int64_t last = 0;

	if (!r->o->count)
		return atomic_load(&r->end) - r->measure_start;
	for (unsigned i = 0; i < r->o->numjobs; i++)
		if (r->jobs[i].last_counted_ns > last)
			last = r->jobs[i].last_counted_ns;
	return last - r->measure_start;
}

static int collect(struct run *r, const struct cpu_window *cpu, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	struct lat_stats all;
	int ret;

	for (unsigned i = 0; i < o->numjobs; i++)
		if (r->jobs[i].failed)
			return fail(res, "%s", r->jobs[i].error);
	if (!vd_bench_stats_init(&all))
		return fail(res, "out of memory");
	for (unsigned i = 0; i < o->numjobs; i++)
		stats_merge(&all, &r->jobs[i].stats);
	ret = vd_bench_fill_result(res, &all, measured_window(r), o->bs);
	if (ret == 0 && cpu->started && cpu->end_ns > cpu->start_ns)
		res->cpu = (double)(cpu->end_us - cpu->start_us) * 1000.0 * 100.0 / (double)(cpu->end_ns - cpu->start_ns);
	vd_bench_stats_free(&all);
	return ret;
}

/* ---- One run ------------------------------------------------------------------------ */

static void run_measure(struct run *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	struct cpu_window cpu = { 0 };

	r->t0 = vd_bench_now_ns();
	r->measure_start = r->t0 + (int64_t)o->ramp_ns;
	atomic_store(&r->end, r->measure_start + bench_time_limit_ns(o));
	if (o->ramp_ns == 0) {
		cpu_sample(&cpu.start_ns, &cpu.start_us);
		cpu.started = true;
	}
	open_gate(r);
	res->interrupted = supervise(r, &cpu);
	join_threads(r);
	collect(r, &cpu, res);
}

static void run_teardown(struct run *r)
{
	if (!r->gate_open) { /* threads may be waiting at the gate: let them out */
		atomic_store(&r->abort, true);
		open_gate(r);
	}
	join_threads(r);
	free_jobs(r);
	if (r->have_region)
		vdisk_free_mem_region(r->v, &r->region);
	vdisk_destroy(&r->v);
	pthread_cond_destroy(&r->gate_cond);
	pthread_mutex_destroy(&r->gate_lock);
}

/* Run the job on one driver.  res->status says whether it worked. */
static void run_one(const struct bench_opts *o, const char *driver, struct bench_result *res)
{
	struct run r = { .o = o, .driver = driver };

	memset(res, 0, sizeof(*res));
	pthread_mutex_init(&r.gate_lock, NULL);
	pthread_cond_init(&r.gate_cond, NULL);
	atomic_init(&r.abort, false);
	atomic_init(&r.end, 0);
	atomic_init(&r.jobs_done, 0);
	if (open_instance(&r, res) == 0 && init_jobs(&r, res) == 0 && start_threads(&r, res) == 0)
		run_measure(&r, res);
	run_teardown(&r);
}

/* ---- Preparing the file ------------------------------------------------------------------ */

static bool any_driver_needs_path(const struct bench_opts *o)
{
	if (o->driver)
		return driver_needs_path(o->driver);
	for (int i = 0; i < o->n_compare; i++)
		if (driver_needs_path(o->compare[i]))
			return true;
	return false;
}

/* A write workload on a missing file creates it (sparse, --size bytes). */
static int create_missing_file(const struct bench_opts *o)
{
	struct stat st;
	int fd;

	if (!o->path || !any_driver_needs_path(o) || !rw_writes(o->rw))
		return EXIT_OK;
	if (stat(o->path, &st) == 0 || errno != ENOENT)
		return EXIT_OK; /* connect reports any other problem with the path */
	if (!o->size)
		return usage_error("'%s' does not exist: give --size to create it", o->path);
	fd = open(o->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		fprintf(stderr, "vdisk bench: cannot create '%s': %s\n", o->path, strerror(errno));
		return EXIT_RUNTIME;
	}
	if (ftruncate(fd, (off_t)o->size) < 0) {
		fprintf(stderr, "vdisk bench: cannot size '%s' to %" PRIu64 " bytes: %s\n", o->path, o->size,
			strerror(errno));
		close(fd);
		return EXIT_RUNTIME;
	}
	close(fd);
	fprintf(stderr, "vdisk bench: created '%s' (%" PRIu64 " bytes, sparse)\n", o->path, o->size);
	return EXIT_OK;
}

/* Every --set NAME must be a property of each driver it applies to. */
static int check_settings(const struct bench_opts *o, const char *driver)
{
	const char *const *names;
	struct vdisk *v;
	int status = EXIT_OK;

	if (vdisk_create(driver, &v) < 0) {
		fprintf(stderr, "vdisk bench: %s: %s\n", driver, vdisk_get_error_msg());
		return EXIT_RUNTIME;
	}
	names = vdisk_list_properties(v);
	for (int i = 0; i < o->n_sets && status == EXIT_OK; i++) {
		const char *const *n = names;

		if (!setting_applies(&o->sets[i], driver))
			continue;
		while (*n && strcmp(*n, o->sets[i].name) != 0)
			n++;
		if (!*n) {
			fprintf(stderr, "vdisk bench: --set: driver '%s' has no property '%s' (it has:", driver,
				o->sets[i].name);
			for (n = names; *n; n++)
				fprintf(stderr, "%s %s", n == names ? "" : ",", *n);
			fputs(")\nTry 'vdisk bench --help'.\n", stderr);
			status = EXIT_USAGE;
		}
	}
	vdisk_destroy(&v);
	return status;
}

/* ---- Output --------------------------------------------------------------------------- */

static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c == '\t')
			fputs("\\t", f);
		else if (c < 0x20 || c == 0x7f)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static void json_result(FILE *f, const struct bench_opts *o, const char *driver, const struct bench_result *r)
{
	fputs("{\"driver\":", f);
	json_string(f, driver);
	if (r->status != EXIT_OK) {
		fputs(",\"error\":", f);
		json_string(f, r->error);
		fputc('}', f);
		return;
	}
	if (o->image) {
		/* The block layer: driver is the file node's libvdisk driver. */
		fputs(",\"layer\":\"block\",\"path\":", f);
		json_string(f, o->image);
		fputs(",\"format\":", f);
		json_string(f, r->format ? r->format : "?");
		fputs(",\"cache\":", f);
		json_string(f, o->cache);
		fputs(",\"aio\":", f);
		json_string(f, o->aio);
	} else {
		fputs(",\"layer\":\"driver\"", f);
	}
	if (!o->image && o->path && driver_needs_path(driver)) {
		fputs(",\"path\":", f);
		json_string(f, o->path);
	}
	if (o->stride)
		fprintf(f, ",\"stride\":%" PRIu64, o->stride);
	if (o->count)
		fprintf(f, ",\"count\":%" PRIu64, o->count);
	fprintf(f, ",\"rw\":\"%s\",\"bs\":%" PRIu64 ",\"iodepth\":%u,\"numjobs\":%u,\"size\":%" PRIu64, vd_bench_rw_names[o->rw],
		o->bs, o->iodepth, o->numjobs, r->size);
	if (o->rw == RW_RANDRW)
		fprintf(f, ",\"rwmixread\":%u", o->rwmixread);
	fprintf(f, ",\"direct\":%s,\"poll\":%s,\"runtime_ns\":%" PRIu64 ",\"interrupted\":%s",
		o->direct || (o->image && r->direct) ? "true" : "false",
		o->poll ? "true" : "false", r->runtime_ns, r->interrupted ? "true" : "false");
	fprintf(f, ",\"ios\":%" PRIu64 ",\"iops\":%.1f,\"bw_bytes\":%.0f", r->ios, r->iops, r->bw_bytes);
	fprintf(f,
		",\"lat_ns\":{\"mean\":%.1f,\"min\":%" PRIu64 ",\"max\":%" PRIu64 ",\"p50\":%" PRIu64
		",\"p99\":%" PRIu64 ",\"p999\":%" PRIu64 "}",
		r->lat_mean_ns, r->lat_min_ns, r->lat_max_ns, r->p50_ns, r->p99_ns, r->p999_ns);
	if (r->have_file_ops)
		fprintf(f,
			",\"file_ops\":{\"read\":%" PRIu64 ",\"write\":%" PRIu64 ",\"flush\":%" PRIu64
			",\"read_bytes\":%" PRIu64 ",\"write_bytes\":%" PRIu64 "}",
			r->file_rd_ops, r->file_wr_ops, r->file_flush_ops, r->file_rd_bytes, r->file_wr_bytes);
	fprintf(f, ",\"cpu\":%.1f}", r->cpu);
}

/* "4k", "1G" when exact, else bytes. */
static void format_size(char *buf, size_t len, uint64_t bytes)
{
	static const char units[] = "kMGT";
	int u = -1;

	while (u < 3 && bytes && bytes % 1024 == 0) {
		bytes /= 1024;
		u++;
	}
	if (u < 0)
		snprintf(buf, len, "%" PRIu64, bytes);
	else
		snprintf(buf, len, "%" PRIu64 "%c", bytes, units[u]);
}

static double us(uint64_t ns)
{
	return (double)ns / 1000.0;
}

static void print_summary(const struct bench_opts *o, const char *driver, const struct bench_result *r)
{
	char bs[24], size[24];

	format_size(bs, sizeof(bs), o->bs);
	format_size(size, sizeof(size), r->size);
	if (o->image)
		printf("%s (%s, cache=%s, aio=%s -> %s): rw=%s bs=%s iodepth=%u size=%s\n", o->image,
		       r->format ? r->format : "?", o->cache, o->aio, driver, vd_bench_rw_names[o->rw], bs, o->iodepth,
		       size);
	else
		printf("%s: rw=%s bs=%s iodepth=%u numjobs=%u size=%s direct=%d poll=%d\n", driver,
		       vd_bench_rw_names[o->rw], bs, o->iodepth, o->numjobs, size, o->direct, o->poll);
	printf("  iops     : %.0f\n", r->iops);
	printf("  bandwidth: %.1f MB/s (%.1f MiB/s)\n", r->bw_bytes / 1e6, r->bw_bytes / (1024.0 * 1024.0));
	printf("  lat (us) : mean %.2f, p50 %.2f, p99 %.2f, p99.9 %.2f (min %.2f, max %.2f)\n",
	       r->lat_mean_ns / 1000.0, us(r->p50_ns), us(r->p99_ns), us(r->p999_ns), us(r->lat_min_ns),
	       us(r->lat_max_ns));
	printf("  ios      : %" PRIu64 " in %.3f s%s\n", r->ios, (double)r->runtime_ns / NS_PER_S,
	       r->interrupted ? " (interrupted)" : "");
	printf("  cpu      : %.1f%% (user+sys of all threads over wall time)\n", r->cpu);
	if (r->have_file_ops)
		printf("  file I/O : %" PRIu64 " reads, %" PRIu64 " writes, %" PRIu64 " flushes on the protocol node\n",
		       r->file_rd_ops, r->file_wr_ops, r->file_flush_ops);
}

static void print_table(const struct bench_opts *o, const struct bench_result *res)
{
	char bs[24];

	format_size(bs, sizeof(bs), o->bs);
	printf("rw=%s bs=%s iodepth=%u numjobs=%u direct=%d poll=%d\n\n", vd_bench_rw_names[o->rw], bs, o->iodepth,
	       o->numjobs, o->direct, o->poll);
	printf("%-10s | %10s | %9s | %9s | %9s | %9s | %9s | %6s\n", "driver", "IOPS", "MB/s", "mean us", "p50 us",
	       "p99 us", "p99.9 us", "CPU%");
	printf("-----------+------------+-----------+-----------+-----------+-----------+-----------+-------\n");
	for (int i = 0; i < o->n_compare; i++) {
		const struct bench_result *r = &res[i];

		if (r->status != EXIT_OK) {
			printf("%-10s | failed: %s\n", o->compare[i], r->error);
			continue;
		}
		printf("%-10s | %10.0f | %9.1f | %9.2f | %9.2f | %9.2f | %9.2f | %6.1f%s\n", o->compare[i], r->iops,
		       r->bw_bytes / 1e6, r->lat_mean_ns / 1000.0, us(r->p50_ns), us(r->p99_ns), us(r->p999_ns),
		       r->cpu, r->interrupted ? "  (interrupted)" : "");
	}
}

/* ---- main ------------------------------------------------------------------------------ */

bool vd_bench_stop_signal_pending(void)
{
	struct timespec zero = { 0, 0 };

	return sigtimedwait(&stop_signals, NULL, &zero) > 0;
}

static int bench_single(const struct bench_opts *o)
{
	struct bench_result res;

	run_one(o, o->driver, &res);
	if (res.status != EXIT_OK) {
		fprintf(stderr, "vdisk bench: %s: %s\n", o->driver, res.error);
		return res.status;
	}
	if (o->json) {
		json_result(stdout, o, o->driver, &res);
		fputc('\n', stdout);
	} else {
		print_summary(o, o->driver, &res);
	}
	return EXIT_OK;
}

static int bench_image(const struct bench_opts *o)
{
	struct bench_result res;

	vd_bench_block_run(o, &res);
	if (res.status != EXIT_OK) {
		fprintf(stderr, "vdisk bench: %s: %s\n", o->image, res.error);
		return res.status;
	}
	if (o->json) {
		json_result(stdout, o, res.driver, &res);
		fputc('\n', stdout);
	} else {
		print_summary(o, res.driver, &res);
	}
	return EXIT_OK;
}

static int bench_compare(const struct bench_opts *o)
{
	struct bench_result res[MAX_COMPARE];
	bool any_ok = false, stopped = false;

	for (int i = 0; i < o->n_compare; i++) {
		if (stopped || (stopped = vd_bench_stop_signal_pending())) {
			memset(&res[i], 0, sizeof(res[i]));
			fail(&res[i], "not run: interrupted");
			continue;
		}
		run_one(o, o->compare[i], &res[i]);
		stopped = res[i].interrupted;
		if (res[i].status == EXIT_OK)
			any_ok = true; /* failures are reported in their row */
	}
	if (o->json) {
		fputs("{\"results\":[", stdout);
		for (int i = 0; i < o->n_compare; i++) {
			if (i)
				fputc(',', stdout);
			json_result(stdout, o, o->compare[i], &res[i]);
		}
		fputs("]}\n", stdout);
	} else {
		print_table(o, res);
	}
	return any_ok ? EXIT_OK : EXIT_RUNTIME;
}

static int check_all_settings(const struct bench_opts *o)
{
	int status = EXIT_OK;

	if (o->driver)
		return check_settings(o, o->driver);
	for (int i = 0; i < o->n_compare && status == EXIT_OK; i++)
		status = check_settings(o, o->compare[i]);
	return status;
}

int vd_bench_main(int argc, char **argv)
{
	struct bench_opts o;
	bool help = false;
	int status;

	opts_init(&o);
	status = parse_args(&o, argc, argv, &help);
	if (status == EXIT_OK && help) {
		usage(stdout);
		opts_free(&o);
		return EXIT_OK;
	}
	if (status == EXIT_OK)
		status = check_all_settings(&o);
	if (status == EXIT_OK)
		status = o.image ? vd_bench_block_prepare(&o) : create_missing_file(&o);
	if (status == EXIT_OK) {
		block_stop_signals();
		status = o.image ? bench_image(&o) : o.driver ? bench_single(&o) : bench_compare(&o);
	}
	if (fflush(stdout) != 0 && status == EXIT_OK) {
		fprintf(stderr, "vdisk bench: writing the results: %s\n", strerror(errno));
		status = EXIT_RUNTIME;
	}
	opts_free(&o);
	return status;
}
