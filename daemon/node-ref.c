/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Node references: `--blockdev driver=qcow2,node-name=q0,file=f0` makes the
 * existing node f0 q0's file child, as in qemu-storage-daemon.
 *
 * The block layer opens children from options only, so the daemon rewrites
 * a reference "file": "f0" into {"driver": "vdd-node-ref", "node": "f0"}:
 * a protocol node that passes every request to f0's node object (taking a
 * reference on it).  The proxy holds no data of its own; it costs one more
 * call per request.  While vd_bnode_open_opts() runs, the opening thread
 * publishes the nodes that may be referenced (vdd_node_ref_set_table), so
 * the proxy finds f0 without touching the main thread's tables.
 *
 * A block-layer hook (open a format node on an existing child) would remove
 * the indirection; see the report in docs/vdiskd.8 (NOTES).
 */
#include <errno.h>
#include <string.h>

#include "daemon.h"
#include "lib/vd-internal.h" /* vd_error(): the block layer's error convention */

struct ref_state {
	struct vd_bnode *target;
};

static _Thread_local struct vdd_node **ref_table;
static _Thread_local int ref_count;

void vdd_node_ref_set_table(struct vdd_node **nodes, int n)
{
	ref_table = nodes;
	ref_count = n;
}

struct vd_bnode *vdd_bnode_unwrap(struct vd_bnode *bs)
{
	while (bs && bs->fmt == &vdd_format_node_ref)
		bs = ((struct ref_state *)bs->opaque)->target;
	return bs;
}

static int ref_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct ref_state *st = bs->opaque;
	const char *name = vd_opt_str(opts, "node", NULL);
	struct vd_bnode *target = NULL;

	for (int i = 0; name && i < ref_count; i++)
		if (!strcmp(ref_table[i]->name, name))
			target = ref_table[i]->bs;
	if (!target)
		return vd_error(EINVAL, "node '%s' not found", name ? name : "(none)");
	if ((flags & VD_BO_RDWR) && target->read_only)
		return vd_error(EACCES, "node '%s' is read-only: a writable node cannot use it (give read-only=on)",
				name);
	vd_bnode_ref(target);
	st->target = target;
	bs->size = target->size;
	bs->max_transfer = target->max_transfer;
	bs->request_alignment = 1; /* the target aligns for itself */
	free(bs->filename);
	bs->filename = target->filename ? strdup(target->filename) : NULL;
	return 0;
}

static void ref_close(struct vd_bnode *bs)
{
	struct ref_state *st = bs->opaque;

	vd_bnode_unref(st->target);
	st->target = NULL;
}

static struct vd_bnode *target(struct vd_bnode *bs)
{
	return ((struct ref_state *)bs->opaque)->target;
}

static int ref_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		      int flags)
{
	return vd_bnode_co_preadv(target(bs), off, len, qiov, qiov_off, flags);
}

static int ref_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	return vd_bnode_co_pwritev(target(bs), off, len, qiov, qiov_off, flags);
}

static int ref_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	return vd_bnode_co_pwrite_zeroes(target(bs), off, len, flags);
}

static int ref_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	return vd_bnode_co_pdiscard(target(bs), off, len);
}

static int ref_flush(struct vd_bnode *bs)
{
	return vd_bnode_co_flush(target(bs));
}

static int ref_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			    struct vd_bnode **file)
{
	int ret = vd_bnode_co_block_status(target(bs), off, len, pnum, map, file);

	if (ret < 0)
		return ret;
	if (*pnum == 0) { /* cannot happen inside the range; answer something valid */
		*pnum = len;
		return VD_BS_ZERO;
	}
	return ret & (VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID);
}

static int ref_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	int ret = vd_bnode_co_truncate(target(bs), size, exact, prealloc);

	vd_bnode_set_size(bs, vd_bnode_size(target(bs)));
	return ret;
}

static int ref_map_to_fd(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off)
{
	return vd_bnode_map_to_fd(target(bs), off, len, fd, fd_off);
}

static int64_t ref_allocated_size(struct vd_bnode *bs)
{
	return vd_bnode_allocated_size(target(bs));
}

const struct vd_format vdd_format_node_ref = {
	.name = "vdd-node-ref",
	.state_size = sizeof(struct ref_state),
	.is_protocol = true,
	.supports_fua = true, /* passed to the target, which handles FUA itself */
	.multiqueue = true, /* the target's own entry points decide where its requests run */
	.open = ref_open,
	.close = ref_close,
	.co_preadv = ref_preadv,
	.map_to_fd = ref_map_to_fd,
	.co_pwritev = ref_pwritev,
	.co_pwrite_zeroes = ref_pwrite_zeroes,
	.co_pdiscard = ref_pdiscard,
	.co_flush = ref_flush,
	.co_block_status = ref_block_status,
	.co_truncate = ref_truncate,
	.get_allocated_size = ref_allocated_size,
};
