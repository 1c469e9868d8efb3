/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The request path.  Every vd_bnode_co_*() entry point:
 *   1. validates (range, permissions, corruption) so formats never see an
 *      invalid request;
 *   2. counts it in the node's statistics;
 *   3. aligns it to bs->request_alignment: misaligned reads read the
 *      enclosing blocks into a bounce buffer; misaligned writes do
 *      read-modify-write of the partial head/tail blocks, serialised against
 *      overlapping requests on the node (track.c) so two RMWs of one block
 *      cannot lose each other's bytes;
 *   4. splits data transfers by bs->max_transfer;
 *   5. applies the cache mode: writethrough flushes the node after each
 *      write, FUA is emulated with a flush for formats without FUA support,
 *      no-flush drops flushes.
 * Before all that, a request from a thread other than the node's home, on a
 * node whose format is not multiqueue, is forwarded to the home thread and
 * runs there from step 1 (see "Threads" in block.h).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block-int.h"

/* ---- threads ------------------------------------------------------------------------ */

/* Counters several threads bump at once. */
#define STAT_ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)

bool vd_bnode_runs_here(const struct vd_bnode *bs)
{
	return bs->fmt->multiqueue || bs->home == vd_loop_get();
}

enum fwd_op { FWD_READ, FWD_WRITE, FWD_ZEROES, FWD_DISCARD, FWD_FLUSH, FWD_STATUS, FWD_TRUNCATE };

/* A request travelling to its node's home thread (on the caller's stack). */
struct fwd {
	enum fwd_op op;
	struct vd_bnode *bs;
	uint64_t off, len;
	struct vd_qiov *qiov;
	size_t qiov_off;
	int flags;
	uint64_t *pnum, *map;
	struct vd_bnode **file;
	bool exact;
	const char *prealloc;
	int ret;
	char msg[512]; /* the home thread's error message, re-raised in the caller's */
};

/* The home thread: the same entry point again, which now runs here. */
static void fwd_run(void *opaque)
{
	struct fwd *f = opaque;
	struct vd_bnode *bs = f->bs;

	switch (f->op) {
	case FWD_READ:
		f->ret = vd_bnode_co_preadv(bs, f->off, f->len, f->qiov, f->qiov_off, f->flags);
		break;
	case FWD_WRITE:
		f->ret = vd_bnode_co_pwritev(bs, f->off, f->len, f->qiov, f->qiov_off, f->flags);
		break;
	case FWD_ZEROES:
		f->ret = vd_bnode_co_pwrite_zeroes(bs, f->off, f->len, f->flags);
		break;
	case FWD_DISCARD:
		f->ret = vd_bnode_co_pdiscard(bs, f->off, f->len);
		break;
	case FWD_FLUSH:
		f->ret = vd_bnode_co_flush(bs);
		break;
	case FWD_STATUS:
		f->ret = vd_bnode_co_block_status(bs, f->off, f->len, f->pnum, f->map, f->file);
		break;
	case FWD_TRUNCATE:
		f->ret = vd_bnode_co_truncate(bs, f->len, f->exact, f->prealloc);
		break;
	}
	if (f->ret < 0)
		snprintf(f->msg, sizeof(f->msg), "%s", vdisk_get_error_msg());
}

/* Both threads must accept cross-thread posts (forwarding, wake-ups of tracked requests). */
static int check_cross_thread(struct vd_bnode *bs)
{
	struct vd_loop *self = vd_loop_get();

	if (!vd_loop_accepts_remote(bs->home))
		return vd_error(EXDEV, "node '%s' belongs to another thread, which takes no requests from others",
				vd_bnode_name(bs));
	if (!vd_loop_accepts_remote(self) && vd_loop_enable_remote(self) < 0)
		return vd_error(EXDEV, "node '%s': this thread cannot take cross-thread calls", vd_bnode_name(bs));
	return 0;
}

static int forward(struct fwd *f)
{
	int ret = check_cross_thread(f->bs);

	if (ret < 0)
		return ret;
	vd_loop_co_call(f->bs->home, fwd_run, f);
	if (f->ret < 0)
		vd_error(-f->ret, "%s", f->msg);
	return f->ret;
}

