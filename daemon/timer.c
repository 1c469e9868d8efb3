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

struct sleeper {
	struct vd_co *co;
	bool done;
};

static void sleeper_wake(void *opaque)
{
	struct sleeper *s = opaque;

	s->done = true;
	vd_co_enter(s->co);
}

void vdd_co_sleep_ns(uint64_t ns)
{
	struct sleeper s = { .co = vd_co_self() };
	struct vdd_timer *t = vdd_timer_new(sleeper_wake, &s);

	if (!t) {
		fprintf(stderr, "vdiskd: cannot create a timer\n");
		return;
	}
	vdd_timer_arm(t, ns ? ns : 1);
	while (!s.done)
		vd_co_yield();
	vdd_timer_free(t);
}
