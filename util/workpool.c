/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Worker threads for CPU-heavy work (see workpool.h).
 *
 * Jobs live on the waiting coroutine's stack.  A worker takes the oldest
 * job from one global FIFO, runs it, puts it on the done list of the loop
 * thread it came from ("home") and bumps that home's eventfd.  The loop
 * calls on_done() for the eventfd, which resumes the coroutines.  The
 * eventfd handler is registered only while the home has jobs out, so a
 * loop with nothing to wait for but its I/O queue keeps its fast path
 * (blocking in the queue itself, no poll()).
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <unistd.h>

#include "coroutine.h"
#include "loop.h"
#include "workpool.h"

/* The jobs one coroutine waits for. */
struct batch {
	struct vd_co *co;
	int left;
};

struct job {
	long (*fn)(void *);
	void *arg;
	long ret;
	struct batch *batch;
	struct home *home;
	struct job *next;
};

/* One per loop thread that has used the pool. */
struct home {
	int efd;
	pthread_mutex_t lock;
	struct job *done; /* finished, not yet resumed (LIFO; order does not matter) */
	unsigned pending; /* jobs handed out and not yet resumed (loop thread only) */
	bool watching;    /* efd handler registered on the loop */
	/* Under lock: jobs queued or running whose worker has not finished signalling efd. */
	unsigned outstanding;
	bool orphaned; /* its thread has ended: the last worker to signal frees it */
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cond = PTHREAD_COND_INITIALIZER;
static struct job *queue_head, *queue_tail;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_workers;
static bool pool_stopping; /* under pool_lock: workers exit once the queue is empty */
static pthread_t pool_threads[VD_WORKPOOL_MAX];

static _Thread_local struct home *thread_home;
static pthread_key_t home_key; /* its destructor frees a thread's home */

static void home_free(struct home *h)
{
	close(h->efd);
	pthread_mutex_destroy(&h->lock);
	free(h);
}

/* A worker has signalled h for one job: free h if its thread is gone and no job is left. */
static void home_release(struct home *h)
{
	bool last;

	pthread_mutex_lock(&h->lock);
	last = --h->outstanding == 0 && h->orphaned;
	pthread_mutex_unlock(&h->lock);
	if (last)
		home_free(h);
}

/*
 * The home's thread ends.  Its loop is gone or going (threads free their
 * loop before they end), so the efd handler is not touched: with no job
 * out it is not registered anyway.
 */
static void home_thread_end(void *opaque)
{
	struct home *h = opaque;
	bool now;

	if (thread_home == h)
		thread_home = NULL;
	pthread_mutex_lock(&h->lock);
	h->orphaned = true;
	now = h->outstanding == 0;
	pthread_mutex_unlock(&h->lock);
	if (now)
		home_free(h);
}

static void *worker_main(void *opaque)
{
	(void)opaque;
	for (;;) {
		struct job *j;
		struct home *h;
		uint64_t one = 1;
		ssize_t n;

		pthread_mutex_lock(&pool_lock);
		while (!queue_head && !pool_stopping)
			pthread_cond_wait(&pool_cond, &pool_lock);
		if (!queue_head) {
			pthread_mutex_unlock(&pool_lock);
			return NULL;
		}
		j = queue_head;
		queue_head = j->next;
		if (!queue_head)
			queue_tail = NULL;
		pthread_mutex_unlock(&pool_lock);

		j->ret = j->fn(j->arg);
		h = j->home;
		pthread_mutex_lock(&h->lock);
		j->next = h->done;
		h->done = j;
		pthread_mutex_unlock(&h->lock);
		/* j may be gone from here on (its coroutine resumed); h stays until released. */
		n = write(h->efd, &one, sizeof(one));
		(void)n; /* only fails when the counter would overflow: it is non-zero then anyway */
		home_release(h);
	}
}

/* At exit: let the workers finish what is queued, and join them (their thread-specific state is freed). */
static void pool_stop(void)
{
	struct home *h = thread_home;

	pthread_mutex_lock(&pool_lock);
	pool_stopping = true;
	pthread_cond_broadcast(&pool_cond);
	pthread_mutex_unlock(&pool_lock);
	for (int i = 0; i < pool_workers; i++)
		pthread_join(pool_threads[i], NULL);
	pool_workers = 0;
	/* The exiting thread's key destructors do not run: free its home here. */
	if (h) {
		pthread_setspecific(home_key, NULL);
		home_thread_end(h);
	}
}

static void pool_start(void)
{
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

	if (ncpu < 1)
		ncpu = 1;
	if (ncpu > VD_WORKPOOL_MAX)
		ncpu = VD_WORKPOOL_MAX;
	if (pthread_key_create(&home_key, home_thread_end) != 0)
		return; /* no workers: jobs run inline */
	for (long i = 0; i < ncpu; i++) {
		if (pthread_create(&pool_threads[pool_workers], NULL, worker_main, NULL) != 0)
			break;
		pool_workers++;
	}
	if (pool_workers)
		atexit(pool_stop);
}

int vd_workpool_size(void)
{
	pthread_once(&pool_once, pool_start);
	return pool_workers;
}

static struct home *get_home(void)
{
	struct home *h = thread_home;

