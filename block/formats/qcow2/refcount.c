/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Refcounts: the refcount table (in memory, written through), refcount
 * blocks of any width (1..64 bits, through the refcount cache), cluster
 * allocation, table growth, and the deferred host discards of freed
 * clusters.  Everything here runs with s->lock held.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* ---- entries of any width ------------------------------------------------- */

uint64_t qcow2_rc_get(const uint8_t *b, uint32_t order, uint64_t i)
{
	switch (order) {
	case 0:
		return (b[i >> 3] >> (i & 7)) & 1;
	case 1:
		return (b[i >> 2] >> ((i & 3) * 2)) & 3;
	case 2:
		return (b[i >> 1] >> ((i & 1) * 4)) & 15;
	case 3:
		return b[i];
	case 4:
		return ld_be16(b + 2 * i);
	case 5:
		return ld_be32(b + 4 * i);
	default:
		return ld_be64(b + 8 * i);
	}
}

void qcow2_rc_set(uint8_t *b, uint32_t order, uint64_t i, uint64_t v)
{
	unsigned shift, bits;

	switch (order) {
	case 0:
	case 1:
	case 2:
		bits = 1u << order;
		shift = (unsigned)((i & ((8u >> order) - 1)) << order);
		b[i >> (3 - order)] = (uint8_t)((b[i >> (3 - order)] & ~(((1u << bits) - 1) << shift)) |
						 ((v & ((1u << bits) - 1)) << shift));
		return;
	case 3:
		b[i] = (uint8_t)v;
		return;
	case 4:
		st_be16(b + 2 * i, (uint16_t)v);
		return;
	case 5:
		st_be32(b + 4 * i, (uint32_t)v);
		return;
	default:
		st_be64(b + 8 * i, v);
		return;
	}
}

uint64_t qcow2_reftable_entries_for(const struct qcow2_state *s, uint64_t clusters)
{
	return (clusters + (1ULL << s->refblock_bits) - 1) >> s->refblock_bits;
}

/* ---- the table ------------------------------------------------------------ */

int qcow2_refcount_init(struct qcow2_state *s)
{
	uint64_t bytes = (uint64_t)s->refcount_table_clusters << s->cluster_bits;
	int ret;

	s->refcount_table_size = bytes / 8;
	s->refcount_table = malloc(bytes);
	if (!s->refcount_table)
		return vd_error(ENOMEM, "qcow2: out of memory for the refcount table");
	ret = qcow2_file_pread(s, s->refcount_table_offset, s->refcount_table, bytes);
	if (ret < 0)
		return vd_error(-ret, "qcow2: could not read the refcount table");
	for (uint64_t i = 0; i < s->refcount_table_size; i++)
		s->refcount_table[i] = be64toh(s->refcount_table[i]);
	qcow2_reftable_rescan(s);
	return 0;
}

void qcow2_reftable_rescan(struct qcow2_state *s)
{
	s->reftable_used = s->refcount_table_size;
	while (s->reftable_used && !(s->refcount_table[s->reftable_used - 1] & REFT_OFFSET_MASK))
		s->reftable_used--;
}

static uint64_t file_end(struct qcow2_state *s)
{
	uint64_t f = s->bs->file->size;

	return f > s->host_end ? f : s->host_end;
}

/* Refcount block for table index idx (NULL when not allocated). */
static int get_block(struct qcow2_state *s, uint64_t idx, uint8_t **blk)
{
	uint64_t e, off;

	*blk = NULL;
	if (idx >= s->refcount_table_size)
		return 0;
	/*
	 * Absent only when the whole entry is zero, the test block_missing()
	 * makes when it plans new blocks: an entry of reserved bits alone is
	 * damage, not a missing block (allocating would find nothing to set up).
	 */
	e = s->refcount_table[idx];
	if (!e)
		return 0;
	off = e & REFT_OFFSET_MASK;
	if (e & (s->cluster_size - 1))
		return qcow2_signal_corruption(s, "refblock offset %#" PRIx64 " unaligned (reftable index %#" PRIx64 ")",
					       e, idx);
	if (off + s->cluster_size > file_end(s) + s->cluster_size)
		return qcow2_signal_corruption(s, "refblock offset %#" PRIx64 " past the end of the file (reftable index %#" PRIx64 ")",
					       off, idx);
	return qcow2_cache_get(s, &s->rc_cache, off, blk, true, true);
}

