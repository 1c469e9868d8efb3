/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Per-thread event loop.  It drives the libvdisk queues the thread's block
 * nodes use (submitting what coroutines enqueued, in batches, and resuming
 * each coroutine when its request completes), deferred coroutine wake-ups,
 * and plain fd handlers (sockets, for the exports later).
 */
#ifndef VD_LOOP_H
#define VD_LOOP_H

#include <stdbool.h>
#include <stdint.h>

#include "vdisk.h"

struct vd_co;
struct vd_loop;

/* The calling thread's loop (created on first use). */
struct vd_loop *vd_loop_get(void);
void vd_loop_free_current(void);

/* A libvdisk queue served by this loop.  user_data of every request on it must be a struct vd_io_wait *. */
int vd_loop_add_queue(struct vd_loop *l, struct vdiskq *q);
void vd_loop_del_queue(struct vd_loop *l, struct vdiskq *q);

/* One outstanding libvdisk request issued from a coroutine. */
struct vd_io_wait {
	struct vd_co *co;
	int ret;
	bool done;
};

/*
 * From a coroutine, after enqueueing a request with user_data = w: yield
 * until it completes; returns its ret.  The loop submits the queue's
 * pending requests once per iteration, so requests from many coroutines
 * reach the kernel in one batch.
 */
int vd_loop_co_wait_io(struct vdiskq *q, struct vd_io_wait *w);

/* Resume co from the loop soon (not inline). */
void vd_loop_schedule(struct vd_loop *l, struct vd_co *co);

/* fd handler: called from the loop when fd is readable/writable (events: POLLIN/POLLOUT). */
typedef void (*vd_fd_handler)(void *opaque, int fd, int revents);
int vd_loop_set_fd_handler(struct vd_loop *l, int fd, short events, vd_fd_handler cb, void *opaque);
void vd_loop_del_fd_handler(struct vd_loop *l, int fd);

/* Run one iteration; with blocking, sleep until something happens. Returns true if progress was made. */
bool vd_loop_run_once(struct vd_loop *l, bool blocking);
/* Run until *done becomes true. */
void vd_loop_run_until(struct vd_loop *l, const bool *done);

#endif
