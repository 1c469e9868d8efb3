/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * threads: a pool of worker threads per instance ("num-threads", default 8)
 * doing the I/O synchronously with vd_file_execute() (preadv2 / pwritev2 /
 * fdatasync / fallocate).  Works with direct=true and direct=false, and is
 * the only way to make discard and write-zeroes asynchronous on files.
 *
 *   queue thread                       workers
 *   submit(): append to a local list
 *   commit(): one lock: move the list  ──► shared work list (mutex + condvar),
 *             into the pool, wake up       one request taken per lock hold,
 *             as many idle workers as      executed without any lock
 *             requests were added
 *   reap():   one lock: take the whole ◄── push onto the owning queue's done
 *             done list, vd_req_complete   list (queue mutex), signal its
 *             each request                 condvar and, when the list was
 *                                          empty, its eventfd
 *
 * vd_req_complete() is not thread-safe, so only the queue thread calls it.
 * The pool starts in the start op and is joined in destroy.  The core frees
 * the queues before destroy; queue_fini therefore waits until no worker
 * holds or is about to touch one of the queue's requests.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../vd-internal.h"

#define TH_DEFAULT_THREADS 8
#define TH_MAX_THREADS 256

struct th_req {
	struct vdiskq *q;
	struct vd_request *next; /* work list / local list / done list */
	int ret;
};

struct th_queue {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* Under lock (shared with the workers). */
	struct vd_request *done_head, *done_tail;
	uint64_t finished;   /* requests pushed onto the done list */
	bool fd_enabled;
	/* Queue thread only. */
	uint64_t submitted; /* requests handed to the pool */
	struct vd_request *local_head, *local_tail;
	unsigned n_local;
};

struct th_state {
	int num_threads; /* property */
	/* The pool. */
	bool running;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct vd_request *head, *tail; /* work list, under lock */
	unsigned idle;                  /* workers waiting on cond, under lock */
	bool stop;                      /* under lock */
	pthread_t *workers;
	int n_workers;
};

static const struct vd_prop th_props[] = {
	{ .name = "num-threads", .type = VD_PROP_INT, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct th_state, num_threads), .min = 1, .max = TH_MAX_THREADS },
	{ .name = NULL },
};

static inline struct th_req *th_req(struct vd_request *r)
{
	return (struct th_req *)r->priv;
}

static int th_init(struct vdisk *v)
{
	struct th_state *s = vd_priv(v);

	s->num_threads = TH_DEFAULT_THREADS;
	return 0;
}

static int th_connect(struct vdisk *v)
{
	v->can_poll = false;
	return vd_file_connect(v, "vdisk_connect: threads");
}

/* A finished request goes back to its queue; called by a worker. */
static void th_done(struct vd_request *r)
{
	struct vdiskq *q = th_req(r)->q;
	struct th_queue *qs = q->priv;

	th_req(r)->next = NULL;
	pthread_mutex_lock(&qs->lock);
	if (qs->done_head) {
		th_req(qs->done_tail)->next = r;
	} else {
		qs->done_head = r;
		/*
		 * Empty -> non-empty: signal the eventfd.  Done under the lock so
		 * that the signal for a request is out before reap() can take it
		 * (no stale wakeup after the application reaped it or turned
		 * signalling off), and before queue_fini() can close the fd.
		 */
		if (qs->fd_enabled) {
			uint64_t one = 1;
			ssize_t n = write(q->completion_fd, &one, sizeof(one));

			(void)n; /* EAGAIN only when the counter is saturated: readable anyway */
		}
	}
	qs->done_tail = r;
	qs->finished++;
	pthread_cond_signal(&qs->cond);
	pthread_mutex_unlock(&qs->lock);
}

