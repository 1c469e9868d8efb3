/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Event-driven completion, for every driver: the queue's completion fd
 * becomes readable once a request has finished, so an application can
 * enqueue, submit with vdiskq_do_io(min=0), poll() the fd and then collect;
 * disabling the fd stops the signalling.
 */
#include <poll.h>

#include "test-util.h"

#define BLK 4096
/* A local request completes in milliseconds; a silent fd fails the test after this. */
#define FD_WAIT_S 5

static void drain_fd(int fd)
{
	uint64_t cnt;
	struct pollfd p = { .fd = fd, .events = POLLIN };

	while (poll(&p, 1, 0) == 1 && (p.revents & POLLIN))
		if (read(fd, &cnt, sizeof(cnt)) != sizeof(cnt))
			break;
}

static bool fd_readable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int r = poll(&p, 1, timeout_ms);

	assert_true(r >= 0);
	return r == 1 && (p.revents & POLLIN);
}

/*
 * The event loop an application writes: wait for the fd, read it, collect
 * with min_completions = 0.  Returns when the request tagged user_data is in.
 */
static void event_loop_until(struct vdiskq *q, int fd, void *user_data)
{
	struct timespec start, now;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		struct vdisk_completion c[4];
		uint64_t cnt;
		int n;

		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - start.tv_sec >= FD_WAIT_S)
			fail_msg("request never completed through the completion fd (not readable for %d s)", FD_WAIT_S);
		if (!fd_readable(fd, 200))
			continue;
		assert_int_equal(read(fd, &cnt, sizeof(cnt)), (ssize_t)sizeof(cnt));
		assert_true(cnt >= 1);
		n = vdiskq_do_io(q, c, 0, 4, NULL);
		assert_true(n >= 0 && n <= 1);
		if (n == 1) {
			assert_ptr_equal(c[0].user_data, user_data);
			assert_int_equal(c[0].ret, 0);
			return;
		}
	}
}

static void completion_fd_becomes_readable(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 65536);
	struct vdisk_completion c[4];
	int fd, n;

	fx_open(f, 0);
	fd = vdiskq_get_completion_fd(f->q);
	assert_true(fd >= 0);
	assert_int_equal(vdiskq_get_completion_fd(f->q), fd); /* the same fd each time */
	drain_fd(fd);

	/* 1: submit with max_completions 0, so the completion must be signalled. */
	fill_pattern(buf, 65536, 0, 1);
	assert_int_equal(vdiskq_write(f->q, 0, buf, 65536, (void *)1, 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 0, NULL), 0);
	event_loop_until(f->q, fd, (void *)1);

	/* 2: the usual loop: do_io(min=0) may already return it; if not, the fd says when. */
	drain_fd(fd);
	assert_int_equal(vdiskq_read(f->q, 0, buf, 65536, (void *)2, 0), 0);
	n = vdiskq_do_io(f->q, c, 0, 4, NULL);
	assert_true(n == 0 || n == 1);
	if (n == 1) {
		assert_ptr_equal(c[0].user_data, (void *)2);
		assert_int_equal(c[0].ret, 0);
	} else {
		event_loop_until(f->q, fd, (void *)2);
	}
	if (f->cfg->file)
		assert_int_equal(check_pattern(buf, 65536, 0, 1), -1);
}

static void completion_fd_stays_quiet_when_disabled(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 65536);
	struct vdisk_completion c[4];
	struct timespec t;
	int fd;

	fx_open(f, 0);
	fd = vdiskq_get_completion_fd(f->q);
	assert_true(fd >= 0);
	vdiskq_set_completion_fd_enabled(f->q, false);
	drain_fd(fd);
	for (int i = 0; i < 4; i++)
		assert_int_equal(vdiskq_write(f->q, (uint64_t)i * 65536, buf, 65536, (void *)(uintptr_t)(i + 1), 0), 0);
	/* One at a time, so completions are left over between calls (which would signal if enabled). */
	for (int i = 0; i < 4; i++) {
		t = ts_sec(FX_TIMEOUT_S);
		assert_int_equal(vdiskq_do_io(f->q, c, 1, 1, &t), 1);
	}
	if (fd_readable(fd, 100))
		fail_msg("completion fd signalled while disabled");

	/* Enabled again: it signals. */
	vdiskq_set_completion_fd_enabled(f->q, true);
	assert_int_equal(vdiskq_read(f->q, 0, buf, 65536, (void *)9, 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 0, NULL), 0);
	event_loop_until(f->q, fd, (void *)9);
}

/*
 * max_completions 1 in an event loop: each wake-up collects one, and the fd
 * must signal again for those still waiting, or the application would sleep
 * forever with completions ready.
 */
static void leftover_completions_signal_again(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 4 * BLK), seen[5] = { 0 };
	struct vdisk_completion c[1];
	struct timespec start, now;
	int fd, got = 0;

	fx_open(f, 0);
	fd = vdiskq_get_completion_fd(f->q);
	assert_true(fd >= 0);
	drain_fd(fd);
	for (int i = 0; i < 4; i++)
		assert_int_equal(vdiskq_read(f->q, (uint64_t)i * BLK, buf + i * BLK, BLK, (void *)(uintptr_t)(i + 1), 0), 0);
	assert_int_equal(vdiskq_do_io(f->q, c, 0, 0, NULL), 0);
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (got < 4) {
		uint64_t cnt;
		int n;

		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - start.tv_sec >= FD_WAIT_S)
			fail_msg("%d of 4 completions collected; the fd stopped signalling", got);
		if (!fd_readable(fd, 200))
			continue;
		assert_int_equal(read(fd, &cnt, sizeof(cnt)), (ssize_t)sizeof(cnt));
		n = vdiskq_do_io(f->q, c, 0, 1, NULL);
		assert_true(n == 0 || n == 1);
		if (n == 1) {
			uintptr_t tag = (uintptr_t)c[0].user_data;

			assert_true(tag >= 1 && tag <= 4 && !seen[tag]);
			seen[tag] = 1;
			assert_int_equal(c[0].ret, 0);
			got++;
		}
	}
}

int main(void)
{
	struct CMUnitTest tests[64];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	ADD_CFG_TESTS(tests, n, completion_fd_becomes_readable, true);
	ADD_CFG_TESTS(tests, n, completion_fd_stays_quiet_when_disabled, true);
	ADD_CFG_TESTS(tests, n, leftover_completions_signal_again, true);
	return run_cfg_tests("completion-fd", tests, n);
}