/*
 * Where a request runs: 0 = in this thread, 1 = forward it home, <0 = it
 * cannot run (cross-thread calls not set up).
 */
static int route(struct vd_bnode *bs)
{
	if (bs->home == vd_loop_get())
		return 0;
	if (!bs->fmt->multiqueue)
		return 1;
	return check_cross_thread(bs);
}

/* ---- validation -------------------------------------------------------------------- */

static int check_range(struct vd_bnode *bs, const char *op, uint64_t off, uint64_t len)
{
	uint64_t size = vd_bnode_size(bs);

	if (off > size || len > size - off)
		return vd_error(EINVAL, "node '%s': %s of [%" PRIu64 ", +%" PRIu64 ") is past the end (size %" PRIu64 ")",
				vd_bnode_name(bs), op, off, len, size);
	return 0;
}

static int check_writable(struct vd_bnode *bs, const char *op)
{
	if (bs->read_only)
		return vd_error(EACCES, "node '%s' is read-only: %s refused", vd_bnode_name(bs), op);
	if (bs->corrupt)
		return vd_error(EIO, "node '%s' is marked corrupt: %s refused (run check -r)", vd_bnode_name(bs), op);
	return 0;
}

static int check_qiov(struct vd_bnode *bs, const char *op, const struct vd_qiov *qiov, size_t qiov_off, uint64_t len)
{
	if (len && (!qiov || qiov_off > qiov->size || len > qiov->size - qiov_off))
		return vd_error(EINVAL, "node '%s': %s of %" PRIu64 " bytes from a %zu-byte buffer at offset %zu",
				vd_bnode_name(bs), op, len, qiov ? qiov->size : 0, qiov_off);
	return 0;
}

static int check_op(struct vd_bnode *bs, const char *op, bool present)
{
	if (!present)
		return vd_error(ENOTSUP, "node '%s': format '%s' does not support %s", vd_bnode_name(bs), bs->fmt->name,
				op);
	return 0;
}

static bool is_aligned(const struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	return bs->request_alignment <= 1 || ((off | len) % bs->request_alignment) == 0;
}

/* ---- aligned transfers, split by max_transfer ------------------------------------------- */

static uint64_t max_chunk(const struct vd_bnode *bs)
{
	uint64_t align = bs->request_alignment > 1 ? bs->request_alignment : 1;
	uint64_t max = vd_align_down(bs->max_transfer, align);

	return bs->max_transfer && max ? max : UINT64_MAX;
}

typedef int (*vd_rw_op)(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
			int flags);

/* Call a format's read or write op in pieces of at most max_transfer bytes. */
static int rw_chunks(struct vd_bnode *bs, vd_rw_op op, uint64_t off, uint64_t len, struct vd_qiov *qiov,
		     size_t qiov_off, int flags)
{
	uint64_t chunk = max_chunk(bs);

	while (len > 0) {
		uint64_t n = len < chunk ? len : chunk;
		int ret = op(bs, off, n, qiov, qiov_off, flags);

		if (ret < 0)
			return ret;
		off += n;
		qiov_off += n;
		len -= n;
	}
	return 0;
}

/* ---- misaligned requests ---------------------------------------------------------------- */

/*
 * A misaligned request [off, end) is cut at alignment boundaries into a
 * partial head block, an aligned middle and a partial tail block; only the
 * partial blocks go through the one-block bounce buffer.
 */
struct pieces {
	uint64_t head_blk, head_len; /* head_len 0: no partial head */
	uint64_t mid_off, mid_len;
	uint64_t tail_blk, tail_len; /* tail_len 0: no partial tail */
};

static struct pieces cut(uint64_t off, uint64_t len, uint64_t align)
{
	uint64_t end = off + len, pos = off;
	struct pieces p = { 0 };

	if (off % align) {
		uint64_t blk_end = vd_align_down(off, align) + align;

		p.head_blk = vd_align_down(off, align);
		p.head_len = (end < blk_end ? end : blk_end) - off;
		pos += p.head_len;
	}
	p.mid_off = pos;
	p.mid_len = pos < vd_align_down(end, align) ? vd_align_down(end, align) - pos : 0;
	pos += p.mid_len;
	if (pos < end) {
		p.tail_blk = pos;
		p.tail_len = end - pos;
	}
	return p;
}

