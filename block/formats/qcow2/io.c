/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Guest I/O: reads (data, zero, backing, compressed), writes (in place
 * without the lock; allocating writes with copy-on-write of the untouched
 * head/tail, from the backing file or zero), write-zeroes, discard and
 * block status.  See the top of qcow2.c for ordering and locking.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* Upper bound of clusters one allocating write handles at once. */
#define MAX_ALLOC_CLUSTERS 2048u

enum classify_mode {
	MODE_READ,    /* merge zero kinds and unallocated kinds; normal must be host-contiguous */
	MODE_STATUS,  /* exact kinds; host-contiguous for normal and zero-alloc */
	MODE_INPLACE, /* normal + COPIED, host-contiguous */
};

struct run {
	enum qcow2_sc_type type;
	uint64_t host;  /* host byte offset for the first byte (0 if none) */
	uint64_t bytes; /* guest bytes in the run */
	uint64_t entry; /* L2 entry of the first cluster */
};

static uint64_t file_end(struct qcow2_state *s)
{
	uint64_t f = s->bs->file->size;

	return f > s->host_end ? f : s->host_end;
}

static int kind(enum classify_mode m, enum qcow2_sc_type t)
{
	if (m == MODE_READ) {
		if (qcow2_sc_type_is_zero(t))
			return 100;
		if (qcow2_sc_type_is_unalloc(t))
			return 101;
	}
	if (m == MODE_STATUS && qcow2_sc_type_is_unalloc(t))
		return 101;
	return (int)t;
}

static bool host_contiguous_kind(enum classify_mode m, enum qcow2_sc_type t)
{
	return t == QCOW2_SC_NORMAL || (m == MODE_STATUS && t == QCOW2_SC_ZERO_ALLOC);
}

/* Classify guest [off, off+len) from its L2 table (stays within that table). */
static int classify(struct qcow2_state *s, const uint8_t *l2, uint64_t off, uint64_t len, enum classify_mode mode,
		    struct run *r)
{
	uint64_t scs = 1ULL << s->sc_bits, cs = s->cluster_size;
	uint64_t l2_span = 1ULL << (s->cluster_bits + s->l2_bits);
	uint64_t limit = (off & ~(l2_span - 1)) + l2_span, pos = off;

	if (off + len < limit)
		limit = off + len;
	memset(r, 0, sizeof(*r));
	if (!l2) {
		r->type = QCOW2_SC_UNALLOC_PLAIN;
		r->bytes = limit - off;
		return mode == MODE_INPLACE ? (r->bytes = 0, 0) : 0;
	}
	while (pos < limit) {
		uint32_t idx = qcow2_l2_index(s, pos), sc = qcow2_sc_index(s, pos);
		uint64_t entry = qcow2_l2_entry(s, l2, idx), bitmap = qcow2_l2_bitmap(s, l2, idx);
		enum qcow2_sc_type t = qcow2_sc_type(s->extl2, entry, bitmap, sc);
		uint64_t hc = t == QCOW2_SC_COMPRESSED ? 0 : entry & L2E_OFFSET_MASK;

		if (pos == off) {
			if (t == QCOW2_SC_INVALID)
				return qcow2_signal_corruption(s, "invalid subcluster bitmap %#" PRIx64 " (L2 entry %#" PRIx64
							       ", guest offset %#" PRIx64 ")", bitmap, entry, pos);
			if (hc & (cs - 1))
				return qcow2_signal_corruption(s, "cluster allocation offset %#" PRIx64
							       " unaligned (guest offset %#" PRIx64 ")", hc, pos);
			r->type = t;
			r->entry = entry;
			r->host = hc ? hc + qcow2_offset_into_cluster(s, pos) : 0;
			if (mode == MODE_INPLACE && !(t == QCOW2_SC_NORMAL && (entry & QCOW2_OFLAG_COPIED))) {
				r->bytes = 0;
				return 0;
			}
			if (t == QCOW2_SC_COMPRESSED) {
				uint64_t cend = qcow2_start_of_cluster(s, pos) + cs;
				r->bytes = (cend < limit ? cend : limit) - pos;
				return 0;
			}
		} else {
			if (t == QCOW2_SC_INVALID || kind(mode, t) != kind(mode, r->type))
				break;
			if (host_contiguous_kind(mode, r->type) &&
			    ((hc & (cs - 1)) || hc + qcow2_offset_into_cluster(s, pos) != r->host + (pos - off)))
				break;
			if (mode == MODE_INPLACE && !(entry & QCOW2_OFLAG_COPIED))
				break;
		}
		pos = (pos | (scs - 1)) + 1;
		if (pos > limit)
			pos = limit;
	}
	r->bytes = pos - off;
	return 0;
}

/* ---------------------------------------------------------------------------
 * Reads
 * ------------------------------------------------------------------------- */

static int read_backing(struct qcow2_state *s, uint64_t off, uint64_t n, struct vd_qiov *qiov, size_t qoff)
{
	struct vd_bnode *b = s->bs->backing;
	uint64_t m = 0;
	int ret;

	if (b && off < b->size) {
		m = b->size - off < n ? b->size - off : n;
		ret = vd_bnode_co_preadv(b, off, m, qiov, qoff, 0);
		if (ret < 0)
			return ret;
	}
	if (m < n)
		vd_qiov_memset(qiov, qoff + m, 0, n - m);
	return 0;
}

