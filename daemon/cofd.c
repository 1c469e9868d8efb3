/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Coroutines waiting on one fd (sockets of the control channel and of the
 * exports).  At most one reader and one writer wait at a time; the fd
 * handler is registered only for the events someone waits for, and removed
 * when nobody waits, so idle connections cost nothing in poll() and a
 * hung-up fd cannot make the loop spin.
 */
#include <poll.h>

#include "daemon.h"

static void update(struct vdd_cofd *c);

static void cofd_event(void *opaque, int fd, int revents)
{
	struct vdd_cofd *c = opaque;
	struct vd_co *rd = NULL, *wr = NULL;

	(void)fd;
	if (revents & (POLLOUT | POLLERR | POLLHUP | POLLNVAL)) {
		wr = c->wr_co;
		c->wr_co = NULL;
	}
	if (revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL)) {
		rd = c->rd_co;
		c->rd_co = NULL;
	}
	update(c);
	/*
	 * The writer first: a writer is a request in flight, which keeps the
	 * connection (and c) alive; the reader may end up freeing it.
	 */
	if (wr) {
		c->wr_woken = true;
		vd_co_enter(wr);
	}
	if (rd) {
		c->rd_woken = true;
		vd_co_enter(rd);
	}
}

static void update(struct vdd_cofd *c)
{
	short ev = (c->rd_co ? POLLIN : 0) | (c->wr_co ? POLLOUT : 0);

	if (ev == c->events)
		return;
	if (ev)
		vd_loop_set_fd_handler(c->loop, c->fd, ev, cofd_event, c);
	else
		vd_loop_del_fd_handler(c->loop, c->fd);
	c->events = ev;
}

void vdd_cofd_init(struct vdd_cofd *c, int fd)
{
	c->fd = fd;
	c->loop = vd_loop_get();
	c->rd_co = c->wr_co = NULL;
	c->events = 0;
}

void vdd_cofd_wait(struct vdd_cofd *c, short event)
{
	struct vd_co *self = vd_co_self();
	bool *woken = event == POLLIN ? &c->rd_woken : &c->wr_woken;

	if (event == POLLIN)
		c->rd_co = self;
	else
		c->wr_co = self;
	*woken = false;
	update(c);
	while (!*woken)
		vd_co_yield();
}

void vdd_cofd_wake(struct vdd_cofd *c)
{
	cofd_event(c, c->fd, POLLERR);
}

void vdd_cofd_detach(struct vdd_cofd *c)
{
	c->rd_co = c->wr_co = NULL;
	update(c);
}