static int read_block(struct vd_bnode *bs, uint64_t blk, void *bounce, int flags)
{
	struct vd_qiov q;

	vd_qiov_init_buf(&q, bounce, bs->request_alignment);
	return rw_chunks(bs, bs->fmt->co_preadv, blk, bs->request_alignment, &q, 0, flags);
}

static int write_block(struct vd_bnode *bs, uint64_t blk, void *bounce, int flags)
{
	struct vd_qiov q;

	vd_qiov_init_buf(&q, bounce, bs->request_alignment);
	return rw_chunks(bs, bs->fmt->co_pwritev, blk, bs->request_alignment, &q, 0, flags);
}

/* Read the partial block at blk and copy [off, off+n) of it into qiov. */
static int read_partial(struct vd_bnode *bs, uint64_t blk, uint64_t off, uint64_t n, void *bounce,
			struct vd_qiov *qiov, size_t qiov_pos, int flags)
{
	int ret = read_block(bs, blk, bounce, flags);

	if (ret == 0)
		vd_qiov_from_buf(qiov, qiov_pos, (char *)bounce + (off - blk), n);
	return ret;
}

static int preadv_misaligned(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov,
			     size_t qiov_off, int flags)
{
	struct pieces p = cut(off, len, bs->request_alignment);
	void *bounce = NULL;
	int ret = 0;

	if (p.head_len || p.tail_len) {
		bounce = vd_blk_alloc(bs->request_alignment);
		if (!bounce)
			return vd_error(ENOMEM, "node '%s': out of memory for a bounce buffer", vd_bnode_name(bs));
	}
	if (p.head_len)
		ret = read_partial(bs, p.head_blk, off, p.head_len, bounce, qiov, qiov_off, flags);
	if (ret == 0 && p.mid_len)
		ret = rw_chunks(bs, bs->fmt->co_preadv, p.mid_off, p.mid_len, qiov, qiov_off + (p.mid_off - off), flags);
	if (ret == 0 && p.tail_len)
		ret = read_partial(bs, p.tail_blk, p.tail_blk, p.tail_len, bounce, qiov,
				   qiov_off + (p.tail_blk - off), flags);
	vd_blk_free(bounce);
	return ret;
}

/* Where the bytes of a write come from: a qiov, or zeroes (qiov NULL). */
struct wsrc {
	struct vd_qiov *qiov;
	size_t qiov_off; /* position of the request's first byte */
	uint64_t off;    /* the request's offset */
	struct vd_write_order *ord; /* NULL, or released by the one write of the data */
};

/* Read-modify-write of one partial block: bytes [off, off+n) come from src. */
static int rmw_block(struct vd_bnode *bs, uint64_t blk, uint64_t off, uint64_t n, void *bounce,
		     const struct wsrc *src, int flags)
{
	char *dst = (char *)bounce + (off - blk);
	int ret = read_block(bs, blk, bounce, 0);

	if (ret < 0)
		return ret;
	if (src->qiov)
		vd_qiov_to_buf(src->qiov, src->qiov_off + (off - src->off), dst, n);
	else
		memset(dst, 0, n);
	return write_block(bs, blk, bounce, flags);
}

/* Write the aligned middle of a request. */
typedef int (*mid_writer)(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src, int flags);

static int write_mid_data(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src, int flags)
{
	if (src->ord && len <= max_chunk(bs)) {
		if (bs->fmt->co_pwritev_ordered)
			return bs->fmt->co_pwritev_ordered(bs, off, len, src->qiov, src->qiov_off + (off - src->off), flags,
							   src->ord);
		vd_write_order_release(src->ord); /* nothing to allocate: the write is issued next */
	}
	return rw_chunks(bs, bs->fmt->co_pwritev, off, len, src->qiov, src->qiov_off + (off - src->off), flags);
}

