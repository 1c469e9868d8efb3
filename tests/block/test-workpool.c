/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The worker pool: batches run in parallel and resume their coroutine;
 * a loop thread's state (its eventfd, its home) is freed when the thread
 * ends, also when it ends while workers still finish its jobs.
 */
#include <dirent.h>
#include <pthread.h>
#include <time.h>

#include "test-block-util.h"
#include "workpool.h"

/* Square the number at arg, slowly enough that jobs overlap. */
static long square_slowly(void *arg)
{
	long v = *(long *)arg;
	struct timespec ts = { 0, 200 * 1000 };

	nanosleep(&ts, NULL);
	return v * v;
}

enum { BATCH = 12 }; /* more than the pool's inline job array */

struct batch_run {
	long in[BATCH], out[BATCH];
	bool done;
};

static void run_batch(void *opaque)
{
	struct batch_run *b = opaque;
	void *args[BATCH];

	for (int i = 0; i < BATCH; i++) {
		b->in[i] = i + 1;
		args[i] = &b->in[i];
	}
	vd_co_run_in_workers(square_slowly, args, b->out, BATCH);
	b->done = true;
}

static void check_batch(const struct batch_run *b)
{
	assert_true(b->done);
	for (int i = 0; i < BATCH; i++)
		assert_int_equal(b->out[i], (long)(i + 1) * (i + 1));
}

static void batches_resume_their_coroutines(void **state)
{
	enum { N = 4 };
	struct batch_run runs[N] = { 0 };
	void *args[N];

	(void)state;
	assert_true(vd_workpool_size() >= 1);
	for (int i = 0; i < N; i++)
		args[i] = &runs[i];
	run_parallel(N, run_batch, args);
	for (int i = 0; i < N; i++)
		check_batch(&runs[i]);
}

static int count_open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	assert_non_null(d);
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

static void *loop_thread(void *opaque)
{
	struct batch_run *b = opaque;
	void *arg = b;

	run_parallel(1, run_batch, &arg);
	vd_loop_free_current();
	return NULL;
}

/* Threads that used the pool and ended leave no eventfd (nor memory: ASan) behind. */
static void ended_threads_free_their_state(void **state)
{
	enum { THREADS = 16 };
	struct batch_run runs[THREADS] = { 0 };
	int before;

	(void)state;
	assert_true(vd_workpool_size() >= 1);
	before = count_open_fds();
	for (int i = 0; i < THREADS; i++) {
		pthread_t t;

		assert_int_equal(pthread_create(&t, NULL, loop_thread, &runs[i]), 0);
		assert_int_equal(pthread_join(t, NULL), 0);
		check_batch(&runs[i]);
	}
	/* A worker may still be signalling an ended thread's eventfd: it frees the home right after. */
	for (int tries = 0; tries < 200 && count_open_fds() != before; tries++)
		usleep(10 * 1000);
	assert_int_equal(count_open_fds(), before);
}

/* Outside a coroutine the jobs run inline, in order. */
static void outside_a_coroutine_runs_inline(void **state)
{
	long in = 7, out = 0;
	void *arg = &in;

	(void)state;
	vd_co_run_in_workers(square_slowly, &arg, &out, 1);
	assert_int_equal(out, 49);
	assert_int_equal(vd_co_run_in_worker(square_slowly, &in), 49);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(batches_resume_their_coroutines),
		cmocka_unit_test(ended_threads_free_their_state),
		cmocka_unit_test(outside_a_coroutine_runs_inline),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