int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster, uint64_t *rc)
{
	uint8_t *blk;
	int ret;

	ret = get_block(s, cluster >> s->refblock_bits, &blk);
	if (ret < 0)
		return ret;
	if (!blk) {
		*rc = 0;
		return 0;
	}
	*rc = qcow2_rc_get(blk, s->refcount_order, cluster & ((1ULL << s->refblock_bits) - 1));
	qcow2_cache_put(&s->rc_cache, blk);
	return 0;
}

static int write_reftable_entry(struct qcow2_state *s, uint64_t idx)
{
	/* One 512-byte sector of the table around idx. */
	uint64_t first = idx & ~63ULL, n = 64;
	uint8_t buf[512];
	int ret;

	if (first + n > s->refcount_table_size)
		n = s->refcount_table_size - first;
	memset(buf, 0, sizeof(buf));
	for (uint64_t i = 0; i < n; i++)
		st_be64(buf + i * 8, s->refcount_table[first + i]);
	ret = qcow2_overlap_check(s, QCOW2_OL_REFTABLE, s->refcount_table_offset + first * 8, n * 8);
	if (ret < 0)
		return ret;
	return qcow2_file_pwrite(s, s->refcount_table_offset + first * 8, buf, n * 8);
}

/*
 * Grow the refcount table to at least min_entries.  The new table and the
 * refcount blocks describing it are placed right after the area the old
 * table covers (which is free by definition).
 */
static int grow_reftable(struct qcow2_state *s, uint64_t min_entries)
{
	uint64_t per_cluster = s->cluster_size / 8, per_block = 1ULL << s->refblock_bits;
	uint64_t old_entries = s->refcount_table_size, new_entries, tclusters, nblocks = 0;
	uint64_t P, first_idx, last_idx, total;
	uint64_t old_off = s->refcount_table_offset, old_clusters = s->refcount_table_clusters;
	uint64_t *new_table = NULL;
	uint8_t *buf = NULL, hdr[12];
	int ret;

	new_entries = old_entries + old_entries / 2 + 1;
	if (new_entries < min_entries)
		new_entries = min_entries;
	P = old_entries << s->refblock_bits; /* first cluster not covered */
	for (;;) {
		new_entries = (new_entries + per_cluster - 1) / per_cluster * per_cluster;
		tclusters = new_entries / per_cluster;
		for (;;) {
			total = tclusters + nblocks;
			first_idx = P >> s->refblock_bits;
			last_idx = (P + total - 1) >> s->refblock_bits;
			if (last_idx - first_idx + 1 == nblocks)
				break;
			nblocks = last_idx - first_idx + 1;
		}
		if (last_idx < new_entries)
			break;
		new_entries = last_idx + 1;
	}
	if (tclusters * s->cluster_size > QCOW2_MAX_REFTABLE_BYTES)
		return vd_error(EFBIG, "qcow2: the refcount table would exceed 8 MiB (image too large for this "
				       "cluster size)");

	/* Refcount blocks covering [P, P + total): the new metadata itself. */
	buf = vd_blk_alloc(s->cluster_size);
	new_table = calloc(new_entries, 8);
	if (!buf || !new_table) {
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	memcpy(new_table, s->refcount_table, old_entries * 8);
	ret = qcow2_ensure_file(s, (P + total) << s->cluster_bits);
	if (ret < 0)
		goto out;
	for (uint64_t b = 0; b < nblocks; b++) {
		uint64_t idx = first_idx + b, boff = (P + b) << s->cluster_bits;
		memset(buf, 0, s->cluster_size);
		for (uint64_t c = P; c < P + total; c++)
			if ((c >> s->refblock_bits) == idx)
				qcow2_rc_set(buf, s->refcount_order, c & (per_block - 1), 1);
		ret = qcow2_file_pwrite(s, boff, buf, s->cluster_size);
		if (ret < 0)
			goto out;
		new_table[idx] = boff;
	}
	/* The table, written from a big-endian copy. */
	{
		uint64_t toff = (P + nblocks) << s->cluster_bits;
		for (uint64_t c = 0; c < tclusters; c++) {
			for (uint64_t i = 0; i < per_cluster; i++)
				st_be64(buf + i * 8, new_table[c * per_cluster + i]);
			ret = qcow2_file_pwrite(s, toff + c * s->cluster_size, buf, s->cluster_size);
			if (ret < 0)
				goto out;
		}
		ret = qcow2_file_flush(s);
		if (ret < 0)
			goto out;
		st_be64(hdr, toff);
		st_be32(hdr + 8, (uint32_t)tclusters);
		ret = qcow2_file_pwrite(s, QCOW2_HDR_REFTABLE_OFF, hdr, 12);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret < 0)
			goto out;
		free(s->refcount_table);
		s->refcount_table = new_table;
		new_table = NULL;
		s->refcount_table_size = new_entries;
		qcow2_reftable_rescan(s);
		s->refcount_table_offset = toff;
		s->refcount_table_clusters = (uint32_t)tclusters;
	}
	/* The old table is no longer referenced by the header. */
	ret = qcow2_update_refcount(s, old_off, old_clusters << s->cluster_bits, 1, true);
out:
	vd_blk_free(buf);
	free(new_table);
	return ret;
}

