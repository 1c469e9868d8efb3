/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * vdiskq_do_io() semantics, for every driver: any number of requests may be
 * enqueued (more than queue-size), max_completions caps what one call
 * returns and the rest come back on the next, min_completions above what is
 * outstanding is -EINVAL, a timeout is -ETIME and loses nothing, and
 * min_completions = 0 never blocks.
 */
#include <sched.h>

#include "test-util.h"

#define BLK 4096

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void more_enqueued_than_queue_size_all_complete(void **state)
{
	struct fx *f = *state;
	const int n = 100;
	unsigned char *w = fx_buf(f, (size_t)n * BLK), *r = fx_buf(f, (size_t)n * BLK);
	int qs = 0;

	fx_open(f, 4);
	assert_int_equal(vdisk_get_int(f->v, "queue-size", &qs), 0);
	assert_int_equal(qs, 4);
	for (int i = 0; i < n; i++) {
		/* Scattered offsets, each block with its own contents. */
		uint64_t off = (uint64_t)((i * 37) % n) * 2 * BLK;

		fill_pattern(w + (size_t)i * BLK, BLK, off, 11);
		assert_int_equal(vdiskq_write(f->q, off, w + (size_t)i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	}
	drain_tags(f->q, n, 16);
	if (!f->cfg->file)
		return;
	/* Read everything back through the queue, again all at once... */
	memset(r, 0, (size_t)n * BLK);
	for (int i = 0; i < n; i++) {
		uint64_t off = (uint64_t)((i * 37) % n) * 2 * BLK;

		assert_int_equal(vdiskq_read(f->q, off, r + (size_t)i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	}
	drain_tags(f->q, n, 3);
	for (int i = 0; i < n; i++) {
		uint64_t off = (uint64_t)((i * 37) % n) * 2 * BLK;

		if (check_pattern(r + (size_t)i * BLK, BLK, off, 11) != -1)
			fail_msg("block %d (offset %" PRIu64 ") read back wrong", i, off);
	}
	/* ...and directly from the file. */
	for (int i = 0; i < n; i++) {
		uint64_t off = (uint64_t)((i * 37) % n) * 2 * BLK;

		pread_file(f->path, r, BLK, off);
		if (check_pattern(r, BLK, off, 11) != -1)
			fail_msg("block at offset %" PRIu64 " wrong in the file", off);
	}
}

static void max_completions_caps_and_rest_come_next_call(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 10 * BLK), seen[11] = { 0 };
	struct vdisk_completion c[16];
	struct timespec t;
	int n;

	fx_open(f, 0);
	for (int i = 0; i < 10; i++)
		assert_int_equal(vdiskq_read(f->q, (uint64_t)i * BLK, buf + i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	t = ts_sec(FX_TIMEOUT_S);
	memset(c, 0, sizeof(c));
	n = vdiskq_do_io(f->q, c, 4, 4, &t);
	assert_int_equal(n, 4);
	assert_null(c[4].user_data); /* nothing written past max */
	for (int i = 0; i < n; i++) {
		uintptr_t tag = (uintptr_t)c[i].user_data;

		assert_true(tag >= 1 && tag <= 10 && !seen[tag]);
		seen[tag] = 1;
		assert_int_equal(c[i].ret, 0);
	}
	t = ts_sec(FX_TIMEOUT_S);
	n = vdiskq_do_io(f->q, c, 6, 16, &t);
	assert_int_equal(n, 6);
	for (int i = 0; i < n; i++) {
		uintptr_t tag = (uintptr_t)c[i].user_data;

		assert_true(tag >= 1 && tag <= 10 && !seen[tag]);
		seen[tag] = 1;
		assert_int_equal(c[i].ret, 0);
	}
	/* Nothing left. */
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 16, NULL), 0);
}

static void max_zero_keeps_completions_for_later(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 3 * BLK);
	struct vdisk_completion c[4];

	fx_open(f, 0);
	for (int i = 0; i < 3; i++)
		assert_int_equal(vdiskq_read(f->q, (uint64_t)i * BLK, buf + i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, NULL, 0, 0, NULL), 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 0, NULL), 0);
	drain_tags(f->q, 3, 4);
}

static void min_above_outstanding_is_einval(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 2 * BLK);
	struct vdisk_completion c[8];
	struct timespec t;

	fx_open(f, 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 1, 1, NULL), -EINVAL);
	assert_msg_contains("vdiskq_do_io");
	assert_int_equal(vdiskq_read(f->q, 0, buf, BLK, (void *)1, 0), 0);
	assert_int_equal(vdiskq_read(f->q, BLK, buf + BLK, BLK, (void *)2, 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 3, 8, NULL), -EINVAL);
	assert_msg_contains("vdiskq_do_io");
	/* Other invalid arguments. */
	assert_int_equal(vdiskq_do_io(f->q, c, 2, 1, NULL), -EINVAL);
	assert_int_equal(vdiskq_do_io(f->q, c, -1, 8, NULL), -EINVAL);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, -1, NULL), -EINVAL);
	assert_int_equal(vdiskq_do_io(f->q, NULL, 0, 8, NULL), -EINVAL);
	assert_int_equal(vdiskq_do_io(NULL, c, 0, 8, NULL), -EINVAL);
	/* The two requests were not lost by the failed calls. */
	t = ts_sec(FX_TIMEOUT_S);
	assert_int_equal(vdiskq_do_io(f->q, c, 2, 8, &t), 2);
	assert_true((c[0].user_data == (void *)1 && c[1].user_data == (void *)2) ||
		    (c[0].user_data == (void *)2 && c[1].user_data == (void *)1));
}

