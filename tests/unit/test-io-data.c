/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The data path, for every file driver with and without O_DIRECT: what is
 * written is what the file holds and what is read back (single buffer and
 * vectored, small and large), flush and FUA succeed, discard and
 * write-zeroes read back as zeroes, and NO_UNMAP keeps the blocks allocated.
 */
#include "test-util.h"

#define KiB 1024u
#define MiB (1024u * 1024u)

static void write_then_read(struct fx *f, uint64_t off, size_t len, unsigned seed)
{
	unsigned char *r = malloc(len);
	void *wa = NULL, *ra = NULL;

	assert_non_null(r);
	assert_int_equal(posix_memalign(&wa, 4096, len), 0);
	assert_int_equal(posix_memalign(&ra, 4096, len), 0);
	fill_pattern(wa, len, off, seed);
	memset(ra, 0xee, len);
	assert_int_equal(vdiskq_write(f->q, off, wa, len, wa, 0), 0);
	assert_int_equal(wait_one(f->q, wa, NULL), 0);
	assert_int_equal(vdiskq_read(f->q, off, ra, len, ra, 0), 0);
	assert_int_equal(wait_one(f->q, ra, NULL), 0);
	if (check_pattern(ra, len, off, seed) != -1)
		fail_msg("read back %zu bytes at %" PRIu64 ": mismatch at +%ld", len, off, check_pattern(ra, len, off, seed));
	pread_file(f->path, r, len, off);
	if (check_pattern(r, len, off, seed) != -1)
		fail_msg("file content at %" PRIu64 " differs at +%ld", off, check_pattern(r, len, off, seed));
	free(wa);
	free(ra);
	free(r);
}

static void written_data_is_in_the_file_and_reads_back(void **state)
{
	struct fx *f = *state;

	fx_open(f, 0);
	write_then_read(f, 0, 4 * KiB, 1);
	write_then_read(f, 1 * MiB + 4 * KiB, 64 * KiB, 2);
	write_then_read(f, 3 * MiB, 1 * MiB, 3);
	write_then_read(f, 8 * MiB, 8 * MiB, 4); /* large: no max-transfer on files */
	write_then_read(f, f->capacity - 4 * KiB, 4 * KiB, 5); /* the very end */
}

static void data_written_to_the_file_is_read(void **state)
{
	struct fx *f = *state;
	unsigned char *w = fx_buf(f, 128 * KiB), *r = fx_buf(f, 128 * KiB);

	fill_pattern(w, 128 * KiB, 2 * MiB, 77);
	pwrite_file(f->path, w, 128 * KiB, 2 * MiB);
	fx_open(f, 0);
	memset(r, 0, 128 * KiB);
	assert_int_equal(vdiskq_read(f->q, 2 * MiB, r, 128 * KiB, r, 0), 0);
	assert_int_equal(wait_one(f->q, r, NULL), 0);
	assert_int_equal(check_pattern(r, 128 * KiB, 2 * MiB, 77), -1);
	/* Unwritten (sparse) ranges read as zeroes. */
	assert_int_equal(vdiskq_read(f->q, 20 * MiB, r, 128 * KiB, r, 0), 0);
	assert_int_equal(wait_one(f->q, r, NULL), 0);
	assert_true(all_bytes(r, 128 * KiB, 0));
}

