/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Invalid requests never reach the device: past capacity -EINVAL, write on a
 * read-only instance -EBADF, misaligned direct I/O -EINVAL, unsupported flags
 * -EINVAL, too many segments -EINVAL; each completes (through do_io, with its
 * user_data) with an error message, and the queue keeps working afterwards.
 * Enqueueing an invalid request still returns 0: its error comes as its completion.
 * Zero-length requests complete with 0 from the core without reaching the driver
 * (after validation, so a zero-length write on a read-only instance is still -EBADF).
 */
#include "test-util.h"

#define BLK 4096

/* Collect the one completion and check it failed with err and a message containing needle. */
static void expect_fail(struct fx *f, void *tag, int err, const char *needle)
{
	const char *msg = NULL;
	int ret = wait_one(f->q, tag, &msg);

	if (ret != err)
		fail_msg("request completed with %d (%s), expected %d", ret, msg ? msg : "no message", err);
	assert_non_null(msg);
	if (needle)
		assert_str_contains(msg, needle);
}

static void queue_still_works(struct fx *f)
{
	unsigned char *buf = fx_buf(f, BLK);

	assert_int_equal(vdiskq_read(f->q, 0, buf, BLK, buf, 0), 0);
	assert_int_equal(wait_one(f->q, buf, NULL), 0);
}

static uint64_t file_size(const char *path)
{
	struct stat st;

	assert_int_equal(stat(path, &st), 0);
	return (uint64_t)st.st_size;
}

static void past_capacity_is_einval(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 2 * BLK);
	struct iovec iov[2] = { { buf, BLK }, { buf + BLK, BLK } };
	uint64_t cap;

	fx_open(f, 0);
	cap = f->capacity;
	memset(buf, 0x77, 2 * BLK);
	assert_int_equal(vdiskq_read(f->q, cap, buf, BLK, (void *)1, 0), 0);
	expect_fail(f, (void *)1, -EINVAL, "capacity");
	/* Straddling the end: nothing may be written, the file must not grow. */
	assert_int_equal(vdiskq_write(f->q, cap - BLK, buf, 2 * BLK, (void *)2, 0), 0);
	expect_fail(f, (void *)2, -EINVAL, "capacity");
	assert_int_equal(vdiskq_writev(f->q, cap - BLK, iov, 2, (void *)3, 0), 0);
	expect_fail(f, (void *)3, -EINVAL, "capacity");
	/* offset + len overflowing 64 bits */
	assert_int_equal(vdiskq_read(f->q, UINT64_MAX - BLK + 1, buf, BLK, (void *)4, 0), 0);
	expect_fail(f, (void *)4, -EINVAL, "capacity");
	assert_int_equal(vdiskq_discard(f->q, cap - BLK, 2 * BLK, (void *)5, 0), 0);
	expect_fail(f, (void *)5, -EINVAL, "capacity");
	assert_int_equal(vdiskq_write_zeroes(f->q, cap, BLK, (void *)6, 0), 0);
	expect_fail(f, (void *)6, -EINVAL, "capacity");
	assert_int_equal(vdiskq_write_zeroes(f->q, BLK, UINT64_MAX, (void *)7, 0), 0);
	expect_fail(f, (void *)7, -EINVAL, "capacity");
	if (f->cfg->file) {
		assert_int_equal(file_size(f->path), FX_FILE_SIZE);
		pread_file(f->path, buf, BLK, cap - BLK);
		assert_true(all_bytes(buf, BLK, 0));
	}
	/* The last block itself is fine. */
	assert_int_equal(vdiskq_read(f->q, cap - BLK, buf, BLK, (void *)8, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)8, NULL), 0);
}

