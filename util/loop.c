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
 *      block inside vdiskq_do_io(min=1) — no extra syscall on the fast path;
 *      otherwise wait on the queues' completion eventfds and the fd handlers.
 *
 * Waiting is done with the loop's own io_uring: every fd handler and every
 * busy queue's completion eventfd has one one-shot IORING_OP_POLL_ADD in
 * flight, re-armed after it fires, so arming new polls and sleeping is a
 * single io_uring_enter.  One-shot polls check readiness when armed, so the
 * semantics are poll()'s (level-triggered).  If no ring can be set up
 * (old kernel, seccomp), or VDISK_LOOP=poll is set, the loop uses poll().
 *
 * Stale events: handlers are looked up by a token that is new for every
 * registration and every armed poll, never by fd number, so an event for an
 * fd that was closed (and whose number was reused) earlier in the same round
 * never reaches the new fd's handler.
 */
#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <liburing.h>

#include "coroutine-int.h"
#include "coroutine.h"
#include "lib/vd-internal.h" /* vd_error(): the thread's error message */
#include "loop.h"

#define COMPLETION_BATCH 64
#define RING_ENTRIES 256

/* io_uring user_data: token << 2 | kind. */
enum { UD_HANDLER = 1, UD_QUEUE = 2, UD_IGNORE = 3 };

struct loop_queue {
	struct vdiskq *q;
	int completion_fd; /* -1: poll queue, cannot be slept on */
	unsigned outstanding; /* requests issued through vd_loop_co_wait_io, not yet completed */
	bool kicked;          /* new requests enqueued, or the eventfd fired */
	uint64_t armed;       /* token of the eventfd poll in flight (ring), 0: none */
};

struct fd_handler {
	int fd;
	short events;
	vd_fd_handler cb;
	void *opaque;
	uint64_t id;         /* new for every registration (poll() path) */
	uint64_t armed;      /* token of the poll in flight (ring), 0: none */
	short armed_events;  /* the events it waits for */
};

struct vd_loop {
	struct loop_queue *queues;
	int n_queues, queues_alloc;

	/* Run list: a ring of scheduled coroutines (grows, never shrinks). */
	struct vd_co **ring;
	unsigned ring_head, ring_len, ring_alloc;
	unsigned busy_rounds; /* rounds in a row that found coroutines scheduled (no wait) */

	struct fd_handler *handlers;
	int n_handlers, handlers_alloc;

	struct pollfd *pollfds; /* scratch for wait_for_events() */
	uint64_t *pollids;      /* handler id of each pollfd, 0 for queues */
	int pollfds_alloc, pollids_alloc;

	uint64_t next_token;
	struct io_uring uring;
	int uring_state; /* 0: not tried yet, 1: in use, -1: poll() */

	/* Mailbox: other threads append under mb_lock, then kick mb_efd. */
	pthread_mutex_t mb_lock;
	struct vd_loop_msg *mb_head, **mb_tail;
	int mb_efd;      /* -1: not accepting posts */
	bool mb_enabled; /* atomic: read by posting threads */
};

static _Thread_local struct vd_loop *thread_loop;

static void disarm(struct vd_loop *l, uint64_t token, int kind);

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
		pthread_mutex_init(&thread_loop->mb_lock, NULL);
		thread_loop->mb_tail = &thread_loop->mb_head;
		thread_loop->mb_efd = -1;
	}
	return thread_loop;
}

void vd_loop_free_current(void)
{
	struct vd_loop *l = thread_loop;

	if (!l)
		return;
	assert(l->ring_len == 0 && "freeing a loop with scheduled coroutines");
	vd_loop_disable_remote(l);
	pthread_mutex_destroy(&l->mb_lock);
	free(l->queues);
	free(l->ring);
	free(l->handlers);
	free(l->pollfds);
	free(l->pollids);
	if (l->uring_state > 0)
		io_uring_queue_exit(&l->uring);
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
	if (lq->armed)
		disarm(l, lq->armed, UD_QUEUE);
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

static struct io_uring_sqe *get_sqe(struct vd_loop *l)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&l->uring);

	if (!sqe) {
		io_uring_submit(&l->uring); /* SQ full: make room */
		sqe = io_uring_get_sqe(&l->uring);
	}
	return sqe;
}

/*
 * Cancel the poll with this token.  Its CQE (cancelled, or an event that
 * raced) no longer matches anything and is dropped.  The removal goes to
 * the kernel with the next submission; until then the ring holds a
 * reference to the file, so a closed fd's number can be reused safely.
 */
