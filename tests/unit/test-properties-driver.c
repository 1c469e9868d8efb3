/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Driver-specific properties: null "size" and "read-zeroes", threads
 * "num-threads", io_uring "sqpoll".  Each is looked up by name with
 * vdisk_list_properties() and the test is skipped when the driver lacks it.
 */
#include "test-util.h"

static bool has_property(struct vdisk *v, const char *name)
{
	const char *const *names = vdisk_list_properties(v);

	assert_non_null(names);
	for (int i = 0; names[i]; i++)
		if (!strcmp(names[i], name))
			return true;
	return false;
}

static void null_size_is_uint64_set_before_connect_and_becomes_capacity(void **state)
{
	struct vdisk *v = NULL;
	uint64_t cap = 0, size = 0;
	int i;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_true(has_property(v, "size"));
	assert_int_equal(vdisk_get_int(v, "size", &i), -ENOTTY);
	assert_msg_contains("size");
	assert_int_equal(vdisk_set_int(v, "size", 4096), -ENOTTY);
	assert_int_equal(vdisk_set_uint64(v, "size", 5ull << 30), 0);
	assert_int_equal(vdisk_get_uint64(v, "size", &size), 0);
	assert_int_equal(size, 5ull << 30);
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_get_uint64(v, "capacity", &cap), 0);
	assert_int_equal(cap, 5ull << 30);
	assert_int_equal(vdisk_set_uint64(v, "size", 4096), -EBUSY);
	assert_msg_contains("size");
	assert_int_equal(vdisk_get_uint64(v, "size", &size), 0);
	assert_int_equal(size, 5ull << 30);
	vdisk_destroy(&v);
}

static void null_without_size_cannot_connect(void **state)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_connect(v), -EINVAL);
	assert_msg_contains("size");
	/* Still in the created state: size can be set and connect retried. */
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_connect(v), 0);
	vdisk_destroy(&v);
}

static void null_read_zeroes(void **state)
{
	for (int rz = 0; rz <= 2; rz++) { /* 2: default */
		struct vdisk *v = NULL;
		struct vdiskq *q;
		unsigned char *buf = malloc(8192);
		bool val;

		assert_non_null(buf);
		assert_int_equal(vdisk_create("null", &v), 0);
		assert_true(has_property(v, "read-zeroes"));
		assert_int_equal(vdisk_get_bool(v, "read-zeroes", &val), 0);
		assert_true(val); /* default */
		assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
		if (rz < 2)
			assert_int_equal(vdisk_set_bool(v, "read-zeroes", rz == 1), 0);
		assert_int_equal(vdisk_set_int(v, "read-zeroes", 1), -ENOTTY);
		assert_int_equal(vdisk_connect(v), 0);
		assert_int_equal(vdisk_set_bool(v, "read-zeroes", true), -EBUSY);
		assert_msg_contains("read-zeroes");
		assert_int_equal(vdisk_start(v), 0);
		q = vdisk_get_queue(v, 0);
		assert_non_null(q);
		memset(buf, 0xee, 8192);
		assert_int_equal(vdiskq_read(q, 4096, buf, 8192, buf, 0), 0);
		assert_int_equal(wait_one(q, buf, NULL), 0);
		if (rz == 0)
			assert_true(all_bytes(buf, 8192, 0xee)); /* untouched */
		else
			assert_true(all_bytes(buf, 8192, 0));
		/* Writes are dropped: the data never comes back. */
		if (rz != 0) {
			memset(buf, 0x11, 8192);
			assert_int_equal(vdiskq_write(q, 0, buf, 8192, NULL, 0), 0);
			assert_int_equal(wait_one(q, NULL, NULL), 0);
			assert_int_equal(vdiskq_read(q, 0, buf, 8192, NULL, 0), 0);
			assert_int_equal(wait_one(q, NULL, NULL), 0);
			assert_true(all_bytes(buf, 8192, 0));
		}
		free(buf);
		vdisk_destroy(&v);
	}
}

/* Set an int/bool property in created or connected state, whichever the driver allows. */
static int set_before_start(struct vdisk *v, const char *name, bool is_bool, int value, bool *connected)
{
	int ret = is_bool ? vdisk_set_bool(v, name, value) : vdisk_set_int(v, name, value);

	*connected = false;
	if (ret != -EBUSY)
		return ret;
	assert_int_equal(vdisk_connect(v), 0);
	*connected = true;
	return is_bool ? vdisk_set_bool(v, name, value) : vdisk_set_int(v, name, value);
}

