/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The "raw" format: the guest sees bs->file's bytes, optionally a window
 * [offset, offset+size) of them.  Every request passes straight through
 * (shifted by offset); alignment is the file node's business.
 */
#include <inttypes.h>
#include <string.h>

#include "block-int.h"

struct raw_state {
	uint64_t offset;
	bool has_size; /* an explicit window: the node does not follow the file's size */
};

static int raw_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct raw_state *s = bs->opaque;
	uint64_t file_size = bs->file->size, size;
	int ret = vd_opt_u64(opts, "offset", 0, &s->offset);

	(void)flags;
	if (ret == 0)
		ret = vd_opt_u64(opts, "size", 0, &size);
	if (ret < 0)
		return ret;
	if (s->offset > file_size)
		return vd_error(EINVAL, "raw '%s': offset %" PRIu64 " is past the end of the file (%" PRIu64 " bytes)",
				vd_bnode_name(bs), s->offset, file_size);
	s->has_size = json_object_get(opts, "size") != NULL;
	if (!s->has_size)
		size = file_size - s->offset;
	if (size > file_size - s->offset)
		return vd_error(EINVAL, "raw '%s': offset %" PRIu64 " + size %" PRIu64 " exceeds the file size %" PRIu64,
				vd_bnode_name(bs), s->offset, size, file_size);
	bs->size = size;
	bs->max_transfer = bs->file->max_transfer;
	return 0;
}

static int raw_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		      int flags)
{
	struct raw_state *s = bs->opaque;

	return vd_bnode_co_preadv(bs->file, off + s->offset, len, qiov, qiov_off, flags);
}

static int raw_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	struct raw_state *s = bs->opaque;

	return vd_bnode_co_pwritev(bs->file, off + s->offset, len, qiov, qiov_off, flags);
}

static int raw_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	struct raw_state *s = bs->opaque;

	return vd_bnode_co_pwrite_zeroes(bs->file, off + s->offset, len, flags);
}

static int raw_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	struct raw_state *s = bs->opaque;

	return vd_bnode_co_pdiscard(bs->file, off + s->offset, len);
}

/* The file knows: ask it (VD_BS_RECURSE) at the shifted offset. */
static int raw_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			    struct vd_bnode **file)
{
	struct raw_state *s = bs->opaque;

	*pnum = len;
	*map = off + s->offset;
	*file = bs->file;
	return VD_BS_RECURSE | VD_BS_OFFSET_VALID;
}

static int raw_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	struct raw_state *s = bs->opaque;
	int ret;

	if (s->offset || s->has_size)
		return vd_error(ENOTSUP, "raw '%s': cannot resize a window (offset/size options)", vd_bnode_name(bs));
	ret = vd_bnode_co_truncate(bs->file, size, exact, prealloc);
	if (ret == 0)
		vd_bnode_set_size(bs, vd_bnode_size(bs->file));
	return ret;
}

/* Anything can be raw: the lowest score, chosen only when no format claims the file. */
static int raw_probe(const uint8_t *buf, size_t len)
{
	(void)buf;
	(void)len;
	return 1;
}

/* A fixed shift into the file: the file decides whether its bytes can be spliced. */
static int raw_map_to_fd(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off)
{
	struct raw_state *s = bs->opaque;

	return vd_bnode_map_to_fd(bs->file, off + s->offset, len, fd, fd_off);
}

static int raw_create(const struct vd_create_opts *o)
{
	return vd_create_file(o->filename, o->size, vd_opt_str(o->opts, "preallocation", NULL));
}

static const char *const raw_options[] = { "offset", "size", NULL };

const struct vd_format vd_format_raw = {
	.name = "raw",
	.state_size = sizeof(struct raw_state),
	.options = raw_options,
	.supports_fua = true, /* FUA passes through to the file */
	.multiqueue = true, /* stateless: requests pass through in the calling thread */
	.probe = raw_probe,
	.open = raw_open,
	.co_preadv = raw_preadv,
	.co_pwritev = raw_pwritev,
	.co_pwrite_zeroes = raw_pwrite_zeroes,
	.co_pdiscard = raw_pdiscard,
	.co_block_status = raw_block_status,
	.co_truncate = raw_truncate,
	.map_to_fd = raw_map_to_fd,
	.create = raw_create,
};
