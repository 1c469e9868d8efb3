/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Instance lifecycle: create -> connect -> start -> destroy, and the errors
 * for doing things out of order or with bad configuration.
 */
#include <sys/types.h>

#include "test-util.h"

static void list_drivers_names_all_six(void **state)
{
	const char *const want[] = { "io_uring", "linux-aio", "posix-aio", "threads", "sync", "null" };
	const char *const *d = vdisk_list_drivers();

	assert_non_null(d);
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		bool found = false;

		for (int k = 0; d[k]; k++)
			found |= strcmp(d[k], want[i]) == 0;
		if (!found)
			fail_msg("driver '%s' missing from vdisk_list_drivers()", want[i]);
	}
	/* Every listed driver can be created. */
	for (int k = 0; d[k]; k++) {
		struct vdisk *v = NULL;

		assert_int_equal(vdisk_create(d[k], &v), 0);
		assert_non_null(v);
		vdisk_destroy(&v);
		assert_null(v);
	}
}

static void unknown_driver_is_enoent(void **state)
{
	struct vdisk *v = (struct vdisk *)(uintptr_t)1;

	assert_int_equal(vdisk_create("no-such-driver", &v), -ENOENT);
	assert_null(v);
	assert_msg_contains("vdisk_create");
	assert_msg_contains("no-such-driver");
	assert_int_equal(vdisk_create(NULL, &v), -EINVAL);
	assert_int_equal(vdisk_create("null", NULL), -EINVAL);
}

static void destroy_accepts_null(void **state)
{
	struct vdisk *v = NULL;

	vdisk_destroy(NULL);
	vdisk_destroy(&v);
	assert_null(v);
}

static void connect_twice_is_einval(void **state)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_connect(v), -EINVAL);
	assert_msg_contains("vdisk_connect");
	assert_int_equal(vdisk_start(v), 0);
	assert_int_equal(vdisk_connect(v), -EINVAL);
	vdisk_destroy(&v);
}

static void start_before_connect_or_twice_is_einval(void **state)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_start(v), -EINVAL);
	assert_msg_contains("vdisk_start");
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_start(v), 0);
	assert_int_equal(vdisk_start(v), -EINVAL);
	assert_msg_contains("vdisk_start");
	vdisk_destroy(&v);
}

static void get_queue_only_when_started_and_in_range(void **state)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_null(vdisk_get_queue(v, 0));
	assert_int_equal(vdisk_connect(v), 0);
	assert_int_equal(vdisk_set_int(v, "num-queues", 3), 0);
	assert_null(vdisk_get_queue(v, 0));
	assert_null(vdisk_get_poll_queue(v, 0));
	assert_int_equal(vdisk_start(v), 0);
	for (int i = 0; i < 3; i++) {
		struct vdiskq *q = vdisk_get_queue(v, i);

		assert_non_null(q);
		for (int k = 0; k < i; k++)
			assert_ptr_not_equal(q, vdisk_get_queue(v, k));
		assert_ptr_equal(q, vdisk_get_queue(v, i)); /* stable */
	}
	assert_null(vdisk_get_queue(v, 3));
	assert_null(vdisk_get_queue(v, -1));
	assert_null(vdisk_get_poll_queue(v, 0)); /* num-poll-queues is 0 */
	assert_null(vdisk_get_queue(NULL, 0));
	vdisk_destroy(&v);
}

/* ---- file drivers (per config) ---- */

/* The config's driver with direct set as the config says, nothing else. */
static void create_bare(struct fx *f)
{
	assert_int_equal(vdisk_create(f->cfg->driver, &f->v), 0);
	if (f->cfg->direct)
		assert_int_equal(vdisk_set_bool(f->v, "direct", true), 0);
}

static void connect_without_path_is_einval(void **state)
{
	struct fx *f = *state;
	int ret;

	create_bare(f);
	ret = vdisk_connect(f->v);
	assert_int_equal(ret, -EINVAL);
	assert_msg_contains("vdisk_connect");
	assert_msg_contains("path");
	/* The instance stays usable: set the path and connect. */
	assert_int_equal(vdisk_set_str(f->v, "path", f->path), 0);
	fx_connect(f);
	assert_int_equal(f->capacity, FX_FILE_SIZE);
}

static void connect_missing_file_is_enoent(void **state)
{
	struct fx *f = *state;
	char missing[PATH_MAX + 16];

	snprintf(missing, sizeof(missing), "%s.does-not-exist", f->path);
	create_bare(f);
	assert_int_equal(vdisk_set_str(f->v, "path", missing), 0);
	assert_int_equal(vdisk_connect(f->v), -ENOENT);
	assert_msg_contains(missing);
	assert_null(vdisk_get_queue(f->v, 0));
	assert_int_equal(vdisk_start(f->v), -EINVAL);
}

