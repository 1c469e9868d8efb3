/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Per-thread event loop.
 *
 * One iteration (vd_loop_run_once):
 *   1. enter the coroutines scheduled so far (new ones wait for the next
 *      iteration, so a coroutine that keeps rescheduling itself cannot starve
 *      the I/O);
 *   2. for every queue with new or outstanding requests, vdiskq_do_io(min=0):
 *      this submits what the coroutines enqueued since the last iteration in
 *      one batch and resumes the coroutine of each completion;
 *   3. if nothing happened and the caller wants to block: when exactly one
 *      queue has requests outstanding and there is nothing else to wait for,
 *      block inside vdiskq_do_io(min=1) — no poll() syscall on the fast path;
 *      otherwise poll() the queues' completion eventfds and the fd handlers.
 *
 * The design calls for an io_uring-based loop (poll and I/O in one ring);
 * poll() is what this implements for now.  Swapping it only changes
 * wait_for_events().
 */
#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coroutine-int.h"
#include "coroutine.h"
#include "lib/vd-internal.h" /* vd_error(): the thread's error message */
#include "loop.h"

#define COMPLETION_BATCH 64

struct loop_queue {
	struct vdiskq *q;
	int completion_fd; /* -1: poll queue, cannot be slept on */
	unsigned outstanding; /* requests issued through vd_loop_co_wait_io, not yet completed */
	bool kicked;          /* new requests enqueued, or the eventfd fired */
};

struct fd_handler {
	int fd;
	short events;
	vd_fd_handler cb;
	void *opaque;
};

struct vd_loop {
	struct loop_queue *queues;
	int n_queues, queues_alloc;

	/* Run list: a ring of scheduled coroutines (grows, never shrinks). */
	struct vd_co **ring;
	unsigned ring_head, ring_len, ring_alloc;

	struct fd_handler *handlers;
	int n_handlers, handlers_alloc;

	struct pollfd *pollfds; /* scratch for wait_for_events() */
	int pollfds_alloc;
};

static _Thread_local struct vd_loop *thread_loop;

static void *grow(void *array, int *alloc, int need, size_t elem)
{
	int n = *alloc ? *alloc : 8;
	void *p;

	if (need <= *alloc)
		return array;
	while (n < need)
		n *= 2;
	p = realloc(array, (size_t)n * elem);
	if (!p)
		return NULL;
	*alloc = n;
	return p;
}

struct vd_loop *vd_loop_get(void)
{
	if (!thread_loop) {
		thread_loop = calloc(1, sizeof(*thread_loop));
		if (!thread_loop) {
			fprintf(stderr, "vd_loop_get: out of memory\n");
			abort();
		}
	}
	return thread_loop;
}

void vd_loop_free_current(void)
{
	struct vd_loop *l = thread_loop;

	if (!l)
		return;
	assert(l->ring_len == 0 && "freeing a loop with scheduled coroutines");
	free(l->queues);
	free(l->ring);
	free(l->handlers);
	free(l->pollfds);
	free(l);
	thread_loop = NULL;
	vd_co_pool_drain();
}

/* ---- queues ------------------------------------------------------------------ */

static struct loop_queue *find_queue(struct vd_loop *l, struct vdiskq *q)
{
	for (int i = 0; i < l->n_queues; i++)
		if (l->queues[i].q == q)
			return &l->queues[i];
	return NULL;
}

int vd_loop_add_queue(struct vd_loop *l, struct vdiskq *q)
{
	struct loop_queue *lq;
	void *p;

	if (find_queue(l, q))
		return 0;
	p = grow(l->queues, &l->queues_alloc, l->n_queues + 1, sizeof(*l->queues));
	if (!p)
		return -ENOMEM;
	l->queues = p;
	lq = &l->queues[l->n_queues++];
	memset(lq, 0, sizeof(*lq));
	lq->q = q;
	lq->completion_fd = vdiskq_get_completion_fd(q);
	if (lq->completion_fd < 0)
		lq->completion_fd = -1;
	return 0;
}

void vd_loop_del_queue(struct vd_loop *l, struct vdiskq *q)
{
	struct loop_queue *lq = find_queue(l, q);

	if (!lq)
		return;
	assert(lq->outstanding == 0 && "removing a queue with requests in flight");
	*lq = l->queues[--l->n_queues];
}

int vd_loop_co_wait_io(struct vdiskq *q, struct vd_io_wait *w)
{
	struct vd_loop *l = vd_loop_get();
	struct loop_queue *lq = find_queue(l, q);

	assert(vd_in_co() && "vd_loop_co_wait_io outside a coroutine");
	if (!lq) {
		/* First use of this queue from this thread. */
		if (vd_loop_add_queue(l, q) < 0) {
			fprintf(stderr, "vd_loop_co_wait_io: out of memory\n");
			abort();
		}
		lq = find_queue(l, q);
	}
	w->co = vd_co_self();
	w->done = false;
	lq->outstanding++;
	lq->kicked = true;
	while (!w->done)
		vd_co_yield();
	return w->ret;
}

