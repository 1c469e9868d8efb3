/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Helpers shared by the block layer tests. */
#ifndef TEST_BLOCK_UTIL_H
#define TEST_BLOCK_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "block.h"
#include "coroutine.h"
#include "loop.h"

/* A fresh empty temporary directory (removed by rm_tmpdir). */
static inline void make_tmpdir(char *dir, size_t size)
{
	const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";

	snprintf(dir, size, "%s/vdblock-XXXXXX", base);
	assert_non_null(mkdtemp(dir));
}

static inline void rm_tmpdir(const char *dir)
{
	char cmd[4200];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
}

/* Run fn(args[i]) in n coroutines at once, until all returned. */
struct par_ctx {
	void (*fn)(void *);
	void *arg;
	int *left;
};

static inline void par_entry(void *opaque)
{
	struct par_ctx *c = opaque;

	c->fn(c->arg);
	(*c->left)--;
}

static inline void run_parallel(int n, void (*fn)(void *), void **args)
{
	struct par_ctx *ctx = calloc((size_t)n, sizeof(*ctx));
	int left = n;

	assert_non_null(ctx);
	for (int i = 0; i < n; i++) {
		ctx[i] = (struct par_ctx){ .fn = fn, .arg = args[i], .left = &left };
		vd_co_enter(vd_co_create(par_entry, &ctx[i]));
	}
	while (left > 0)
		vd_loop_run_once(vd_loop_get(), true);
	free(ctx);
}

#endif