static int read_host(struct qcow2_state *s, uint64_t host, uint64_t n, struct vd_qiov *qiov, size_t qoff)
{
	uint64_t fe = file_end(s), m = n;
	int ret;

	/* Like a file past its end, clusters past the end read as zeroes (preallocated metadata). */
	if (host >= fe)
		m = 0;
	else if (fe - host < n)
		m = fe - host;
	if (m) {
		ret = vd_bnode_co_preadv(s->bs->file, host, m, qiov, qoff, 0);
		if (ret < 0)
			return ret;
	}
	if (m < n)
		vd_qiov_memset(qiov, qoff + m, 0, n - m);
	return 0;
}

int qcow2_read_guest(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff)
{
	uint8_t *cbuf = NULL, *l2;
	struct run r;
	int ret = 0;

	while (len > 0) {
		ret = qcow2_get_l2_read(s, off, &l2, false);
		if (ret < 0)
			break;
		ret = classify(s, l2, off, len, MODE_READ, &r);
		if (l2)
			qcow2_cache_put(&s->l2_cache, l2);
		if (ret < 0)
			break;
		switch (r.type) {
		case QCOW2_SC_NORMAL:
			ret = read_host(s, r.host, r.bytes, qiov, qoff);
			break;
		case QCOW2_SC_ZERO_PLAIN:
		case QCOW2_SC_ZERO_ALLOC:
			vd_qiov_memset(qiov, qoff, 0, r.bytes);
			break;
		case QCOW2_SC_UNALLOC_PLAIN:
		case QCOW2_SC_UNALLOC_ALLOC:
			ret = read_backing(s, off, r.bytes, qiov, qoff);
			break;
		case QCOW2_SC_COMPRESSED:
			if (!cbuf) {
				cbuf = malloc(s->cluster_size);
				if (!cbuf) {
					ret = vd_error(ENOMEM, "qcow2: out of memory");
					break;
				}
			}
			ret = qcow2_read_compressed(s, r.entry, cbuf);
			if (ret == 0)
				vd_qiov_from_buf(qiov, qoff, cbuf + qcow2_offset_into_cluster(s, off), r.bytes);
			break;
		default:
			ret = -EIO;
			break;
		}
		if (ret < 0)
			break;
		off += r.bytes;
		qoff += r.bytes;
		len -= r.bytes;
	}
	free(cbuf);
	return ret;
}

int qcow2_co_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags)
{
	return qcow2_read_guest(bs->opaque, off, len, qiov, qoff);
}

/* ---------------------------------------------------------------------------
 * In-flight allocations
 * ------------------------------------------------------------------------- */

static bool inflight_overlaps(struct qcow2_state *s, uint64_t c0, uint64_t c1)
{
	for (struct qcow2_inflight *f = s->inflight; f; f = f->next)
		if (c0 < f->end && f->start < c1)
			return true;
	return false;
}

bool qcow2_wait_inflight(struct qcow2_state *s, uint64_t c0, uint64_t c1)
{
	bool waited = false;

	while (inflight_overlaps(s, c0, c1)) {
		vd_co_queue_wait(&s->inflight_wq, &s->lock);
		waited = true;
	}
	return waited;
}

static void inflight_add(struct qcow2_state *s, struct qcow2_inflight *f, uint64_t c0, uint64_t c1)
{
	f->start = c0;
	f->end = c1;
	f->next = s->inflight;
	s->inflight = f;
}

static void inflight_del(struct qcow2_state *s, struct qcow2_inflight *f)
{
	for (struct qcow2_inflight **pp = &s->inflight; *pp; pp = &(*pp)->next) {
		if (*pp == f) {
			*pp = f->next;
			break;
		}
	}
	vd_co_queue_wake_all(&s->inflight_wq);
}

/* ---------------------------------------------------------------------------
 * Writes
 * ------------------------------------------------------------------------- */

static int write_host(struct qcow2_state *s, uint64_t host, uint64_t n, struct vd_qiov *qiov, size_t qoff, int flags)
{
	int ret = vd_bnode_co_pwritev(s->bs->file, host, n, qiov, qoff, flags);

	if (ret < 0)
		return ret;
	if (host + n > s->host_end)
		s->host_end = host + n;
	return 0;
}

static int write_in_place(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff,
			  int flags, struct vd_write_order *ord, uint64_t *done)
{
	struct qcow2_host_io io;
	uint8_t *l2;
	struct run r;
	int ret;

	*done = 0;
	ret = qcow2_get_l2_read(s, off, &l2, false);
	if (ret < 0 || !l2)
		return ret;
	ret = classify(s, l2, off, len, MODE_INPLACE, &r);
	qcow2_cache_put(&s->l2_cache, l2);
	if (ret < 0 || !r.bytes)
		return ret;
	/* Registered before any yield: a concurrent free cannot hand these clusters out meanwhile. */
	qcow2_host_io_begin(s, &io, r.host, r.bytes);
	ret = qcow2_overlap_check(s, 0, r.host, r.bytes);
	if (ret == 0 && r.host + r.bytes > s->bs->file->size) {
		/* A cluster another writer left partly past the end of the file. */
		vd_co_mutex_lock(&s->lock);
		ret = qcow2_ensure_file(s, r.host + r.bytes);
		vd_co_mutex_unlock(&s->lock);
	}
	if (ret == 0 && r.bytes == len)
		vd_write_order_release(ord); /* the rest of the write allocates nothing */
	if (ret == 0)
		ret = write_host(s, r.host, r.bytes, qiov, qoff, flags & VD_BREQ_FUA);
	qcow2_host_io_end(s, &io);
	if (ret == 0)
		*done = r.bytes;
	return ret;
}