/* Hand one completion to the coroutine waiting for it. */
static void complete_one(struct loop_queue *lq, const struct vdisk_completion *c)
{
	struct vd_io_wait *w = c->user_data;

	lq->outstanding--;
	w->ret = c->ret;
	w->done = true;
	/*
	 * The message lives in the queue only until the next do_io; put it in
	 * the thread's error message so the coroutine can add its context.
	 */
	if (c->ret < 0 && c->error_msg)
		vd_error(-c->ret, "%s", c->error_msg);
	if (w->co)
		vd_co_enter(w->co);
}

/*
 * Submit and reap on one queue; resume the completed coroutines.  They may
 * enqueue more requests (kicking the queue again), which the next pass sends.
 * Returns the number of completions handled.
 */
static int service_queue(struct vd_loop *l, int idx, int min_completions)
{
	struct vdisk_completion comps[COMPLETION_BATCH];
	struct vdiskq *q = l->queues[idx].q;
	int n;

	l->queues[idx].kicked = false;
	n = vdiskq_do_io(q, comps, min_completions, COMPLETION_BATCH, NULL);
	if (n < 0) {
		/* Driver failure: requests stay queued and are retried next time. */
		fprintf(stderr, "vd_loop: vdiskq_do_io: %s\n", vdisk_get_error_msg());
		return 0;
	}
	for (int i = 0; i < n; i++) {
		/* l->queues may move when a resumed coroutine adds a queue: index again. */
		struct loop_queue *lq = find_queue(l, q);

		assert(lq);
		complete_one(lq, &comps[i]);
	}
	return n;
}

static bool service_queues(struct vd_loop *l)
{
	bool progress = false;

	for (int i = 0; i < l->n_queues; i++) {
		struct loop_queue *lq = &l->queues[i];

		if (lq->kicked || lq->outstanding)
			progress |= service_queue(l, i, 0) > 0;
	}
	return progress;
}

/* ---- scheduled coroutines ----------------------------------------------------- */

static bool ring_grow(struct vd_loop *l)
{
	unsigned n = l->ring_alloc ? l->ring_alloc * 2 : 64;
	struct vd_co **ring = malloc(sizeof(*ring) * n);

	if (!ring)
		return false;
	/* Unwrap the old ring into the front of the new one. */
	for (unsigned i = 0; i < l->ring_len; i++)
		ring[i] = l->ring[(l->ring_head + i) % l->ring_alloc];
	free(l->ring);
	l->ring = ring;
	l->ring_head = 0;
	l->ring_alloc = n;
	return true;
}

void vd_loop_schedule(struct vd_loop *l, struct vd_co *co)
{
	if (vd_co_set_scheduled(co, true))
		return; /* already on the run list: entering it twice would be wrong */
	if (l->ring_len == l->ring_alloc && !ring_grow(l)) {
		fprintf(stderr, "vd_loop_schedule: out of memory\n");
		abort();
	}
	l->ring[(l->ring_head + l->ring_len) % l->ring_alloc] = co;
	l->ring_len++;
}

static struct vd_co *ring_pop(struct vd_loop *l)
{
	struct vd_co *co = l->ring[l->ring_head];

	l->ring_head = (l->ring_head + 1) % l->ring_alloc;
	l->ring_len--;
	return co;
}

static bool run_scheduled(struct vd_loop *l)
{
	unsigned n = l->ring_len; /* only those scheduled before this pass */

	for (unsigned i = 0; i < n; i++) {
		struct vd_co *co = ring_pop(l);

		vd_co_set_scheduled(co, false);
		vd_co_enter(co);
	}
	return n > 0;
}

/* ---- fd handlers ---------------------------------------------------------------- */

static struct fd_handler *find_handler(struct vd_loop *l, int fd)
{
	for (int i = 0; i < l->n_handlers; i++)
		if (l->handlers[i].fd == fd)
			return &l->handlers[i];
	return NULL;
}

int vd_loop_set_fd_handler(struct vd_loop *l, int fd, short events, vd_fd_handler cb, void *opaque)
{
	struct fd_handler *h = find_handler(l, fd);

	if (!h) {
		void *p = grow(l->handlers, &l->handlers_alloc, l->n_handlers + 1, sizeof(*l->handlers));

		if (!p)
			return -ENOMEM;
		l->handlers = p;
		h = &l->handlers[l->n_handlers++];
	}
	h->fd = fd;
	h->events = events;
	h->cb = cb;
	h->opaque = opaque;
	return 0;
}