static int write_misaligned(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src,
			    mid_writer write_mid, int flags)
{
	struct pieces p = cut(off, len, bs->request_alignment);
	void *bounce = NULL;
	int ret = 0;

	if (p.head_len || p.tail_len) {
		bounce = vd_blk_alloc(bs->request_alignment);
		if (!bounce)
			return vd_error(ENOMEM, "node '%s': out of memory for a bounce buffer", vd_bnode_name(bs));
	}
	if (p.head_len)
		ret = rmw_block(bs, p.head_blk, off, p.head_len, bounce, src, flags);
	if (ret == 0 && p.mid_len)
		ret = write_mid(bs, p.mid_off, p.mid_len, src, flags);
	if (ret == 0 && p.tail_len)
		ret = rmw_block(bs, p.tail_blk, p.tail_blk, p.tail_len, bounce, src, flags);
	vd_blk_free(bounce);
	return ret;
}

/*
 * Nodes with a backing child track every request (see vd_bnode_track_begin):
 * a stream job excludes them from the range it copies and, to change the
 * chain, from the whole node.  Aligning nodes track writes anyway.
 */
static bool guard_begin(struct vd_bnode *bs, struct vd_tracked *t, uint64_t off, uint64_t len)
{
	if (!bs->backing || bs->request_alignment > 1)
		return false;
	vd_bnode_track_begin(bs, t, off, len, false);
	return true;
}

/*
 * Run a modifying request under tracking (only nodes that align need it):
 * misaligned requests serialise against overlapping ones, aligned ones wait
 * only for overlapping misaligned ones.  Ranges are widened to whole blocks,
 * since that is what read-modify-write touches.
 */
static int tracked_write(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src,
			 mid_writer write_mid, int flags)
{
	uint64_t align = bs->request_alignment;
	uint64_t t_off, t_end;
	struct vd_tracked t;
	bool misaligned;
	int ret;

	if (align <= 1) {
		bool guarded = guard_begin(bs, &t, off, len);

		ret = write_mid(bs, off, len, src, flags);
		if (guarded)
			vd_bnode_track_end(bs, &t);
		return ret;
	}
	misaligned = !is_aligned(bs, off, len);
	if (misaligned && src->ord) {
		/* Partial blocks are written after the middle: release only at the end. */
		struct wsrc unordered = *src;

		unordered.ord = NULL;
		return tracked_write(bs, off, len, &unordered, write_mid, flags);
	}
	t_off = vd_align_down(off, align);
	t_end = vd_align_up(off + len, align);
	vd_bnode_track_begin(bs, &t, t_off, t_end - t_off, misaligned);
	ret = misaligned ? write_misaligned(bs, off, len, src, write_mid, flags) : write_mid(bs, off, len, src, flags);
	vd_bnode_track_end(bs, &t);
	return ret;
}

/* ---- cache mode ------------------------------------------------------------------------- */

/*
 * Flags for the format, and whether a flush must follow: writethrough flushes
 * after every write (FUA then is redundant), FUA is emulated by a flush when
 * the format cannot do it.
 */
static int write_flags(const struct vd_bnode *bs, int flags, bool *flush_after)
{
	if (!bs->cache.writeback) {
		*flush_after = true;
		return flags & ~VD_BREQ_FUA;
	}
	*flush_after = (flags & VD_BREQ_FUA) && !bs->fmt->supports_fua;
	return *flush_after ? flags & ~VD_BREQ_FUA : flags;
}

static int finish_write(struct vd_bnode *bs, int ret, bool flush_after)
{
	if (ret == 0 && flush_after)
		ret = vd_bnode_co_flush(bs);
	return ret;
}

/* ---- entry points ---------------------------------------------------------------------- */

int vd_bnode_co_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	int ret = route(bs);
	struct vd_tracked t;
	bool guarded;

	if (ret > 0)
		return forward(&(struct fwd){ .op = FWD_READ, .bs = bs, .off = off, .len = len, .qiov = qiov,
					       .qiov_off = qiov_off, .flags = flags });
	if (ret == 0)
		ret = check_range(bs, "read", off, len);

	if (ret == 0)
		ret = check_qiov(bs, "read", qiov, qiov_off, len);
	if (ret == 0)
		ret = check_op(bs, "read", bs->fmt->co_preadv);
	if (ret < 0 || len == 0)
		return ret;
	STAT_ADD(bs->rd_ops, 1);
	STAT_ADD(bs->rd_bytes, len);
	guarded = guard_begin(bs, &t, off, len);
	if (!is_aligned(bs, off, len))
		ret = preadv_misaligned(bs, off, len, qiov, qiov_off, flags);
	else
		ret = rw_chunks(bs, bs->fmt->co_preadv, off, len, qiov, qiov_off, flags);
	if (guarded)
		vd_bnode_track_end(bs, &t);
	return ret;
}