static void disarm(struct vd_loop *l, uint64_t token, int kind)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return; /* cannot happen after a submit; the stale CQE is dropped anyway */
	io_uring_prep_poll_remove(sqe, token << 2 | (uint64_t)kind);
	io_uring_sqe_set_data64(sqe, UD_IGNORE);
}

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
		memset(h, 0, sizeof(*h));
		h->id = ++l->next_token;
	} else if (h->armed && h->armed_events != events) {
		disarm(l, h->armed, UD_HANDLER); /* re-armed with the new events at the next wait */
		h->armed = 0;
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

	if (!h)
		return;
	if (h->armed)
		disarm(l, h->armed, UD_HANDLER);
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
	p = grow(l->pollids, &l->pollids_alloc, l->n_queues + l->n_handlers, sizeof(*l->pollids));
	if (!p)
		return -ENOMEM;
	l->pollids = p;
	*busy_poll = false;
	for (int i = 0; i < l->n_queues; i++) {
		if (!l->queues[i].outstanding)
			continue;
		if (l->queues[i].completion_fd < 0) {
			*busy_poll = true; /* a poll queue: it only progresses if we keep calling do_io */
			continue;
		}
		l->pollids[n] = 0;
		l->pollfds[n++] = (struct pollfd){ .fd = l->queues[i].completion_fd, .events = POLLIN };
	}
	for (int i = 0; i < l->n_handlers; i++) {
		l->pollids[n] = l->handlers[i].id;
		l->pollfds[n++] = (struct pollfd){ .fd = l->handlers[i].fd, .events = l->handlers[i].events };
	}
	return n;
}

static struct fd_handler *find_handler_by(struct vd_loop *l, uint64_t id, bool armed)
{
	for (int i = 0; i < l->n_handlers; i++)
		if ((armed ? l->handlers[i].armed : l->handlers[i].id) == id)
			return &l->handlers[i];
	return NULL;
}

static void dispatch_pollfd(struct vd_loop *l, const struct pollfd *pfd, uint64_t id)
{
	struct fd_handler *h;

	if (!id) {
		for (int i = 0; i < l->n_queues; i++) {
			if (l->queues[i].completion_fd == pfd->fd && l->queues[i].outstanding) {
				drain_eventfd(pfd->fd);
				l->queues[i].kicked = true;
				return;
			}
		}
		return;
	}
	/*
	 * Look the handler up again, by registration: an earlier callback may
	 * have removed it, or closed its fd and registered another fd that got
	 * the same number — whose readiness this event does not describe.
	 */
	h = find_handler_by(l, id, false);
	if (h)
		h->cb(h->opaque, pfd->fd, pfd->revents);
}

