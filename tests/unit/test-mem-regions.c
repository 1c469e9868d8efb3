/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Memory regions: vdisk_alloc_mem_region() hands out memfd-backed memory
 * aligned for every driver; map/unmap keep a table in which regions may not
 * overlap and which holds at most max-mem-regions; free unmaps; and every
 * driver does I/O to and from mapped regions.
 */
#include <sys/mman.h>

#include "test-util.h"

static struct vdisk *null_connected(void)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	assert_int_equal(vdisk_connect(v), 0);
	return v;
}

static void alloc_needs_connect_and_nonzero_length(void **state)
{
	struct vdisk *v = NULL;
	struct vdisk_mem_region r = { .fd = -1 };
	int ret;

	assert_int_equal(vdisk_create("null", &v), 0);
	ret = vdisk_alloc_mem_region(v, &r, 4096);
	if (ret != -EBUSY && ret != -EINVAL)
		fail_msg("alloc before connect returned %d, expected -EBUSY/-EINVAL", ret);
	assert_msg_contains("vdisk_alloc_mem_region");
	assert_null(r.addr);
	vdisk_destroy(&v);

	v = null_connected();
	assert_int_equal(vdisk_alloc_mem_region(v, &r, 0), -EINVAL);
	assert_msg_contains("vdisk_alloc_mem_region");
	assert_int_equal(vdisk_alloc_mem_region(v, NULL, 4096), -EINVAL);
	assert_int_equal(vdisk_alloc_mem_region(v, &r, SIZE_MAX), -EINVAL);
	vdisk_destroy(&v);
}

static void alloc_is_aligned_rounded_and_memfd_backed(void **state)
{
	struct vdisk *v = null_connected();
	struct vdisk_mem_region r;
	uint64_t align = 0;
	int buf_align = 0;
	unsigned char *p, back[16];

	assert_int_equal(vdisk_get_uint64(v, "mem-region-alignment", &align), 0);
	assert_int_equal(vdisk_get_int(v, "buf-alignment", &buf_align), 0);
	assert_true(align >= 1 && (align & (align - 1)) == 0);
	assert_int_equal(vdisk_alloc_mem_region(v, &r, 1), 0);
	assert_non_null(r.addr);
	assert_int_equal(r.len, align); /* rounded up */
	assert_int_equal((uintptr_t)r.addr % align, 0);
	assert_int_equal((uintptr_t)r.addr % (uintptr_t)buf_align, 0);
	assert_true(r.fd >= 0);
	assert_true(r.fd_offset >= 0);
	/* The fd is the memory: what is written through one is read through the other. */
	p = r.addr;
	memcpy(p + 100, "vdisk-region", 12);
	assert_int_equal(pread(r.fd, back, 12, r.fd_offset + 100), 12);
	assert_memory_equal(back, "vdisk-region", 12);
	assert_int_equal(pwrite(r.fd, "FD", 2, r.fd_offset), 2);
	assert_memory_equal(p, "FD", 2);
	vdisk_free_mem_region(v, &r);
	assert_null(r.addr);
	vdisk_free_mem_region(v, &r); /* freeing twice is harmless */
	vdisk_destroy(&v);
}

