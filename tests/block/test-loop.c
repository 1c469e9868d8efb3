/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The per-thread loop: libvdisk queues, scheduled coroutines, fd handlers. */
#include <fcntl.h>
#include <poll.h>

#include "test-block-util.h"

static struct vdisk *null_disk(struct vdiskq **q)
{
	struct vdisk *v;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_start(v), 0);
	*q = vdisk_get_queue(v, 0);
	assert_non_null(*q);
	return v;
}

struct reader {
	struct vdiskq *q;
	uint64_t off;
	int ret;
	bool done;
};

static void read_once(void *opaque)
{
	struct reader *r = opaque;
	struct vd_io_wait w = { 0 };
	char buf[512];

	vdiskq_read(r->q, r->off, buf, sizeof(buf), &w, 0);
	r->ret = vd_loop_co_wait_io(r->q, &w);
	r->done = true;
}

/* Many coroutines each wait for their own request on one queue. */
static void requests_resume_their_coroutines(void **state)
{
	enum { N = 200 }; /* more than one completion batch */
	struct reader readers[N];
	void *args[N];
	struct vdiskq *q;
	struct vdisk *v = null_disk(&q);

	(void)state;
	for (int i = 0; i < N; i++) {
		readers[i] = (struct reader){ .q = q, .off = (uint64_t)i * 512, .ret = 1 };
		args[i] = &readers[i];
	}
	run_parallel(N, read_once, args);
	for (int i = 0; i < N; i++) {
		assert_true(readers[i].done);
		assert_int_equal(readers[i].ret, 0);
	}
	vd_loop_del_queue(vd_loop_get(), q);
	vdisk_destroy(&v);
}

/* A request libvdisk rejects still completes, with its error and message. */
static void rejected_request_reports_error(void **state)
{
	struct vdiskq *q;
	struct vdisk *v = null_disk(&q);
	struct reader r = { .q = q, .off = 2 << 20 }; /* past the end */
	void *args[1] = { &r };

	(void)state;
	run_parallel(1, read_once, args);
	assert_int_equal(r.ret, -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "capacity"));
	vd_loop_del_queue(vd_loop_get(), q);
	vdisk_destroy(&v);
}

/* Two queues busy at once: the loop waits on both (the poll path). */
static void two_queues_progress_together(void **state)
{
	struct vdiskq *q1, *q2;
	struct vdisk *v1 = null_disk(&q1), *v2 = null_disk(&q2);
	struct reader r[4] = { { .q = q1 }, { .q = q2 }, { .q = q1, .off = 512 }, { .q = q2, .off = 512 } };
	void *args[4] = { &r[0], &r[1], &r[2], &r[3] };

	(void)state;
	run_parallel(4, read_once, args);
	for (int i = 0; i < 4; i++)
		assert_int_equal(r[i].ret, 0);
	vd_loop_del_queue(vd_loop_get(), q1);
	vd_loop_del_queue(vd_loop_get(), q2);
	vdisk_destroy(&v1);
	vdisk_destroy(&v2);
}

struct pipe_test {
	int fds[2];
	int calls;
};

static void on_readable(void *opaque, int fd, int revents)
{
	struct pipe_test *t = opaque;
	char c;

	assert_true(revents & POLLIN);
	assert_int_equal(read(fd, &c, 1), 1);
	t->calls++;
}

static void fd_handler_runs_when_readable(void **state)
{
	struct pipe_test t = { 0 };
	struct vd_loop *l = vd_loop_get();

	(void)state;
	assert_int_equal(pipe(t.fds), 0);
	assert_int_equal(vd_loop_set_fd_handler(l, t.fds[0], POLLIN, on_readable, &t), 0);
	assert_false(vd_loop_run_once(l, false));
	assert_int_equal(write(t.fds[1], "x", 1), 1);
	assert_true(vd_loop_run_once(l, true));
	assert_int_equal(t.calls, 1);
	vd_loop_del_fd_handler(l, t.fds[0]);
	close(t.fds[0]);
	close(t.fds[1]);
}

/*
 * Two fds ready in one round; the first one's handler closes the second and
 * opens another fd that gets the same number.  The second fd's event must not
 * reach the new fd's handler (its fd is not readable), in either wait mode.
 */
struct reuse_test {
	int a[2], b[2], c[2];
	int a_calls, b_calls, new_calls;
};

static void on_new(void *opaque, int fd, int revents)
{
	struct reuse_test *t = opaque;
	char ch;

	t->new_calls++;
	assert_true(revents & POLLIN);
	assert_int_equal(read(fd, &ch, 1), 1); /* would block if called for the stale event */
}

static void on_b(void *opaque, int fd, int revents)
{
	struct reuse_test *t = opaque;

	(void)fd;
	(void)revents;
	t->b_calls++;
}

