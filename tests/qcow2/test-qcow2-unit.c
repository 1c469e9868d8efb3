/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the qcow2 pure helpers: refcount entries of every width,
 * L1/L2 arithmetic, subcluster classification, compressed descriptors,
 * header / extension / snapshot-table parsing and serialisation, and the
 * zlib / zstd codecs.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "qcow2.h"

/* ---- refcounts ----------------------------------------------------------- */

static void test_rc_all_widths(void **state)
{
	(void)state;
	for (uint32_t order = 0; order <= 6; order++) {
		uint8_t blk[512];
		uint64_t entries = sizeof(blk) * 8 >> order;
		uint64_t max = order == 6 ? UINT64_MAX : (UINT64_C(1) << (1u << order)) - 1;

		memset(blk, 0, sizeof(blk));
		for (uint64_t i = 0; i < entries; i++)
			qcow2_rc_set(blk, order, i, (i * 7 + 3) & max);
		for (uint64_t i = 0; i < entries; i++)
			assert_int_equal(qcow2_rc_get(blk, order, i), (i * 7 + 3) & max);
		/* Setting one entry leaves its neighbours alone. */
		qcow2_rc_set(blk, order, 5, max);
		assert_int_equal(qcow2_rc_get(blk, order, 4), (4 * 7 + 3) & max);
		assert_int_equal(qcow2_rc_get(blk, order, 5), max);
		assert_int_equal(qcow2_rc_get(blk, order, 6), (6 * 7 + 3) & max);
	}
}

static void test_rc_bit_order(void **state)
{
	uint8_t b[4] = { 0 };

	(void)state;
	/* Sub-byte widths: entry 0 is in the least significant bits. */
	qcow2_rc_set(b, 0, 0, 1);
	assert_int_equal(b[0], 0x01);
	qcow2_rc_set(b, 0, 7, 1);
	assert_int_equal(b[0], 0x81);
	memset(b, 0, 4);
	qcow2_rc_set(b, 1, 1, 3);
	assert_int_equal(b[0], 0x0c);
	memset(b, 0, 4);
	qcow2_rc_set(b, 2, 1, 0xa);
	assert_int_equal(b[0], 0xa0);
	memset(b, 0, 4);
	qcow2_rc_set(b, 4, 1, 0x1234);
	assert_int_equal(b[2], 0x12);
	assert_int_equal(b[3], 0x34);
}

/* ---- geometry -------------------------------------------------------------- */

static void test_size_to_l1(void **state)
{
	(void)state;
	/* 64k clusters: one L2 table maps 8192 * 64k = 512 MiB. */
	assert_int_equal(qcow2_size_to_l1(16, 13, 0), 0);
	assert_int_equal(qcow2_size_to_l1(16, 13, 1), 1);
	assert_int_equal(qcow2_size_to_l1(16, 13, 512ULL << 20), 1);
	assert_int_equal(qcow2_size_to_l1(16, 13, (512ULL << 20) + 1), 2);
	assert_int_equal(qcow2_size_to_l1(16, 13, 1ULL << 40), 2048);
	/* extended L2: 4096 entries per table. */
	assert_int_equal(qcow2_size_to_l1(16, 12, 1ULL << 30), 4);
	/* 512-byte clusters. */
	assert_int_equal(qcow2_size_to_l1(9, 6, 1ULL << 20), 32);
}

static void test_guest_offset_split(void **state)
{
	struct qcow2_state s;

	(void)state;
	memset(&s, 0, sizeof(s));
	/* 64k clusters, extended L2: 4096 entries per table, 2k subclusters. */
	s.cluster_bits = 16;
	s.cluster_size = 65536;
	s.l2_bits = 12;
	s.l2_size = 4096;
	s.sc_bits = 11;
	s.extl2 = true;
	s.l2_entry_size = 16;
	uint64_t off = (3ULL << 28) + (5ULL << 16) + 7 * 2048 + 100;
	assert_int_equal(qcow2_l1_index(&s, off), 3);
	assert_int_equal(qcow2_l2_index(&s, off), 5);
	assert_int_equal(qcow2_sc_index(&s, off), 7);
	assert_int_equal(qcow2_offset_into_cluster(&s, off), 7 * 2048 + 100);
	assert_int_equal(qcow2_start_of_cluster(&s, off), off - 7 * 2048 - 100);
	assert_int_equal(qcow2_size_to_clusters(&s, 65537), 2);
	/* Entry accessors on a raw big-endian table. */
	uint8_t tbl[64] = { 0 };
	qcow2_l2_set(&s, tbl, 2, 0x8000000000050000ULL, 0x0000000300000004ULL);
	assert_int_equal(qcow2_l2_entry(&s, tbl, 2), 0x8000000000050000ULL);
	assert_int_equal(qcow2_l2_bitmap(&s, tbl, 2), 0x0000000300000004ULL);
	assert_int_equal(tbl[32], 0x80);
	assert_int_equal(tbl[47], 0x04);
	s.extl2 = false;
	s.l2_entry_size = 8;
	qcow2_l2_set(&s, tbl, 1, 0x1234, 0xffff);
	assert_int_equal(qcow2_l2_entry(&s, tbl, 1), 0x1234);
	assert_int_equal(qcow2_l2_bitmap(&s, tbl, 1), 0);
	assert_int_equal(qcow2_entry_host(0x8000000000050001ULL), 0x50000);
	assert_int_equal(qcow2_entry_host(QCOW2_OFLAG_COMPRESSED | 0x50000), 0);
}