static int alloc_run(struct qcow2_state *s, uint64_t n, uint64_t extra_idx, uint64_t *data_start);

static int update_one_range(struct qcow2_state *s, uint64_t c0, uint64_t c1, uint64_t addend, bool decrease,
			    uint64_t *done)
{
	uint64_t per_block = 1ULL << s->refblock_bits;
	int ret = 0;

	*done = c0;
	while (*done < c1) {
		uint64_t c = *done, idx = c >> s->refblock_bits, end;
		uint8_t *blk;

		ret = get_block(s, idx, &blk);
		if (ret < 0)
			return ret;
		if (!blk) {
			if (decrease)
				return vd_error(EINVAL, "qcow2: refcount of cluster %#" PRIx64 " would drop below zero",
						c << s->cluster_bits);
			/* Only for clusters in use without a refcount block (damaged images being repaired). */
			uint64_t unused;
			ret = alloc_run(s, 0, idx, &unused);
			if (ret < 0)
				return ret;
			continue;
		}
		end = (idx + 1) * per_block;
		if (end > c1)
			end = c1;
		for (; c < end; c++) {
			uint64_t i = c & (per_block - 1);
			uint64_t cur = qcow2_rc_get(blk, s->refcount_order, i), nv;
			if (decrease) {
				if (cur < addend) {
					qcow2_cache_put(&s->rc_cache, blk);
					*done = c;
					return vd_error(EINVAL, "qcow2: refcount of cluster %#" PRIx64
							" would drop below zero", c << s->cluster_bits);
				}
				nv = cur - addend;
			} else {
				if (addend > s->refcount_max - cur) {
					qcow2_cache_put(&s->rc_cache, blk);
					*done = c;
					return vd_error(ERANGE, "qcow2: refcount overflow for cluster %#" PRIx64
							" (refcount_bits=%u)", c << s->cluster_bits, s->refcount_bits);
				}
				nv = cur + addend;
			}
			qcow2_rc_set(blk, s->refcount_order, i, nv);
			if (nv == 0) {
				uint64_t off = c << s->cluster_bits;
				if (c < s->free_cluster_index)
					s->free_cluster_index = c;
				qcow2_cache_discard(&s->l2_cache, off);
				if (s->free_byte_offset && qcow2_start_of_cluster(s, s->free_byte_offset) == off)
					s->free_byte_offset = 0;
				qcow2_queue_discard(s, off, s->cluster_size);
			}
		}
		qcow2_cache_mark_dirty(&s->rc_cache, blk);
		qcow2_cache_put(&s->rc_cache, blk);
		*done = end;
	}
	return 0;
}

int qcow2_update_refcount(struct qcow2_state *s, uint64_t off, uint64_t len, uint64_t addend, bool decrease)
{
	uint64_t c0, c1, done;
	int ret;

	if (!len || !addend)
		return 0;
	if (decrease) {
		/* The references being dropped must reach the disk before the new refcounts. */
		ret = qcow2_cache_set_dependency(s, &s->rc_cache, &s->l2_cache);
		if (ret < 0)
			return ret;
	}
	c0 = off >> s->cluster_bits;
	c1 = ((off + len - 1) >> s->cluster_bits) + 1;
	ret = update_one_range(s, c0, c1, addend, decrease, &done);
	if (ret < 0 && done > c0) {
		uint64_t undone;
		(void)update_one_range(s, c0, done, addend, !decrease, &undone);
	}
	return ret;
}

/* ---- file size ------------------------------------------------------------------ */