int vd_bnode_map_to_fd(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off)
{
	int ret;

	if (!bs->fmt->map_to_fd || bs->request_alignment > 1 || len == 0 || off > bs->size || len > bs->size - off)
		return -ENOTSUP;
	ret = bs->fmt->map_to_fd(bs, off, len, fd, fd_off);
	if (ret == 0) {
		STAT_ADD(bs->rd_ops, 1);
		STAT_ADD(bs->rd_bytes, len);
	}
	return ret;
}

void vd_write_order_release(struct vd_write_order *ord)
{
	if (ord && !ord->released) {
		ord->released = true;
		ord->release(ord->opaque);
	}
}

int vd_bnode_co_pwritev_ordered(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov,
				size_t qiov_off, int flags, struct vd_write_order *ord)
{
	struct wsrc src = { .qiov = qiov, .qiov_off = qiov_off, .off = off, .ord = ord };
	bool flush_after;
	int ret = route(bs);

	if (ret > 0) {
		ret = forward(&(struct fwd){ .op = FWD_WRITE, .bs = bs, .off = off, .len = len, .qiov = qiov,
					      .qiov_off = qiov_off, .flags = flags });
		vd_write_order_release(ord);
		return ret;
	}
	if (ret == 0)
		ret = check_writable(bs, "write");

	if (ret == 0)
		ret = check_range(bs, "write", off, len);
	if (ret == 0)
		ret = check_qiov(bs, "write", qiov, qiov_off, len);
	if (ret == 0)
		ret = check_op(bs, "write", bs->fmt->co_pwritev);
	if (ret < 0 || len == 0) {
		vd_write_order_release(ord);
		return ret;
	}
	STAT_ADD(bs->wr_ops, 1);
	STAT_ADD(bs->wr_bytes, len);
	flags = write_flags(bs, flags, &flush_after);
	ret = tracked_write(bs, off, len, &src, write_mid_data, flags);
	vd_write_order_release(ord); /* not done below (error, split or misaligned write) */
	return finish_write(bs, ret, flush_after);
}

int vd_bnode_co_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
			int flags)
{
	return vd_bnode_co_pwritev_ordered(bs, off, len, qiov, qiov_off, flags, NULL);
}

int vd_bnode_co_pread(struct vd_bnode *bs, uint64_t off, void *buf, size_t len)
{
	struct vd_qiov q;

	vd_qiov_init_buf(&q, buf, len);
	return vd_bnode_co_preadv(bs, off, len, &q, 0, 0);
}

int vd_bnode_co_pwrite(struct vd_bnode *bs, uint64_t off, const void *buf, size_t len, int flags)
{
	struct vd_qiov q;

	vd_qiov_init_buf(&q, (void *)buf, len);
	return vd_bnode_co_pwritev(bs, off, len, &q, 0, flags);
}

#define ZERO_CHUNK (1u << 20)

/* Write-zeroes the format cannot do efficiently: write zero buffers. */
static int write_zero_buffers(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	size_t chunk = len < ZERO_CHUNK ? (size_t)len : ZERO_CHUNK;
	void *zeroes = vd_blk_alloc(chunk);
	struct vd_qiov q;
	int ret = 0;

	if (!zeroes)
		return vd_error(ENOMEM, "node '%s': out of memory writing zeroes", vd_bnode_name(bs));
	memset(zeroes, 0, chunk);
	while (ret == 0 && len > 0) {
		size_t n = len < chunk ? (size_t)len : chunk;

		vd_qiov_init_buf(&q, zeroes, n);
		ret = rw_chunks(bs, bs->fmt->co_pwritev, off, n, &q, 0, flags & VD_BREQ_FUA);
		off += n;
		len -= n;
	}
	vd_blk_free(zeroes);
	return ret;
}

