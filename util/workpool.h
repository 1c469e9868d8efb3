/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Worker threads for CPU-heavy work that must not stall an event loop
 * (qcow2 compression).  A coroutine hands fn(arg) to the pool and yields;
 * a worker runs it, and the coroutine resumes on its own loop (woken
 * through an eventfd that the loop watches only while jobs are out).
 * The workers are shared by all loops, started on first use, one per CPU
 * (at most VD_WORKPOOL_MAX).
 */
#ifndef VD_WORKPOOL_H
#define VD_WORKPOOL_H

#define VD_WORKPOOL_MAX 16

/*
 * From a coroutine: run fn(arg) on a worker thread and return its value.
 * fn must not touch coroutines, loops or block nodes.  Outside a coroutine,
 * or when no worker can be started, fn runs inline.
 */
long vd_co_run_in_worker(long (*fn)(void *), void *arg);
/* The same for n jobs at once (they run in parallel): rets[i] = fn(args[i]). */
void vd_co_run_in_workers(long (*fn)(void *), void *const *args, long *rets, int n);

/* Number of worker threads (starting them); 0 if none could be started. */
int vd_workpool_size(void);

#endif