int qcow2_ensure_file(struct qcow2_state *s, uint64_t end)
{
	uint64_t cur = s->bs->file->size, extra, target;
	int ret;

	if (end > s->alloc_end)
		s->alloc_end = end;
	/* Everything below `end` is about to be written: no longer known to be zeroes. */
	if (end > s->fresh_start)
		s->fresh_start = end;
	if (end <= cur)
		return 0;
	/*
	 * Resizing drains the file node (every request waits): do it rarely,
	 * far ahead of need.  Doubling (up to 1 GiB at a time) costs nothing
	 * on a sparse file and is trimmed at close; a 1 GiB image is grown
	 * about a dozen times instead of sixty with steps of an eighth.
	 */
	extra = cur;
	if (extra < (1u << 20))
		extra = 1u << 20;
	if (extra > (1u << 30))
		extra = 1u << 30;
	target = cur + extra > end ? cur + extra : end;
	target = (target + s->cluster_size - 1) & ~((uint64_t)s->cluster_size - 1);
	ret = vd_bnode_co_truncate(s->bs->file, target, false, "off");
	if (ret < 0)
		return vd_error(-ret, "qcow2: could not grow the image file to %" PRIu64 " bytes", target);
	s->file_grown = true;
	return 0;
}

/* ---- host I/O in flight ------------------------------------------------------- */

bool qcow2_host_io_busy(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	for (struct qcow2_host_io *io = s->host_io; io; io = io->next)
		if (off < io->end && io->start < off + len)
			return true;
	return false;
}

void qcow2_host_io_begin(struct qcow2_state *s, struct qcow2_host_io *io, uint64_t off, uint64_t len)
{
	io->start = off;
	io->end = off + len;
	io->next = s->host_io;
	io->pprev = &s->host_io;
	if (s->host_io)
		s->host_io->pprev = &io->next;
	s->host_io = io;
}

void qcow2_host_io_end(struct qcow2_state *s, struct qcow2_host_io *io)
{
	*io->pprev = io->next;
	if (io->next)
		io->next->pprev = io->pprev;
}

/* ---- allocation ------------------------------------------------------------------- */

/* First run of n free clusters at or after `from` (clusters without a refcount block count as free). */
static int find_free(struct qcow2_state *s, uint64_t from, uint64_t n, uint64_t *start)
{
	uint64_t per_block = 1ULL << s->refblock_bits, c = from, run = 0;
	int ret;

	if (c == 0)
		c = 1; /* never the header cluster */
	while (run < n) {
		uint64_t idx = c >> s->refblock_bits, end = (idx + 1) * per_block;
		uint8_t *blk;

		ret = get_block(s, idx, &blk);
		if (ret < 0)
			return ret;
		for (; c < end && run < n; c++) {
			uint64_t rc = blk ? qcow2_rc_get(blk, s->refcount_order, c & (per_block - 1)) : 0;
			if (rc == 0 && s->host_io && qcow2_host_io_busy(s, c << s->cluster_bits, s->cluster_size))
				rc = 1;
			if (rc == 0 && s->check_refs && c < s->check_refs_n && s->check_refs[c])
				rc = 1;
			run = rc ? 0 : run + 1;
		}
		if (blk)
			qcow2_cache_put(&s->rc_cache, blk);
		if (c > (1ULL << (56 - s->cluster_bits)))
			return vd_error(ENOSPC, "qcow2: no free clusters below the 64 PiB limit");
	}
	*start = c - n;
	return 0;
}

static bool block_missing(struct qcow2_state *s, uint64_t idx)
{
	return idx >= s->refcount_table_size || !s->refcount_table[idx];
}

/* Sorted distinct missing refcount-block indices for clusters [c0, c0+n), plus extra_idx. */
static uint64_t missing_blocks(struct qcow2_state *s, uint64_t c0, uint64_t n, uint64_t extra_idx, uint64_t *out,
			       uint64_t max)
{
	uint64_t k = 0;

	if (n) {
		for (uint64_t idx = c0 >> s->refblock_bits; idx <= (c0 + n - 1) >> s->refblock_bits && k < max; idx++)
			if (block_missing(s, idx))
				out[k++] = idx;
	}
	if (extra_idx != UINT64_MAX && block_missing(s, extra_idx) && k < max) {
		uint64_t i = k;
		bool dup = false;
		for (uint64_t j = 0; j < k; j++)
			dup |= out[j] == extra_idx;
		if (!dup) {
			while (i > 0 && out[i - 1] > extra_idx) {
				out[i] = out[i - 1];
				i--;
			}
			out[i] = extra_idx;
			k++;
		}
	}
	return k;
}

