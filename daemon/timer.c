/* SPDX-License-Identifier: GPL-2.0-or-later */
/* One-shot timers on the calling thread's loop, built on timerfd. */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "daemon.h"

struct vdd_timer {
	int fd;
	struct vd_loop *loop;
	void (*cb)(void *opaque);
	void *opaque;
	bool armed;
};

static void timer_event(void *opaque, int fd, int revents)
{
	struct vdd_timer *t = opaque;
	uint64_t n;

	(void)revents;
	/*
	 * Only a timer that really expired reads 8 bytes.  The loop looks
	 * handlers up by fd number after poll(), so an event of an fd closed
	 * earlier in the same round can reach a timerfd that reused its number.
	 */
	if (read(fd, &n, sizeof(n)) != (ssize_t)sizeof(n))
		return;
	t->armed = false;
	vd_loop_del_fd_handler(t->loop, t->fd);
	t->cb(t->opaque); /* may free t */
}

struct vdd_timer *vdd_timer_new(void (*cb)(void *opaque), void *opaque)
{
	struct vdd_timer *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (t->fd < 0) {
		free(t);
		return NULL;
	}
	t->loop = vd_loop_get();
	t->cb = cb;
	t->opaque = opaque;
	return t;
}

void vdd_timer_arm(struct vdd_timer *t, uint64_t ns)
{
	struct itimerspec its = { 0 };

	its.it_value.tv_sec = (time_t)(ns / 1000000000ull);
	its.it_value.tv_nsec = (long)(ns % 1000000000ull);
	timerfd_settime(t->fd, 0, &its, NULL);
	if (ns && !t->armed)
		vd_loop_set_fd_handler(t->loop, t->fd, POLLIN, timer_event, t);
	else if (!ns && t->armed)
		vd_loop_del_fd_handler(t->loop, t->fd);
	t->armed = ns != 0;
}

void vdd_timer_free(struct vdd_timer *t)
{
	if (!t)
		return;
	if (t->armed)
		vd_loop_del_fd_handler(t->loop, t->fd);
	close(t->fd);
	free(t);
}

/*
 * Coroutine sleeps share one timer per thread: sleepers wait in a list
 * sorted by deadline and the thread's timer is armed for the earliest one.
 * A request that sleeps (null-co's latency-ns, retry back-offs) then costs
 * no syscall of its own, where a timerfd per sleep cost four (create, arm,
 * read, close) plus a poll registration — what made a slow null node slow
 * at high queue depths.
 */
struct sleeper {
	struct vd_co *co;
	uint64_t deadline;
	bool done;
	struct sleeper *next;
};

struct sleep_queue {
	struct sleeper *head, *tail;
	struct vdd_timer *timer; /* freed whenever the queue empties, so no thread leaves one behind */
};

static _Thread_local struct sleep_queue sleepq;

static void sleepq_fire(void *opaque);

/* (Re)arm the thread's timer for the earliest sleeper; false if no timer could be made. */
static bool sleepq_arm(struct sleep_queue *q)
{
	uint64_t now = vdd_now_ns();

	if (!q->head) {
		vdd_timer_free(q->timer);
		q->timer = NULL;
		return true;
	}
	if (!q->timer && !(q->timer = vdd_timer_new(sleepq_fire, q)))
		return false;
	vdd_timer_arm(q->timer, q->head->deadline > now ? q->head->deadline - now : 1);
	return true;
}

static void sleepq_fire(void *opaque)
{
	struct sleep_queue *q = opaque;
	uint64_t now = vdd_now_ns();
	struct sleeper *due = NULL, **last = &due;

	/* Take the due sleepers off first: the ones we resume may sleep again. */
	while (q->head && q->head->deadline <= now) {
		struct sleeper *s = q->head;

		q->head = s->next;
		s->next = NULL;
		*last = s;
		last = &s->next;
	}
	if (!q->head)
		q->tail = NULL;
	while (due) {
		struct sleeper *s = due;

		due = s->next;
		s->done = true;
		vd_co_enter(s->co);
	}
	if (!sleepq_arm(q))
		fprintf(stderr, "vdiskd: cannot create a timer\n");
}

void vdd_co_sleep_ns(uint64_t ns)
{
	struct sleep_queue *q = &sleepq;
	struct sleeper s = { .co = vd_co_self(), .deadline = vdd_now_ns() + (ns ? ns : 1) };
	struct sleeper **pp;

	/* Deadlines mostly grow: append at the tail, else insert in order. */
	if (!q->tail || q->tail->deadline <= s.deadline) {
		if (q->tail)
			q->tail->next = &s;
		else
			q->head = &s;
		q->tail = &s;
	} else {
		for (pp = &q->head; (*pp)->deadline <= s.deadline; pp = &(*pp)->next)
			;
		s.next = *pp;
		*pp = &s;
	}
	if (q->head == &s && !sleepq_arm(q)) {
		/* No timer: do not sleep at all rather than forever. */
		q->head = s.next;
		if (!q->head)
			q->tail = NULL;
		fprintf(stderr, "vdiskd: cannot create a timer\n");
		return;
	}
	while (!s.done)
		vd_co_yield();
}