static void timeout_is_etime_without_losing_completions(void **state)
{
	struct fx *f = *state;
	const int n = 64;
	const size_t len = 256 * 1024;
	unsigned char *buf = fx_buf(f, len);
	struct vdisk_completion *c = calloc((size_t)n, sizeof(*c));
	double full, t0;
	int timeouts = 0;

	assert_non_null(c);
	if (!strcmp(f->cfg->driver, "null") || !strcmp(f->cfg->driver, "sync")) {
		free(c);
		print_message("%s completes every request during submission: no timeout possible\n", f->cfg->driver);
		skip();
	}
	fx_open(f, n);
	memset(buf, 0x5a, len);
	/* How long do 16 MiB of FUA writes take here? */
	t0 = now_s();
	for (int i = 0; i < n; i++)
		assert_int_equal(vdiskq_write(f->q, (uint64_t)i * len, buf, len, (void *)(uintptr_t)(i + 1), VDISK_REQ_FUA), 0);
	drain_tags(f->q, n, n);
	full = now_s() - t0;
	/*
	 * Time out part-way (a third of that, then shorter), so that some
	 * completions are typically already reaped when -ETIME is returned:
	 * they must all still come back, each exactly once.
	 */
	for (int attempt = 0; attempt < 6; attempt++) {
		double limit = full / (3 << attempt);
		struct timespec t = { .tv_sec = 0, .tv_nsec = limit < 1e-4 ? 100000 : (long)(limit * 1e9) };
		int got;

		if (limit >= 1.0)
			t.tv_sec = (time_t)limit, t.tv_nsec = (long)((limit - (double)(long)limit) * 1e9);
		for (int i = 0; i < n; i++)
			assert_int_equal(vdiskq_write(f->q, (uint64_t)i * len, buf, len, (void *)(uintptr_t)(i + 1), VDISK_REQ_FUA), 0);
		got = vdiskq_do_io(f->q, c, n, n, &t);
		if (got == -ETIME) {
			timeouts++;
			assert_msg_contains("vdiskq_do_io");
			/* The remaining time is written back: none left. */
			assert_int_equal(t.tv_sec, 0);
			assert_true(t.tv_nsec < 1000000);
			drain_tags(f->q, n, n);
		} else {
			if (got != n)
				fail_msg("do_io(min %d) returned %d: %s", n, got, vdisk_get_error_msg());
		}
	}
	free(c);
	if (!timeouts) {
		print_message("%s: 16 MiB of FUA writes never outlasted the timeout: untested\n", f->cfg->name);
		skip();
	}
}