static void map_rejects_overlap_and_misalignment(void **state)
{
	struct vdisk *v = null_connected();
	struct vdisk_mem_region r, half, other, bad;
	uint64_t align = 0;

	assert_int_equal(vdisk_get_uint64(v, "mem-region-alignment", &align), 0);
	assert_int_equal(vdisk_alloc_mem_region(v, &r, 4 * align), 0);
	assert_int_equal(vdisk_alloc_mem_region(v, &other, align), 0);
	assert_int_equal(vdisk_map_mem_region(v, &r), 0);
	/* The same region again. */
	assert_int_equal(vdisk_map_mem_region(v, &r), -EINVAL);
	assert_msg_contains("overlap");
	/* Its second half, and a range sticking out of its end. */
	half = r;
	half.addr = (char *)r.addr + 2 * align;
	half.len = 2 * align;
	half.fd_offset = r.fd_offset + (int64_t)(2 * align);
	assert_int_equal(vdisk_map_mem_region(v, &half), -EINVAL);
	half.addr = (char *)r.addr + 3 * align;
	half.len = 4 * align;
	assert_int_equal(vdisk_map_mem_region(v, &half), -EINVAL);
	/* A different region is fine. */
	assert_int_equal(vdisk_map_mem_region(v, &other), 0);
	/* Misaligned address or length. */
	if (align > 1) {
		vdisk_unmap_mem_region(v, &other);
		bad = other;
		bad.addr = (char *)other.addr + 1;
		bad.len = align - 1;
		assert_int_equal(vdisk_map_mem_region(v, &bad), -EINVAL);
		assert_msg_contains("alignment");
		bad = other;
		bad.len = align / 2;
		assert_int_equal(vdisk_map_mem_region(v, &bad), -EINVAL);
	}
	bad = other;
	bad.len = 0;
	assert_int_equal(vdisk_map_mem_region(v, &bad), -EINVAL);
	assert_int_equal(vdisk_map_mem_region(v, NULL), -EINVAL);
	/* Unmapped, the range can be mapped again. */
	vdisk_unmap_mem_region(v, &r);
	assert_int_equal(vdisk_map_mem_region(v, &r), 0);
	vdisk_free_mem_region(v, &r);
	vdisk_free_mem_region(v, &other);
	vdisk_destroy(&v);
}

static void map_before_connect_is_ebusy(void **state)
{
	struct vdisk *v = NULL;
	struct vdisk_mem_region r = { .fd = -1 };
	long page = sysconf(_SC_PAGESIZE);

	assert_int_equal(vdisk_create("null", &v), 0);
	r.addr = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(r.addr != MAP_FAILED);
	r.len = (size_t)page;
	assert_int_equal(vdisk_map_mem_region(v, &r), -EBUSY);
	assert_msg_contains("vdisk_map_mem_region");
	munmap(r.addr, r.len);
	vdisk_destroy(&v);
}

static void map_limit_is_enospc_and_free_unmaps(void **state)
{
	struct vdisk *v = null_connected();
	struct vdisk_mem_region big, piece, last;
	uint64_t max = 0, align = 0;

	assert_int_equal(vdisk_get_uint64(v, "max-mem-regions", &max), 0);
	assert_int_equal(vdisk_get_uint64(v, "mem-region-alignment", &align), 0);
	if (max == 0 || max > 65536) {
		print_message("max-mem-regions %" PRIu64 ": skipped\n", max);
		vdisk_destroy(&v);
		skip();
	}
	/* max - 1 slices of one big region, plus one region of its own: full. */
	assert_int_equal(vdisk_alloc_mem_region(v, &big, (size_t)(max * align)), 0);
	assert_int_equal(vdisk_alloc_mem_region(v, &last, (size_t)align), 0);
	for (uint64_t i = 0; i < max - 1; i++) {
		piece = big;
		piece.addr = (char *)big.addr + i * align;
		piece.len = (size_t)align;
		piece.fd_offset = big.fd_offset + (int64_t)(i * align);
		assert_int_equal(vdisk_map_mem_region(v, &piece), 0);
	}
	assert_int_equal(vdisk_map_mem_region(v, &last), 0);
	piece = big;
	piece.addr = (char *)big.addr + (max - 1) * align;
	piece.len = (size_t)align;
	piece.fd_offset = big.fd_offset + (int64_t)((max - 1) * align);
	assert_int_equal(vdisk_map_mem_region(v, &piece), -ENOSPC);
	assert_msg_contains("max-mem-regions");
	/* Freeing a mapped region unmaps it, which makes room. */
	vdisk_free_mem_region(v, &last);
	assert_int_equal(vdisk_map_mem_region(v, &piece), 0);
	vdisk_destroy(&v); /* with regions still mapped: no leak, no crash */
	munmap(big.addr, big.len);
	close(big.fd);
}