static bool needs_new_cluster(uint64_t entry)
{
	return (entry & QCOW2_OFLAG_COMPRESSED) || !(entry & L2E_OFFSET_MASK) || !(entry & QCOW2_OFLAG_COPIED);
}

static uint32_t sc_mask(uint32_t from, uint32_t to) /* bits [from, to) of 32 */
{
	uint64_t m = ((1ULL << to) - 1) & ~((1ULL << from) - 1);

	return (uint32_t)m;
}

/* Where copy-on-write must start in the first cluster (relative), for guest data starting at rel offset a. */
static uint64_t cow_start_rel(struct qcow2_state *s, uint64_t entry, uint64_t bitmap, uint64_t a)
{
	uint32_t first;

	if (!s->extl2 || (entry & QCOW2_OFLAG_COMPRESSED))
		return 0;
	first = (uint32_t)(a >> s->sc_bits);
	if (entry & L2E_OFFSET_MASK) {
		uint32_t alloc = (uint32_t)(bitmap & L2_BITMAP_ALL_ALLOC);
		if (alloc && (uint32_t)__builtin_ctz(alloc) < first)
			first = (uint32_t)__builtin_ctz(alloc);
	}
	return (uint64_t)first << s->sc_bits;
}

/* Where copy-on-write must end in the last cluster (relative), for guest data ending at rel offset b (> 0). */
static uint64_t cow_end_rel(struct qcow2_state *s, uint64_t entry, uint64_t bitmap, uint64_t b)
{
	uint32_t last;

	if (!s->extl2 || (entry & QCOW2_OFLAG_COMPRESSED))
		return s->cluster_size;
	last = (uint32_t)((b + (1ULL << s->sc_bits) - 1) >> s->sc_bits);
	if (entry & L2E_OFFSET_MASK) {
		uint32_t alloc = (uint32_t)(bitmap & L2_BITMAP_ALL_ALLOC);
		if (alloc && 32u - (uint32_t)__builtin_clz(alloc) > last)
			last = 32u - (uint32_t)__builtin_clz(alloc);
	}
	return (uint64_t)last << s->sc_bits;
}

/* Are all subclusters of [a, b) (relative) in this cluster plain data? */
static bool all_normal(struct qcow2_state *s, uint64_t entry, uint64_t bitmap, uint64_t a, uint64_t b)
{
	for (uint32_t sc = (uint32_t)(a >> s->sc_bits); sc <= (uint32_t)((b - 1) >> s->sc_bits); sc++)
		if (qcow2_sc_type(s->extl2, entry, bitmap, sc) != QCOW2_SC_NORMAL)
			return false;
	return true;
}

/* Do subclusters [a, b) (relative, b > a) of this cluster read as zeroes (no backing data, no data)? */
static bool cow_reads_zero(struct qcow2_state *s, uint64_t entry, uint64_t bitmap, uint64_t cbase, uint64_t a,
			   uint64_t b)
{
	for (uint32_t sc = (uint32_t)(a >> s->sc_bits); sc <= (uint32_t)((b - 1) >> s->sc_bits); sc++) {
		enum qcow2_sc_type t = qcow2_sc_type(s->extl2, entry, bitmap, sc);

		if (qcow2_sc_type_is_zero(t))
			continue;
		if (!qcow2_sc_type_is_unalloc(t))
			return false;
		if (s->bs->backing ? cbase + ((uint64_t)sc << s->sc_bits) < s->bs->backing->size
				   : s->bs->backing_file[0] != 0)
			return false; /* the backing file's data shows through */
	}
	return true;
}

/*
 * Copy-on-write regions that read as zero.  Host clusters never used before
 * (fresh: past the old end of file) already read as zeroes, a hole: write
 * only the guest data.  Otherwise, into a file written through the page
 * cache: zero the new cluster range with one fallocate and write only the
 * guest data, as QEMU does, instead of writing whole clusters of zero
 * buffers (a 4k write into a new 64k cluster dirtied 16 times the page
 * cache).  With O_DIRECT one combined write measured faster (bench/RESULTS.md).
 * 1: done; 0: not done, write head + data + tail; <0: error.
 */
static int write_data_after_zeroing(struct qcow2_state *s, uint64_t host, uint64_t len, uint64_t data_host,
				    uint64_t data_len, struct vd_qiov *qiov, size_t qoff, bool fresh)
{
	int ret;

	if (!fresh && (s->bs->file->cache.direct || s->no_fast_zero))
		return 0;
	ret = qcow2_overlap_check(s, 0, host, len);
	if (ret == 0 && !fresh)
		ret = vd_bnode_co_pwrite_zeroes(s->bs->file, host, len, VD_BREQ_NO_FALLBACK);
	if (ret == -ENOTSUP) {
		vd_error_clear();
		s->no_fast_zero = true;
		return 0;
	}
	if (ret == 0)
		ret = write_host(s, data_host, data_len, qiov, qoff, 0);
	if (ret == 0 && host + len > s->host_end)
		s->host_end = host + len;
	return ret < 0 ? ret : 1;
}

/*
 * One allocating step at guest `off`: either a run of clusters that need new
 * host clusters, or one existing (COPIED) cluster whose touched subclusters
 * are not yet data.  *done = 0 means "retry the in-place path".
 */
