/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Queues are independent: with num-queues = 4, four threads each drive their
 * own queue at the same time (no locking by the application) and every
 * request of every queue completes on that queue with the right data.
 */
#include <pthread.h>

#include "test-util.h"

#define NQ 4
#define REQS 64
#define BLK 4096

struct worker {
	struct vdiskq *q;
	int index;
	bool check_data;
	unsigned char *buf; /* REQS * BLK */
	char error[160];
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct vdisk_completion c[8];
	unsigned char seen[REQS + 1];
	uint64_t base = (uint64_t)w->index * REQS * BLK;

	for (int pass = 0; pass < 2; pass++) { /* 0: write, 1: read back */
		int got = 0;

		memset(seen, 0, sizeof(seen));
		if (pass == 1)
			memset(w->buf, 0, REQS * BLK);
		for (int i = 0; i < REQS; i++) {
			unsigned char *b = w->buf + (size_t)i * BLK;
			uint64_t off = base + (uint64_t)i * BLK;

			if (pass == 0) {
				fill_pattern(b, BLK, off, 100 + (unsigned)w->index);
				vdiskq_write(w->q, off, b, BLK, (void *)(uintptr_t)(i + 1), 0);
			} else {
				vdiskq_read(w->q, off, b, BLK, (void *)(uintptr_t)(i + 1), 0);
			}
		}
		while (got < REQS) {
			struct timespec t = ts_sec(FX_TIMEOUT_S);
			int n = vdiskq_do_io(w->q, c, 1, 8, &t);

			if (n < 1) {
				snprintf(w->error, sizeof(w->error), "queue %d: do_io returned %d: %s", w->index, n,
					 vdisk_get_error_msg());
				return NULL;
			}
			for (int k = 0; k < n; k++) {
				uintptr_t tag = (uintptr_t)c[k].user_data;

				if (tag < 1 || tag > REQS || seen[tag] || c[k].ret != 0) {
					snprintf(w->error, sizeof(w->error), "queue %d: bad completion tag %lu ret %d",
						 w->index, (unsigned long)tag, c[k].ret);
					return NULL;
				}
				seen[tag] = 1;
			}
			got += n;
		}
	}
	if (w->check_data) {
		for (int i = 0; i < REQS; i++) {
			uint64_t off = base + (uint64_t)i * BLK;

			if (check_pattern(w->buf + (size_t)i * BLK, BLK, off, 100 + (unsigned)w->index) != -1) {
				snprintf(w->error, sizeof(w->error), "queue %d: block at %lu read back wrong", w->index,
					 (unsigned long)off);
				return NULL;
			}
		}
	}
	return NULL;
}

static void four_threads_four_queues(void **state)
{
	struct fx *f = *state;
	struct worker w[NQ];
	pthread_t th[NQ];

	fx_create(f);
	fx_connect(f);
	assert_int_equal(vdisk_set_int(f->v, "num-queues", NQ), 0);
	assert_int_equal(vdisk_set_int(f->v, "queue-size", 8), 0);
	fx_start(f);
	for (int i = 0; i < NQ; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i].q = vdisk_get_queue(f->v, i);
		assert_non_null(w[i].q);
		w[i].index = i;
		w[i].check_data = f->cfg->file;
		w[i].buf = fx_buf(f, REQS * BLK);
	}
	for (int i = 0; i < NQ; i++)
		assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
	for (int i = 0; i < NQ; i++)
		assert_int_equal(pthread_join(th[i], NULL), 0);
	for (int i = 0; i < NQ; i++)
		if (w[i].error[0])
			fail_msg("%s", w[i].error);
	if (f->cfg->file) {
		unsigned char *r = fx_buf(f, BLK);

		for (int q = 0; q < NQ; q++) {
			uint64_t off = (uint64_t)q * REQS * BLK + 7 * BLK;

			pread_file(f->path, r, BLK, off);
			assert_int_equal(check_pattern(r, BLK, off, 100 + (unsigned)q), -1);
		}
	}
}

int main(void)
{
	struct CMUnitTest tests[32];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	ADD_CFG_TESTS(tests, n, four_threads_four_queues, true);
	return run_cfg_tests("queues-concurrent", tests, n);
}
