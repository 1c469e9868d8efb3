/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Multiqueue through the block graph: a node opened in the test's main
 * thread (its home) takes requests from worker threads at the same time.
 * raw over file runs them in the workers (one libvdisk instance each);
 * qcow2 forwards them home.  Checked: data written from every thread reads
 * back from every other; misaligned overlapping writes from two threads
 * under O_DIRECT (read-modify-write, serialised across threads) lose no
 * byte; statistics count every request; a resize at home while the workers
 * write lets them use the new end afterwards; a node whose home loop takes
 * no cross-thread calls refuses requests from elsewhere with EXDEV.
 */
#include <inttypes.h>
#include <pthread.h>

#include "test-block-util.h"

#define NWORKERS 2
#define COS 8          /* coroutines per thread */
#define CHUNK 65536    /* each coroutine owns one region */
#define ROUNDS 16

struct worker;
typedef void (*body_fn)(struct worker *w);

struct worker {
	int id; /* 1..NWORKERS; 0 is the main thread */
	pthread_t thread;
	struct vd_bnode *bs;
	body_fn body;
	struct vd_loop *loop, *main_loop;
	int failures;
	bool quit;
	struct vd_loop_msg done_msg, quit_msg;
};

static int workers_done; /* main thread only (set by messages run there) */
static uint64_t last_rd_ops, last_wr_ops; /* the node's counters when the threads were done */

static void on_done(void *arg)
{
	(void)arg;
	workers_done++;
}

static void on_quit(void *arg)
{
	((struct worker *)arg)->quit = true;
}

/* Run fn(w) in one coroutine until it returns (bodies run outside coroutines, as run_parallel wants). */
static void in_co(void (*fn)(void *), struct worker *w)
{
	void *p[1] = { w };

	run_parallel(1, fn, p);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	w->loop = vd_loop_get();
	assert_int_equal(vd_loop_enable_remote(w->loop), 0);
	w->body(w);
	w->done_msg = (struct vd_loop_msg){ .fn = on_done };
	vd_loop_post_msg(w->main_loop, &w->done_msg);
	/* Stay until the node is closed: its file node destroys our instance in this thread. */
	vd_loop_run_until(w->loop, &w->quit);
	vd_loop_free_current();
	return NULL;
}

/* Run body in NWORKERS threads (and in the main thread too when also_main), then close bs. */
static void run_workers(struct vd_bnode *bs, body_fn body, bool also_main, int *failures)
{
	struct worker w[NWORKERS + 1];
	struct vd_loop *main_loop = vd_loop_get();

	assert_int_equal(vd_loop_enable_remote(main_loop), 0);
	workers_done = 0;
	for (int i = 0; i <= NWORKERS; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i] = (struct worker){ .id = i, .bs = bs, .body = body, .main_loop = main_loop };
	}
	for (int i = 1; i <= NWORKERS; i++)
		assert_int_equal(pthread_create(&w[i].thread, NULL, worker_main, &w[i]), 0);
	if (also_main)
		w[0].body(&w[0]);
	while (workers_done < NWORKERS)
		vd_loop_run_once(main_loop, true);
	*failures = 0;
	for (int i = 0; i <= NWORKERS; i++)
		*failures += w[i].failures;
	last_rd_ops = bs->rd_ops;
	last_wr_ops = bs->wr_ops;
	/* Close before the threads go: the file node destroys their instances in their loops. */
	vd_bnode_unref(bs);
	for (int i = 1; i <= NWORKERS; i++) {
		w[i].quit_msg = (struct vd_loop_msg){ .fn = on_quit, .arg = &w[i] };
		vd_loop_post_msg(w[i].loop, &w[i].quit_msg);
		pthread_join(w[i].thread, NULL);
	}
}

/* ---- data from several threads ----------------------------------------------------------- */

struct co_arg {
	struct worker *w;
	int co;
};

static uint8_t pattern(int thread, int co, int round)
{
	return (uint8_t)(1 + thread * 64 + co * 7 + round);
}

/* Each (thread, coroutine) owns one region: write it, read it back, round after round. */
static void region_co(void *opaque)
{
	struct co_arg *a = opaque;
	uint64_t off = ((uint64_t)a->w->id * COS + (uint64_t)a->co) * CHUNK;
	uint8_t *buf = vd_blk_alloc(CHUNK), *back = vd_blk_alloc(CHUNK);

	for (int r = 0; r < ROUNDS; r++) {
		memset(buf, pattern(a->w->id, a->co, r), CHUNK);
		if (vd_bnode_co_pwrite(a->w->bs, off, buf, CHUNK, 0) < 0 ||
		    vd_bnode_co_pread(a->w->bs, off, back, CHUNK) < 0 || memcmp(buf, back, CHUNK)) {
			fprintf(stderr, "thread %d co %d round %d: %s\n", a->w->id, a->co, r, vdisk_get_error_msg());
			a->w->failures++;
			break;
		}
	}
	if (a->co == 0 && vd_bnode_co_flush(a->w->bs) < 0)
		a->w->failures++;
	vd_blk_free(buf);
	vd_blk_free(back);
}