static void test_sc_type(void **state)
{
	const uint64_t host = 0x50000;

	(void)state;
	/* Standard entries. */
	assert_int_equal(qcow2_sc_type(false, 0, 0, 0), QCOW2_SC_UNALLOC_PLAIN);
	assert_int_equal(qcow2_sc_type(false, host | QCOW2_OFLAG_COPIED, 0, 0), QCOW2_SC_NORMAL);
	assert_int_equal(qcow2_sc_type(false, QCOW2_OFLAG_ZERO, 0, 0), QCOW2_SC_ZERO_PLAIN);
	assert_int_equal(qcow2_sc_type(false, host | QCOW2_OFLAG_ZERO, 0, 0), QCOW2_SC_ZERO_ALLOC);
	assert_int_equal(qcow2_sc_type(false, QCOW2_OFLAG_COMPRESSED | 0x1234, 0, 0), QCOW2_SC_COMPRESSED);
	/* Extended entries. */
	assert_int_equal(qcow2_sc_type(true, host, 1, 0), QCOW2_SC_NORMAL);
	assert_int_equal(qcow2_sc_type(true, host, 1, 1), QCOW2_SC_UNALLOC_ALLOC);
	assert_int_equal(qcow2_sc_type(true, host, UINT64_C(1) << 33, 1), QCOW2_SC_ZERO_ALLOC);
	assert_int_equal(qcow2_sc_type(true, 0, UINT64_C(1) << 33, 1), QCOW2_SC_ZERO_PLAIN);
	assert_int_equal(qcow2_sc_type(true, 0, 0, 31), QCOW2_SC_UNALLOC_PLAIN);
	assert_int_equal(qcow2_sc_type(true, 0, 1, 0), QCOW2_SC_INVALID);
	assert_int_equal(qcow2_sc_type(true, host, 1 | (UINT64_C(1) << 32), 0), QCOW2_SC_INVALID);
	assert_int_equal(qcow2_sc_type(true, host, UINT64_C(1) << 31, 31), QCOW2_SC_NORMAL);
}

static void test_compressed_descriptor(void **state)
{
	struct qcow2_state s;

	(void)state;
	for (uint32_t cb = 9; cb <= 21; cb++) {
		memset(&s, 0, sizeof(s));
		s.cluster_bits = cb;
		s.cluster_size = 1u << cb;
		s.csize_shift = 62 - (cb - 8);
		s.csize_mask = (UINT64_C(1) << (cb - 8)) - 1;
		s.cluster_offset_mask = (UINT64_C(1) << s.csize_shift) - 1;
		for (uint64_t off = 0x100000; off < 0x100000 + 1200; off += 97) {
			for (uint64_t len = 1; len < s.cluster_size; len = len * 3 + 1) {
				uint64_t e = qcow2_compressed_encode(&s, off, len), co, cs, rs, rl;
				qcow2_compressed_decode(&s, e, &co, &cs, &rs, &rl);
				assert_true(e & QCOW2_OFLAG_COMPRESSED);
				assert_int_equal(co, off);
				assert_true(cs >= len);          /* covers the data */
				assert_true(cs - len < 512);     /* within the last sector */
				assert_int_equal(rs, off & ~511ULL);
				assert_int_equal(rs + rl, ((off + len + 511) & ~511ULL));
			}
		}
	}
}

/* ---- header parsing ---------------------------------------------------------- */