static int write_mid_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src, int flags)
{
	int ret = -ENOTSUP;

	(void)src;
	if (bs->fmt->co_pwrite_zeroes)
		ret = bs->fmt->co_pwrite_zeroes(bs, off, len, flags);
	if (ret != -ENOTSUP)
		return ret;
	if (flags & VD_BREQ_NO_FALLBACK)
		return vd_error(ENOTSUP, "node '%s': no efficient write-zeroes, and no fallback allowed",
				vd_bnode_name(bs));
	if (!bs->fmt->co_pwritev)
		return check_op(bs, "write-zeroes", false);
	return write_zero_buffers(bs, off, len, flags);
}

int vd_bnode_co_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	struct wsrc zeroes = { .qiov = NULL, .off = off };
	bool flush_after;
	int ret = route(bs);

	if (ret > 0)
		return forward(&(struct fwd){ .op = FWD_ZEROES, .bs = bs, .off = off, .len = len, .flags = flags });
	if (ret == 0)
		ret = check_writable(bs, "write-zeroes");

	if (ret == 0)
		ret = check_range(bs, "write-zeroes", off, len);
	if (ret < 0 || len == 0)
		return ret;
	/* Partial blocks need real zero bytes written: that is a fallback. */
	if ((flags & VD_BREQ_NO_FALLBACK) && !is_aligned(bs, off, len))
		return vd_error(ENOTSUP, "node '%s': write-zeroes of [%" PRIu64 ", +%" PRIu64 ") is not aligned to %" PRIu32
				" and no fallback is allowed", vd_bnode_name(bs), off, len, bs->request_alignment);
	STAT_ADD(bs->wr_ops, 1);
	STAT_ADD(bs->wr_bytes, len);
	flags = write_flags(bs, flags, &flush_after);
	ret = tracked_write(bs, off, len, &zeroes, write_mid_zeroes, flags);
	return finish_write(bs, ret, flush_after);
}

static int discard_mid(struct vd_bnode *bs, uint64_t off, uint64_t len, const struct wsrc *src, int flags)
{
	(void)src;
	(void)flags;
	return bs->fmt->co_pdiscard(bs, off, len);
}

/* Discard is advisory: the partial blocks of a misaligned discard are left alone. */
int vd_bnode_co_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	uint64_t align = bs->request_alignment > 1 ? bs->request_alignment : 1;
	uint64_t a_off = vd_align_up(off, align), a_end = vd_align_down(off + len, align);
	bool flush_after;
	int ret = route(bs);

	if (ret > 0)
		return forward(&(struct fwd){ .op = FWD_DISCARD, .bs = bs, .off = off, .len = len });
	if (ret == 0)
		ret = check_writable(bs, "discard");

	if (ret == 0)
		ret = check_range(bs, "discard", off, len);
	if (ret == 0)
		ret = check_op(bs, "discard", bs->fmt->co_pdiscard);
	if (ret < 0 || a_end <= a_off)
		return ret;
	STAT_ADD(bs->discard_ops, 1);
	STAT_ADD(bs->discard_bytes, len);
	write_flags(bs, 0, &flush_after);
	ret = tracked_write(bs, a_off, a_end - a_off, NULL, discard_mid, 0);
	return finish_write(bs, ret, flush_after);
}

/*
 * Flush the format's caches, then the children.  Read-only nodes have
 * nothing to write back (and libvdisk refuses flushes on them).
 */
int vd_bnode_co_flush(struct vd_bnode *bs)
{
	int ret = 0;

	if (!bs || bs->read_only || bs->cache.no_flush)
		return 0;
	ret = route(bs);
	if (ret > 0)
		return forward(&(struct fwd){ .op = FWD_FLUSH, .bs = bs });
	if (ret < 0)
		return ret;
	STAT_ADD(bs->flush_ops, 1);
	if (bs->fmt->co_flush)
		ret = bs->fmt->co_flush(bs);
	if (ret == 0)
		ret = vd_bnode_co_flush(bs->file);
	if (ret == 0)
		ret = vd_bnode_co_flush(bs->backing);
	return ret;
}

/* ---- block status -------------------------------------------------------------------- */