static void regions_body(struct worker *w)
{
	struct co_arg args[COS];
	void *p[COS];

	for (int i = 0; i < COS; i++) {
		args[i] = (struct co_arg){ .w = w, .co = i };
		p[i] = &args[i];
	}
	run_parallel(COS, region_co, p);
}

/* After the threads are done: every region holds its owner's last pattern. */
static void check_regions(const char *path, const char *fmt)
{
	struct vd_bnode *bs = vd_bnode_open(path, fmt, NULL, 0);
	uint8_t *buf = vd_blk_alloc(CHUNK);

	assert_non_null(bs);
	for (int t = 0; t <= NWORKERS; t++)
		for (int c = 0; c < COS; c++) {
			uint64_t off = ((uint64_t)t * COS + (uint64_t)c) * CHUNK;

			assert_int_equal(vd_bnode_pread(bs, off, buf, CHUNK), 0);
			for (int i = 0; i < CHUNK; i++)
				if (buf[i] != pattern(t, c, ROUNDS - 1))
					fail_msg("thread %d co %d: byte %d is %u", t, c, i, buf[i]);
		}
	vd_blk_free(buf);
	vd_bnode_unref(bs);
}

#define IMG_SIZE ((uint64_t)(NWORKERS + 1) * COS * CHUNK)

static void make_image(char *dir, size_t dsize, char *path, size_t psize, const char *fmt)
{
	make_tmpdir(dir, dsize);
	snprintf(path, psize, "%s/disk.%s", dir, fmt);
	if (!strcmp(fmt, "raw")) {
		assert_int_equal(vd_create_file(path, IMG_SIZE, "off"), 0);
	} else {
		struct vd_create_opts o = { .filename = path, .size = IMG_SIZE, .opts = json_object() };

		assert_int_equal(vd_image_create(fmt, &o), 0);
		json_decref(o.opts);
	}
}

static struct vd_bnode *open_node(const char *path, const char *fmt, const char *cache)
{
	struct vd_cache_mode mode;
	char spec[8192];
	struct vd_bnode *bs;

	assert_int_equal(vd_cache_mode_parse(cache, &mode), 0);
	snprintf(spec, sizeof(spec), "driver=%s,file.driver=file,file.filename=%s", fmt, path);
	bs = vd_bnode_open(spec, NULL, &mode, VD_BO_RDWR);
	if (!bs)
		fail_msg("open %s: %s", spec, vdisk_get_error_msg());
	return bs;
}

static void regions_test(const char *fmt, const char *cache)
{
	char dir[4096], path[4200];
	struct vd_bnode *bs;
	uint64_t reqs = (uint64_t)(NWORKERS + 1) * COS * ROUNDS;
	int failures;

	make_image(dir, sizeof(dir), path, sizeof(path), fmt);
	bs = open_node(path, fmt, cache);
	run_workers(bs, regions_body, true, &failures);
	assert_int_equal(failures, 0);
	/* Every request was counted once, whichever thread it ran in. */
	assert_int_equal(last_wr_ops, reqs);
	assert_int_equal(last_rd_ops, reqs);
	check_regions(path, fmt);
	rm_tmpdir(dir);
}

static void test_raw_writeback(void **state)
{
	(void)state;
	regions_test("raw", "writeback");
}

static void test_raw_direct(void **state)
{
	(void)state;
	regions_test("raw", "none");
}

static void test_qcow2_forwarded(void **state)
{
	(void)state;
	regions_test("qcow2", "writeback");
}

/* ---- misaligned writes to one block from several threads ---------------------------------- */

#define RMW_ROUNDS 200

/*
 * Thread t writes byte t (of the first 4 KiB block) RMW_ROUNDS times: each
 * write is a read-modify-write of the whole block under O_DIRECT, so an
 * unserialised pair would put one thread's stale copy of the other's byte
 * back.
 */
static void rmw_co(void *opaque)
{
	struct worker *w = opaque;

	for (int r = 0; r < RMW_ROUNDS; r++) {
		uint8_t v = (uint8_t)(r + 1);

		if (vd_bnode_co_pwrite(w->bs, (uint64_t)w->id, &v, 1, 0) < 0) {
			w->failures++;
			return;
		}
	}
}