static void make_header(uint8_t *b, uint32_t version, uint32_t cluster_bits, uint64_t size)
{
	memset(b, 0, 4096);
	st_be32(b, QCOW2_MAGIC);
	st_be32(b + 4, version);
	st_be32(b + 20, cluster_bits);
	st_be64(b + 24, size);
	st_be32(b + 36, 1);                               /* l1_size */
	st_be64(b + 40, 3ULL << cluster_bits);            /* l1_table_offset */
	st_be64(b + 48, 1ULL << cluster_bits);            /* refcount_table_offset */
	st_be32(b + 56, 1);                               /* refcount_table_clusters */
	if (version == 3) {
		st_be32(b + 96, 4);
		st_be32(b + 100, 112);
	}
}

static void test_parse_header_ok(void **state)
{
	uint8_t b[4096];
	struct qcow2_header h;

	(void)state;
	make_header(b, 3, 16, 1 << 20);
	assert_int_equal(qcow2_parse_header(b, sizeof(b), &h), 0);
	assert_int_equal(h.version, 3);
	assert_int_equal(h.cluster_bits, 16);
	assert_int_equal(h.refcount_order, 4);
	assert_int_equal(h.header_length, 112);
	assert_int_equal(qcow2_validate_header(&h, 1 << 20), 0);
	make_header(b, 2, 12, 1 << 20);
	assert_int_equal(qcow2_parse_header(b, sizeof(b), &h), 0);
	assert_int_equal(h.refcount_order, 4);
	assert_int_equal(h.header_length, 72);
	assert_int_equal(qcow2_validate_header(&h, 1 << 20), 0);
}

static void expect_bad(uint8_t *b, uint64_t file_size, int err, const char *needle)
{
	struct qcow2_header h;
	int ret = qcow2_parse_header(b, 4096, &h);

	if (ret == 0)
		ret = qcow2_validate_header(&h, file_size);
	assert_int_equal(ret, -err);
	if (needle && !strstr(vdisk_get_error_msg(), needle)) {
		fprintf(stderr, "message '%s' lacks '%s'\n", vdisk_get_error_msg(), needle);
		fail();
	}
}

static void test_parse_header_bad(void **state)
{
	uint8_t b[4096];

	(void)state;
	make_header(b, 3, 16, 1 << 20);
	b[0] = 'X';
	expect_bad(b, 1 << 20, EINVAL, "magic");
	make_header(b, 4, 16, 1 << 20);
	expect_bad(b, 1 << 20, ENOTSUP, "version");
	make_header(b, 3, 8, 1 << 20);
	expect_bad(b, 1 << 20, EINVAL, "cluster_bits");
	make_header(b, 3, 22, 1 << 20);
	expect_bad(b, 1 << 20, EINVAL, "cluster_bits");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 100, 100);
	expect_bad(b, 1 << 20, EINVAL, "header_length");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 100, 108);
	expect_bad(b, 1 << 20, EINVAL, "multiple of 8");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 96, 7);
	expect_bad(b, 1 << 20, EINVAL, "refcount_order");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 32, 1);
	expect_bad(b, 1 << 20, ENOTSUP, "crypt");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 36, 0x7fffffff);
	expect_bad(b, 1 << 20, EFBIG, "l1_size");
	make_header(b, 3, 16, 1ULL << 40);
	expect_bad(b, 1 << 20, EINVAL, "too small");
	make_header(b, 3, 16, 1 << 20);
	st_be64(b + 40, 0x30001);
	expect_bad(b, 1 << 20, EINVAL, "l1_table_offset");
	make_header(b, 3, 16, 1 << 20);
	st_be64(b + 40, 1ULL << 40);
	expect_bad(b, 1 << 20, EINVAL, "past the end");
	make_header(b, 3, 16, 1 << 20);
	st_be64(b + 48, 0x10200);
	expect_bad(b, 1 << 20, EINVAL, "refcount_table_offset");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 56, 1000);
	expect_bad(b, 1 << 20, EFBIG, "refcount_table_clusters");
	make_header(b, 3, 16, 1 << 20);
	st_be64(b + 48, 3ULL << 16); /* same as L1 */
	expect_bad(b, 1 << 20, EINVAL, "overlaps");
	make_header(b, 3, 16, 1 << 20);
	st_be64(b + 8, 0x200);
	st_be32(b + 16, 2000);
	expect_bad(b, 1 << 20, EINVAL, "backing_file_size");
	make_header(b, 3, 16, 1 << 20);
	st_be32(b + 60, 100000);
	expect_bad(b, 1 << 20, EINVAL, "nb_snapshots");
	make_header(b, 3, 12, 1 << 20);
	st_be64(b + 72, QCOW2_INCOMPAT_EXTL2);
	expect_bad(b, 1 << 20, EINVAL, "extended L2");
	make_header(b, 3, 16, 1 << 20);
	b[104] = 1; /* zstd without the feature bit */
	expect_bad(b, 1 << 20, EINVAL, "compression");
	make_header(b, 3, 16, 1 << 20);
	b[104] = 9;
	st_be64(b + 72, QCOW2_INCOMPAT_COMPRESSION);
	expect_bad(b, 1 << 20, ENOTSUP, "compression_type");
	/* Too short. */
	{
		struct qcow2_header h;
		make_header(b, 3, 16, 1 << 20);
		assert_int_equal(qcow2_parse_header(b, 50, &h), -EINVAL);
		assert_int_equal(qcow2_parse_header(b, 90, &h), -EINVAL);
	}
}