static void write_read_back(struct fx *f)
{
	unsigned char *w = fx_buf(f, 65536), *r = fx_buf(f, 65536);

	fill_pattern(w, 65536, 1 << 20, 7);
	memset(r, 0, 65536);
	assert_int_equal(vdiskq_write(f->q, 1 << 20, w, 65536, w, 0), 0);
	assert_int_equal(wait_one(f->q, w, NULL), 0);
	assert_int_equal(vdiskq_read(f->q, 1 << 20, r, 65536, r, 0), 0);
	assert_int_equal(wait_one(f->q, r, NULL), 0);
	assert_int_equal(check_pattern(r, 65536, 1 << 20, 7), -1);
}

static void threads_num_threads(void **state)
{
	struct fx *f = *state;
	bool connected;
	int n = 0, ret;

	fx_create(f);
	if (!has_property(f->v, "num-threads")) {
		print_message("threads has no num-threads property: skipped\n");
		skip();
	}
	assert_int_equal(vdisk_get_bool(f->v, "num-threads", &(bool){ false }), -ENOTTY);
	assert_msg_contains("num-threads");
	ret = set_before_start(f->v, "num-threads", false, -1, &connected);
	assert_int_equal(ret, -EINVAL);
	assert_msg_contains("num-threads");
	ret = vdisk_set_int(f->v, "num-threads", 3);
	if (ret < 0)
		print_message("num-threads=3: %s\n", vdisk_get_error_msg());
	assert_int_equal(ret, 0);
	assert_int_equal(vdisk_get_int(f->v, "num-threads", &n), 0);
	assert_int_equal(n, 3);
	if (!connected)
		fx_connect(f);
	else
		assert_int_equal(vdisk_get_uint64(f->v, "capacity", &f->capacity), 0);
	fx_start(f);
	assert_int_equal(vdisk_set_int(f->v, "num-threads", 2), -EBUSY);
	assert_msg_contains("num-threads");
	write_read_back(f);
}

static void io_uring_sqpoll(void **state)
{
	struct fx *f = *state;
	bool connected, on = false;
	int ret, i;

	fx_create(f);
	if (!has_property(f->v, "sqpoll")) {
		print_message("io_uring has no sqpoll property: skipped\n");
		skip();
	}
	assert_int_equal(vdisk_get_int(f->v, "sqpoll", &i), -ENOTTY);
	assert_msg_contains("sqpoll");
	ret = set_before_start(f->v, "sqpoll", true, true, &connected);
	if (ret < 0)
		print_message("sqpoll=true: %s\n", vdisk_get_error_msg());
	assert_int_equal(ret, 0);
	assert_int_equal(vdisk_get_bool(f->v, "sqpoll", &on), 0);
	assert_true(on);
	if (!connected)
		fx_connect(f);
	fx_start(f);
	assert_int_equal(vdisk_set_bool(f->v, "sqpoll", false), -EBUSY);
	assert_msg_contains("sqpoll");
	write_read_back(f);
}

int main(void)
{
	static const struct cfg threads_cfg = { "threads", "threads", false, true };
	static const struct cfg uring_cfg = { "io_uring", "io_uring", false, true };
	static const struct cfg uring_direct_cfg = { "io_uring+direct", "io_uring", true, true };
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(null_size_is_uint64_set_before_connect_and_becomes_capacity),
		cmocka_unit_test(null_without_size_cannot_connect),
		cmocka_unit_test(null_read_zeroes),
		cmocka_unit_test_prestate_setup_teardown(threads_num_threads, fx_setup, fx_teardown, (void *)&threads_cfg),
		cmocka_unit_test_prestate_setup_teardown(io_uring_sqpoll, fx_setup, fx_teardown, (void *)&uring_cfg),
		{ "io_uring_sqpoll/direct", io_uring_sqpoll, fx_setup, fx_teardown, (void *)&uring_direct_cfg },
	};

	return cmocka_run_group_tests_name("properties-driver", tests, NULL, NULL);
}
