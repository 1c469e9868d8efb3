/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Helpers shared by the cmocka unit tests.  Everything here uses the public
 * API only (include/vdisk.h), so the tests hold for any driver implementation.
 *
 * A test that should run for every driver is registered once per "config"
 * (driver + direct on/off); its fixture creates a sparse temporary file and
 * removes it again even when an assertion fails.
 */
#ifndef VDISK_TEST_UTIL_H
#define VDISK_TEST_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "vdisk.h"

#define FX_FILE_SIZE (32u << 20)
#define FX_TIMEOUT_S 20 /* no single wait in a test may take longer */

struct cfg {
	const char *name;
	const char *driver;
	bool direct;
	bool file; /* false: null driver, sized with "size" */
};

static const struct cfg test_cfgs[] = {
	{ "null", "null", false, false },
	{ "sync", "sync", false, true },
	{ "sync+direct", "sync", true, true },
	{ "threads", "threads", false, true },
	{ "threads+direct", "threads", true, true },
	{ "posix-aio", "posix-aio", false, true },
	{ "posix-aio+direct", "posix-aio", true, true },
	{ "io_uring", "io_uring", false, true },
	{ "io_uring+direct", "io_uring", true, true },
	{ "linux-aio+direct", "linux-aio", true, true },
};
#define N_TEST_CFGS (sizeof(test_cfgs) / sizeof(test_cfgs[0]))

/* Per-test state. */
struct fx {
	const struct cfg *cfg;
	char path[PATH_MAX];
	struct vdisk *v;
	struct vdiskq *q;
	uint64_t capacity;
	int req_align, buf_align;
	void *bufs[8];
	struct vdisk_mem_region regions[4];
};

static inline const char *tmp_dir(void)
{
	const char *d = getenv("TMPDIR");

	/* /var/tmp rather than /tmp: O_DIRECT needs a disk-backed filesystem. */
	return d && *d ? d : "/var/tmp";
}

/* Create a sparse file of size bytes; path receives its name. */
static inline void make_temp_file(char *path, size_t size, uint64_t bytes)
{
	int fd;

	snprintf(path, size, "%s/vdisk-unit-XXXXXX", tmp_dir());
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	close(fd);
}

static inline int fx_setup(void **state)
{
	const struct cfg *cfg = *state;
	struct fx *f = calloc(1, sizeof(*f));

	if (!f)
		return -1;
	f->cfg = cfg ? cfg : &test_cfgs[0];
	for (size_t i = 0; i < sizeof(f->regions) / sizeof(f->regions[0]); i++)
		f->regions[i].fd = -1;
	if (f->cfg->file) {
		int fd;

		snprintf(f->path, sizeof(f->path), "%s/vdisk-unit-XXXXXX", tmp_dir());
		fd = mkstemp(f->path);
		if (fd < 0 || ftruncate(fd, FX_FILE_SIZE) < 0) {
			if (fd >= 0)
				close(fd);
			free(f);
			return -1;
		}
		close(fd);
	}
	*state = f;
	return 0;
}

static inline int fx_teardown(void **state)
{
	struct fx *f = *state;

	if (!f)
		return 0;
	for (size_t i = 0; i < sizeof(f->regions) / sizeof(f->regions[0]); i++)
		if (f->regions[i].addr)
			vdisk_free_mem_region(f->v, &f->regions[i]);
	vdisk_destroy(&f->v);
	for (size_t i = 0; i < sizeof(f->bufs) / sizeof(f->bufs[0]); i++)
		free(f->bufs[i]);
	if (f->path[0])
		unlink(f->path);
	free(f);
	return 0;
}

/* Create the instance for the fixture's config (skips if the driver is missing). */
static inline void fx_create(struct fx *f)
{
	int ret = vdisk_create(f->cfg->driver, &f->v);

	if (ret == -ENOENT) {
		print_message("driver %s not built in: skipped\n", f->cfg->driver);
		skip();
	}
	assert_int_equal(ret, 0);
	if (f->cfg->file)
		assert_int_equal(vdisk_set_str(f->v, "path", f->path), 0);
	else
		assert_int_equal(vdisk_set_uint64(f->v, "size", FX_FILE_SIZE), 0);
	if (f->cfg->direct)
		assert_int_equal(vdisk_set_bool(f->v, "direct", true), 0);
}