void vd_loop_del_fd_handler(struct vd_loop *l, int fd)
{
	struct fd_handler *h = find_handler(l, fd);

	if (h)
		*h = l->handlers[--l->n_handlers];
}

/* ---- waiting ------------------------------------------------------------------- */

static void drain_eventfd(int fd)
{
	uint64_t count;
	ssize_t n = read(fd, &count, sizeof(count));

	(void)n; /* EAGAIN: already drained; the queue is serviced either way */
}

/* Fill l->pollfds: queues with outstanding requests first, then handlers. */
static int build_pollfds(struct vd_loop *l, bool *busy_poll)
{
	int n = 0;
	void *p = grow(l->pollfds, &l->pollfds_alloc, l->n_queues + l->n_handlers, sizeof(*l->pollfds));

	if (!p)
		return -ENOMEM;
	l->pollfds = p;
	*busy_poll = false;
	for (int i = 0; i < l->n_queues; i++) {
		if (!l->queues[i].outstanding)
			continue;
		if (l->queues[i].completion_fd < 0) {
			*busy_poll = true; /* a poll queue: it only progresses if we keep calling do_io */
			continue;
		}
		l->pollfds[n++] = (struct pollfd){ .fd = l->queues[i].completion_fd, .events = POLLIN };
	}
	for (int i = 0; i < l->n_handlers; i++)
		l->pollfds[n++] = (struct pollfd){ .fd = l->handlers[i].fd, .events = l->handlers[i].events };
	return n;
}

static void dispatch_pollfd(struct vd_loop *l, const struct pollfd *pfd)
{
	struct fd_handler *h;

	for (int i = 0; i < l->n_queues; i++) {
		if (l->queues[i].completion_fd == pfd->fd && l->queues[i].outstanding) {
			drain_eventfd(pfd->fd);
			l->queues[i].kicked = true;
			return;
		}
	}
	/* Look the handler up again: an earlier callback may have removed it. */
	h = find_handler(l, pfd->fd);
	if (h)
		h->cb(h->opaque, pfd->fd, pfd->revents);
}

static bool poll_and_dispatch(struct vd_loop *l)
{
	bool busy_poll;
	int n = build_pollfds(l, &busy_poll), ready;

	if (n < 0)
		return false;
	ready = poll(l->pollfds, (nfds_t)n, busy_poll ? 0 : -1);
	if (ready < 0) {
		if (errno != EINTR)
			fprintf(stderr, "vd_loop: poll: %s\n", strerror(errno));
		return false;
	}
	for (int i = 0, left = ready; i < n && left > 0; i++) {
		if (!l->pollfds[i].revents)
			continue;
		left--;
		dispatch_pollfd(l, &l->pollfds[i]);
	}
	return service_queues(l) || ready > 0 || busy_poll;
}

/* The one queue with requests outstanding, when it is the only thing to wait for. */
static int sole_busy_queue(struct vd_loop *l)
{
	int found = -1;

	if (l->n_handlers)
		return -1;
	for (int i = 0; i < l->n_queues; i++) {
		if (!l->queues[i].outstanding)
			continue;
		if (found >= 0)
			return -1;
		found = i;
	}
	return found;
}

static bool anything_to_wait_for(struct vd_loop *l)
{
	if (l->n_handlers)
		return true;
	for (int i = 0; i < l->n_queues; i++)
		if (l->queues[i].outstanding)
			return true;
	return false;
}

static bool wait_for_events(struct vd_loop *l)
{
	int sole = sole_busy_queue(l);

	if (sole >= 0)
		return service_queue(l, sole, 1) > 0;
	return poll_and_dispatch(l);
}

/* ---- iterations ---------------------------------------------------------------- */

bool vd_loop_run_once(struct vd_loop *l, bool blocking)
{
	bool progress;

	assert(!vd_in_co() && "the loop runs outside coroutines (use vd_co_run_sync's caller)");
	progress = run_scheduled(l);
	progress |= service_queues(l);
	if (progress || !blocking || l->ring_len)
		return progress;
	if (!anything_to_wait_for(l))
		return false;
	return wait_for_events(l);
}

void vd_loop_run_until(struct vd_loop *l, const bool *done)
{
	while (!*done) {
		if (vd_loop_run_once(l, true))
			continue;
		if (!l->ring_len && !anything_to_wait_for(l)) {
			/* Single-threaded: no one else can ever wake what we wait for. */
			fprintf(stderr, "vd_loop_run_until: deadlock: waiting with no I/O, fd handler or "
					"scheduled coroutine left that could make progress\n");
			abort();
		}
	}
}
