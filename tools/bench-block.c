/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk bench --image — the same fio-like job as the driver path, run
 * through the block layer: a format node (raw, qcow2, or probed) over a
 * "file" protocol node whose I/O goes through a libvdisk driver (aio=).
 *
 * A node belongs to one thread, so this is one thread and its loop
 * (util/loop.h) with IODEPTH coroutines.  Each coroutine loops: take the
 * next offset from the shared generator (random, or sequential with
 * --stride as qemu-img bench -S), call vd_bnode_co_preadv/pwritev on its own
 * buffer and qiov, record the latency, repeat.  The loop submits what the
 * coroutines enqueued in one batch per iteration and resumes each coroutine
 * when its request completes.
 *
 * Nothing is allocated per request here: the coroutines are created once
 * (before the clock starts) and live for the whole run, each with one
 * buffer and one qiov set up once; the histogram is allocated up front.
 * (Whether the layers below allocate is theirs to avoid; raw over file
 * does not once warmed up.)
 *
 * Time limit, --count, ramp and SIGINT behave as on the driver path; the
 * periodic work (stop signals, the progress line) is done by the
 * coroutines themselves every CHECK_NS, so the thread only runs its loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "block.h"
#include "coroutine.h"
#include "loop.h"

#define CHECK_NS (10 * 1000 * 1000) /* how often to look for SIGINT / draw progress */
#define BUF_ALIGN 4096

/* ---- options ------------------------------------------------------------------ */

static const char *const aio_names[] = { "io_uring", "native", "threads", "sync" };
static const char *const format_names[] = { "raw", "qcow2" }; /* the formats bench offers, if built */
static const char *const cache_names = "none, writeback, writethrough, directsync or unsafe";

const char *vd_bench_block_driver(const char *aio)
{
	return strcmp(aio, "native") == 0 ? "linux-aio" : aio;
}

static bool format_usable(const char *name)
{
	const struct vd_format *f = vd_format_find(name);

	return f && !f->is_protocol && f->co_preadv;
}

static int bad_format(const char *arg)
{
	char list[64] = "";
	size_t n = 0;

	for (size_t i = 0; i < sizeof(format_names) / sizeof(format_names[0]); i++)
		if (format_usable(format_names[i]))
			n += (size_t)snprintf(list + n, sizeof(list) - n, "%s%s", n ? " or " : "", format_names[i]);
	return vd_bench_usage_error("invalid --format '%s': expected %s (or leave it out to probe)", arg,
				    n ? list : "(no format built in)");
}

int vd_bench_block_check_opts(const struct bench_opts *o)
{
	struct vd_cache_mode mode;
	bool aio_ok = false;

	if (vd_cache_mode_parse(o->cache, &mode) < 0)
		return vd_bench_usage_error("invalid --cache '%s': expected %s", o->cache, cache_names);
	for (size_t i = 0; i < sizeof(aio_names) / sizeof(aio_names[0]); i++)
		aio_ok |= strcmp(o->aio, aio_names[i]) == 0;
	if (!aio_ok)
		return vd_bench_usage_error("invalid --aio '%s': expected io_uring, native, threads or sync", o->aio);
	if (strcmp(o->aio, "native") == 0 && !mode.direct)
		return vd_bench_usage_error("--aio=native needs O_DIRECT: give --cache=none or --cache=directsync "
					    "(as QEMU's aio=native needs cache.direct=on)");
	if (o->format) {
		bool listed = false;

		for (size_t i = 0; i < sizeof(format_names) / sizeof(format_names[0]); i++)
			listed |= strcmp(o->format, format_names[i]) == 0;
		if (!listed || !format_usable(o->format))
			return bad_format(o->format);
	}
	return EXIT_OK;
}

/* A write job on a missing image creates it, as the driver path creates a missing file. */
int vd_bench_block_prepare(const struct bench_opts *o)
{
	const char *fmt = o->format ? o->format : "raw";
	struct vd_create_opts c = { .filename = o->image, .size = o->size };
	struct stat st;
	int ret;

	if (!rw_writes(o->rw) || stat(o->image, &st) == 0 || errno != ENOENT)
		return EXIT_OK; /* opening reports any other problem */
	if (!o->size)
		return vd_bench_usage_error("'%s' does not exist: give --size to create it", o->image);
	c.opts = json_object();
	if (!c.opts) {
		fprintf(stderr, "vdisk bench: out of memory\n");
		return EXIT_RUNTIME;
	}
	ret = vd_image_create(fmt, &c);
	json_decref(c.opts);
	if (ret < 0) {
		fprintf(stderr, "vdisk bench: cannot create '%s': %s\n", o->image, vdisk_get_error_msg());
		return EXIT_RUNTIME;
	}
	fprintf(stderr, "vdisk bench: created '%s' (%s, %" PRIu64 " bytes)\n", o->image, fmt, o->size);
	return EXIT_OK;
}

