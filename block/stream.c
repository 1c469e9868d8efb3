/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Streaming: copy the data a node reads from its backing chain into the
 * node itself, then cut the chain (QEMU's block-stream).
 *
 * Correctness while the node is in use (exported, say):
 * - each step holds a serialising tracked range on top over the run it
 *   copies; top tracks every request because it has a backing child, so a
 *   guest write to that run waits for the copy (and the copy waits for an
 *   older guest write), and the copy can never overwrite newer guest data;
 * - a run that top already allocates is skipped, so guest data is never
 *   read back and rewritten;
 * - finishing first waits for chain walks that hold top's chain
 *   (vd_bnode_chain_hold: NBD/FUSE block status, is_allocated_above) and
 *   keeps new ones out, then holds a serialising range over the whole node:
 *   every request on top in flight has finished and new ones wait until the
 *   chain is switched, so nothing still uses a layer that is dropped.
 * Crash safety: the copied data and its metadata are flushed before the
 * header stops naming the old backing file, so a crash at any point leaves
 * either the old chain (with some data already copied: harmless) or the
 * new one with all data present.
 */
#include <errno.h>
#include <string.h>

#include "block-int.h"

static int copy_run(struct vd_bnode *top, uint64_t off, uint64_t len, void *buf)
{
	struct vd_qiov q;
	int ret = vd_bnode_co_pread(top, off, buf, (size_t)len);

	if (ret < 0)
		return ret;
	/* A zero run becomes a zero cluster rather than allocated zero data. */
	vd_qiov_init_buf(&q, buf, (size_t)len);
	if (vd_qiov_is_zero(&q, 0, (size_t)len))
		return vd_bnode_co_pwrite_zeroes(top, off, len, 0);
	return vd_bnode_co_pwrite(top, off, buf, (size_t)len, 0);
}

int vd_bnode_co_stream_step(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t max, void *buf,
			    uint64_t *pnum, bool *copied)
{
	struct vd_tracked t;
	uint64_t n = 0;
	int ret;

	*pnum = 0;
	*copied = false;
	if (off >= top->size)
		return 0;
	if (max > top->size - off)
		max = top->size - off;
	vd_bnode_track_begin(top, &t, off, max, true);
	ret = vd_bnode_co_block_status(top, off, max, &n, NULL, NULL);
	if (ret >= 0 && !(ret & VD_BS_ALLOCATED) && top->backing) {
		/* Only what lies above base needs copying; base stays below. */
		ret = vd_bnode_co_is_allocated_above(top->backing, base, off, n, &n);
		if (ret == 1) {
			ret = copy_run(top, off, n, buf);
			*copied = ret == 0;
		}
	}
	vd_bnode_track_end(top, &t);
	if (ret < 0)
		return ret;
	*pnum = n;
	return 0;
}

int vd_bnode_co_stream_finish(struct vd_bnode *top, struct vd_bnode *base, const char *backing_file,
			      const char *backing_fmt)
{
	struct vd_bnode *old = top->backing;
	struct vd_tracked t;
	int ret;

	if (!top->fmt->co_change_backing)
		return vd_error(ENOTSUP, "node '%s': format '%s' cannot change its backing file", vd_bnode_name(top),
				top->fmt->name);
	/* No chain walk may still hold the old chain; then no request may still be in flight. */
	vd_bnode_chain_switch_begin(top);
	vd_bnode_track_begin(top, &t, 0, top->size ? top->size : 1, true);
	ret = vd_bnode_co_flush(top);
	if (ret == 0)
		ret = top->fmt->co_change_backing(top, backing_file ? backing_file : "", backing_fmt);
	if (ret == 0)
		ret = vd_bnode_co_flush(top);
	if (ret == 0 && old != base) {
		if (base)
			vd_bnode_ref(base);
		top->backing = base;
		vd_bnode_unref(old);
	}
	vd_bnode_track_end(top, &t);
	vd_bnode_chain_switch_end(top);
	return ret;
}