static bool poll_and_dispatch(struct vd_loop *l, bool nowait)
{
	bool busy_poll;
	int n = build_pollfds(l, &busy_poll), ready;

	if (n < 0)
		return false;
	ready = poll(l->pollfds, (nfds_t)n, busy_poll || nowait ? 0 : -1);
	if (ready < 0) {
		if (errno != EINTR)
			fprintf(stderr, "vd_loop: poll: %s\n", strerror(errno));
		return false;
	}
	for (int i = 0, left = ready; i < n && left > 0; i++) {
		if (!l->pollfds[i].revents)
			continue;
		left--;
		dispatch_pollfd(l, &l->pollfds[i], l->pollids[i]);
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

/* ---- waiting on the loop's io_uring ------------------------------------------------ */

static bool ring_ready(struct vd_loop *l)
{
	if (l->uring_state == 0) {
		const char *mode = getenv("VDISK_LOOP");

		l->uring_state = -1;
		if ((!mode || strcmp(mode, "poll") != 0) && io_uring_queue_init(RING_ENTRIES, &l->uring, 0) == 0)
			l->uring_state = 1;
	}
	return l->uring_state > 0;
}

static bool arm(struct vd_loop *l, int fd, short events, int kind, uint64_t *token)
{
	struct io_uring_sqe *sqe = get_sqe(l);

	if (!sqe)
		return false;
	*token = ++l->next_token;
	io_uring_prep_poll_add(sqe, fd, (unsigned)events);
	io_uring_sqe_set_data64(sqe, *token << 2 | (uint64_t)kind);
	return true;
}

static void ring_dispatch(struct vd_loop *l, uint64_t data, int res)
{
	uint64_t token = data >> 2;
	struct fd_handler *h;

	switch (data & 3) {
	case UD_QUEUE:
		for (int i = 0; i < l->n_queues; i++) {
			struct loop_queue *lq = &l->queues[i];

			if (lq->armed == token) {
				lq->armed = 0;
				drain_eventfd(lq->completion_fd);
				lq->kicked = true;
				return;
			}
		}
		return;
	case UD_HANDLER:
		/* By token: a handler removed, re-registered or re-armed since gets nothing. */
		h = find_handler_by(l, token, true);
		if (!h)
			return;
		h->armed = 0;
		if (res < 0)
			res = POLLERR; /* the poll itself failed (e.g. a bad fd): let the owner find out */
		h->cb(h->opaque, h->fd, res);
		return;
	default:
		return;
	}
}

static bool ring_wait_and_dispatch(struct vd_loop *l, bool nowait)
{
	struct __kernel_timespec zero = { 0 };
	struct io_uring_cqe *cqe;
	bool busy_poll = false;
	unsigned head, n = 0;
	uint64_t cqes[COMPLETION_BATCH][2];
	int ret;

	for (int i = 0; i < l->n_queues; i++) {
		struct loop_queue *lq = &l->queues[i];

		if (!lq->outstanding)
			continue;
		if (lq->completion_fd < 0)
			busy_poll = true; /* a poll queue: it only progresses if we keep calling do_io */
		else if (!lq->armed && !arm(l, lq->completion_fd, POLLIN, UD_QUEUE, &lq->armed))
			return poll_and_dispatch(l, nowait);
	}
	for (int i = 0; i < l->n_handlers; i++) {
		struct fd_handler *h = &l->handlers[i];

		if (h->armed)
			continue;
		if (!arm(l, h->fd, h->events, UD_HANDLER, &h->armed))
			return poll_and_dispatch(l, nowait);
		h->armed_events = h->events;
	}
	ret = io_uring_submit_and_wait_timeout(&l->uring, &cqe, 1, busy_poll || nowait ? &zero : NULL, NULL);
	if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
		fprintf(stderr, "vd_loop: io_uring wait: %s\n", strerror(-ret));
	/* Copy the CQEs out first: handlers may arm or cancel polls (new SQEs) while we dispatch. */
	io_uring_for_each_cqe(&l->uring, head, cqe) {
		if (n == COMPLETION_BATCH)
			break;
		cqes[n][0] = cqe->user_data;
		cqes[n][1] = (uint64_t)(int64_t)cqe->res;
		n++;
	}
	io_uring_cq_advance(&l->uring, n);
	for (unsigned i = 0; i < n; i++)
		ring_dispatch(l, cqes[i][0], (int)(int64_t)cqes[i][1]);
	return service_queues(l) || n > 0 || busy_poll;
}

/* Wait for an fd or a completion (nowait: only look at what is ready now) and dispatch it. */
static bool wait_for_events(struct vd_loop *l, bool nowait)
{
	int sole = nowait ? -1 : sole_busy_queue(l);

	if (sole >= 0)
		return service_queue(l, sole, 1) > 0;
	if (ring_ready(l))
		return ring_wait_and_dispatch(l, nowait);
	return poll_and_dispatch(l, nowait);
}

/* ---- mailbox: cross-thread calls --------------------------------------------------- */

static void mailbox_event(void *opaque, int fd, int revents)
{
	struct vd_loop *l = opaque;
	struct vd_loop_msg *list;
	uint64_t count;
	ssize_t n = read(fd, &count, sizeof(count));

	(void)n; /* EAGAIN: drained already; the list is what counts */
	(void)revents;
	pthread_mutex_lock(&l->mb_lock);
	list = l->mb_head;
	l->mb_head = NULL;
	l->mb_tail = &l->mb_head;
	pthread_mutex_unlock(&l->mb_lock);
	while (list) {
		struct vd_loop_msg *m = list;

		list = m->next; /* before fn: it may free m */
		m->fn(m->arg);
	}
}

int vd_loop_enable_remote(struct vd_loop *l)
{
	int ret;

	assert(l == thread_loop && "vd_loop_enable_remote from another thread");
	if (l->mb_efd >= 0)
		return 0;
	l->mb_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (l->mb_efd < 0)
		return -errno;
	ret = vd_loop_set_fd_handler(l, l->mb_efd, POLLIN, mailbox_event, l);
	if (ret < 0) {
		close(l->mb_efd);
		l->mb_efd = -1;
		return ret;
	}
	__atomic_store_n(&l->mb_enabled, true, __ATOMIC_RELEASE);
	return 0;
}

void vd_loop_disable_remote(struct vd_loop *l)
{
	int efd = l->mb_efd;

	if (efd < 0)
		return;
	pthread_mutex_lock(&l->mb_lock);
	__atomic_store_n(&l->mb_enabled, false, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&l->mb_lock);
	/* Whatever was posted before runs now: its poster may be waiting for it. */
	mailbox_event(l, efd, POLLIN);
	vd_loop_del_fd_handler(l, efd);
	l->mb_efd = -1;
	close(efd);
}

bool vd_loop_accepts_remote(struct vd_loop *l)
{
	return __atomic_load_n(&l->mb_enabled, __ATOMIC_ACQUIRE);
}

void vd_loop_post_msg(struct vd_loop *l, struct vd_loop_msg *m)
{
	uint64_t one = 1;
	ssize_t n;

	m->next = NULL;
	pthread_mutex_lock(&l->mb_lock);
	if (!l->mb_enabled) {
		pthread_mutex_unlock(&l->mb_lock);
		fprintf(stderr, "vd_loop_post: the target thread's loop does not accept cross-thread calls\n");
		abort();
	}
	*l->mb_tail = m;
	l->mb_tail = &m->next;
	/* Under the lock: the owner closes the eventfd only after clearing mb_enabled under it. */
	n = write(l->mb_efd, &one, sizeof(one));
	pthread_mutex_unlock(&l->mb_lock);
	(void)n; /* the counter only saturates after 2^64 - 2 posts */
}

struct post_co {
	struct vd_loop_msg msg;
	void (*fn)(void *arg);
	void *arg;
};

static void post_co_body(void *opaque)
{
	struct post_co *p = opaque;
	void (*fn)(void *arg) = p->fn;
	void *arg = p->arg;

	free(p);
	fn(arg);
}

static void post_co_start(void *opaque)
{
	struct vd_co *co = vd_co_create(post_co_body, opaque);

	if (!co) {
		fprintf(stderr, "vd_loop_post: out of memory for a coroutine stack\n");
		abort();
	}
	vd_co_enter(co);
}

void vd_loop_post(struct vd_loop *l, void (*fn)(void *arg), void *arg)
{
	struct post_co *p = malloc(sizeof(*p));

	if (!p) {
		fprintf(stderr, "vd_loop_post: out of memory\n");
		abort();
	}
	p->fn = fn;
	p->arg = arg;
	p->msg.fn = post_co_start;
	p->msg.arg = p;
	vd_loop_post_msg(l, &p->msg);
}

/* A synchronous cross-thread call: lives on the caller's stack until `done`. */
struct co_call {
	struct vd_loop_msg run;  /* caller -> target */
	struct vd_loop_msg back; /* target -> caller */
	void (*fn)(void *arg);
	void *arg;
	struct vd_loop *origin;
	struct vd_co *waiter;
	bool done;
};

static void co_call_back(void *opaque)
{
	struct co_call *c = opaque;

	c->done = true;
	vd_loop_schedule(c->origin, c->waiter);
}

static void co_call_body(void *opaque)
{
	struct co_call *c = opaque;

	c->fn(c->arg);
	vd_loop_post_msg(c->origin, &c->back); /* c is gone once the caller resumes */
}

static void co_call_start(void *opaque)
{
	struct vd_co *co = vd_co_create(co_call_body, opaque);

	if (!co) {
		fprintf(stderr, "vd_loop_co_call: out of memory for a coroutine stack\n");
		abort();
	}
	vd_co_enter(co);
}

void vd_loop_co_call(struct vd_loop *l, void (*fn)(void *arg), void *arg)
{
	struct vd_loop *self = vd_loop_get();
	struct co_call c = {
		.run = { .fn = co_call_start, .arg = &c },
		.back = { .fn = co_call_back, .arg = &c },
		.fn = fn,
		.arg = arg,
		.origin = self,
		.waiter = vd_co_self(),
	};

	if (l == self) {
		fn(arg);
		return;
	}
	if (!c.waiter || vd_loop_enable_remote(self) < 0) {
		fprintf(stderr, "vd_loop_co_call: %s\n", c.waiter ? "cannot set up this thread's mailbox"
								  : "called outside a coroutine");
		abort();
	}
	vd_loop_post_msg(l, &c.run);
	while (!c.done)
		vd_co_yield();
}

/* ---- iterations ---------------------------------------------------------------- */

#define FD_CHECK_EVERY 64 /* loop rounds with coroutines scheduled between two looks at the fds */

bool vd_loop_run_once(struct vd_loop *l, bool blocking)
{
	bool progress;

	assert(!vd_in_co() && "the loop runs outside coroutines (use vd_co_run_sync's caller)");
	progress = run_scheduled(l);
	progress |= service_queues(l);
	if (l->ring_len && ++l->busy_rounds >= FD_CHECK_EVERY) {
		/*
		 * Coroutines that keep rescheduling themselves (pollers) must not
		 * keep the fds from being looked at: whoever they wait for may be
		 * waiting for an fd (a full socket, a control message).
		 */
		l->busy_rounds = 0;
		if (anything_to_wait_for(l))
			progress |= wait_for_events(l, true);
	}
	if (progress || !blocking || l->ring_len)
		return progress;
	l->busy_rounds = 0;
	if (!anything_to_wait_for(l))
		return false;
	return wait_for_events(l, false);
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