static void vectored_io_uses_each_segment_in_order(void **state)
{
	struct fx *f = *state;
	/* Segments of unequal size, far apart, with poisoned gaps between them. */
	const size_t seg[3] = { 4 * KiB, 12 * KiB, 48 * KiB }, total = 64 * KiB, stride = 128 * KiB;
	unsigned char *w = fx_buf(f, 3 * stride), *r = fx_buf(f, 3 * stride), *flat = fx_buf(f, total);
	struct iovec wi[3], ri[3];
	const uint64_t off = 5 * MiB;
	size_t pos = 0;

	fx_open(f, 0);
	memset(w, 0xa5, 3 * stride);
	memset(r, 0xa5, 3 * stride);
	for (int i = 0; i < 3; i++) {
		/* Reverse order in memory, so "contiguous from iov[0]" is wrong. */
		wi[i].iov_base = w + (size_t)(2 - i) * stride;
		wi[i].iov_len = seg[i];
		fill_pattern(wi[i].iov_base, seg[i], off + pos, 31);
		pos += seg[i];
	}
	assert_int_equal(vdiskq_writev(f->q, off, wi, 3, wi, 0), 0);
	assert_int_equal(wait_one(f->q, wi, NULL), 0);
	pread_file(f->path, flat, total, off);
	assert_int_equal(check_pattern(flat, total, off, 31), -1);
	/* Read back split differently: 32 KiB, 16 KiB, 16 KiB. */
	ri[0].iov_base = r + stride;
	ri[0].iov_len = 32 * KiB;
	ri[1].iov_base = r;
	ri[1].iov_len = 16 * KiB;
	ri[2].iov_base = r + 2 * stride + 4 * KiB;
	ri[2].iov_len = 16 * KiB;
	assert_int_equal(vdiskq_readv(f->q, off, ri, 3, ri, 0), 0);
	assert_int_equal(wait_one(f->q, ri, NULL), 0);
	assert_int_equal(check_pattern(ri[0].iov_base, 32 * KiB, off, 31), -1);
	assert_int_equal(check_pattern(ri[1].iov_base, 16 * KiB, off + 32 * KiB, 31), -1);
	assert_int_equal(check_pattern(ri[2].iov_base, 16 * KiB, off + 48 * KiB, 31), -1);
	/* Nothing outside the segments was touched. */
	assert_true(all_bytes(r + 16 * KiB, stride - 16 * KiB, 0xa5));
	assert_true(all_bytes(r + stride + 32 * KiB, stride - 32 * KiB, 0xa5));
	assert_true(all_bytes(r + 2 * stride, 4 * KiB, 0xa5));
	assert_true(all_bytes(r + 2 * stride + 20 * KiB, stride - 20 * KiB, 0xa5));
}