static inline void fx_connect(struct fx *f)
{
	int ret = vdisk_connect(f->v);

	if (ret < 0)
		print_message("vdisk_connect(%s): %s\n", f->cfg->name, vdisk_get_error_msg());
	if (ret == -EINVAL && f->cfg->direct && strstr(vdisk_get_error_msg(), "O_DIRECT")) {
		print_message("%s does not support O_DIRECT: skipped\n", tmp_dir());
		skip();
	}
	assert_int_equal(ret, 0);
	assert_int_equal(vdisk_get_uint64(f->v, "capacity", &f->capacity), 0);
	assert_int_equal(vdisk_get_int(f->v, "request-alignment", &f->req_align), 0);
	assert_int_equal(vdisk_get_int(f->v, "buf-alignment", &f->buf_align), 0);
	assert_true(f->req_align >= 1);
	assert_true(f->buf_align >= 1);
}

static inline void fx_start(struct fx *f)
{
	int ret = vdisk_start(f->v);

	if (ret < 0)
		print_message("vdisk_start(%s): %s\n", f->cfg->name, vdisk_get_error_msg());
	assert_int_equal(ret, 0);
	f->q = vdisk_get_queue(f->v, 0);
	assert_non_null(f->q);
}

/* create + connect (+ queue-size when > 0) + start */
static inline void fx_open(struct fx *f, int queue_size)
{
	fx_create(f);
	fx_connect(f);
	if (queue_size > 0)
		assert_int_equal(vdisk_set_int(f->v, "queue-size", queue_size), 0);
	fx_start(f);
}

/* A 4 KiB-aligned buffer owned by the fixture (freed at teardown). */
static inline void *fx_buf(struct fx *f, size_t len)
{
	for (size_t i = 0; i < sizeof(f->bufs) / sizeof(f->bufs[0]); i++) {
		if (!f->bufs[i]) {
			assert_int_equal(posix_memalign(&f->bufs[i], 4096, len ? len : 1), 0);
			return f->bufs[i];
		}
	}
	fail_msg("fx_buf: out of slots");
	return NULL;
}

static inline struct timespec ts_sec(long s)
{
	struct timespec t = { .tv_sec = s, .tv_nsec = 0 };

	return t;
}

/* Wait for exactly one completion (bounded); returns its ret and checks user_data. */
static inline int wait_one(struct vdiskq *q, void *user_data, const char **msg)
{
	struct vdisk_completion c;
	struct timespec t = ts_sec(FX_TIMEOUT_S);
	int n = vdiskq_do_io(q, &c, 1, 1, &t);

	if (n != 1)
		print_message("vdiskq_do_io returned %d: %s\n", n, vdisk_get_error_msg());
	assert_int_equal(n, 1);
	assert_ptr_equal(c.user_data, user_data);
	if (c.ret == 0)
		assert_null(c.error_msg);
	else
		assert_non_null(c.error_msg);
	if (msg)
		*msg = c.error_msg;
	return c.ret;
}

/*
 * Collect completions for tags 1..n (user_data = (void *)tag) until all are
 * in; each must come back exactly once and succeed.  max is the
 * max_completions passed to each vdiskq_do_io() call.
 */
static inline void drain_tags(struct vdiskq *q, int n, int max)
{
	struct vdisk_completion *c = calloc((size_t)max, sizeof(*c));
	unsigned char *seen = calloc((size_t)n + 1, 1);
	int got = 0;

	assert_non_null(c);
	assert_non_null(seen);
	while (got < n) {
		struct timespec t = ts_sec(FX_TIMEOUT_S);
		int r = vdiskq_do_io(q, c, 1, max, &t);

		if (r < 0)
			print_message("vdiskq_do_io: %d %s (got %d of %d)\n", r, vdisk_get_error_msg(), got, n);
		assert_true(r >= 1);
		assert_true(r <= max);
		for (int i = 0; i < r; i++) {
			uintptr_t tag = (uintptr_t)c[i].user_data;

			assert_true(tag >= 1 && tag <= (uintptr_t)n);
			assert_int_equal(seen[tag], 0);
			seen[tag] = 1;
			if (c[i].ret != 0)
				print_message("tag %lu failed: %s\n", (unsigned long)tag, c[i].error_msg);
			assert_int_equal(c[i].ret, 0);
			assert_null(c[i].error_msg);
		}
		got += r;
	}
	free(c);
	free(seen);
}