static void rmw_body(struct worker *w)
{
	in_co(rmw_co, w);
}

static void test_rmw_across_threads(void **state)
{
	char dir[4096], path[4200];
	struct vd_bnode *bs;
	uint8_t buf[NWORKERS + 1];
	int failures;

	(void)state;
	make_image(dir, sizeof(dir), path, sizeof(path), "raw");
	bs = open_node(path, "raw", "none");
	run_workers(bs, rmw_body, true, &failures);
	assert_int_equal(failures, 0);
	bs = open_node(path, "raw", "none");
	assert_int_equal(vd_bnode_pread(bs, 0, buf, sizeof(buf)), 0);
	for (int t = 0; t <= NWORKERS; t++)
		assert_int_equal(buf[t], (uint8_t)RMW_ROUNDS);
	vd_bnode_unref(bs);
	rm_tmpdir(dir);
}

/* ---- resize while other threads write --------------------------------------------------- */

#define GROWN (IMG_SIZE + 4 * CHUNK)

static void yield_once(void)
{
	vd_loop_schedule(vd_loop_get(), vd_co_self());
	vd_co_yield();
}

/* Grow four times while the workers' requests run (each resize drains them). */
static void grow_co(void *opaque)
{
	struct worker *w = opaque;

	for (int r = 1; r <= 4; r++)
		if (vd_bnode_co_truncate(w->bs, IMG_SIZE + (uint64_t)r * CHUNK, true, "off") < 0)
			w->failures++;
}

static void tail_co(void *opaque)
{
	struct worker *w = opaque;
	uint8_t v = (uint8_t)(0xa0 + w->id), back = 0;
	uint64_t off = GROWN - 1 - (uint64_t)w->id;

	/* Wait for the last resize, then write near the new end: our instance must have restarted. */
	while (__atomic_load_n(&w->bs->size, __ATOMIC_RELAXED) < GROWN)
		yield_once();
	if (vd_bnode_co_pwrite(w->bs, off, &v, 1, 0) < 0 || vd_bnode_co_pread(w->bs, off, &back, 1) < 0 ||
	    back != v) {
		fprintf(stderr, "thread %d: write past the old end: %s\n", w->id, vdisk_get_error_msg());
		w->failures++;
	}
}

static void resize_body(struct worker *w)
{
	if (w->id == 0) {
		in_co(grow_co, w);
		return;
	}
	regions_body(w);
	in_co(tail_co, w);
}

static void test_resize_under_load(void **state)
{
	char dir[4096], path[4200];
	struct vd_bnode *bs;
	uint8_t buf[NWORKERS];
	int failures;

	(void)state;
	make_image(dir, sizeof(dir), path, sizeof(path), "raw");
	bs = open_node(path, "raw", "none");
	run_workers(bs, resize_body, true, &failures);
	assert_int_equal(failures, 0);
	bs = open_node(path, "raw", "writeback");
	assert_int_equal(bs->size, GROWN);
	assert_int_equal(vd_bnode_pread(bs, GROWN - 1 - NWORKERS, buf, NWORKERS), 0);
	for (int t = 1; t <= NWORKERS; t++)
		assert_int_equal(buf[NWORKERS - t], 0xa0 + t);
	vd_bnode_unref(bs);
	rm_tmpdir(dir);
}

/* ---- a home that takes no cross-thread calls --------------------------------------------- */

static void *foreign_read(void *arg)
{
	struct vd_bnode *bs = arg;
	uint8_t buf[512];
	long ret = vd_bnode_pread(bs, 0, buf, sizeof(buf));

	vd_loop_free_current();
	return (void *)ret;
}

static void test_home_without_mailbox(void **state)
{
	char dir[4096], path[4200];
	struct vd_bnode *bs;
	pthread_t t;
	void *ret;

	(void)state;
	/* A fresh thread is the home here, and never enables cross-thread calls. */
	make_image(dir, sizeof(dir), path, sizeof(path), "qcow2");
	bs = open_node(path, "qcow2", "writeback");
	vd_loop_disable_remote(vd_loop_get());
	assert_int_equal(pthread_create(&t, NULL, foreign_read, bs), 0);
	pthread_join(t, &ret);
	assert_int_equal((long)ret, -EXDEV);
	vd_bnode_unref(bs);
	rm_tmpdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_raw_writeback),
		cmocka_unit_test(test_raw_direct),
		cmocka_unit_test(test_qcow2_forwarded),
		cmocka_unit_test(test_rmw_across_threads),
		cmocka_unit_test(test_resize_under_load),
		cmocka_unit_test(test_home_without_mailbox),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