static void test_header_roundtrip(void **state)
{
	uint8_t *b = calloc(1, 65536);
	struct qcow2_header h, h2;
	struct qcow2_ext_info x, x2;
	struct qcow2_ext *u = calloc(1, sizeof(*u));

	(void)state;
	memset(&h, 0, sizeof(h));
	h.magic = QCOW2_MAGIC;
	h.version = 3;
	h.cluster_bits = 16;
	h.size = 1ULL << 30;
	h.l1_size = 2;
	h.l1_table_offset = 0x30000;
	h.refcount_table_offset = 0x10000;
	h.refcount_table_clusters = 1;
	h.refcount_order = 4;
	h.compatible_features = QCOW2_COMPAT_LAZY_REFCOUNTS;
	h.incompatible_features = QCOW2_INCOMPAT_COMPRESSION;
	h.compression_type = QCOW2_COMPRESSION_ZSTD;
	memset(&x, 0, sizeof(x));
	u->type = 0x12345678;
	u->len = 5;
	u->data = (uint8_t *)strdup("hello");
	x.unknown = u;
	assert_int_equal(qcow2_build_header(&h, &x, "base.qcow2", "qcow2", b, 65536), 0);
	assert_int_equal(qcow2_parse_header(b, 65536, &h2), 0);
	assert_int_equal(qcow2_validate_header(&h2, 1 << 20), 0);
	assert_int_equal(h2.size, h.size);
	assert_int_equal(h2.compression_type, QCOW2_COMPRESSION_ZSTD);
	assert_int_equal(h2.compatible_features, QCOW2_COMPAT_LAZY_REFCOUNTS);
	assert_int_equal(h2.backing_file_size, 10);
	assert_memory_equal(b + h2.backing_file_offset, "base.qcow2", 10);
	assert_int_equal(qcow2_parse_extensions(b, 65536, &h2, &x2), 0);
	assert_true(x2.has_backing_format);
	assert_string_equal(x2.backing_format, "qcow2");
	assert_true(x2.nb_features >= 5);
	assert_non_null(x2.unknown);
	assert_int_equal(x2.unknown->type, 0x12345678);
	assert_int_equal(x2.unknown->len, 5);
	assert_memory_equal(x2.unknown->data, "hello", 5);
	qcow2_ext_info_free(&x2);
	/* Does not fit in a 512-byte cluster with a long backing name. */
	{
		char name[600];
		memset(name, 'a', sizeof(name) - 1);
		name[sizeof(name) - 1] = 0;
		h.cluster_bits = 9;
		assert_int_equal(qcow2_build_header(&h, &x, name, NULL, b, 512), -ENOSPC);
		/* A short name fits; the optional feature table is then left out. */
		qcow2_ext_info_free(&x);
		memset(&x, 0, sizeof(x));
		assert_int_equal(qcow2_build_header(&h, &x, "base.qcow2", "qcow2", b, 512), 0);
		assert_int_equal(qcow2_parse_header(b, 512, &h2), 0);
		assert_int_equal(qcow2_parse_extensions(b, 512, &h2, &x2), 0);
		assert_int_equal(x2.nb_features, 0);
		assert_string_equal(x2.backing_format, "qcow2");
		qcow2_ext_info_free(&x2);
	}
	qcow2_ext_info_free(&x);
	free(b);
}

static void test_extension_too_large(void **state)
{
	uint8_t b[4096];
	struct qcow2_header h;
	struct qcow2_ext_info x;

	(void)state;
	make_header(b, 3, 12, 1 << 20);
	st_be32(b + 112, QCOW2_EXT_BACKING_FORMAT);
	st_be32(b + 116, 5000);
	assert_int_equal(qcow2_parse_header(b, sizeof(b), &h), 0);
	assert_int_equal(qcow2_parse_extensions(b, sizeof(b), &h, &x), -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "too large"));
	st_be32(b + 116, 40); /* backing format name longer than 31 */
	assert_int_equal(qcow2_parse_extensions(b, sizeof(b), &h, &x), -EINVAL);
	st_be32(b + 112, QCOW2_EXT_BITMAPS);
	st_be32(b + 116, 8);
	assert_int_equal(qcow2_parse_extensions(b, sizeof(b), &h, &x), -EINVAL);
}

