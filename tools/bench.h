/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk bench internals shared by its two halves: bench.c (options, the
 * libvdisk driver path with one thread per job, output) and bench-block.c
 * (the block-layer path: one thread, one loop, IODEPTH coroutines over a
 * block node).  Not an API: only these two files include it.
 */
#ifndef VD_TOOLS_BENCH_H
#define VD_TOOLS_BENCH_H

#include <stdbool.h>
#include <stdint.h>

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

#define NS_PER_S 1000000000LL
#define MAX_COMPARE 16
#define MAX_SETS 32
#define ERR_LEN 512
/* "No time limit" for --count runs without --runtime (fits now + this in int64). */
#define BENCH_FOREVER_NS (INT64_MAX / 4)

/* ---- options ---------------------------------------------------------------- */

enum rw_mode { RW_READ, RW_WRITE, RW_RANDREAD, RW_RANDWRITE, RW_RANDRW };

extern const char *const vd_bench_rw_names[];

/* --set [DRIVER:]NAME=VALUE */
struct prop_setting {
	char *driver; /* NULL: every driver */
	char *name;
	const char *value;
};

struct bench_opts {
	const char *driver; /* NULL with --compare or --image */
	const char *path;
	enum rw_mode rw;
	unsigned rwmixread;
	uint64_t bs;
	unsigned iodepth;
	unsigned numjobs;
	uint64_t size;   /* 0: the device's capacity */
	uint64_t stride; /* sequential step; 0: bs */
	uint64_t count;  /* stop after this many requests; 0: none */
	uint64_t runtime_ns;
	uint64_t ramp_ns;
	bool runtime_set; /* --runtime given (with --count it is a cap) */
	bool direct;
	bool poll;
	bool json;
	bool rwmixread_set;
	char *compare_buf; /* --compare list, split in place */
	const char *compare[MAX_COMPARE];
	int n_compare;
	struct prop_setting sets[MAX_SETS];
	int n_sets;

	/* The block layer (--image): a node over a file, in one thread. */
	const char *image;
	const char *format; /* NULL: probe */
	const char *cache;  /* cache mode name (default writeback) */
	const char *aio;    /* file protocol aio (default io_uring) */
};

static inline bool rw_is_random(enum rw_mode rw)
{
	return rw == RW_RANDREAD || rw == RW_RANDWRITE || rw == RW_RANDRW;
}

static inline bool rw_writes(enum rw_mode rw)
{
	return rw == RW_WRITE || rw == RW_RANDWRITE || rw == RW_RANDRW;
}

/* The time limit of a run: --runtime, or none for a --count run without it. */
static inline int64_t bench_time_limit_ns(const struct bench_opts *o)
{
	return o->count && !o->runtime_set ? BENCH_FOREVER_NS : (int64_t)o->runtime_ns;
}

/* ---- latency histogram (bench.c) -------------------------------------------- */

struct lat_stats {
	uint64_t ios;
	uint64_t sum_ns;
	uint64_t min_ns;
	uint64_t max_ns;
	uint64_t *hist; /* log-linear buckets */
};

bool vd_bench_stats_init(struct lat_stats *s);
void vd_bench_stats_record(struct lat_stats *s, uint64_t ns);
void vd_bench_stats_free(struct lat_stats *s);

/* ---- results ---------------------------------------------------------------- */

struct bench_result {
	int status; /* EXIT_OK, EXIT_RUNTIME */
	char error[ERR_LEN];
	bool interrupted;
	uint64_t size;
	uint64_t ios;
	uint64_t runtime_ns;
	double iops;
	double bw_bytes;
	double cpu;
	double lat_mean_ns;
	uint64_t lat_min_ns, lat_max_ns, p50_ns, p99_ns, p999_ns;
	/* Block layer: what was opened. */
	const char *format; /* static string (the format's name) */
	const char *driver; /* libvdisk driver of the file node */
	bool direct;
	/* Block layer: requests the protocol (file) node saw during the run. */
	bool have_file_ops;
	uint64_t file_rd_ops, file_wr_ops, file_flush_ops, file_rd_bytes, file_wr_bytes;
};

/* Record a failure in res (EXIT_RUNTIME); returns -1. */
int vd_bench_fail(struct bench_result *res, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Fill the counters of res from the measured samples over window_ns; -1 (res failed) if none. */
int vd_bench_fill_result(struct bench_result *res, const struct lat_stats *all, int64_t window_ns, uint64_t bs);

/* ---- clock, random numbers, buffers, offsets (bench.c) ----------------------- */

int64_t vd_bench_now_ns(void);
/* User + system CPU time of the process, in microseconds. */
uint64_t vd_bench_cpu_us(void);
uint64_t vd_bench_random(uint64_t *state);
/* Uniform in [0, n). */
uint64_t vd_bench_random_below(uint64_t *state, uint64_t n);
/* Write workloads write pseudo-random data, not zeroes that compress. */
void vd_bench_fill_random(void *buf, size_t len);
/*
 * Sequential offsets, as qemu-img bench -S: the next request is STEP bytes
 * after the previous, wrapping modulo SIZE; a request that would cross the
 * end (BS bytes from there) starts over at 0 instead.
 */
uint64_t vd_bench_seq_next(uint64_t off, uint64_t step, uint64_t bs, uint64_t size);
/* Should this request be a write (per --rw and --rwmixread)? */
bool vd_bench_pick_write(const struct bench_opts *o, uint64_t *rng);

/* ---- signals and errors ------------------------------------------------------ */

/* SIGINT or SIGTERM arrived (they are blocked; this takes one).  A syscall: call it now and then. */
bool vd_bench_stop_signal_pending(void);
int vd_bench_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- the block-layer path (bench-block.c) ------------------------------------ */

/* Option checks specific to --image (values of --format, --cache, --aio); EXIT_USAGE with a message. */
int vd_bench_block_check_opts(const struct bench_opts *o);
/* A write job on a missing --image creates it (--size bytes, --format or raw). */
int vd_bench_block_prepare(const struct bench_opts *o);
/* Run the job through the block layer; res->status says whether it worked. */
void vd_bench_block_run(const struct bench_opts *o, struct bench_result *res);
/* The libvdisk driver behind an aio= name ("native" -> "linux-aio"). */
const char *vd_bench_block_driver(const char *aio);

#endif