static int write_allocating(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff,
			    struct vd_write_order *ord, uint64_t *done)
{
	uint64_t cs = s->cluster_size, l2_span = 1ULL << (s->cluster_bits + s->l2_bits);
	uint64_t c0, c1, k, end, cbase, host, cow_s, cow_e, data_end;
	uint64_t e0, b0, el, bl;
	struct qcow2_inflight inf;
	struct vd_qiov q;
	uint8_t *l2, *head = NULL, *tail = NULL;
	uint64_t head_len, tail_len;
	bool inplace, zero_cow, fresh = false;
	uint32_t idx0;
	int ret;

	*done = 0;
	vd_co_mutex_lock(&s->lock);
again:
	if (!s->writable) {
		vd_co_mutex_unlock(&s->lock);
		return s->bs->corrupt ? vd_error(EIO, "qcow2: image is corrupt") : vd_error(EACCES, "qcow2: read-only");
	}
	c0 = off >> s->cluster_bits;
	end = (off & ~(l2_span - 1)) + l2_span;
	if (off + len < end)
		end = off + len;
	c1 = (end + cs - 1) >> s->cluster_bits;
	if (c1 - c0 > MAX_ALLOC_CLUSTERS) {
		c1 = c0 + MAX_ALLOC_CLUSTERS;
		end = c1 << s->cluster_bits;
	}
	if (qcow2_wait_inflight(s, c0, c1))
		goto again;
	ret = qcow2_get_l2_write(s, off, &l2);
	if (ret < 0)
		goto out_unlock;
	/* get_l2_write may have yielded, but nobody else changes these entries: we hold the lock. */
	idx0 = qcow2_l2_index(s, off);
	e0 = qcow2_l2_entry(s, l2, idx0);
	b0 = qcow2_l2_bitmap(s, l2, idx0);
	cbase = c0 << s->cluster_bits;
	if (!(e0 & QCOW2_OFLAG_COMPRESSED) && ((e0 & L2E_OFFSET_MASK) & (cs - 1))) {
		qcow2_cache_put(&s->l2_cache, l2);
		ret = qcow2_signal_corruption(s, "cluster allocation offset %#" PRIx64 " unaligned (guest offset %#" PRIx64 ")",
					      e0 & L2E_OFFSET_MASK, off);
		goto out_unlock;
	}
	if (!needs_new_cluster(e0)) {
		uint64_t a = off - cbase, b = (end < cbase + cs ? end : cbase + cs) - cbase;
		if (all_normal(s, e0, b0, a, b)) {
			/* Someone allocated it meanwhile: write in place. */
			qcow2_cache_put(&s->l2_cache, l2);
			ret = 0;
			goto out_unlock;
		}
		inplace = true;
		k = 1;
		end = cbase + b;
		host = e0 & L2E_OFFSET_MASK;
		ret = qcow2_ensure_file(s, host + cs);
		if (ret < 0) {
			qcow2_cache_put(&s->l2_cache, l2);
			goto out_unlock;
		}
		if (s->extl2) {
			uint32_t sa = (uint32_t)(a >> s->sc_bits), sb = (uint32_t)((b - 1) >> s->sc_bits);
			cow_s = qcow2_sc_type(true, e0, b0, sa) == QCOW2_SC_NORMAL ? a : (uint64_t)sa << s->sc_bits;
			cow_e = qcow2_sc_type(true, e0, b0, sb) == QCOW2_SC_NORMAL ? b : (uint64_t)(sb + 1) << s->sc_bits;
		} else {
			/* A preallocated zero cluster becomes data: the rest must read as zeroes. */
			cow_s = 0;
			cow_e = cs;
		}
		cow_e += cbase;
		cow_s += cbase;
	} else {
		int64_t nh;
		uint64_t fresh_before;
		inplace = false;
		k = 1;
		while (c0 + k < c1 && needs_new_cluster(qcow2_l2_entry(s, l2, idx0 + (uint32_t)k)))
			k++;
		if (end > (c0 + k) << s->cluster_bits)
			end = (c0 + k) << s->cluster_bits;
		el = qcow2_l2_entry(s, l2, idx0 + (uint32_t)(k - 1));
		bl = qcow2_l2_bitmap(s, l2, idx0 + (uint32_t)(k - 1));
		cow_s = cbase + cow_start_rel(s, e0, b0, off - cbase);
		cow_e = ((c0 + k - 1) << s->cluster_bits) +
			cow_end_rel(s, el, bl, end - ((c0 + k - 1) << s->cluster_bits));
		fresh_before = s->fresh_start;
		nh = qcow2_alloc_clusters(s, k);
		if (nh < 0) {
			qcow2_cache_put(&s->l2_cache, l2);
			ret = (int)nh;
			goto out_unlock;
		}
		host = (uint64_t)nh;
		fresh = host >= fresh_before;
	}
	{
		uint64_t last = (c0 + k - 1) << s->cluster_bits;

		if (inplace)
			el = e0, bl = b0;
		zero_cow = (cow_s == off || cow_reads_zero(s, e0, b0, cbase, cow_s - cbase, off - cbase)) &&
			   (cow_e == end || cow_reads_zero(s, el, bl, last, end - last, cow_e - last));
	}
	qcow2_cache_put(&s->l2_cache, l2);
	inflight_add(s, &inf, c0, c0 + k);
	vd_co_mutex_unlock(&s->lock);
	if (end == off + len)
		vd_write_order_release(ord); /* the last allocation of this write is made */