/*
 * Allocate a run: m new refcount blocks (for every block missing over the
 * run, and extra_idx) followed by n data clusters, contiguous.  The new
 * blocks describe each other and the data; they are written and flushed
 * before the refcount table points at them.  *data_start: first data cluster.
 */
#define MAX_NEW_BLOCKS 256
static int alloc_run(struct qcow2_state *s, uint64_t n, uint64_t extra_idx, uint64_t *data_start)
{
	uint64_t per_block = 1ULL << s->refblock_bits, start, m, idx[MAX_NEW_BLOCKS], from = s->free_cluster_index;
	int ret;

	for (;;) {
		ret = find_free(s, from, n ? n : 1, &start);
		if (ret < 0)
			return ret;
		m = 0;
		for (;;) {
			uint64_t k = missing_blocks(s, start, m + n, extra_idx, idx, MAX_NEW_BLOCKS), check;
			if (k == MAX_NEW_BLOCKS)
				return vd_error(EFBIG, "qcow2: allocation needs too many new refcount blocks");
			if (k == m)
				break;
			m = k;
			/* The run grew by the blocks: it must still be free. */
			ret = find_free(s, start, m + n, &check);
			if (ret < 0)
				return ret;
			start = check;
		}
		if (m && idx[m - 1] >= s->refcount_table_size) {
			ret = grow_reftable(s, idx[m - 1] + 1);
			if (ret < 0)
				return ret;
			from = s->free_cluster_index;
			continue; /* the growth used clusters: plan again */
		}
		break;
	}
	ret = qcow2_ensure_file(s, (start + m + (n ? n : 0)) << s->cluster_bits);
	if (ret < 0)
		return ret;
	if (m) {
		/* Block clusters covered by an existing block are counted there. */
		for (uint64_t c = start; c < start + m; c++) {
			bool covered_by_new = false;
			for (uint64_t j = 0; j < m; j++)
				covered_by_new |= (c >> s->refblock_bits) == idx[j];
			if (!covered_by_new) {
				ret = qcow2_update_refcount(s, c << s->cluster_bits, s->cluster_size, 1, false);
				if (ret < 0)
					return ret;
			}
		}
		/* Build and write the new blocks; each new block cluster has refcount 1 in whichever new block covers it. */
		for (uint64_t j = 0; j < m; j++) {
			uint64_t boff = (start + j) << s->cluster_bits;
			uint8_t *blk;
			ret = qcow2_cache_get(s, &s->rc_cache, boff, &blk, false, true);
			if (ret < 0)
				return ret;
			for (uint64_t c = start; c < start + m; c++)
				if ((c >> s->refblock_bits) == idx[j])
					qcow2_rc_set(blk, s->refcount_order, c & (per_block - 1), 1);
			ret = qcow2_overlap_check(s, QCOW2_OL_REFBLOCK, boff, s->cluster_size);
			if (ret == 0)
				ret = qcow2_file_pwrite(s, boff, blk, s->cluster_size);
			qcow2_cache_put(&s->rc_cache, blk);
			if (ret < 0) {
				for (uint64_t i = 0; i <= j; i++)
					qcow2_cache_discard(&s->rc_cache, (start + i) << s->cluster_bits);
				return ret;
			}
		}
		/* All of it on disk before the refcount table points at the new blocks. */
		ret = qcow2_cache_flush(s, &s->rc_cache);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		for (uint64_t j = 0; ret == 0 && j < m; j++) {
			s->refcount_table[idx[j]] = (start + j) << s->cluster_bits;
			if (idx[j] >= s->reftable_used)
				s->reftable_used = idx[j] + 1;
			ret = write_reftable_entry(s, idx[j]);
		}
		if (ret < 0) {
			for (uint64_t j = 0; j < m; j++) {
				s->refcount_table[idx[j]] = 0;
				qcow2_cache_discard(&s->rc_cache, (start + j) << s->cluster_bits);
			}
			return ret;
		}
	}
	*data_start = start + m;
	if (n) {
		ret = qcow2_update_refcount(s, (start + m) << s->cluster_bits, n << s->cluster_bits, 1, false);
		if (ret < 0)
			return ret;
		qcow2_unqueue_discard(s, (start + m) << s->cluster_bits, n << s->cluster_bits);
		s->free_cluster_index = start + m + n;
	} else if (start + m > s->free_cluster_index && start <= s->free_cluster_index) {
		s->free_cluster_index = start + m;
	}
	return 0;
}

