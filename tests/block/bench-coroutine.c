/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Coroutine micro-benchmark: ns per cycle of create + enter + yield +
 * re-enter (to completion), i.e. two round-trip switches plus a pool
 * get/put, the cost the block layer pays per request.  Also the cost of a
 * bare yield/enter round trip.  Usage: bench-coroutine [iterations]
 *
 * Times are thread CPU time: on a busy VM, wall-clock time also counts the
 * time the vCPU was stolen by the host.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "coroutine.h"
#include "loop.h"

static void yield_once(void *opaque)
{
	(void)opaque;
	vd_co_yield();
}

static void yield_forever(void *opaque)
{
	volatile int *stop = opaque;

	while (!*stop)
		vd_co_yield();
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long iters = argc > 1 ? strtol(argv[1], NULL, 0) : 10000000;
	volatile int stop = 0;
	struct vd_co *co;
	double t0, t1;

	/* Warm up the pool so the loop measures the steady state. */
	for (long i = 0; i < 1000; i++) {
		co = vd_co_create(yield_once, NULL);
		vd_co_enter(co);
		vd_co_enter(co);
	}
	t0 = now_ns();
	for (long i = 0; i < iters; i++) {
		co = vd_co_create(yield_once, NULL);
		vd_co_enter(co);
		vd_co_enter(co);
	}
	t1 = now_ns();
	printf("create+enter+yield+reenter: %.1f ns/cycle (%ld cycles)\n", (t1 - t0) / (double)iters, iters);

	co = vd_co_create(yield_forever, (void *)&stop);
	vd_co_enter(co);
	t0 = now_ns();
	for (long i = 0; i < iters; i++)
		vd_co_enter(co);
	t1 = now_ns();
	printf("enter+yield round trip:     %.1f ns (%.1f ns per switch)\n", (t1 - t0) / (double)iters,
	       (t1 - t0) / (double)iters / 2);
	stop = 1;
	vd_co_enter(co);
	vd_loop_free_current();
	return 0;
}