/* ---- run state ----------------------------------------------------------------- */

struct brun;

/* One coroutine: one request in flight at a time, always on the same buffer. */
struct worker {
	struct brun *r;
	struct vd_co *co;
	struct vd_qiov qiov; /* set up once (one element: the buffer); never moves */
};

struct brun {
	const struct bench_opts *o;
	struct vd_bnode *bs;
	struct vd_bnode *leaf; /* the protocol node at the bottom of bs's file chain */
	struct vd_bnode leaf_at_start; /* its counters when the clock started */
	uint64_t size;    /* bytes of the node in use */
	uint64_t nblocks; /* size / bs */
	uint64_t stride;
	void *bufs;
	struct worker *workers;
	unsigned n_workers;

	/* The shared offset generator and request budget (one thread: no atomics). */
	uint64_t rng;
	uint64_t next_offset;
	uint64_t budget; /* requests left to issue (--count; else UINT64_MAX) */

	/* CLOCK_MONOTONIC ns; end moves earlier on SIGINT or an error. */
	int64_t t0, measure_start, end;
	int64_t last_counted_ns;
	int64_t next_check;
	unsigned active; /* coroutines still running */
	bool done;       /* all of them finished: the loop stops */
	bool interrupted;
	bool failed;

	struct lat_stats stats; /* the measured window only */
	uint64_t completed;

	/* CPU use over the measured window. */
	bool cpu_started;
	int64_t cpu_start_ns, cpu_end_ns;
	uint64_t cpu_start_us, cpu_end_us;

	/* Progress line (stderr is a terminal). */
	bool progress;
	int64_t next_tick, last_tick_ns;
	uint64_t last_tick_ios;

	char error[ERR_LEN];
};

/* ---- the worker coroutines -------------------------------------------------------- */

static uint64_t pick_offset(struct brun *r)
{
	uint64_t off;

	if (rw_is_random(r->o->rw))
		return vd_bench_random_below(&r->rng, r->nblocks) * r->o->bs;
	off = r->next_offset;
	r->next_offset = vd_bench_seq_next(off, r->stride, r->o->bs, r->size);
	return off;
}

static void worker_error(struct brun *r, bool write, uint64_t off, int ret)
{
	const char *msg = vdisk_get_error_msg(); /* thread-local: read it before anything else runs */

	if (r->failed)
		return;
	snprintf(r->error, sizeof(r->error), "%s of %" PRIu64 " bytes at offset %" PRIu64 " failed: %s",
		 write ? "write" : "read", r->o->bs, off, msg[0] ? msg : strerror(-ret));
	r->failed = true;
	r->end = vd_bench_now_ns(); /* the others stop issuing */
}

static void cpu_sample(int64_t *wall, uint64_t *cpu_us)
{
	*cpu_us = vd_bench_cpu_us();
	*wall = vd_bench_now_ns();
}

static void show_progress(struct brun *r, int64_t now)
{
	double secs = (double)(now - r->last_tick_ns) / NS_PER_S;
	double iops = secs > 0 ? (double)(r->completed - r->last_tick_ios) / secs : 0;

	if (r->o->count)
		fprintf(stderr, "\r%s: run  %" PRIu64 "/%" PRIu64 " requests  %.0f IOPS  %.1f MB/s\033[K", r->o->image,
			r->completed, r->o->count, iops, iops * (double)r->o->bs / 1e6);
	else
		fprintf(stderr, "\r%s: %s %.0f/%.0fs  %.0f IOPS  %.1f MB/s\033[K", r->o->image,
			now < r->measure_start ? "ramp" : "run ", (double)(now - r->t0) / NS_PER_S,
			(double)(r->end - r->t0) / NS_PER_S, iops, iops * (double)r->o->bs / 1e6);
	r->last_tick_ns = now;
	r->last_tick_ios = r->completed;
	r->next_tick += NS_PER_S;
}