	if (h)
		return h;
	h = calloc(1, sizeof(*h));
	if (!h)
		return NULL;
	h->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (h->efd < 0) {
		free(h);
		return NULL;
	}
	pthread_mutex_init(&h->lock, NULL);
	if (pthread_setspecific(home_key, h) != 0) {
		home_free(h);
		return NULL;
	}
	thread_home = h;
	return h;
}

static void on_done(void *opaque, int fd, int revents)
{
	struct home *h = opaque;
	struct job *list, *next;
	uint64_t count;
	ssize_t n = read(fd, &count, sizeof(count));

	(void)n;
	(void)revents;
	pthread_mutex_lock(&h->lock);
	list = h->done;
	h->done = NULL;
	pthread_mutex_unlock(&h->lock);
	for (struct job *j = list; j; j = next) {
		struct batch *b = j->batch;

		next = j->next; /* j belongs to the coroutine entered below */
		h->pending--;
		if (--b->left == 0)
			vd_co_enter(b->co);
	}
	if (h->pending == 0 && h->watching) {
		vd_loop_del_fd_handler(vd_loop_get(), h->efd);
		h->watching = false;
	}
}

void vd_co_run_in_workers(long (*fn)(void *), void *const *args, long *rets, int n)
{
	struct job inline_jobs[8], *jobs = inline_jobs;
	struct batch b = { .left = n };
	struct home *h;

	if (n <= 0)
		return;
	if (!vd_in_co() || vd_workpool_size() == 0 || !(h = get_home()))
		goto run_inline;
	if (n > 8 && !(jobs = calloc((size_t)n, sizeof(*jobs))))
		goto run_inline;
	if (!h->watching) {
		if (vd_loop_set_fd_handler(vd_loop_get(), h->efd, POLLIN, on_done, h) < 0) {
			if (jobs != inline_jobs)
				free(jobs);
			goto run_inline;
		}
		h->watching = true;
	}
	b.co = vd_co_self();
	for (int i = 0; i < n; i++)
		jobs[i] = (struct job){ .fn = fn, .arg = args[i], .batch = &b, .home = h, .next = &jobs[i + 1] };
	jobs[n - 1].next = NULL;
	h->pending += (unsigned)n;
	pthread_mutex_lock(&h->lock);
	h->outstanding += (unsigned)n;
	pthread_mutex_unlock(&h->lock);
	pthread_mutex_lock(&pool_lock);
	if (queue_tail)
		queue_tail->next = &jobs[0];
	else
		queue_head = &jobs[0];
	queue_tail = &jobs[n - 1];
	if (n == 1)
		pthread_cond_signal(&pool_cond);
	else
		pthread_cond_broadcast(&pool_cond);
	pthread_mutex_unlock(&pool_lock);
	while (b.left > 0)
		vd_co_yield();
	for (int i = 0; i < n; i++)
		rets[i] = jobs[i].ret;
	if (jobs != inline_jobs)
		free(jobs);
	return;

run_inline:
	for (int i = 0; i < n; i++)
		rets[i] = fn(args[i]);
}

long vd_co_run_in_worker(long (*fn)(void *), void *arg)
{
	long ret;

	vd_co_run_in_workers(fn, &arg, &ret, 1);
	return ret;
}
