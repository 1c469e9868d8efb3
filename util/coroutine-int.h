/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Coroutine internals shared with the loop (util/ only). */
#ifndef VD_COROUTINE_INT_H
#define VD_COROUTINE_INT_H

#include <stdbool.h>

struct vd_co;

/* Mark co as on (or off) the loop's run list; returns the previous mark. */
bool vd_co_set_scheduled(struct vd_co *co, bool scheduled);
/* Free the calling thread's pooled coroutines (thread exit, loop teardown). */
void vd_co_pool_drain(void);

#endif