	/* Data: head copy + guest data + tail copy, one write into the cluster(s). */
	data_end = end;
	head_len = off - cow_s;
	tail_len = cow_e - data_end;
	vd_qiov_init(&q);
	ret = 0;
	if (zero_cow && (head_len || tail_len)) {
		ret = write_data_after_zeroing(s, host + (cow_s - cbase), cow_e - cow_s, host + (off - cbase),
					       data_end - off, qiov, qoff, fresh);
		if (ret != 0)
			goto linked_data; /* done (1) or failed */
	}
	if (head_len) {
		head = vd_blk_alloc(head_len);
		if (!head)
			ret = vd_error(ENOMEM, "qcow2: out of memory");
		else {
			struct vd_qiov hq;
			vd_qiov_init_buf(&hq, head, head_len);
			ret = qcow2_read_guest(s, cow_s, head_len, &hq, 0);
			vd_qiov_destroy(&hq);
		}
		if (ret == 0)
			ret = vd_qiov_add(&q, head, head_len);
	}
	if (ret == 0)
		ret = vd_qiov_add_slice(&q, qiov, qoff, data_end - off);
	if (ret == 0 && tail_len) {
		tail = vd_blk_alloc(tail_len);
		if (!tail)
			ret = vd_error(ENOMEM, "qcow2: out of memory");
		else {
			struct vd_qiov tq;
			vd_qiov_init_buf(&tq, tail, tail_len);
			ret = qcow2_read_guest(s, data_end, tail_len, &tq, 0);
			vd_qiov_destroy(&tq);
		}
		if (ret == 0)
			ret = vd_qiov_add(&q, tail, tail_len);
	}
	if (ret == 0)
		ret = qcow2_overlap_check(s, 0, host + (cow_s - cbase), cow_e - cow_s);
	if (ret == 0)
		ret = write_host(s, host + (cow_s - cbase), cow_e - cow_s, &q, 0, 0);
linked_data:
	if (ret > 0)
		ret = 0;
	vd_qiov_destroy(&q);
	vd_blk_free(head);
	vd_blk_free(tail);

	/* Link the cluster(s). */
	vd_co_mutex_lock(&s->lock);
	if (ret < 0) {
		if (!inplace)
			(void)qcow2_free_clusters(s, host, k << s->cluster_bits);
		goto out_inflight;
	}
	if (!s->writable) {
		ret = vd_error(EIO, "qcow2: image is corrupt");
		goto out_inflight;
	}
	if (inplace)
		qcow2_cache_depends_on_flush(&s->l2_cache);
	else
		ret = qcow2_l2_after_alloc(s);
	if (ret == 0)
		ret = qcow2_get_l2_write(s, off, &l2);
	if (ret < 0) {
		if (!inplace)
			(void)qcow2_free_clusters(s, host, k << s->cluster_bits);
		goto out_inflight;
	}
	{
		uint64_t *old = NULL;
		uint64_t nold = 0;
		if (!inplace) {
			old = malloc(k * sizeof(*old));
			if (!old) {
				qcow2_cache_put(&s->l2_cache, l2);
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				(void)qcow2_free_clusters(s, host, k << s->cluster_bits);
				goto out_inflight;
			}
		}
		idx0 = qcow2_l2_index(s, off);
		for (uint64_t i = 0; i < k; i++) {
			uint32_t idx = idx0 + (uint32_t)i;
			uint64_t oe = qcow2_l2_entry(s, l2, idx), ob = qcow2_l2_bitmap(s, l2, idx);
			uint64_t ne, nb = 0;
			uint64_t ccbase = (c0 + i) << s->cluster_bits;
			if (inplace) {
				ne = host | QCOW2_OFLAG_COPIED;
				if (s->extl2) {
					uint32_t m = sc_mask((uint32_t)((cow_s - ccbase) >> s->sc_bits),
							     (uint32_t)((cow_e - ccbase + (1ULL << s->sc_bits) - 1) >> s->sc_bits));
					nb = (ob & ~((uint64_t)m << 32)) | m;
				}
			} else {
				ne = (host + (i << s->cluster_bits)) | QCOW2_OFLAG_COPIED;
				if (s->extl2) {
					uint32_t from = 0, to = 32, m;
					if (i == 0)
						from = (uint32_t)((cow_s - ccbase) >> s->sc_bits);
					if (i == k - 1)
						to = (uint32_t)((cow_e - ccbase + (1ULL << s->sc_bits) - 1) >> s->sc_bits);
					m = sc_mask(from, to);
					if (oe & QCOW2_OFLAG_COMPRESSED)
						nb = L2_BITMAP_ALL_ALLOC;
					else
						nb = (ob & L2_BITMAP_ALL_ZERO & ~((uint64_t)m << 32)) | m;
				}
				if ((oe & QCOW2_OFLAG_COMPRESSED) || (oe & L2E_OFFSET_MASK))
					old[nold++] = oe;
			}
			qcow2_l2_set(s, l2, idx, ne, nb);
		}
		qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		for (uint64_t i = 0; i < nold; i++) {
			int r2 = qcow2_free_entry_cluster(s, old[i]);
			if (r2 < 0 && ret == 0)
				ret = r2;
		}
		free(old);
	}
	if (ret == 0)
		*done = data_end - off;
out_inflight:
	inflight_del(s, &inf);
out_unlock:
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_do_pwritev(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags,
		     struct vd_write_order *ord)
{
	uint64_t done;
	int ret;