static void write_on_read_only_is_ebadf(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, BLK);
	struct iovec iov = { buf, BLK };

	fx_create(f);
	assert_int_equal(vdisk_set_bool(f->v, "read-only", true), 0);
	fx_connect(f);
	fx_start(f);
	memset(buf, 0x42, BLK);
	assert_int_equal(vdiskq_write(f->q, 0, buf, BLK, (void *)1, 0), 0);
	expect_fail(f, (void *)1, -EBADF, "read-only");
	assert_int_equal(vdiskq_writev(f->q, 0, &iov, 1, (void *)2, 0), 0);
	expect_fail(f, (void *)2, -EBADF, "read-only");
	assert_int_equal(vdiskq_discard(f->q, 0, BLK, (void *)3, 0), 0);
	expect_fail(f, (void *)3, -EBADF, "read-only");
	assert_int_equal(vdiskq_write_zeroes(f->q, 0, BLK, (void *)4, 0), 0);
	expect_fail(f, (void *)4, -EBADF, "read-only");
	if (f->cfg->file) {
		pread_file(f->path, buf, BLK, 0);
		assert_true(all_bytes(buf, BLK, 0));
	}
	queue_still_works(f);
}

static void misaligned_direct_io_is_einval(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 4 * BLK);
	struct iovec iov[2];

	fx_open(f, 0);
	if (f->req_align <= 1 && f->buf_align <= 1) {
		print_message("%s has no alignment requirement: skipped\n", f->cfg->name);
		skip();
	}
	if (f->req_align > 1) {
		/* Misaligned offset, misaligned length, for reads and writes. */
		assert_int_equal(vdiskq_read(f->q, (uint64_t)f->req_align / 2, buf, (size_t)f->req_align, (void *)1, 0), 0);
		expect_fail(f, (void *)1, -EINVAL, "alignment");
		assert_int_equal(vdiskq_write(f->q, 0, buf, (size_t)f->req_align + 1, (void *)2, 0), 0);
		expect_fail(f, (void *)2, -EINVAL, "alignment");
		assert_int_equal(vdiskq_write(f->q, 1, buf, (size_t)f->req_align, (void *)3, 0), 0);
		expect_fail(f, (void *)3, -EINVAL, "alignment");
	}
	if (f->buf_align > 1) {
		/* Misaligned buffer address; misaligned segment length inside a vector. */
		assert_int_equal(vdiskq_read(f->q, 0, buf + f->buf_align / 2, BLK, (void *)4, 0), 0);
		expect_fail(f, (void *)4, -EINVAL, "alignment");
		iov[0].iov_base = buf;
		iov[0].iov_len = BLK - (size_t)f->buf_align / 2;
		iov[1].iov_base = buf + 2 * BLK;
		iov[1].iov_len = (size_t)f->buf_align / 2;
		assert_int_equal(vdiskq_writev(f->q, 0, iov, 2, (void *)5, 0), 0);
		expect_fail(f, (void *)5, -EINVAL, "alignment");
	}
	queue_still_works(f);
}