static void *th_worker(void *arg)
{
	struct vdisk *v = arg;
	struct th_state *s = vd_priv(v);

	pthread_mutex_lock(&s->lock);
	for (;;) {
		struct vd_request *r;

		while (!s->head && !s->stop) {
			s->idle++;
			pthread_cond_wait(&s->cond, &s->lock);
			s->idle--;
		}
		if (!s->head)
			break; /* stopping, and nothing left to do */
		r = s->head;
		s->head = th_req(r)->next;
		if (!s->head)
			s->tail = NULL;
		pthread_mutex_unlock(&s->lock);

		th_req(r)->ret = vd_file_execute(v, r);
		th_done(r);

		pthread_mutex_lock(&s->lock);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

static void th_pool_stop(struct th_state *s)
{
	pthread_mutex_lock(&s->lock);
	s->stop = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	for (int i = 0; i < s->n_workers; i++)
		pthread_join(s->workers[i], NULL);
	free(s->workers);
	s->workers = NULL;
	s->n_workers = 0;
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->lock);
	s->running = false;
}

static int th_start(struct vdisk *v)
{
	struct th_state *s = vd_priv(v);
	sigset_t all, old;
	int err;

	if (s->running)
		return 0; /* a previous vdisk_start failed after starting the pool */
	s->workers = calloc((size_t)s->num_threads, sizeof(*s->workers));
	if (!s->workers)
		return vd_error(ENOMEM, "vdisk_start: threads: out of memory");
	err = pthread_mutex_init(&s->lock, NULL);
	if (err) {
		free(s->workers);
		s->workers = NULL;
		return vd_error(err, "vdisk_start: threads: pthread_mutex_init: %s", strerror(err));
	}
	err = pthread_cond_init(&s->cond, NULL);
	if (err) {
		pthread_mutex_destroy(&s->lock);
		free(s->workers);
		s->workers = NULL;
		return vd_error(err, "vdisk_start: threads: pthread_cond_init: %s", strerror(err));
	}
	s->head = s->tail = NULL;
	s->idle = 0;
	s->stop = false;
	s->running = true;

	/* Workers never take the application's signals, only faults of their own (blocking those is fatal). */
	sigfillset(&all);
	sigdelset(&all, SIGBUS);
	sigdelset(&all, SIGSEGV);
	sigdelset(&all, SIGFPE);
	sigdelset(&all, SIGILL);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (int i = 0; i < s->num_threads; i++) {
		err = pthread_create(&s->workers[i], NULL, th_worker, v);
		if (err)
			break;
		s->n_workers++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		int started = s->n_workers;

		th_pool_stop(s);
		return vd_error(err, "vdisk_start: threads: cannot start worker thread %d of %d: %s", started + 1,
				s->num_threads, strerror(err));
	}
	return 0;
}

static void th_destroy(struct vdisk *v)
{
	struct th_state *s = vd_priv(v);

	if (s->running)
		th_pool_stop(s); /* the queues, and with them every request, are gone already */
	vd_file_close(v);
}

static int th_queue_init(struct vdiskq *q)
{
	struct th_queue *qs = q->priv;
	pthread_condattr_t ca;
	int err;

	qs->fd_enabled = q->completion_fd_enabled;
	err = pthread_condattr_init(&ca);
	if (!err) {
		err = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		if (!err)
			err = pthread_cond_init(&qs->cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (err)
		return vd_error(err, "vdisk_start: threads: pthread_cond_init: %s", strerror(err));
	err = pthread_mutex_init(&qs->lock, NULL);
	if (err) {
		pthread_cond_destroy(&qs->cond);
		return vd_error(err, "vdisk_start: threads: pthread_mutex_init: %s", strerror(err));
	}
	return 0;
}

static int th_commit(struct vdiskq *q);

static void th_queue_fini(struct vdiskq *q)
{
	struct th_queue *qs = q->priv;

	th_commit(q); /* nothing is left here in practice: the core commits every batch */
	/* In-flight requests at teardown are waited for: workers hold pointers into this queue. */
	pthread_mutex_lock(&qs->lock);
	while (qs->finished != qs->submitted)
		pthread_cond_wait(&qs->cond, &qs->lock);
	pthread_mutex_unlock(&qs->lock);
	pthread_cond_destroy(&qs->cond);
	pthread_mutex_destroy(&qs->lock);
}

static int th_submit(struct vdiskq *q, struct vd_request *r)
{
	struct th_queue *qs = q->priv;

	th_req(r)->q = q;
	th_req(r)->next = NULL;
	if (qs->local_head)
		th_req(qs->local_tail)->next = r;
	else
		qs->local_head = r;
	qs->local_tail = r;
	qs->n_local++;
	return 0;
}

/* The whole burst goes to the pool under one lock acquisition. */
static int th_commit(struct vdiskq *q)
{
	struct th_queue *qs = q->priv;
	struct th_state *s = vd_priv(q->v);
	unsigned n = qs->n_local, wake;

	if (!n)
		return 0;
	qs->submitted += n;
	pthread_mutex_lock(&s->lock);
	if (s->head)
		th_req(s->tail)->next = qs->local_head;
	else
		s->head = qs->local_head;
	s->tail = qs->local_tail;
	wake = n < s->idle ? n : s->idle;
	if (wake == s->idle && wake > 1)
		pthread_cond_broadcast(&s->cond);
	else
		for (unsigned i = 0; i < wake; i++)
			pthread_cond_signal(&s->cond);
	pthread_mutex_unlock(&s->lock);
	qs->local_head = qs->local_tail = NULL;
	qs->n_local = 0;
	return 0;
}

static int th_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct th_queue *qs = q->priv;
	struct vd_request *list;
	bool timed_out = false;

	pthread_mutex_lock(&qs->lock);
	while (wait && !qs->done_head && qs->finished != qs->submitted) {
		int err = deadline ? pthread_cond_timedwait(&qs->cond, &qs->lock, deadline)
				   : pthread_cond_wait(&qs->cond, &qs->lock);

		if (err == ETIMEDOUT) {
			timed_out = !qs->done_head;
			break;
		}
	}
	list = qs->done_head;
	qs->done_head = qs->done_tail = NULL;
	pthread_mutex_unlock(&qs->lock);

	if (timed_out)
		return -ETIME;
	while (list) {
		struct vd_request *r = list;

		list = th_req(r)->next;
		vd_req_complete(q, r, th_req(r)->ret);
	}
	return 0;
}

static void th_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct th_queue *qs = q->priv;
	bool pending;

	pthread_mutex_lock(&qs->lock);
	qs->fd_enabled = enabled;
	pending = enabled && qs->done_head;
	pthread_mutex_unlock(&qs->lock);
	if (pending)
		vd_queue_signal(q); /* completions arrived while signalling was off */
}

const struct vd_driver vd_driver_threads = {
	.name = "threads",
	.priv_size = sizeof(struct th_state),
	.queue_priv_size = sizeof(struct th_queue),
	.req_priv_size = sizeof(struct th_req),
	.props = th_props,
	.init = th_init,
	.connect = th_connect,
	.start = th_start,
	.destroy = th_destroy,
	.queue_init = th_queue_init,
	.queue_fini = th_queue_fini,
	.submit = th_submit,
	.commit = th_commit,
	.reap = th_reap,
	.set_completion_fd_enabled = th_set_completion_fd_enabled,
};