/* Status when the format has no co_block_status. */
static int default_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
				struct vd_bnode **file)
{
	*pnum = len;
	if (bs->fmt->is_protocol) {
		*map = off;
		*file = bs;
		return VD_BS_DATA | VD_BS_OFFSET_VALID;
	}
	return VD_BS_DATA; /* a format that cannot tell: everything is data of its own */
}

/* VD_BS_RECURSE: the answer is *file's status at *map (raw over its file). */
static int recurse_status(int ret, uint64_t *pnum, uint64_t *map, struct vd_bnode **file)
{
	uint64_t n2, map2 = 0;
	struct vd_bnode *file2 = NULL;
	int ret2 = vd_bnode_co_block_status(*file, *map, *pnum, &n2, &map2, &file2);

	if (ret2 < 0)
		return ret2;
	if (n2 == 0) /* past the file's end: reads as zeroes */
		return (ret & VD_BS_OFFSET_VALID) | VD_BS_ZERO;
	*pnum = n2 < *pnum ? n2 : *pnum;
	*map = map2;
	*file = file2;
	return ret2 & (VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID);
}

/*
 * ALLOCATED: this layer answers.  Neither DATA nor ZERO means "read from the
 * backing": zeroes when there is no backing file or the range is past its
 * end (an image whose backing was not opened, VD_BO_NO_BACKING, cannot say).
 */
static int add_allocation(struct vd_bnode *bs, uint64_t off, int ret)
{
	if (ret & (VD_BS_DATA | VD_BS_ZERO))
		return ret | VD_BS_ALLOCATED;
	if (!bs->fmt->supports_backing)
		return ret;
	if (bs->backing ? off >= bs->backing->size : !bs->backing_file[0])
		ret |= VD_BS_ZERO;
	return ret;
}

/* The format's answer, checked, with VD_BS_RECURSE resolved. */
static int format_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *n, uint64_t *map,
			       struct vd_bnode **file)
{
	int ret;

	if (bs->fmt->co_block_status)
		ret = bs->fmt->co_block_status(bs, off, len, n, map, file);
	else
		ret = default_block_status(bs, off, len, n, map, file);
	if (ret < 0)
		return ret;
	if (*n == 0 || *n > len)
		return vd_error(EIO, "node '%s': format '%s' answered block status for %" PRIu64 " of %" PRIu64 " bytes",
				vd_bnode_name(bs), bs->fmt->name, *n, len);
	if ((ret & VD_BS_RECURSE) && (ret & VD_BS_OFFSET_VALID) && *file)
		ret = recurse_status(ret, n, map, file);
	return ret;
}

/*
 * VD_BS_PROBE_FILE: data of a format (a qcow2 data cluster) may lie in a
 * hole of its file, as the untouched part of a never-used cluster does: ask
 * the file, as QEMU does, so map, convert and NBD block status see those
 * bytes as zeroes.
 */
static int probe_file_zero(struct vd_bnode *bs, int ret, uint64_t *n, uint64_t map, struct vd_bnode *file)
{
	uint64_t fn = 0;
	int fret;

	if (!(ret & VD_BS_PROBE_FILE))
		return ret;
	ret &= ~VD_BS_PROBE_FILE;
	if (!(ret & VD_BS_DATA) || !(ret & VD_BS_OFFSET_VALID) || (ret & VD_BS_ZERO) || !file || file == bs)
		return ret;
	fret = vd_bnode_co_block_status(file, map, *n, &fn, NULL, NULL);
	if (fret < 0) {
		vd_error_clear(); /* the format's answer stands */
		return ret;
	}
	if (fn == 0) /* past the file's end */
		return ret | VD_BS_ZERO;
	*n = fn < *n ? fn : *n;
	return ret | (fret & VD_BS_ZERO);
}