/* Every CHECK_NS, from whichever coroutine gets there: SIGINT, progress. */
static void housekeeping(struct brun *r, int64_t now)
{
	r->next_check = now + CHECK_NS;
	if (!r->interrupted && vd_bench_stop_signal_pending()) {
		r->interrupted = true;
		if (now < r->end)
			r->end = now;
	}
	if (r->progress && now >= r->next_tick)
		show_progress(r, now);
}

static int do_request(struct brun *r, struct worker *w, bool write, uint64_t off)
{
	if (write)
		return vd_bnode_co_pwritev(r->bs, off, r->o->bs, &w->qiov, 0, 0);
	return vd_bnode_co_preadv(r->bs, off, r->o->bs, &w->qiov, 0, 0);
}

static void worker_co(void *arg)
{
	struct worker *w = arg;
	struct brun *r = w->r;
	int64_t start = vd_bench_now_ns(), now;

	while (!r->failed && r->budget && start < r->end) {
		uint64_t off = pick_offset(r);
		bool write = vd_bench_pick_write(r->o, &r->rng);
		int ret;

		r->budget--;
		ret = do_request(r, w, write, off);
		now = vd_bench_now_ns();
		if (ret < 0) {
			worker_error(r, write, off, ret);
			break;
		}
		r->completed++;
		if (now >= r->measure_start && now < r->end) {
			if (!r->cpu_started) { /* the end of --ramp */
				cpu_sample(&r->cpu_start_ns, &r->cpu_start_us);
				r->cpu_started = true;
			}
			vd_bench_stats_record(&r->stats, (uint64_t)(now - start));
			r->last_counted_ns = now;
		}
		if (now >= r->next_check)
			housekeeping(r, now);
		start = now;
	}
	if (--r->active == 0)
		r->done = true;
}

/* ---- setup ---------------------------------------------------------------------------- */

static int open_node(struct brun *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	struct vd_cache_mode mode;
	json_t *opts;

	if (vd_cache_mode_parse(o->cache, &mode) < 0) /* checked with the options already */
		return vd_bench_fail(res, "%s", vdisk_get_error_msg());
	/* {"driver": FMT, "file": {"driver": "file", "filename": IMAGE, "aio": AIO}}; no driver: probe. */
	opts = json_pack("{s:{s:s, s:s, s:s}}", "file", "driver", "file", "filename", o->image, "aio", o->aio);
	if (opts && o->format && json_object_set_new(opts, "driver", json_string(o->format)) < 0) {
		json_decref(opts);
		opts = NULL;
	}
	if (!opts)
		return vd_bench_fail(res, "out of memory");
	/* As qemu-img bench: read-write only for writes. */
	r->bs = vd_bnode_open_opts(opts, &mode, rw_writes(o->rw) ? VD_BO_RDWR : 0);
	json_decref(opts);
	if (!r->bs)
		return vd_bench_fail(res, "%s", vdisk_get_error_msg());
	res->format = r->bs->fmt->name;
	res->direct = mode.direct;
	for (r->leaf = r->bs; r->leaf->file; r->leaf = r->leaf->file)
		;
	return 0;
}

static int choose_geometry(struct brun *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;

	r->size = o->size ? o->size : r->bs->size;
	if (r->size > r->bs->size) {
		fprintf(stderr, "vdisk bench: '%s' holds %" PRIu64 " bytes, less than --size; using them all\n",
			o->image, r->bs->size);
		r->size = r->bs->size;
	}
	if (r->size < o->bs)
		return vd_bench_fail(res, "the image holds %" PRIu64 " bytes, less than --bs=%" PRIu64, r->size, o->bs);
	r->stride = o->stride ? o->stride : o->bs;
	r->nblocks = r->size / o->bs;
	res->size = r->size;
	return 0;
}

static int alloc_workers(struct brun *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	size_t slot = ((size_t)o->bs + BUF_ALIGN - 1) / BUF_ALIGN * BUF_ALIGN, total;

	if (__builtin_mul_overflow(slot, (size_t)o->iodepth, &total))
		return vd_bench_fail(res, "--bs x --iodepth is too large");
	r->bufs = vd_blk_alloc(total);
	r->workers = calloc(o->iodepth, sizeof(*r->workers));
	if (!r->bufs || !r->workers || !vd_bench_stats_init(&r->stats))
		return vd_bench_fail(res, "out of memory for %u buffers of %" PRIu64 " bytes", o->iodepth, o->bs);
	if (rw_writes(o->rw))
		vd_bench_fill_random(r->bufs, total);
	else
		memset(r->bufs, 0, total);
	for (unsigned i = 0; i < o->iodepth; i++) {
		struct worker *w = &r->workers[i];

		w->r = r;
		vd_qiov_init_buf(&w->qiov, (char *)r->bufs + i * slot, (size_t)o->bs);
		/* Created before the clock starts: stacks come from the pool or are mapped now. */
		w->co = vd_co_create(worker_co, w);
		if (!w->co)
			return vd_bench_fail(res, "out of memory for %u coroutines", o->iodepth);
		r->n_workers++;
		r->active++;
	}
	return 0;
}