static void direct_io_at_the_reported_alignment_works(void **state)
{
	struct fx *f = *state;
	unsigned char *buf, *back;
	size_t a;

	fx_open(f, 0);
	a = (size_t)(f->req_align > f->buf_align ? f->req_align : f->buf_align);
	buf = fx_buf(f, 2 * a + BLK);
	back = fx_buf(f, BLK);
	/* Offset and length exactly request-alignment, buffer exactly buf-alignment (not page) aligned. */
	fill_pattern(buf + f->buf_align, (size_t)f->req_align, (uint64_t)f->req_align, 9);
	assert_int_equal(vdiskq_write(f->q, (uint64_t)f->req_align, buf + f->buf_align, (size_t)f->req_align, (void *)1, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	if (f->cfg->file) {
		pread_file(f->path, back, (size_t)f->req_align, (uint64_t)f->req_align);
		assert_int_equal(check_pattern(back, (size_t)f->req_align, (uint64_t)f->req_align, 9), -1);
	}
}

static void unsupported_flags_are_einval(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, BLK);

	fx_open(f, 0);
	assert_int_equal(vdiskq_read(f->q, 0, buf, BLK, (void *)1, VDISK_REQ_FUA), 0);
	expect_fail(f, (void *)1, -EINVAL, "flags");
	assert_int_equal(vdiskq_write(f->q, 0, buf, BLK, (void *)2, VDISK_REQ_NO_UNMAP), 0);
	expect_fail(f, (void *)2, -EINVAL, "flags");
	assert_int_equal(vdiskq_write(f->q, 0, buf, BLK, (void *)3, 1u << 30), 0);
	expect_fail(f, (void *)3, -EINVAL, "flags");
	assert_int_equal(vdiskq_discard(f->q, 0, BLK, (void *)4, VDISK_REQ_NO_FALLBACK), 0);
	expect_fail(f, (void *)4, -EINVAL, "flags");
	assert_int_equal(vdiskq_flush(f->q, (void *)5, VDISK_REQ_FUA), 0);
	expect_fail(f, (void *)5, -EINVAL, "flags");
	assert_int_equal(vdiskq_write_zeroes(f->q, 0, BLK, (void *)6, 1u << 31), 0);
	expect_fail(f, (void *)6, -EINVAL, "flags");
	queue_still_works(f);
}

static void too_many_segments_is_einval(void **state)
{
	struct fx *f = *state;
	int max_seg = 0;
	struct iovec *iov;
	unsigned char *buf;
	size_t seg;

	fx_open(f, 0);
	assert_int_equal(vdisk_get_int(f->v, "max-segments", &max_seg), 0);
	assert_true(max_seg >= 1);
	if (max_seg > 65536) {
		print_message("max-segments %d: skipped\n", max_seg);
		skip();
	}
	seg = (size_t)f->buf_align;
	buf = fx_buf(f, seg * (size_t)(max_seg + 1));
	iov = calloc((size_t)max_seg + 1, sizeof(*iov));
	assert_non_null(iov);
	for (int i = 0; i <= max_seg; i++) {
		iov[i].iov_base = buf + (size_t)i * seg;
		iov[i].iov_len = seg;
	}
	assert_int_equal(vdiskq_readv(f->q, 0, iov, max_seg + 1, (void *)1, 0), 0);
	expect_fail(f, (void *)1, -EINVAL, "segments");
	assert_int_equal(vdiskq_readv(f->q, 0, iov, -1, (void *)2, 0), 0);
	expect_fail(f, (void *)2, -EINVAL, NULL);
	/* Exactly max-segments is fine (when the total is aligned). */
	if (((size_t)max_seg * seg) % (size_t)f->req_align == 0 && (uint64_t)max_seg * seg <= f->capacity) {
		assert_int_equal(vdiskq_readv(f->q, 0, iov, max_seg, (void *)3, 0), 0);
		assert_int_equal(wait_one(f->q, (void *)3, NULL), 0);
	}
	free(iov);
}

static void rejected_and_valid_requests_mixed_in_one_batch(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, 4 * BLK);
	struct vdisk_completion c[8];
	struct timespec t = ts_sec(FX_TIMEOUT_S);
	int seen = 0;

	fx_open(f, 0);
	assert_int_equal(vdiskq_read(f->q, 0, buf, BLK, (void *)1, 0), 0);
	assert_int_equal(vdiskq_read(f->q, f->capacity, buf + BLK, BLK, (void *)2, 0), 0);
	assert_int_equal(vdiskq_read(f->q, BLK, buf + 2 * BLK, BLK, (void *)3, 0), 0);
	assert_int_equal(vdiskq_write(f->q, 0, buf + 3 * BLK, BLK, (void *)4, VDISK_REQ_NO_UNMAP), 0);
	for (int got = 0; got < 4;) {
		int n = vdiskq_do_io(f->q, c, 1, 8, &t);

		assert_true(n >= 1);
		for (int i = 0; i < n; i++) {
			uintptr_t tag = (uintptr_t)c[i].user_data;

			assert_true(tag >= 1 && tag <= 4 && !(seen & (1 << tag)));
			seen |= 1 << tag;
			if (tag == 1 || tag == 3) {
				assert_int_equal(c[i].ret, 0);
				assert_null(c[i].error_msg);
			} else {
				assert_int_equal(c[i].ret, -EINVAL);
				assert_non_null(c[i].error_msg);
			}
		}
		got += n;
	}
}

