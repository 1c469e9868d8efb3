/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * vdisk_refresh_capacity(): after the file grew, requests up to the new end
 * are accepted by the running instance, also while a request is in flight;
 * a shrunk file, a driver without a file, and the wrong state are refused
 * with a message.
 */
#include "test-util.h"

#define BLK 4096

static void expect_result(struct fx *f, void *tag, int err)
{
	const char *msg = NULL;
	int ret = wait_one(f->q, tag, &msg);

	if (ret != err)
		fail_msg("request completed with %d (%s), expected %d", ret, msg ? msg : "no message", err);
}

static void resize(const char *path, uint64_t size)
{
	int fd = open(path, O_RDWR);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	close(fd);
}

static void growth_is_seen_without_a_restart(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, BLK), *in = fx_buf(f, BLK);
	uint64_t cap, grown;

	fx_open(f, 0);
	cap = f->capacity;
	grown = cap + 16 * BLK;
	memset(buf, 0x5a, BLK);
	assert_int_equal(vdiskq_write(f->q, cap, buf, BLK, (void *)1, 0), 0);
	expect_result(f, (void *)1, -EINVAL);

	/* A request in flight across the refresh is not disturbed. */
	assert_int_equal(vdiskq_write(f->q, cap - BLK, buf, BLK, (void *)2, 0), 0);
	resize(f->path, grown);
	assert_int_equal(vdisk_refresh_capacity(f->v), 0);
	assert_int_equal(vdisk_get_uint64(f->v, "capacity", &cap), 0);
	assert_int_equal(cap, grown);
	expect_result(f, (void *)2, 0);

	assert_int_equal(vdiskq_write(f->q, grown - BLK, buf, BLK, (void *)3, 0), 0);
	expect_result(f, (void *)3, 0);
	assert_int_equal(vdiskq_read(f->q, grown - BLK, in, BLK, (void *)4, 0), 0);
	expect_result(f, (void *)4, 0);
	assert_memory_equal(in, buf, BLK);
	assert_int_equal(vdiskq_read(f->q, grown, in, BLK, (void *)5, 0), 0);
	expect_result(f, (void *)5, -EINVAL);

	/* Unchanged: a no-op. */
	assert_int_equal(vdisk_refresh_capacity(f->v), 0);
	assert_int_equal(vdisk_get_uint64(f->v, "capacity", &cap), 0);
	assert_int_equal(cap, grown);
}

static void shrinking_is_refused(void **state)
{
	struct fx *f = *state;
	uint64_t cap;

	fx_open(f, 0);
	resize(f->path, f->capacity / 2);
	assert_int_equal(vdisk_refresh_capacity(f->v), -EINVAL);
	assert_str_contains(vdisk_get_error_msg(), "shrank");
	assert_int_equal(vdisk_get_uint64(f->v, "capacity", &cap), 0);
	assert_int_equal(cap, f->capacity);
}

static void connected_but_not_started_works(void **state)
{
	struct fx *f = *state;
	uint64_t cap;

	fx_create(f);
	fx_connect(f);
	resize(f->path, f->capacity * 2);
	assert_int_equal(vdisk_refresh_capacity(f->v), 0);
	assert_int_equal(vdisk_get_uint64(f->v, "capacity", &cap), 0);
	assert_int_equal(cap, f->capacity * 2);
}

static void refused_without_a_file_or_connection(void **state)
{
	struct vdisk *v = NULL;

	(void)state;
	assert_int_equal(vdisk_refresh_capacity(NULL), -EINVAL);
	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_refresh_capacity(v), -EINVAL); /* not connected */
	assert_str_contains(vdisk_get_error_msg(), "not connected");
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_refresh_capacity(v), -ENOTSUP);
	assert_str_contains(vdisk_get_error_msg(), "null");
	vdisk_destroy(&v);
}

int main(void)
{
	struct CMUnitTest tests[64];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	tests[n++] = (struct CMUnitTest){ strdup("refused_without_a_file_or_connection"),
					  refused_without_a_file_or_connection, NULL, NULL, (void *)1 };
	ADD_CFG_TESTS(tests, n, growth_is_seen_without_a_restart, false);
	ADD_CFG_TESTS(tests, n, shrinking_is_refused, false);
	ADD_CFG_TESTS(tests, n, connected_but_not_started_works, false);
	return run_cfg_tests("refresh-capacity", tests, n);
}
