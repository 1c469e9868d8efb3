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

/*
 * ---- cross-thread calls --------------------------------------------------
 *
 * A loop belongs to one thread; other threads reach it through its mailbox:
 * a mutex-protected list of messages plus an eventfd the loop waits on (an
 * fd handler).  The owning thread opts in with vd_loop_enable_remote(); a
 * loop that did not cannot be posted to (vd_loop_accepts_remote() says so).
 * Messages run in the owning thread, from its loop, in posting order.
 */
struct vd_loop_msg {
	struct vd_loop_msg *next;
	void (*fn)(void *arg); /* run from the loop, outside coroutines; may enter or schedule them */
	void *arg;
};
/* The calling thread's own loop l: accept posts from other threads (idempotent).  -errno. */
int vd_loop_enable_remote(struct vd_loop *l);
/* The owning thread, when nothing will post any more (loop teardown does it too). */
void vd_loop_disable_remote(struct vd_loop *l);
/* Any thread: may l be posted to? */
bool vd_loop_accepts_remote(struct vd_loop *l);
/* Any thread: run m->fn(m->arg) in l's thread.  m stays the caller's until fn runs (fn may free it). */
void vd_loop_post_msg(struct vd_loop *l, struct vd_loop_msg *m);
/* Any thread: run fn(arg) in a fresh coroutine in l's thread (so it may yield). */
void vd_loop_post(struct vd_loop *l, void (*fn)(void *arg), void *arg);
/*
 * From a coroutine: run fn(arg) in a fresh coroutine in l's thread and
 * yield until it returned (the caller's loop keeps running meanwhile).
 * Inline when l is the caller's own loop.  The caller's loop is enabled for
 * remote posts on first use (the answer comes back through it).
 */
void vd_loop_co_call(struct vd_loop *l, void (*fn)(void *arg), void *arg);

/* Run one iteration; with blocking, sleep until something happens. Returns true if progress was made. */
bool vd_loop_run_once(struct vd_loop *l, bool blocking);
/* Run until *done becomes true. */
void vd_loop_run_until(struct vd_loop *l, const bool *done);

#endif