/* ---- I/O through regions, every driver ---- */

static void io_through_mapped_regions(void **state)
{
	struct fx *f = *state;
	struct vdisk_mem_region *w = &f->regions[0], *r = &f->regions[1];
	const size_t len = 1 << 20;
	unsigned char *wp, *rp;
	struct iovec iov[2];

	fx_open(f, 0);
	assert_int_equal(vdisk_alloc_mem_region(f->v, w, len), 0);
	assert_int_equal(vdisk_alloc_mem_region(f->v, r, len), 0);
	assert_int_equal(vdisk_map_mem_region(f->v, w), 0);
	assert_int_equal(vdisk_map_mem_region(f->v, r), 0);
	wp = w->addr;
	rp = r->addr;
	fill_pattern(wp, len, 1 << 20, 21);
	memset(rp, 0xff, len);
	/* Whole region, then a slice in the middle of it (io_uring: fixed buffer + offset). */
	assert_int_equal(vdiskq_write(f->q, 1 << 20, wp, len, (void *)1, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	assert_int_equal(vdiskq_read(f->q, (1 << 20) + 65536, rp + 131072, 65536, (void *)2, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)2, NULL), 0);
	/* Vectored, two regions. */
	iov[0].iov_base = rp;
	iov[0].iov_len = 65536;
	iov[1].iov_base = wp + 262144;
	iov[1].iov_len = 65536;
	assert_int_equal(vdiskq_readv(f->q, 1 << 20, iov, 2, (void *)3, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)3, NULL), 0);
	if (f->cfg->file) {
		assert_int_equal(check_pattern(rp + 131072, 65536, (1 << 20) + 65536, 21), -1);
		assert_int_equal(check_pattern(rp, 65536, 1 << 20, 21), -1);
		assert_int_equal(check_pattern(wp + 262144, 65536, (1 << 20) + 65536, 21), -1);
	}
	/* Unmapped regions still work as plain memory. */
	vdisk_unmap_mem_region(f->v, r);
	memset(rp, 0, len);
	assert_int_equal(vdiskq_read(f->q, 1 << 20, rp, len, (void *)4, 0), 0);
	assert_int_equal(wait_one(f->q, (void *)4, NULL), 0);
	if (f->cfg->file)
		assert_int_equal(check_pattern(rp, len, 1 << 20, 21), -1);
}

static void map_after_start_is_allowed(void **state)
{
	struct fx *f = *state;
	struct vdisk_mem_region *m = &f->regions[0];

	fx_open(f, 0);
	assert_int_equal(vdisk_alloc_mem_region(f->v, m, 65536), 0);
	assert_int_equal(vdisk_map_mem_region(f->v, m), 0);
	memset(m->addr, 0x3c, 65536);
	assert_int_equal(vdiskq_write(f->q, 0, m->addr, 65536, (void *)1, VDISK_REQ_FUA), 0);
	assert_int_equal(wait_one(f->q, (void *)1, NULL), 0);
	vdisk_unmap_mem_region(f->v, m);
	vdisk_unmap_mem_region(f->v, m); /* unmapping twice is harmless */
	if (f->cfg->file) {
		unsigned char *b = fx_buf(f, 65536);

		pread_file(f->path, b, 65536, 0);
		assert_true(all_bytes(b, 65536, 0x3c));
	}
}

int main(void)
{
	struct CMUnitTest tests[64] = {
		cmocka_unit_test(alloc_needs_connect_and_nonzero_length),
		cmocka_unit_test(alloc_is_aligned_rounded_and_memfd_backed),
		cmocka_unit_test(map_rejects_overlap_and_misalignment),
		cmocka_unit_test(map_before_connect_is_ebusy),
		cmocka_unit_test(map_limit_is_enospc_and_free_unmaps),
	};
	size_t n = 5;

	ADD_CFG_TESTS(tests, n, io_through_mapped_regions, true);
	ADD_CFG_TESTS(tests, n, map_after_start_is_allowed, true);
	return run_cfg_tests("mem-regions", tests, n);
}