static void flush_and_fua_succeed(void **state)
{
	struct fx *f = *state;
	unsigned char *w = fx_buf(f, 64 * KiB), *r = fx_buf(f, 64 * KiB);

	fx_open(f, 0);
	assert_int_equal(vdiskq_flush(f->q, (void *)1, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	fill_pattern(w, 64 * KiB, 0, 8);
	assert_int_equal(vdiskq_write(f->q, 0, w, 64 * KiB, (void *)2, VDISK_REQ_FUA), 0);
	assert_int_equal(wait_one(f->q, (void *)2, NULL), 0);
	pread_file(f->path, r, 64 * KiB, 0);
	assert_int_equal(check_pattern(r, 64 * KiB, 0, 8), -1);
	assert_int_equal(vdiskq_flush(f->q, (void *)3, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)3, NULL), 0);
}

static uint64_t allocated_bytes(const char *path)
{
	struct stat st;

	assert_int_equal(stat(path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

/* Is any byte of [off, off+len) backed by data according to SEEK_DATA? */
static bool has_data(const char *path, uint64_t off, uint64_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	off_t d;

	assert_true(fd >= 0);
	d = lseek(fd, (off_t)off, SEEK_DATA);
	close(fd);
	if (d < 0) {
		assert_int_equal(errno, ENXIO);
		return false;
	}
	return (uint64_t)d < off + len;
}

static void write_pattern_and_sync(struct fx *f, uint64_t off, size_t len)
{
	void *a = NULL;

	assert_int_equal(posix_memalign(&a, 4096, len), 0);
	fill_pattern(a, len, off, 44);
	assert_int_equal(vdiskq_write(f->q, off, a, len, a, VDISK_REQ_FUA), 0);
	assert_int_equal(wait_one(f->q, a, NULL), 0);
	free(a);
}

static void assert_zeroes(struct fx *f, uint64_t off, size_t len)
{
	void *r = NULL;

	assert_int_equal(posix_memalign(&r, 4096, len), 0);
	memset(r, 0x99, len);
	assert_int_equal(vdiskq_read(f->q, off, r, len, r, 0), 0);
	assert_int_equal(wait_one(f->q, r, NULL), 0);
	if (!all_bytes(r, len, 0))
		fail_msg("%zu bytes at %" PRIu64 " do not read back as zeroes through %s", len, off, f->cfg->name);
	pread_file(f->path, r, len, off);
	if (!all_bytes(r, len, 0))
		fail_msg("%zu bytes at %" PRIu64 " are not zero in the file", len, off);
	free(r);
}

static void discard_punches_a_hole_that_reads_as_zeroes(void **state)
{
	struct fx *f = *state;

	fx_open(f, 0);
	write_pattern_and_sync(f, 4 * MiB, 1 * MiB);
	assert_true(has_data(f->path, 4 * MiB, 1 * MiB));
	assert_int_equal(vdiskq_discard(f->q, 4 * MiB, 1 * MiB, (void *)1, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	assert_false(has_data(f->path, 4 * MiB, 1 * MiB));
	assert_zeroes(f, 4 * MiB, 1 * MiB);
	/* The file keeps its size. */
	{
		struct stat st;

		assert_int_equal(stat(f->path, &st), 0);
		assert_int_equal(st.st_size, FX_FILE_SIZE);
	}
}

static void write_zeroes_reads_back_as_zeroes(void **state)
{
	struct fx *f = *state;
	const uint32_t flag_sets[] = { 0, VDISK_REQ_FUA, VDISK_REQ_NO_FALLBACK, VDISK_REQ_NO_UNMAP,
				       VDISK_REQ_NO_UNMAP | VDISK_REQ_NO_FALLBACK | VDISK_REQ_FUA };
	unsigned char *around = fx_buf(f, 64 * KiB);

	fx_open(f, 0);
	for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
		uint64_t off = (uint64_t)(8 + 2 * i) * MiB;
		const char *msg = NULL;
		int ret;

		write_pattern_and_sync(f, off, 1 * MiB);
		assert_int_equal(vdiskq_write_zeroes(f->q, off + 64 * KiB, 512 * KiB, (void *)(uintptr_t)(i + 1), flag_sets[i]), 0);
		ret = wait_one(f->q, (void *)(uintptr_t)(i + 1), &msg);
		if (ret == -ENOTSUP && (flag_sets[i] & VDISK_REQ_NO_FALLBACK)) {
			print_message("write-zeroes flags 0x%x: -ENOTSUP (no fast path here)\n", flag_sets[i]);
			continue;
		}
		if (ret != 0)
			fail_msg("write-zeroes with flags 0x%x failed: %d %s", flag_sets[i], ret, msg);
		assert_zeroes(f, off + 64 * KiB, 512 * KiB);
		/* Around it the data is intact. */
		pread_file(f->path, around, 64 * KiB, off);
		assert_int_equal(check_pattern(around, 64 * KiB, off, 44), -1);
		pread_file(f->path, around, 64 * KiB, off + 576 * KiB);
		assert_int_equal(check_pattern(around, 64 * KiB, off + 576 * KiB, 44), -1);
	}
}

static void write_zeroes_no_unmap_keeps_blocks_allocated(void **state)
{
	struct fx *f = *state;
	uint64_t before, after;

	fx_open(f, 0);
	write_pattern_and_sync(f, 16 * MiB, 4 * MiB);
	before = allocated_bytes(f->path);
	assert_true(before >= 4 * MiB);
	assert_int_equal(vdiskq_write_zeroes(f->q, 16 * MiB, 4 * MiB, (void *)1, VDISK_REQ_NO_UNMAP), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	assert_int_equal(vdiskq_flush(f->q, (void *)2, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)2, NULL), 0);
	after = allocated_bytes(f->path);
	/* A punched hole would free 4 MiB; allow for a little metadata churn. */
	if (after + 256 * KiB < before)
		fail_msg("NO_UNMAP write-zeroes deallocated: %" PRIu64 " -> %" PRIu64 " bytes allocated", before, after);
	assert_zeroes(f, 16 * MiB, 4 * MiB);
}

int main(void)
{
	struct CMUnitTest tests[128];
	size_t n = 0;

	memset(tests, 0, sizeof(tests));
	ADD_CFG_TESTS(tests, n, written_data_is_in_the_file_and_reads_back, false);
	ADD_CFG_TESTS(tests, n, data_written_to_the_file_is_read, false);
	ADD_CFG_TESTS(tests, n, vectored_io_uses_each_segment_in_order, false);
	ADD_CFG_TESTS(tests, n, flush_and_fua_succeed, false);
	ADD_CFG_TESTS(tests, n, discard_punches_a_hole_that_reads_as_zeroes, false);
	ADD_CFG_TESTS(tests, n, write_zeroes_reads_back_as_zeroes, false);
	ADD_CFG_TESTS(tests, n, write_zeroes_no_unmap_keeps_blocks_allocated, false);
	return run_cfg_tests("io-data", tests, n);
}
