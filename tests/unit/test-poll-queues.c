/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Poll queues: the null driver supports them; for every other driver either
 * they work (I/O through vdisk_get_poll_queue(), no completion fd) or the
 * driver refuses them cleanly, when num-poll-queues is set or at start,
 * with -ENOTSUP and a message.
 */
#include "test-util.h"

static void use_poll_queue(struct fx *f, struct vdiskq *pq)
{
	unsigned char *w = fx_buf(f, 65536), *r = fx_buf(f, 65536);
	struct vdisk_completion c[2];
	struct timespec t;

	assert_int_equal(vdiskq_get_completion_fd(pq), -ENOTSUP);
	fill_pattern(w, 65536, 4096, 5);
	assert_int_equal(vdiskq_write(pq, 4096, w, 65536, (void *)1, 0), 0);
	t = ts_sec(FX_TIMEOUT_S);
	assert_int_equal(vdiskq_do_io(pq, c, 1, 2, &t), 1);
	assert_ptr_equal(c[0].user_data, (void *)1);
	assert_int_equal(c[0].ret, 0);
	memset(r, 0, 65536);
	assert_int_equal(vdiskq_read(pq, 4096, r, 65536, (void *)2, 0), 0);
	/* Polling: spin with min_completions 0 as a poll-mode application does. */
	clock_gettime(CLOCK_MONOTONIC, &t);
	for (;;) {
		struct timespec now;
		int n = vdiskq_do_io(pq, c, 0, 2, NULL);

		assert_true(n == 0 || n == 1);
		if (n == 1)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - t.tv_sec > FX_TIMEOUT_S)
			fail_msg("poll queue never completed the read");
	}
	assert_ptr_equal(c[0].user_data, (void *)2);
	assert_int_equal(c[0].ret, 0);
	if (f->cfg->file)
		assert_int_equal(check_pattern(r, 65536, 4096, 5), -1);
	else
		assert_true(all_bytes(r, 65536, 0));
}

static void poll_queues_work_or_are_refused(void **state)
{
	struct fx *f = *state;
	struct vdiskq *pq;
	int ret;

	fx_create(f);
	/* Not before connect: limits are unknown then. */
	assert_int_equal(vdisk_set_int(f->v, "num-poll-queues", 1), -EBUSY);
	fx_connect(f);
	ret = vdisk_set_int(f->v, "num-poll-queues", 1);
	if (ret < 0) {
		if (!strcmp(f->cfg->driver, "null"))
			fail_msg("null must support poll queues: %s", vdisk_get_error_msg());
		if (ret != -ENOTSUP && ret != -EINVAL)
			fail_msg("refusing num-poll-queues=1 returned %d (%s), expected -ENOTSUP", ret,
				 vdisk_get_error_msg());
		assert_msg_contains("num-poll-queues");
		print_message("%s: %s\n", f->cfg->name, vdisk_get_error_msg());
		/* Refused, but the instance still starts without poll queues. */
		fx_start(f);
		assert_null(vdisk_get_poll_queue(f->v, 0));
		return;
	}
	ret = vdisk_start(f->v);
	if (ret < 0) {
		if (!strcmp(f->cfg->driver, "null"))
			fail_msg("null must support poll queues: %s", vdisk_get_error_msg());
		if (ret != -ENOTSUP)
			fail_msg("vdisk_start with a poll queue returned %d (%s), expected -ENOTSUP", ret,
				 vdisk_get_error_msg());
		assert_true(vdisk_get_error_msg()[0] != '\0');
		print_message("%s: %s\n", f->cfg->name, vdisk_get_error_msg());
		return;
	}
	print_message("%s: poll queues supported\n", f->cfg->name);
	pq = vdisk_get_poll_queue(f->v, 0);
	assert_non_null(pq);
	assert_null(vdisk_get_poll_queue(f->v, 1));
	assert_ptr_not_equal(pq, vdisk_get_queue(f->v, 0));
	use_poll_queue(f, pq);
}

static void null_poll_queues_only(void **state)
{
	struct fx *f = *state;
	struct vdiskq *pq;

	fx_create(f);
	fx_connect(f);
	assert_int_equal(vdisk_set_int(f->v, "num-queues", 0), 0);
	assert_int_equal(vdisk_set_int(f->v, "num-poll-queues", 2), 0);
	assert_int_equal(vdisk_start(f->v), 0);
	assert_null(vdisk_get_queue(f->v, 0));
	pq = vdisk_get_poll_queue(f->v, 1);
	assert_non_null(pq);
	assert_ptr_not_equal(pq, vdisk_get_poll_queue(f->v, 0));
	assert_null(vdisk_get_poll_queue(f->v, 2));
	use_poll_queue(f, pq);
}

int main(void)
{
	struct CMUnitTest tests[64];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	ADD_CFG_TESTS(tests, n, poll_queues_work_or_are_refused, true);
	tests[n++] = (struct CMUnitTest){ strdup("null_poll_queues_only"), null_poll_queues_only, fx_setup, fx_teardown,
					  (void *)&test_cfgs[0] };
	return run_cfg_tests("poll-queues", tests, n);
}