int vd_bnode_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file)
{
	uint64_t local_map = 0, n = 0;
	struct vd_bnode *local_file = NULL;
	struct vd_tracked t;
	bool guarded;
	uint64_t size;
	int ret = route(bs);

	if (ret > 0)
		return forward(&(struct fwd){ .op = FWD_STATUS, .bs = bs, .off = off, .len = len, .pnum = pnum,
					       .map = map, .file = file });
	if (ret < 0)
		return ret;
	*pnum = 0;
	size = vd_bnode_size(bs);
	if (off >= size)
		return VD_BS_EOF;
	if (len > size - off)
		len = size - off;
	if (len == 0)
		return 0;
	guarded = guard_begin(bs, &t, off, len);
	ret = format_block_status(bs, off, len, &n, &local_map, &local_file);
	if (ret >= 0)
		ret = probe_file_zero(bs, ret, &n, local_map, local_file);
	if (ret >= 0)
		ret = add_allocation(bs, off, ret & ~VD_BS_RECURSE); /* reads bs->backing: still guarded */
	if (guarded)
		vd_bnode_track_end(bs, &t);
	if (ret < 0)
		return ret;
	if (off + n == size)
		ret |= VD_BS_EOF;
	*pnum = n;
	if (map)
		*map = local_map;
	if (file)
		*file = (ret & VD_BS_OFFSET_VALID) ? local_file : NULL;
	return ret;
}

/*
 * Is [off, off+len) allocated in any layer from top down to base (exclusive)?
 * Returns 1 or 0 with *pnum bytes having that answer, as QEMU's
 * bdrv_is_allocated_above: a layer shorter than the request only limits the
 * answer where it ends before the top's size.
 */
void vd_bnode_chain_hold(struct vd_bnode *top)
{
	pthread_mutex_lock(&top->track_lock);
	while (top->chain_switching)
		vd_co_queue_wait_mt(&top->chain_waiters, &top->track_lock);
	top->chain_readers++;
	pthread_mutex_unlock(&top->track_lock);
}

void vd_bnode_chain_release(struct vd_bnode *top)
{
	pthread_mutex_lock(&top->track_lock);
	if (--top->chain_readers == 0 && top->chain_switching)
		vd_co_queue_wake_all(&top->chain_waiters);
	pthread_mutex_unlock(&top->track_lock);
}

void vd_bnode_chain_switch_begin(struct vd_bnode *top)
{
	pthread_mutex_lock(&top->track_lock);
	while (top->chain_switching) /* another switch: one at a time */
		vd_co_queue_wait_mt(&top->chain_waiters, &top->track_lock);
	top->chain_switching = true;
	while (top->chain_readers)
		vd_co_queue_wait_mt(&top->chain_waiters, &top->track_lock);
	pthread_mutex_unlock(&top->track_lock);
}

void vd_bnode_chain_switch_end(struct vd_bnode *top)
{
	pthread_mutex_lock(&top->track_lock);
	top->chain_switching = false;
	vd_co_queue_wake_all(&top->chain_waiters);
	pthread_mutex_unlock(&top->track_lock);
}

static int allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len, uint64_t *pnum)
{
	uint64_t n = len;

	for (struct vd_bnode *bs = top; bs && bs != base; bs = bs->backing) {
		uint64_t layer_n = 0;
		int ret = vd_bnode_co_block_status(bs, off, n, &layer_n, NULL, NULL);

		if (ret < 0)
			return ret;
		if (ret & VD_BS_ALLOCATED) {
			*pnum = layer_n;
			return 1;
		}
		/* Past a lower layer's end nothing is allocated there: keep n. */
		if (layer_n && layer_n < n && (bs == top || off + layer_n < vd_bnode_size(bs)))
			n = layer_n;
	}
	*pnum = n;
	return 0;
}

int vd_bnode_co_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
				   uint64_t *pnum)
{
	int ret;

	vd_bnode_chain_hold(top);
	ret = allocated_above(top, base, off, len, pnum);
	vd_bnode_chain_release(top);
	return ret;
}

int vd_bnode_co_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	int ret;

	/* Always at home, even on multiqueue nodes: the format drains the other threads. */
	if (bs->home != vd_loop_get()) {
		ret = check_cross_thread(bs);
		if (ret < 0)
			return ret;
		return forward(&(struct fwd){ .op = FWD_TRUNCATE, .bs = bs, .len = size, .exact = exact,
					       .prealloc = prealloc });
	}
	ret = check_writable(bs, "resize");

	if (ret == 0)
		ret = check_op(bs, "resize", bs->fmt->co_truncate);
	if (ret < 0)
		return ret;
	return bs->fmt->co_truncate(bs, size, exact, prealloc);
}