static void timeout_remaining_is_written_back(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, BLK);
	struct vdisk_completion c;
	struct timespec t = ts_sec(10);

	fx_open(f, 0);
	assert_int_equal(vdiskq_read(f->q, 0, buf, BLK, buf, 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, &c, 1, 1, &t), 1);
	assert_ptr_equal(c.user_data, buf);
	/* Some time may have passed, not more than the few seconds a read of 4 KiB could take. */
	assert_true(t.tv_sec >= 5 && t.tv_sec <= 10);
	assert_true(t.tv_nsec >= 0 && t.tv_nsec < 1000000000L);
	assert_true(t.tv_sec < 10 || t.tv_nsec == 0);
}

static void min_zero_never_blocks_and_collects_everything(void **state)
{
	struct fx *f = *state;
	const int n = 8;
	unsigned char *buf = fx_buf(f, (size_t)n * 65536), seen[9] = { 0 };
	struct vdisk_completion c[8];
	double deadline = now_s() + FX_TIMEOUT_S;
	int got = 0;

	fx_open(f, 0);
	/* With nothing outstanding: 0 at once. */
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 8, NULL), 0);
	for (int i = 0; i < n; i++)
		vdiskq_write(f->q, (uint64_t)i * 65536, buf + (size_t)i * 65536, 65536, (void *)(uintptr_t)(i + 1),
			     VDISK_REQ_FUA);
	while (got < n) {
		double t0 = now_s();
		int r = vdiskq_do_io(f->q, c, 0, 8, NULL);

		/* A poll, not a wait: a call that blocks for seconds is a bug. */
		assert_true(now_s() - t0 < 2.0);
		assert_true(r >= 0 && r <= n - got);
		for (int i = 0; i < r; i++) {
			uintptr_t tag = (uintptr_t)c[i].user_data;

			assert_true(tag >= 1 && tag <= (uintptr_t)n && !seen[tag]);
			seen[tag] = 1;
			assert_int_equal(c[i].ret, 0);
		}
		got += r;
		if (got < n) {
			if (now_s() > deadline)
				fail_msg("only %d of %d requests completed through min_completions=0 polling", got, n);
			sched_yield();
		}
	}
}

static void null_completes_during_the_call(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 3 * BLK);
	struct vdisk_completion c[8];

	fx_open(f, 0);
	for (int i = 0; i < 3; i++)
		assert_int_equal(vdiskq_read(f->q, (uint64_t)i * BLK, buf + i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	/* null has no latency: one non-blocking call submits and returns all three. */
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 8, NULL), 3);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 8, NULL), 0);
}

static void requests_from_many_rounds_keep_their_user_data(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 64 * BLK);

	fx_open(f, 8);
	/* Interleave enqueueing with partial reaping. */
	for (int round = 0; round < 4; round++) {
		for (int i = 0; i < 16; i++) {
			int k = round * 16 + i;

			assert_int_equal(vdiskq_read(f->q, (uint64_t)k * BLK, buf + (size_t)k * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
		}
		drain_tags(f->q, 16, 5);
	}
}

int main(void)
{
	struct CMUnitTest tests[128];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	ADD_CFG_TESTS(tests, n, more_enqueued_than_queue_size_all_complete, true);
	ADD_CFG_TESTS(tests, n, max_completions_caps_and_rest_come_next_call, true);
	ADD_CFG_TESTS(tests, n, max_zero_keeps_completions_for_later, true);
	ADD_CFG_TESTS(tests, n, min_above_outstanding_is_einval, true);
	ADD_CFG_TESTS(tests, n, timeout_is_etime_without_losing_completions, false);
	ADD_CFG_TESTS(tests, n, timeout_remaining_is_written_back, true);
	ADD_CFG_TESTS(tests, n, min_zero_never_blocks_and_collects_everything, true);
	ADD_CFG_TESTS(tests, n, requests_from_many_rounds_keep_their_user_data, true);
	tests[n++] = (struct CMUnitTest){ strdup("null_completes_during_the_call"), null_completes_during_the_call, fx_setup,
					  fx_teardown, (void *)&test_cfgs[0] };
	return run_cfg_tests("queue-do-io", tests, n);
}
