/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Stackful coroutines for the block layer: one per request, so format code
 * (qcow2) reads as straight-line code.  Context switch is a few instructions
 * of assembly on x86_64 (ucontext elsewhere); stacks are pooled per thread so
 * creating a coroutine on the hot path does not allocate.
 */
#ifndef VD_COROUTINE_H
#define VD_COROUTINE_H

#include <pthread.h>
#include <stdbool.h>

struct vd_co;
typedef void (*vd_co_fn)(void *arg);

/* A coroutine that will run fn(arg) when entered.  NULL on ENOMEM. */
struct vd_co *vd_co_create(vd_co_fn fn, void *arg);
/*
 * Switch into co (from a thread or another coroutine).  Returns when co
 * yields or finishes; a finished coroutine goes back to the pool.
 */
void vd_co_enter(struct vd_co *co);
/* From inside a coroutine: switch back to whoever entered it. */
void vd_co_yield(void);
/* The running coroutine, or NULL outside coroutines. */
struct vd_co *vd_co_self(void);
static inline bool vd_in_co(void)
{
	return vd_co_self() != 0;
}

/* Run fn(arg) in a coroutine and drive the thread's loop until it returns. */
void vd_co_run_sync(vd_co_fn fn, void *arg);

/* Mutex for coroutines: waiters yield; unlock wakes the next in FIFO order. */
struct vd_co_mutex {
	bool locked;
	struct vd_co_waiter *head, *tail;
};
void vd_co_mutex_init(struct vd_co_mutex *m);
void vd_co_mutex_lock(struct vd_co_mutex *m);
void vd_co_mutex_unlock(struct vd_co_mutex *m);

/* Wait queue: park the current coroutine until woken. */
struct vd_co_queue {
	struct vd_co_waiter *head, *tail;
};
void vd_co_queue_init(struct vd_co_queue *wq);
/* Park until woken; if m is given it is unlocked while waiting and relocked after. */
void vd_co_queue_wait(struct vd_co_queue *wq, struct vd_co_mutex *m);
/*
 * A wait queue shared between threads: every access to wq (wait, wake,
 * empty) happens under the caller's pthread mutex `lock`, held on entry;
 * it is released while parked and held again on return.  Waiters in other
 * threads are woken through their loops' mailboxes.
 */
void vd_co_queue_wait_mt(struct vd_co_queue *wq, pthread_mutex_t *lock);
/* Schedule the first / all waiters to resume (from the loop, not inline). */
bool vd_co_queue_wake_one(struct vd_co_queue *wq);
void vd_co_queue_wake_all(struct vd_co_queue *wq);
/* True when nobody waits on wq. */
bool vd_co_queue_empty(const struct vd_co_queue *wq);

#endif