	while (len > 0) {
		ret = write_in_place(s, off, len, qiov, qoff, flags, ord, &done);
		if (ret < 0)
			return ret;
		if (!done) {
			ret = write_allocating(s, off, len, qiov, qoff, ord, &done);
			if (ret < 0)
				return ret;
		}
		off += done;
		qoff += done;
		len -= done;
	}
	return 0;
}

static int write_flush_fua(struct qcow2_state *s)
{
	int ret;

	vd_co_mutex_lock(&s->lock);
	ret = qcow2_flush_metadata(s);
	vd_co_mutex_unlock(&s->lock);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	return ret;
}

int qcow2_co_pwritev_ordered(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff,
			     int flags, struct vd_write_order *ord)
{
	struct qcow2_state *s = bs->opaque;
	int ret = 0;

	if (!s->writable)
		return bs->corrupt ? vd_error(EIO, "qcow2: image is corrupt") : vd_error(EACCES, "qcow2: read-only");
	if ((flags & VD_BREQ_COMPRESSED) || s->compress_writes) {
		while (len > 0 && ret == 0) {
			uint64_t cend = qcow2_start_of_cluster(s, off) + s->cluster_size, n;
			n = cend - off < len ? cend - off : len;
			if (!qcow2_offset_into_cluster(s, off) && (n == s->cluster_size || off + n >= bs->size)) {
				/* A run of whole clusters: compressed as one batch. */
				n = len >= s->cluster_size && off + len < bs->size ? len & ~((uint64_t)s->cluster_size - 1)
										    : len;
				ret = qcow2_co_pwrite_compressed(s, off, n, qiov, qoff);
			} else {
				ret = qcow2_do_pwritev(s, off, n, qiov, qoff, flags & ~VD_BREQ_FUA, NULL);
			}
			off += n;
			qoff += n;
			len -= n;
		}
	} else {
		ret = qcow2_do_pwritev(s, off, len, qiov, qoff, flags & ~VD_BREQ_FUA, ord);
	}
	if (ret == 0 && (flags & VD_BREQ_FUA))
		ret = write_flush_fua(s);
	return ret;
}

int qcow2_co_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags)
{
	return qcow2_co_pwritev_ordered(bs, off, len, qiov, qoff, flags, NULL);
}

/* ---------------------------------------------------------------------------
 * Write zeroes and discard
 * ------------------------------------------------------------------------- */