/* A deterministic, position-dependent byte pattern. */
static inline unsigned char pattern_byte(uint64_t pos, unsigned seed)
{
	uint64_t x = pos * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;

	x ^= x >> 29;
	return (unsigned char)(x ^ (x >> 17));
}

static inline void fill_pattern(void *buf, size_t len, uint64_t pos, unsigned seed)
{
	unsigned char *p = buf;

	for (size_t i = 0; i < len; i++)
		p[i] = pattern_byte(pos + i, seed);
}

/* Index of the first byte that differs from the pattern, or -1. */
static inline long check_pattern(const void *buf, size_t len, uint64_t pos, unsigned seed)
{
	const unsigned char *p = buf;

	for (size_t i = 0; i < len; i++)
		if (p[i] != pattern_byte(pos + i, seed))
			return (long)i;
	return -1;
}

static inline bool all_bytes(const void *buf, size_t len, unsigned char b)
{
	const unsigned char *p = buf;

	for (size_t i = 0; i < len; i++)
		if (p[i] != b)
			return false;
	return true;
}

/* Read the backing file directly (independent of any driver). */
static inline void pread_file(const char *path, void *buf, size_t len, uint64_t off)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	assert_true(fd >= 0);
	assert_int_equal(pread(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
}

static inline void pwrite_file(const char *path, const void *buf, size_t len, uint64_t off)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);

	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
}

/* Error message checks. */
#define assert_msg_contains(needle)                                                                      \
	do {                                                                                             \
		const char *m_ = vdisk_get_error_msg();                                                  \
		if (!m_ || !strstr(m_, (needle)))                                                        \
			fail_msg("error message '%s' does not contain '%s'", m_ ? m_ : "(null)", (needle)); \
	} while (0)

#define assert_str_contains(hay, needle)                                                                  \
	do {                                                                                             \
		const char *h_ = (hay);                                                                  \
		if (!h_ || !strstr(h_, (needle)))                                                        \
			fail_msg("'%s' does not contain '%s'", h_ ? h_ : "(null)", (needle));            \
	} while (0)

/*
 * Register fn once per config.  Test names are "fn/config".  Returns the
 * number of entries written to tests[].
 */
static inline size_t add_cfg_tests(struct CMUnitTest *tests, size_t at, const char *fname,
				   CMUnitTestFunction fn, bool include_null)
{
	for (size_t i = 0; i < N_TEST_CFGS; i++) {
		char *name;

		if (!include_null && !test_cfgs[i].file)
			continue;
		size_t len = strlen(fname) + strlen(test_cfgs[i].name) + 2;

		name = malloc(len);
		assert_non_null(name);
		snprintf(name, len, "%s/%s", fname, test_cfgs[i].name);
		tests[at].name = name;
		tests[at].test_func = fn;
		tests[at].setup_func = fx_setup;
		tests[at].teardown_func = fx_teardown;
		tests[at].initial_state = (void *)&test_cfgs[i];
		at++;
	}
	return at;
}

#define ADD_CFG_TESTS(tests, n, fn, include_null) ((n) = add_cfg_tests((tests), (n), #fn, (fn), (include_null)))

static inline int run_cfg_tests(const char *group, struct CMUnitTest *tests, size_t n)
{
	int ret = _cmocka_run_group_tests(group, tests, n, NULL, NULL);

	for (size_t i = 0; i < n; i++)
		if (tests[i].initial_state) /* names built by add_cfg_tests */
			free((void *)tests[i].name);
	return ret;
}

#endif /* VDISK_TEST_UTIL_H */