static void on_a(void *opaque, int fd, int revents)
{
	struct reuse_test *t = opaque;
	struct vd_loop *l = vd_loop_get();
	int old = t->b[0];
	char ch;

	(void)revents;
	t->a_calls++;
	assert_int_equal(read(fd, &ch, 1), 1);
	vd_loop_del_fd_handler(l, t->a[0]);
	/* Close b's read end and put a fresh, empty pipe on its number. */
	vd_loop_del_fd_handler(l, old);
	assert_int_equal(pipe2(t->c, O_NONBLOCK), 0); /* a stale call fails its read instead of hanging */
	assert_int_equal(dup2(t->c[0], old), old); /* closes b's read end */
	close(t->c[0]);
	t->c[0] = old;
	assert_int_equal(vd_loop_set_fd_handler(l, old, POLLIN, on_new, t), 0);
}

static void stale_event_after_fd_reuse(const char *mode)
{
	struct reuse_test t = { 0 };
	struct vd_loop *l;

	vd_loop_free_current();
	setenv("VDISK_LOOP", mode, 1);
	l = vd_loop_get();
	assert_int_equal(pipe(t.a), 0);
	assert_int_equal(pipe(t.b), 0);
	assert_int_equal(vd_loop_set_fd_handler(l, t.a[0], POLLIN, on_a, &t), 0);
	assert_int_equal(vd_loop_set_fd_handler(l, t.b[0], POLLIN, on_b, &t), 0);
	assert_int_equal(write(t.a[1], "x", 1), 1);
	assert_int_equal(write(t.b[1], "x", 1), 1);
	assert_true(vd_loop_run_once(l, true));
	assert_int_equal(t.a_calls, 1);
	if (t.b_calls == 0) /* a ran first (the case under test) */
		assert_int_equal(t.new_calls, 0);
	/* The new fd's handler works once its fd is really readable. */
	assert_int_equal(write(t.c[1], "y", 1), 1);
	while (t.new_calls == 0)
		vd_loop_run_once(l, true);
	assert_int_equal(t.new_calls, 1);
	vd_loop_del_fd_handler(l, t.c[0]);
	close(t.a[0]);
	close(t.a[1]);
	close(t.b[1]);
	close(t.c[0]);
	close(t.c[1]);
	vd_loop_free_current();
	unsetenv("VDISK_LOOP");
}

static void stale_event_after_fd_reuse_ring(void **state)
{
	(void)state;
	stale_event_after_fd_reuse("io_uring");
}

static void stale_event_after_fd_reuse_poll(void **state)
{
	(void)state;
	stale_event_after_fd_reuse("poll");
}

static void reschedule_self(void *opaque)
{
	int *runs = opaque;

	for (int i = 0; i < 3; i++) {
		(*runs)++;
		vd_loop_schedule(vd_loop_get(), vd_co_self());
		vd_loop_schedule(vd_loop_get(), vd_co_self()); /* twice: still entered once */
		vd_co_yield();
	}
}

/* One iteration enters what was scheduled before it, once each. */
static void scheduled_coroutine_runs_once_per_iteration(void **state)
{
	int runs = 0;
	struct vd_loop *l = vd_loop_get();

	(void)state;
	vd_co_enter(vd_co_create(reschedule_self, &runs));
	assert_int_equal(runs, 1);
	assert_true(vd_loop_run_once(l, false));
	assert_int_equal(runs, 2);
	assert_true(vd_loop_run_once(l, false));
	assert_int_equal(runs, 3);
	assert_true(vd_loop_run_once(l, false)); /* finishes */
	assert_false(vd_loop_run_once(l, false));
}

/* A poller: reschedules itself until the fd handler has run. */
static void spin_until_readable(void *opaque)
{
	struct pipe_test *t = opaque;

	while (!t->calls) {
		vd_loop_schedule(vd_loop_get(), vd_co_self());
		vd_co_yield();
	}
}

/*
 * A coroutine that keeps rescheduling itself must not keep the loop from
 * looking at its fds: here it waits for what only an fd handler can do.
 */
static void fds_are_looked_at_while_a_coroutine_spins(void **state)
{
	struct pipe_test t = { 0 };
	struct vd_loop *l = vd_loop_get();
	int rounds = 0;

	(void)state;
	assert_int_equal(pipe(t.fds), 0);
	assert_int_equal(vd_loop_set_fd_handler(l, t.fds[0], POLLIN, on_readable, &t), 0);
	assert_int_equal(write(t.fds[1], "x", 1), 1);
	vd_co_enter(vd_co_create(spin_until_readable, &t));
	while (!t.calls && rounds++ < 100000)
		vd_loop_run_once(l, true);
	assert_int_equal(t.calls, 1);
	while (vd_loop_run_once(l, false)) /* the poller sees it and ends */
		;
	vd_loop_del_fd_handler(l, t.fds[0]);
	close(t.fds[0]);
	close(t.fds[1]);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(requests_resume_their_coroutines),
		cmocka_unit_test(rejected_request_reports_error),
		cmocka_unit_test(two_queues_progress_together),
		cmocka_unit_test(fd_handler_runs_when_readable),
		cmocka_unit_test(stale_event_after_fd_reuse_ring),
		cmocka_unit_test(stale_event_after_fd_reuse_poll),
		cmocka_unit_test(scheduled_coroutine_runs_once_per_iteration),
		cmocka_unit_test(fds_are_looked_at_while_a_coroutine_spins),
	};
	int ret = cmocka_run_group_tests(tests, NULL, NULL);

	vd_loop_free_current();
	return ret;
}
