/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Synchronous wrappers: run the coroutine entry point in a coroutine and
 * drive the thread's loop until it returns (vd_co_run_sync; called from a
 * coroutine they simply call through).
 */
#include <string.h>

#include "block-int.h"

struct sync_req {
	struct vd_bnode *bs, *base;
	uint64_t off, len;
	void *buf;
	int flags;
	bool exact;
	const char *prealloc;
	uint64_t *pnum, *map;
	struct vd_bnode **file;
	struct vd_check_result *check;
	int ret;
};

static int run(vd_co_fn fn, struct sync_req *r)
{
	vd_co_run_sync(fn, r);
	return r->ret;
}

static void co_pread(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_pread(r->bs, r->off, r->buf, r->len);
}

int vd_bnode_pread(struct vd_bnode *bs, uint64_t off, void *buf, size_t len)
{
	struct sync_req r = { .bs = bs, .off = off, .buf = buf, .len = len };

	return run(co_pread, &r);
}

static void co_pwrite(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_pwrite(r->bs, r->off, r->buf, r->len, r->flags);
}

int vd_bnode_pwrite(struct vd_bnode *bs, uint64_t off, const void *buf, size_t len, int flags)
{
	struct sync_req r = { .bs = bs, .off = off, .buf = (void *)buf, .len = len, .flags = flags };

	return run(co_pwrite, &r);
}

static void co_pwrite_zeroes(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_pwrite_zeroes(r->bs, r->off, r->len, r->flags);
}

int vd_bnode_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	struct sync_req r = { .bs = bs, .off = off, .len = len, .flags = flags };

	return run(co_pwrite_zeroes, &r);
}

static void co_pdiscard(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_pdiscard(r->bs, r->off, r->len);
}

int vd_bnode_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	struct sync_req r = { .bs = bs, .off = off, .len = len };

	return run(co_pdiscard, &r);
}

static void co_flush(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_flush(r->bs);
}

int vd_bnode_flush(struct vd_bnode *bs)
{
	struct sync_req r = { .bs = bs };

	return run(co_flush, &r);
}

static void co_block_status(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_block_status(r->bs, r->off, r->len, r->pnum, r->map, r->file);
}

int vd_bnode_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			  struct vd_bnode **file)
{
	struct sync_req r = { .bs = bs, .off = off, .len = len, .pnum = pnum, .map = map, .file = file };

	return run(co_block_status, &r);
}

static void co_truncate(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_truncate(r->bs, r->off, r->exact, r->prealloc);
}

int vd_bnode_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	struct sync_req r = { .bs = bs, .off = size, .exact = exact, .prealloc = prealloc };

	return run(co_truncate, &r);
}

static void co_is_allocated_above(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = vd_bnode_co_is_allocated_above(r->bs, r->base, r->off, r->len, r->pnum);
}

int vd_bnode_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
				uint64_t *pnum)
{
	struct sync_req r = { .bs = top, .base = base, .off = off, .len = len, .pnum = pnum };

	return run(co_is_allocated_above, &r);
}

static void co_check(void *opaque)
{
	struct sync_req *r = opaque;

	r->ret = r->bs->fmt->co_check(r->bs, r->check, r->flags);
}

int vd_bnode_check(struct vd_bnode *bs, struct vd_check_result *res, int fix)
{
	struct sync_req r = { .bs = bs, .check = res, .flags = fix };

	memset(res, 0, sizeof(*res));
	if (!bs->fmt->co_check)
		return vd_error(ENOTSUP, "format '%s' does not support checks", bs->fmt->name);
	return run(co_check, &r);
}

int64_t vd_bnode_allocated_size(struct vd_bnode *bs)
{
	if (bs->fmt->get_allocated_size)
		return bs->fmt->get_allocated_size(bs);
	if (bs->file)
		return vd_bnode_allocated_size(bs->file);
	return vd_error(ENOTSUP, "node '%s': allocated size unknown", vd_bnode_name(bs));
}
