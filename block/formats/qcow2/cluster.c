/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Cluster mapping: the active L1 table, L2 tables for reading and for
 * modification (allocation of new tables, copy-on-write of tables shared
 * with snapshots), L1 growth, and the cache dependencies that order
 * L2 updates against refcount updates (see the top of qcow2.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

static uint64_t file_end(struct qcow2_state *s)
{
	uint64_t f = s->bs->file->size;

	return f > s->host_end ? f : s->host_end;
}

static int check_l2_offset(struct qcow2_state *s, uint64_t l2off, uint64_t l1i)
{
	if (l2off & (s->cluster_size - 1))
		return qcow2_signal_corruption(s, "L2 table offset %#" PRIx64 " unaligned (L1 index %#" PRIx64 ")", l2off,
					       l1i);
	if (l2off < s->cluster_size)
		return qcow2_signal_corruption(s, "L2 table offset %#" PRIx64 " overlaps the header (L1 index %#" PRIx64 ")",
					       l2off, l1i);
	if (l2off >= file_end(s))
		return qcow2_signal_corruption(s, "L2 table offset %#" PRIx64 " is past the end of the file (L1 index %#" PRIx64 ")",
					       l2off, l1i);
	return 0;
}

int qcow2_get_l2_read(struct qcow2_state *s, uint64_t guest_off, uint8_t **l2, bool locked)
{
	uint64_t l1i = qcow2_l1_index(s, guest_off), l2off;
	int ret;

	*l2 = NULL;
	if (l1i >= s->l1_size)
		return 0;
	l2off = s->l1_table[l1i] & L1E_OFFSET_MASK;
	if (!l2off)
		return 0;
	ret = check_l2_offset(s, l2off, l1i);
	if (ret < 0)
		return ret;
	return qcow2_cache_get(s, &s->l2_cache, l2off, l2, true, locked);
}

int qcow2_write_l1_entry(struct qcow2_state *s, uint64_t index)
{
	uint64_t first = index & ~63ULL, n = 64;
	uint8_t buf[512];
	int ret;

	if (first + n > s->l1_alloc)
		n = s->l1_alloc - first;
	for (uint64_t i = 0; i < n; i++)
		st_be64(buf + i * 8, s->l1_table[first + i]);
	ret = qcow2_overlap_check(s, QCOW2_OL_L1, s->l1_table_offset + first * 8, n * 8);
	if (ret < 0)
		return ret;
	return qcow2_file_pwrite(s, s->l1_table_offset + first * 8, buf, n * 8);
}

int qcow2_l2_after_alloc(struct qcow2_state *s)
{
	int ret;

	/* Data written to new clusters must be on disk before an L2 table references them. */
	qcow2_cache_depends_on_flush(&s->l2_cache);
	if (s->lazy_refcounts)
		return qcow2_mark_dirty(s);
	ret = qcow2_cache_set_dependency(s, &s->l2_cache, &s->rc_cache);
	return ret;
}

int qcow2_rc_after_unref(struct qcow2_state *s)
{
	return qcow2_cache_set_dependency(s, &s->rc_cache, &s->l2_cache);
}

/* Make the refcounts of freshly allocated metadata durable before something on disk points at it. */
static int persist_alloc(struct qcow2_state *s)
{
	int ret;

	if (s->lazy_refcounts)
		return qcow2_mark_dirty(s);
	ret = qcow2_cache_flush(s, &s->rc_cache);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	return ret;
}

int qcow2_get_l2_write(struct qcow2_state *s, uint64_t guest_off, uint8_t **l2)
{
	uint64_t l1i = qcow2_l1_index(s, guest_off), l1e, l2off, old_l1e;
	uint8_t *old = NULL, *tbl;
	int64_t nl2;
	int ret;

	*l2 = NULL;
	if (l1i >= s->l1_size) {
		ret = qcow2_grow_l1(s, l1i + 1);
		if (ret < 0)
			return ret;
	}
	l1e = s->l1_table[l1i];
	l2off = l1e & L1E_OFFSET_MASK;
	if (l2off) {
		ret = check_l2_offset(s, l2off, l1i);
		if (ret < 0)
			return ret;
		if (l1e & QCOW2_OFLAG_COPIED)
			return qcow2_cache_get(s, &s->l2_cache, l2off, l2, true, true);
	}

	/* A new table: empty, or a private copy of a table shared with a snapshot. */
	nl2 = qcow2_alloc_clusters(s, 1);
	if (nl2 < 0)
		return (int)nl2;
	/* The allocation may have yielded; the L1 entry cannot change (lock held) but re-read anyway. */
	old_l1e = s->l1_table[l1i];
	l2off = old_l1e & L1E_OFFSET_MASK;
	ret = qcow2_cache_get(s, &s->l2_cache, (uint64_t)nl2, &tbl, false, true);
	if (ret < 0)
		goto fail_free;
	if (l2off) {
		ret = qcow2_cache_get(s, &s->l2_cache, l2off, &old, true, true);
		if (ret < 0) {
			qcow2_cache_discard(&s->l2_cache, (uint64_t)nl2);
			qcow2_cache_put(&s->l2_cache, tbl);
			goto fail_free;
		}
		memcpy(tbl, old, s->cluster_size);
		qcow2_cache_put(&s->l2_cache, old);
	}
	/* Refcount of the new table on disk, then the table, then the L1 entry. */
	ret = persist_alloc(s);
	if (ret == 0)
		ret = qcow2_overlap_check(s, QCOW2_OL_L2, (uint64_t)nl2, s->cluster_size);
	if (ret == 0)
		ret = qcow2_file_pwrite(s, (uint64_t)nl2, tbl, s->cluster_size);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0) {
		qcow2_cache_discard(&s->l2_cache, (uint64_t)nl2);
		qcow2_cache_put(&s->l2_cache, tbl);
		goto fail_free;
	}
	s->l1_table[l1i] = (uint64_t)nl2 | QCOW2_OFLAG_COPIED;
	ret = qcow2_write_l1_entry(s, l1i);
	if (ret < 0) {
		s->l1_table[l1i] = old_l1e;
		qcow2_cache_discard(&s->l2_cache, (uint64_t)nl2);
		qcow2_cache_put(&s->l2_cache, tbl);
		goto fail_free;
	}
	if (l2off) {
		/* Drop our reference to the shared table (after the L1 entry above). */
		ret = qcow2_free_clusters(s, l2off, s->cluster_size);
		if (ret < 0) {
			qcow2_cache_put(&s->l2_cache, tbl);
			return ret;
		}
	}
	*l2 = tbl;
	return 0;

fail_free:
	(void)qcow2_free_clusters(s, (uint64_t)nl2, s->cluster_size);
	return ret;
}