/* Only a NULL queue is refused at enqueue time (no completion follows). */
static void zero_length_requests_complete_at_once(void **state)
{
	struct fx *f = *state;
	unsigned char *buf = fx_buf(f, BLK);
	struct iovec iov = { buf, 0 };

	fx_open(f, 0);
	memset(buf, 0x5a, BLK);
	assert_int_equal(vdiskq_read(f->q, 0, buf, 0, (void *)1, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	assert_int_equal(vdiskq_write(f->q, BLK, buf, 0, (void *)2, VDISK_REQ_FUA), 0);
	assert_int_equal(wait_one(f->q, (void *)2, NULL), 0);
	assert_int_equal(vdiskq_writev(f->q, f->capacity, &iov, 1, (void *)3, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)3, NULL), 0);
	assert_int_equal(vdiskq_discard(f->q, f->capacity, 0, (void *)4, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)4, NULL), 0);
	assert_int_equal(vdiskq_write_zeroes(f->q, 0, 0, (void *)5, VDISK_REQ_NO_FALLBACK), 0);
	assert_int_equal(wait_one(f->q, (void *)5, NULL), 0);
	/* Still validated: past capacity and bad flags fail even with nothing to transfer. */
	assert_int_equal(vdiskq_read(f->q, f->capacity + 1, buf, 0, (void *)6, 0), 0);
	expect_fail(f, (void *)6, -EINVAL, "capacity");
	assert_int_equal(vdiskq_discard(f->q, 0, 0, (void *)7, VDISK_REQ_FUA), 0);
	expect_fail(f, (void *)7, -EINVAL, "flags");
	assert_true(all_bytes(buf, BLK, 0x5a));
	if (f->cfg->file) {
		assert_int_equal(file_size(f->path), FX_FILE_SIZE);
		pread_file(f->path, buf, BLK, 0);
		assert_true(all_bytes(buf, BLK, 0));
	}
	queue_still_works(f);
}

static void null_queue_is_einval_at_enqueue(void **state)
{
	char buf[512];
	struct iovec iov = { buf, sizeof(buf) };

	assert_int_equal(vdiskq_read(NULL, 0, buf, sizeof(buf), NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_write(NULL, 0, buf, sizeof(buf), NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_readv(NULL, 0, &iov, 1, NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_writev(NULL, 0, &iov, 1, NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_flush(NULL, NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_discard(NULL, 0, 512, NULL, 0), -EINVAL);
	assert_int_equal(vdiskq_write_zeroes(NULL, 0, 512, NULL, 0), -EINVAL);
}

int main(void)
{
	struct CMUnitTest tests[128];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	tests[n++] = (struct CMUnitTest){ strdup("null_queue_is_einval_at_enqueue"), null_queue_is_einval_at_enqueue, NULL,
					  NULL, (void *)1 };
	ADD_CFG_TESTS(tests, n, past_capacity_is_einval, true);
	ADD_CFG_TESTS(tests, n, write_on_read_only_is_ebadf, true);
	ADD_CFG_TESTS(tests, n, unsupported_flags_are_einval, true);
	ADD_CFG_TESTS(tests, n, too_many_segments_is_einval, true);
	ADD_CFG_TESTS(tests, n, rejected_and_valid_requests_mixed_in_one_batch, true);
	ADD_CFG_TESTS(tests, n, zero_length_requests_complete_at_once, true);
	for (size_t i = 0; i < N_TEST_CFGS; i++) {
		const char *const names[] = { "misaligned_direct_io_is_einval", "direct_io_at_the_reported_alignment_works" };
		CMUnitTestFunction fns[] = { misaligned_direct_io_is_einval, direct_io_at_the_reported_alignment_works };

		if (!test_cfgs[i].direct)
			continue;
		for (int k = 0; k < 2; k++) {
			size_t len = strlen(names[k]) + strlen(test_cfgs[i].name) + 2;
			char *name = malloc(len);

			assert_non_null(name);
			snprintf(name, len, "%s/%s", names[k], test_cfgs[i].name);
			tests[n++] = (struct CMUnitTest){ name, fns[k], fx_setup, fx_teardown, (void *)&test_cfgs[i] };
		}
	}
	return run_cfg_tests("request-validation", tests, n);
}