static void connect_directory_is_eisdir(void **state)
{
	struct fx *f = *state;
	int ret;

	create_bare(f);
	assert_int_equal(vdisk_set_str(f->v, "path", tmp_dir()), 0);
	assert_int_equal(vdisk_set_bool(f->v, "read-only", true), 0); /* O_RDWR on a directory fails with EISDIR anyway */
	ret = vdisk_connect(f->v);
	assert_int_equal(ret, -EISDIR);
	assert_msg_contains(tmp_dir());
}

static void connect_char_device_is_einval(void **state)
{
	struct fx *f = *state;

	create_bare(f);
	assert_int_equal(vdisk_set_str(f->v, "path", "/dev/null"), 0);
	assert_int_equal(vdisk_connect(f->v), -EINVAL);
	assert_msg_contains("/dev/null");
}

static void path_and_fd_together_is_einval(void **state)
{
	struct fx *f = *state;
	int fd = open(f->path, O_RDWR | O_CLOEXEC);

	assert_true(fd >= 0);
	create_bare(f);
	assert_int_equal(vdisk_set_str(f->v, "path", f->path), 0);
	assert_int_equal(vdisk_set_int(f->v, "fd", fd), 0);
	assert_int_equal(vdisk_connect(f->v), -EINVAL);
	assert_msg_contains("fd");
	close(fd);
}

static void fd_is_used_and_left_open(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 8192), *back = fx_buf(f, 8192);
	int fd = open(f->path, O_RDWR | O_CLOEXEC);

	assert_true(fd >= 0);
	create_bare(f);
	assert_int_equal(vdisk_set_int(f->v, "fd", fd), 0);
	fx_connect(f);
	assert_int_equal(f->capacity, FX_FILE_SIZE);
	fx_start(f);
	fill_pattern(buf, 8192, 65536, 3);
	assert_int_equal(vdiskq_write(f->q, 65536, buf, 8192, buf, 0), 0);
	assert_int_equal(wait_one(f->q, buf, NULL), 0);
	vdisk_destroy(&f->v);
	/* Still open, and the data is in the file. */
	assert_true(fcntl(fd, F_GETFD) >= 0);
	assert_int_equal(pread(fd, back, 8192, 65536), 8192);
	assert_int_equal(check_pattern(back, 8192, 65536, 3), -1);
	close(fd);
}

static void read_only_fd_needs_read_only(void **state)
{
	struct fx *f = *state;
	int fd = open(f->path, O_RDONLY | O_CLOEXEC), ret;

	assert_true(fd >= 0);
	create_bare(f);
	assert_int_equal(vdisk_set_int(f->v, "fd", fd), 0);
	ret = vdisk_connect(f->v);
	if (ret != -EBADF && ret != -EACCES)
		fail_msg("connect with an O_RDONLY fd and read-only=false returned %d, expected -EBADF/-EACCES", ret);
	assert_msg_contains("read-only");
	vdisk_destroy(&f->v);

	create_bare(f);
	assert_int_equal(vdisk_set_int(f->v, "fd", fd), 0);
	assert_int_equal(vdisk_set_bool(f->v, "read-only", true), 0);
	fx_connect(f);
	fx_start(f);
	vdisk_destroy(&f->v);
	close(fd);
}

static void capacity_is_file_size(void **state)
{
	struct fx *f = *state;
	bool b;

	fx_create(f);
	fx_connect(f);
	assert_int_equal(f->capacity, FX_FILE_SIZE);
	assert_int_equal(vdisk_get_bool(f->v, "direct", &b), 0);
	assert_int_equal(b, f->cfg->direct);
	if (f->cfg->direct) {
		/* O_DIRECT on a regular file has an alignment, a power of two. */
		assert_true(f->req_align > 1);
		assert_int_equal(f->req_align & (f->req_align - 1), 0);
		assert_int_equal(f->buf_align & (f->buf_align - 1), 0);
	}
	fx_start(f);
}

int main(void)
{
	struct CMUnitTest tests[128] = {
		cmocka_unit_test(list_drivers_names_all_six),
		cmocka_unit_test(unknown_driver_is_enoent),
		cmocka_unit_test(destroy_accepts_null),
		cmocka_unit_test(connect_twice_is_einval),
		cmocka_unit_test(start_before_connect_or_twice_is_einval),
		cmocka_unit_test(get_queue_only_when_started_and_in_range),
	};
	size_t n = 6;

	ADD_CFG_TESTS(tests, n, connect_without_path_is_einval, false);
	ADD_CFG_TESTS(tests, n, connect_missing_file_is_enoent, false);
	ADD_CFG_TESTS(tests, n, connect_directory_is_eisdir, false);
	ADD_CFG_TESTS(tests, n, connect_char_device_is_einval, false);
	ADD_CFG_TESTS(tests, n, path_and_fd_together_is_einval, false);
	ADD_CFG_TESTS(tests, n, fd_is_used_and_left_open, false);
	ADD_CFG_TESTS(tests, n, read_only_fd_needs_read_only, false);
	ADD_CFG_TESTS(tests, n, capacity_is_file_size, false);
	return run_cfg_tests("lifecycle", tests, n);
}