int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n)
{
	uint64_t start = 0;
	int ret;

	if (n == 0)
		return vd_error(EINVAL, "qcow2: zero-size allocation");
	ret = alloc_run(s, n, UINT64_MAX, &start);
	if (ret < 0)
		return ret;
	return (int64_t)(start << s->cluster_bits);
}

int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t len)
{
	uint64_t off = s->free_byte_offset;
	int64_t nc;
	int ret;

	if (len == 0 || len > s->cluster_size)
		return vd_error(EINVAL, "qcow2: bad compressed allocation size %" PRIu64, len);
	if (off && qcow2_offset_into_cluster(s, off) && qcow2_offset_into_cluster(s, off) + len <= s->cluster_size) {
		uint64_t rc;
		ret = qcow2_get_refcount(s, off >> s->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		if (rc > 0 && rc < s->refcount_max) {
			ret = qcow2_update_refcount(s, off, 1, 1, false);
			if (ret < 0)
				return ret;
			s->free_byte_offset = off + len;
			if (!qcow2_offset_into_cluster(s, s->free_byte_offset))
				s->free_byte_offset = 0;
			return (int64_t)off;
		}
	}
	nc = qcow2_alloc_clusters(s, 1);
	if (nc < 0)
		return nc;
	s->free_byte_offset = (uint64_t)nc + len;
	if (!qcow2_offset_into_cluster(s, s->free_byte_offset))
		s->free_byte_offset = 0;
	return nc;
}

int qcow2_free_clusters(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	return qcow2_update_refcount(s, off, len, 1, true);
}

int qcow2_free_entry_cluster(struct qcow2_state *s, uint64_t entry)
{
	if (entry & QCOW2_OFLAG_COMPRESSED) {
		uint64_t start, len;
		qcow2_compressed_decode(s, entry, NULL, NULL, &start, &len);
		return qcow2_update_refcount(s, start, len, 1, true);
	}
	if (entry & L2E_OFFSET_MASK)
		return qcow2_update_refcount(s, entry & L2E_OFFSET_MASK, s->cluster_size, 1, true);
	return 0;
}

/* ---- deferred host discards ---------------------------------------------------------- */

#define MAX_PENDING_DISCARDS 8192

void qcow2_queue_discard(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	struct qcow2_discard *d;

	if (!s->discard_passthrough || !len)
		return;
	for (d = s->discards; d; d = d->next) {
		if (d->end == off) {
			d->end = off + len;
			return;
		}
		if (d->start == off + len) {
			d->start = off;
			return;
		}
	}
	if (s->nb_discards >= MAX_PENDING_DISCARDS)
		return; /* the space is simply not returned to the host */
	d = malloc(sizeof(*d));
	if (!d)
		return;
	d->start = off;
	d->end = off + len;
	d->next = s->discards;
	s->discards = d;
	s->nb_discards++;
}

void qcow2_unqueue_discard(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	struct qcow2_discard **pp = &s->discards, *d;
	uint64_t end = off + len;

	while ((d = *pp)) {
		if (d->end <= off || d->start >= end) {
			pp = &d->next;
			continue;
		}
		if (d->start < off && d->end > end) {
			/* Split. */
			struct qcow2_discard *tail = malloc(sizeof(*tail));
			if (tail) {
				tail->start = end;
				tail->end = d->end;
				tail->next = d->next;
				d->next = tail;
				s->nb_discards++;
			}
			d->end = off;
			pp = &d->next;
			continue;
		}
		if (d->start < off) {
			d->end = off;
			pp = &d->next;
		} else if (d->end > end) {
			d->start = end;
			pp = &d->next;
		} else {
			*pp = d->next;
			free(d);
			s->nb_discards--;
		}
	}
}

int qcow2_process_discards(struct qcow2_state *s)
{
	struct qcow2_discard *d;

	while ((d = s->discards)) {
		s->discards = d->next;
		s->nb_discards--;
		(void)vd_bnode_co_pdiscard(s->bs->file, d->start, d->end - d->start);
		free(d);
	}
	return 0;
}

void qcow2_free_discards(struct qcow2_state *s)
{
	struct qcow2_discard *d;

	while ((d = s->discards)) {
		s->discards = d->next;
		free(d);
	}
	s->nb_discards = 0;
}