static int write_zero_buffer(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	size_t bl = len < (1u << 20) ? (size_t)len : (1u << 20);
	uint8_t *buf = vd_blk_alloc(bl);
	int ret = 0;

	if (!buf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	memset(buf, 0, bl);
	while (len > 0 && ret == 0) {
		struct vd_qiov q;
		size_t n = len < bl ? (size_t)len : bl;
		vd_qiov_init_buf(&q, buf, n);
		ret = qcow2_do_pwritev(s, off, n, &q, 0, 0, NULL);
		vd_qiov_destroy(&q);
		off += n;
		len -= n;
	}
	vd_blk_free(buf);
	return ret;
}

static bool has_backing(struct qcow2_state *s)
{
	return s->bs->backing || s->bs->backing_file[0];
}

/* Does the granule at goff (cluster or subcluster) already read as zeroes? */
static int granule_reads_zero(struct qcow2_state *s, uint64_t goff, bool *zero)
{
	uint8_t *l2;
	struct run r;
	int ret;

	*zero = false;
	ret = qcow2_get_l2_read(s, goff, &l2, false);
	if (ret < 0)
		return ret;
	ret = classify(s, l2, goff, 1, MODE_STATUS, &r);
	if (l2)
		qcow2_cache_put(&s->l2_cache, l2);
	if (ret < 0)
		return ret;
	if (qcow2_sc_type_is_zero(r.type))
		*zero = true;
	else if (qcow2_sc_type_is_unalloc(r.type))
		*zero = !s->bs->backing ? !s->bs->backing_file[0] : goff >= s->bs->backing->size;
	return 0;
}

int qcow2_zero_clusters(struct qcow2_state *s, uint64_t off, uint64_t len, bool unmap)
{
	uint64_t cs = s->cluster_size, l2_span = 1ULL << (s->cluster_bits + s->l2_bits), end = off + len;
	uint64_t *frees = NULL;
	int ret = 0;

	while (off < end) {
		uint64_t cend = (off & ~(l2_span - 1)) + l2_span, c0, c1, nf = 0;
		uint8_t *l2;
		bool dirty = false;

		if (cend > end)
			cend = end;
		c0 = off >> s->cluster_bits;
		c1 = (cend + cs - 1) >> s->cluster_bits;
		if (qcow2_wait_inflight(s, c0, c1))
			continue;
		ret = qcow2_get_l2_write(s, off, &l2);
		if (ret < 0)
			break;
		/* Partial subcluster ranges of compressed clusters cannot be expressed. */
		for (uint64_t c = c0; c < c1; c++) {
			uint64_t cb = c << s->cluster_bits, a = (off > cb ? off : cb) - cb;
			uint64_t b = (cend < cb + cs ? cend : cb + cs) - cb;
			uint64_t e = qcow2_l2_entry(s, l2, qcow2_l2_index(s, cb));
			bool full = a == 0 && (b == cs || cb + b >= s->bs->size);
			if (!full && (e & QCOW2_OFLAG_COMPRESSED)) {
				qcow2_cache_put(&s->l2_cache, l2);
				ret = -ENOTSUP;
				goto out;
			}
		}
		frees = realloc(frees, (c1 - c0) * sizeof(*frees));
		if (!frees) {
			qcow2_cache_put(&s->l2_cache, l2);
			ret = vd_error(ENOMEM, "qcow2: out of memory");
			goto out;
		}
		for (uint64_t c = c0; c < c1; c++) {
			uint64_t cb = c << s->cluster_bits, a = (off > cb ? off : cb) - cb;
			uint64_t b = (cend < cb + cs ? cend : cb + cs) - cb;
			uint32_t idx = qcow2_l2_index(s, cb);
			uint64_t e = qcow2_l2_entry(s, l2, idx), bm = qcow2_l2_bitmap(s, l2, idx), ne, nb = 0;
			bool full = a == 0 && (b == cs || cb + b >= s->bs->size);
			bool comp = e & QCOW2_OFLAG_COMPRESSED, host = !comp && (e & L2E_OFFSET_MASK);
			bool drop;

			if (!s->extl2) {
				if (s->version < 3) {
					ne = 0; /* only without a backing file: unallocated reads as zero */
					drop = comp || host;
				} else {
					drop = comp || (host && unmap);
					ne = drop || !host ? QCOW2_OFLAG_ZERO : (e | QCOW2_OFLAG_ZERO);
				}
			} else {
				uint32_t m = sc_mask((uint32_t)(a >> s->sc_bits),
						     (uint32_t)((b + (1ULL << s->sc_bits) - 1) >> s->sc_bits));
				if (full && (comp || (host && unmap) || !host)) {
					drop = comp || host;
					ne = 0;
					nb = L2_BITMAP_ALL_ZERO;
				} else {
					drop = false;
					ne = e;
					nb = (bm & ~(uint64_t)m) | ((uint64_t)m << 32);
				}
			}
			if (ne == e && nb == bm)
				continue;
			qcow2_l2_set(s, l2, idx, ne, nb);
			dirty = true;
			if (drop)
				frees[nf++] = e;
		}
		if (dirty)
			qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		for (uint64_t i = 0; i < nf; i++) {
			ret = qcow2_free_entry_cluster(s, frees[i]);
			if (ret < 0)
				goto out;
		}
		off = cend;
	}
out:
	free(frees);
	return ret;
}

int qcow2_co_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t g = 1ULL << s->sc_bits;
	bool unmap = flags & VD_BREQ_MAY_UNMAP;
	int ret = 0;

	if (!s->writable)
		return bs->corrupt ? vd_error(EIO, "qcow2: image is corrupt") : vd_error(EACCES, "qcow2: read-only");
	while (len > 0 && ret == 0) {
		uint64_t in = off & (g - 1), n;
		if (in || (len < g && off + len < bs->size)) {
			/* Unaligned head or tail granule. */
			bool zero;
			n = g - in < len ? g - in : len;
			ret = granule_reads_zero(s, off - in, &zero);
			if (ret == 0 && !zero) {
				if (flags & VD_BREQ_NO_FALLBACK)
					ret = -ENOTSUP;
				else
					ret = write_zero_buffer(s, off, n);
			}
		} else {
			n = len & ~(g - 1);
			if (off + len >= bs->size)
				n = len; /* the last partial granule ends the image */
			if (s->version < 3 && (has_backing(s) || !unmap)) {
				ret = (flags & VD_BREQ_NO_FALLBACK) ? -ENOTSUP : write_zero_buffer(s, off, n);
			} else {
				vd_co_mutex_lock(&s->lock);
				ret = qcow2_zero_clusters(s, off, n, unmap);
				vd_co_mutex_unlock(&s->lock);
				if (ret == -ENOTSUP)
					ret = (flags & VD_BREQ_NO_FALLBACK) ? -ENOTSUP : write_zero_buffer(s, off, n);
			}
		}
		off += n;
		len -= n;
	}
	if (ret == 0 && (flags & VD_BREQ_FUA))
		ret = write_flush_fua(s);
	return ret;
}