/* ---- the run ----------------------------------------------------------------------- */

static int64_t measured_window(const struct brun *r)
{
	if (r->o->count)
		return r->last_counted_ns - r->measure_start;
	return r->end - r->measure_start;
}

/*
 * What the format made of the requests: the protocol node's requests over
 * the run (a qcow2 write that allocates shows up as several writes and
 * maybe flushes; raw as one each).
 */
static void file_ops(const struct brun *r, struct bench_result *res)
{
	const struct vd_bnode *now = r->leaf, *then = &r->leaf_at_start;

	res->have_file_ops = true;
	res->file_rd_ops = now->rd_ops - then->rd_ops;
	res->file_wr_ops = now->wr_ops - then->wr_ops;
	res->file_flush_ops = now->flush_ops - then->flush_ops;
	res->file_rd_bytes = now->rd_bytes - then->rd_bytes;
	res->file_wr_bytes = now->wr_bytes - then->wr_bytes;
}

static void run_measure(struct brun *r, struct bench_result *res)
{
	const struct bench_opts *o = r->o;
	struct vd_loop *l = vd_loop_get();

	r->leaf_at_start = *r->leaf;
	r->t0 = vd_bench_now_ns();
	r->measure_start = r->t0 + (int64_t)o->ramp_ns;
	r->end = r->measure_start + bench_time_limit_ns(o);
	r->next_check = r->t0 + CHECK_NS;
	r->progress = isatty(STDERR_FILENO);
	r->next_tick = r->t0 + NS_PER_S;
	r->last_tick_ns = r->t0;
	if (o->ramp_ns == 0) {
		cpu_sample(&r->cpu_start_ns, &r->cpu_start_us);
		r->cpu_started = true;
	}
	/* Each issues its first request and yields; the loop submits them in one batch. */
	for (unsigned i = 0; i < r->n_workers; i++)
		vd_co_enter(r->workers[i].co);
	vd_loop_run_until(l, &r->done);
	cpu_sample(&r->cpu_end_ns, &r->cpu_end_us);
	file_ops(r, res);
	if (r->progress)
		fputs("\r\033[K", stderr);
	res->interrupted = r->interrupted;
	if (r->failed) {
		vd_bench_fail(res, "%s", r->error);
		return;
	}
	if (vd_bench_fill_result(res, &r->stats, measured_window(r), o->bs) == 0 && r->cpu_started &&
	    r->cpu_end_ns > r->cpu_start_ns)
		res->cpu = (double)(r->cpu_end_us - r->cpu_start_us) * 1000.0 * 100.0 /
			   (double)(r->cpu_end_ns - r->cpu_start_ns);
}

/* Coroutines created but not run (setup failed) are run to their end: that returns them to the pool. */
static void finish_unstarted(struct brun *r)
{
	r->failed = true;
	for (unsigned i = 0; i < r->n_workers; i++)
		vd_co_enter(r->workers[i].co);
}

void vd_bench_block_run(const struct bench_opts *o, struct bench_result *res)
{
	struct brun r = { .o = o, .rng = 0x9e3779b97f4a7c15ull, .budget = o->count ? o->count : UINT64_MAX };

	memset(res, 0, sizeof(*res));
	res->driver = vd_bench_block_driver(o->aio);
	if (open_node(&r, res) == 0 && choose_geometry(&r, res) == 0 && alloc_workers(&r, res) == 0)
		run_measure(&r, res);
	else if (r.n_workers)
		finish_unstarted(&r);
	if (r.bs) {
		/* Closing flushes a writable node (not timed, as qemu-img bench). */
		vd_bnode_unref(r.bs);
	}
	vd_bench_stats_free(&r.stats);
	free(r.workers);
	vd_blk_free(r.bufs);
	vd_loop_free_current();
}