/* ---- snapshot table ------------------------------------------------------------ */

static void test_snapshot_roundtrip(void **state)
{
	struct qcow2_snapshot sn[2], *out = NULL;
	uint64_t used = 0;
	uint8_t *buf;
	size_t size;

	(void)state;
	memset(sn, 0, sizeof(sn));
	sn[0].l1_table_offset = 0x40000;
	sn[0].l1_size = 3;
	sn[0].id = "1";
	sn[0].name = "first";
	sn[0].date_sec = 1000;
	sn[0].vm_state_size = 1ULL << 33;
	sn[0].disk_size = 1 << 30;
	sn[0].icount = UINT64_MAX;
	sn[1] = sn[0];
	sn[1].id = "2";
	sn[1].name = "second snapshot";
	sn[1].extra_unknown = (uint8_t *)"XYZW";
	sn[1].extra_unknown_len = 4;
	size = qcow2_snapshot_table_size(sn, 2);
	assert_int_equal(size % 8, 0);
	buf = calloc(1, size);
	qcow2_serialize_snapshots(sn, 2, buf);
	/* Short buffers ask for more. */
	assert_int_equal(qcow2_parse_snapshots(buf, 20, 2, 3, 16, &out, &used), -EAGAIN);
	assert_int_equal(qcow2_parse_snapshots(buf, size - 8, 2, 3, 16, &out, &used), -EAGAIN);
	assert_int_equal(qcow2_parse_snapshots(buf, size, 2, 3, 16, &out, &used), 0);
	assert_int_equal(used, size);
	assert_string_equal(out[0].name, "first");
	assert_string_equal(out[1].name, "second snapshot");
	assert_string_equal(out[1].id, "2");
	assert_int_equal(out[0].vm_state_size, 1ULL << 33);
	assert_int_equal(out[1].disk_size, 1 << 30);
	assert_int_equal(out[1].extra_unknown_len, 4);
	assert_memory_equal(out[1].extra_unknown, "XYZW", 4);
	qcow2_snapshots_free(out, 2);
	/* Unaligned L1 offset and oversize extra data are refused. */
	st_be64(buf, 0x40001);
	assert_int_equal(qcow2_parse_snapshots(buf, size, 2, 3, 16, &out, &used), -EINVAL);
	st_be64(buf, 0x40000);
	st_be32(buf + 36, 5000);
	assert_int_equal(qcow2_parse_snapshots(buf, size, 2, 3, 16, &out, &used), -EINVAL);
	free(buf);
}

/* ---- codecs ---------------------------------------------------------------------- */

static void test_codecs(void **state)
{
	const size_t cs = 65536;
	uint8_t *src = malloc(cs), *dst = malloc(cs), *back = malloc(cs), *rnd = malloc(cs);

	(void)state;
	for (size_t i = 0; i < cs; i++) {
		src[i] = (uint8_t)(i / 100);
		rnd[i] = (uint8_t)(rand() >> 7);
	}
	for (uint8_t type = 0; type <= 1; type++) {
		long n = qcow2_compress(type, src, cs, dst, cs - 1);
		assert_true(n > 0 && (size_t)n < cs);
		/* Trailing bytes after the stream (the next cluster's data) are ignored. */
		memset(dst + n, 0x5a, 700 < cs - (size_t)n ? 700 : cs - (size_t)n);
		assert_int_equal(qcow2_decompress(type, dst, (size_t)n + 600, back, cs), 0);
		assert_memory_equal(src, back, cs);
		/* Incompressible data does not fit. */
		assert_int_equal(qcow2_compress(type, rnd, cs, dst, cs - 1), -ENOSPC);
		/* Garbage does not decompress. */
		assert_int_not_equal(qcow2_decompress(type, rnd, 2000, back, cs), 0);
	}
	free(src);
	free(dst);
	free(back);
	free(rnd);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rc_all_widths),
		cmocka_unit_test(test_rc_bit_order),
		cmocka_unit_test(test_size_to_l1),
		cmocka_unit_test(test_guest_offset_split),
		cmocka_unit_test(test_sc_type),
		cmocka_unit_test(test_compressed_descriptor),
		cmocka_unit_test(test_parse_header_ok),
		cmocka_unit_test(test_parse_header_bad),
		cmocka_unit_test(test_header_roundtrip),
		cmocka_unit_test(test_extension_too_large),
		cmocka_unit_test(test_snapshot_roundtrip),
		cmocka_unit_test(test_codecs),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