int qcow2_grow_l1(struct qcow2_state *s, uint64_t min_size)
{
	uint64_t new_bytes, nclusters, new_alloc, old_off = s->l1_table_offset, old_size = s->l1_size;
	uint64_t *nt = NULL;
	uint8_t *buf = NULL, hdr[12];
	int64_t off;
	int ret;

	if (min_size <= s->l1_size)
		return 0;
	if (min_size > s->max_l1_entries)
		return vd_error(EFBIG, "qcow2: the L1 table would exceed 32 MiB (size too large for this cluster size)");
	new_bytes = min_size * 8;
	nclusters = (new_bytes + s->cluster_size - 1) >> s->cluster_bits;
	new_alloc = (nclusters << s->cluster_bits) / 8;
	nt = calloc(new_alloc, 8);
	buf = vd_blk_alloc(nclusters << s->cluster_bits);
	if (!nt || !buf) {
		ret = vd_error(ENOMEM, "qcow2: out of memory growing the L1 table");
		goto out;
	}
	memcpy(nt, s->l1_table, (size_t)s->l1_size * 8);
	off = qcow2_alloc_clusters(s, nclusters);
	if (off < 0) {
		ret = (int)off;
		goto out;
	}
	memset(buf, 0, nclusters << s->cluster_bits);
	for (uint64_t i = 0; i < s->l1_size; i++)
		st_be64(buf + i * 8, nt[i]);
	ret = persist_alloc(s);
	if (ret == 0)
		ret = qcow2_overlap_check(s, 0, (uint64_t)off, nclusters << s->cluster_bits);
	if (ret == 0)
		ret = qcow2_file_pwrite(s, (uint64_t)off, buf, nclusters << s->cluster_bits);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0) {
		(void)qcow2_free_clusters(s, (uint64_t)off, nclusters << s->cluster_bits);
		goto out;
	}
	st_be32(hdr, (uint32_t)min_size);
	st_be64(hdr + 4, (uint64_t)off);
	ret = qcow2_file_pwrite(s, QCOW2_HDR_L1_SIZE_OFF, hdr, 12);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0) {
		(void)qcow2_free_clusters(s, (uint64_t)off, nclusters << s->cluster_bits);
		goto out;
	}
	free(s->l1_table);
	s->l1_table = nt;
	nt = NULL;
	s->l1_alloc = (uint32_t)new_alloc;
	s->l1_size = (uint32_t)min_size;
	s->l1_table_offset = (uint64_t)off;
	if (old_size)
		ret = qcow2_free_clusters(s, old_off, old_size * 8);
out:
	free(nt);
	vd_blk_free(buf);
	return ret;
}