int qcow2_discard_clusters(struct qcow2_state *s, uint64_t off, uint64_t len, bool full_discard)
{
	uint64_t cs = s->cluster_size, l2_span = 1ULL << (s->cluster_bits + s->l2_bits), end = off + len;
	uint64_t *frees = NULL;
	int ret = 0;

	while (off < end) {
		uint64_t cend = (off & ~(l2_span - 1)) + l2_span, c0, c1, nf = 0;
		uint8_t *l2 = NULL;
		bool dirty = false;

		if (cend > end)
			cend = end;
		c0 = off >> s->cluster_bits;
		c1 = (cend + cs - 1) >> s->cluster_bits;
		if (qcow2_l1_index(s, off) >= s->l1_size || !(s->l1_table[qcow2_l1_index(s, off)] & L1E_OFFSET_MASK)) {
			/* No L2 table: nothing allocated here; only a backing file could show through. */
			if (full_discard || !has_backing(s) || s->version < 3) {
				off = cend;
				continue;
			}
		}
		if (qcow2_wait_inflight(s, c0, c1))
			continue;
		ret = qcow2_get_l2_write(s, off, &l2);
		if (ret < 0)
			break;
		frees = realloc(frees, (c1 - c0) * sizeof(*frees));
		if (!frees) {
			qcow2_cache_put(&s->l2_cache, l2);
			ret = vd_error(ENOMEM, "qcow2: out of memory");
			goto out;
		}
		for (uint64_t c = c0; c < c1; c++) {
			uint32_t idx = qcow2_l2_index(s, c << s->cluster_bits);
			uint64_t e = qcow2_l2_entry(s, l2, idx), bm = qcow2_l2_bitmap(s, l2, idx), ne = 0, nb = 0;
			bool comp = e & QCOW2_OFLAG_COMPRESSED, host = !comp && (e & L2E_OFFSET_MASK);
			bool has_data = comp || host || (s->extl2 ? (bm & L2_BITMAP_ALL_ALLOC) != 0 : false);

			if (!full_discard && (has_backing(s) || has_data)) {
				if (s->extl2)
					nb = L2_BITMAP_ALL_ZERO;
				else if (s->version >= 3)
					ne = QCOW2_OFLAG_ZERO;
			}
			if (ne == e && nb == bm)
				continue;
			qcow2_l2_set(s, l2, idx, ne, nb);
			dirty = true;
			if (comp || host)
				frees[nf++] = e;
		}
		if (dirty)
			qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		for (uint64_t i = 0; i < nf; i++) {
			ret = qcow2_free_entry_cluster(s, frees[i]);
			if (ret < 0)
				goto out;
		}
		off = cend;
	}
out:
	free(frees);
	return ret;
}

int qcow2_co_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t cs = s->cluster_size, start, end;
	int ret;

	if (!s->writable)
		return bs->corrupt ? vd_error(EIO, "qcow2: image is corrupt") : vd_error(EACCES, "qcow2: read-only");
	/* Only whole clusters (the last one may end the image); the rest is ignored, as discard allows. */
	start = (off + cs - 1) & ~(cs - 1);
	end = off + len;
	if (end < bs->size)
		end &= ~(cs - 1);
	if (start >= end)
		return 0;
	vd_co_mutex_lock(&s->lock);
	ret = qcow2_discard_clusters(s, start, end - start, false);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

/*
 * What commit leaves in the overlay (QEMU's make_empty): every guest cluster
 * unallocated, so the backing file shows through.  A full discard drops the
 * references (clusters a snapshot shares keep its reference); the header,
 * backing link, L1 and snapshots stay, so the image stays valid as it was.
 */
int qcow2_co_make_empty(struct vd_bnode *bs)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	if (!s->writable)
		return bs->corrupt ? vd_error(EIO, "qcow2: image is corrupt") : vd_error(EACCES, "qcow2: read-only");
	vd_co_mutex_lock(&s->lock);
	ret = qcow2_discard_clusters(s, 0, bs->size, true);
	if (ret == 0)
		ret = qcow2_flush_metadata(s);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

/* ---------------------------------------------------------------------------
 * Block status
 * ------------------------------------------------------------------------- */

/*
 * Does the file hold clearly fewer bytes than the image has clusters in use
 * (more than a tenth short, or two clusters)?  Then data clusters have holes
 * (never-used parts of fresh clusters, metadata preallocation) and block
 * status asks the file about them.  The same test as QEMU's, so that map
 * and measure give its answers; computed once per open.
 */
static int sparse_data_clusters(struct qcow2_state *s)
{
	int64_t real = vd_bnode_allocated_size(s->bs->file);
	uint64_t used = 0, threshold, end;

	if (real < 0) {
		vd_error_clear();
		return 0;
	}
	threshold = (uint64_t)real / s->cluster_size;
	threshold = threshold * 10 / 9 > threshold + 2 ? threshold * 10 / 9 : threshold + 2;
	end = (s->bs->file->size + s->cluster_size - 1) >> s->cluster_bits;
	for (uint64_t c = 0; c < end && used < threshold; c++) {
		uint64_t rc;
		int ret = qcow2_get_refcount(s, c, &rc);
		if (ret < 0)
			return ret;
		used += rc != 0;
	}
	return used >= threshold;
}

int qcow2_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			  struct vd_bnode **file)
{
	struct qcow2_state *s = bs->opaque;
	uint8_t *l2;
	struct run r;
	int ret;

	if (s->sparse_data < 0) {
		vd_co_mutex_lock(&s->lock);
		ret = s->sparse_data < 0 ? sparse_data_clusters(s) : s->sparse_data;
		vd_co_mutex_unlock(&s->lock);
		if (ret < 0)
			return ret;
		s->sparse_data = (int8_t)ret;
	}
	ret = qcow2_get_l2_read(s, off, &l2, false);
	if (ret < 0)
		return ret;
	ret = classify(s, l2, off, len, MODE_STATUS, &r);
	if (l2)
		qcow2_cache_put(&s->l2_cache, l2);
	if (ret < 0)
		return ret;
	*pnum = r.bytes;
	switch (r.type) {
	case QCOW2_SC_NORMAL:
		*map = r.host;
		*file = bs->file;
		return VD_BS_DATA | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID | (s->sparse_data ? VD_BS_PROBE_FILE : 0);
	case QCOW2_SC_ZERO_ALLOC:
		*map = r.host;
		*file = bs->file;
		return VD_BS_ZERO | VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
	case QCOW2_SC_ZERO_PLAIN:
		return VD_BS_ZERO | VD_BS_ALLOCATED;
	case QCOW2_SC_COMPRESSED:
		return VD_BS_DATA | VD_BS_ALLOCATED;
	default:
		return 0;
	}
}
