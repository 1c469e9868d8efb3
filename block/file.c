/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The "file" protocol: a leaf node over a regular file or block device,
 * doing its I/O through a libvdisk instance (one queue per node for now,
 * served by the opening thread's loop).
 *
 * Options: filename (required); aio = io_uring (default) | native
 * (linux-aio, needs cache.direct as in QEMU) | threads | sync.  cache.direct
 * opens with O_DIRECT; the framework then aligns requests to libvdisk's
 * request-alignment, and this file bounces buffers whose addresses are not
 * aligned to buf-alignment.
 *
 * libvdisk has no resize, so co_truncate drains the node, resizes the file
 * through a plain fd and starts a fresh instance that sees the new capacity.
 * The same plain fd (never O_DIRECT) answers block status with
 * SEEK_DATA/SEEK_HOLE.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block-int.h"

struct file_state {
	struct vdisk *v;
	struct vdiskq *q;  /* NULL after a failed restart: I/O fails with -EIO */
	int fd;            /* plain fd: lseek, fstat, ftruncate */
	const char *driver; /* libvdisk driver */
	uint32_t buf_align;
	int max_segments;

	/* Resizing drains the node: requests wait while it runs. */
	unsigned in_flight;
	bool resizing;
	struct vd_co_queue resize_done; /* requests waiting for the resize to finish */
	struct vd_co_queue drained;     /* the resize, waiting for in_flight == 0 */
};

/* ---- the libvdisk instance ------------------------------------------------------------ */

static int aio_to_driver(struct vd_bnode *bs, const char *aio, const char **driver)
{
	if (!strcmp(aio, "io_uring"))
		*driver = "io_uring";
	else if (!strcmp(aio, "threads"))
		*driver = "threads";
	else if (!strcmp(aio, "sync"))
		*driver = "sync";
	else if (!strcmp(aio, "native"))
		*driver = "linux-aio";
	else
		return vd_error(EINVAL, "file '%s': invalid aio '%s' (io_uring, native, threads, sync)", bs->filename,
				aio);
	if (!strcmp(aio, "native") && !bs->cache.direct)
		return vd_error(EINVAL, "file '%s': aio=native was specified, but it requires cache.direct=on, "
				"which was not specified", bs->filename);
	return 0;
}

/*
 * The path the libvdisk instance opens.  Restarts (after a resize) reopen
 * the inode through the node's own descriptor, not by name: the name may
 * since have been covered by a mount -- a FUSE export of this very node
 * mounted over its image file, whose open() would wait on the export's own
 * thread, which is the one opening.
 */
static const char *instance_path(struct vd_bnode *bs, struct file_state *st, char *buf, size_t size)
{
	if (st->fd >= 0 && snprintf(buf, size, "/proc/self/fd/%d", st->fd) < (int)size && access(buf, F_OK) == 0)
		return buf;
	return bs->filename;
}

static int configure(struct vd_bnode *bs, struct file_state *st, struct vdisk *v)
{
	char proc_path[64];
	int ret = vdisk_set_str(v, "path", instance_path(bs, st, proc_path, sizeof(proc_path)));

	if (ret == 0)
		ret = vdisk_set_bool(v, "read-only", bs->read_only);
	if (ret == 0)
		ret = vdisk_set_bool(v, "direct", bs->cache.direct);
	return ret;
}

/* Limits the framework and the I/O path need, read once connected. */
static int read_limits(struct vd_bnode *bs, struct file_state *st)
{
	int align = 1, buf_align = 1, max_transfer = 0;
	uint64_t capacity = 0;
	int ret = vdisk_get_uint64(st->v, "capacity", &capacity);

	if (ret == 0)
		ret = vdisk_get_int(st->v, "request-alignment", &align);
	if (ret == 0)
		ret = vdisk_get_int(st->v, "buf-alignment", &buf_align);
	if (ret == 0)
		ret = vdisk_get_int(st->v, "max-transfer", &max_transfer);
	if (ret == 0)
		ret = vdisk_get_int(st->v, "max-segments", &st->max_segments);
	if (ret < 0)
		return ret;
	bs->size = capacity;
	bs->request_alignment = align > 1 ? (uint32_t)align : 1;
	bs->max_transfer = max_transfer > 0 ? (uint32_t)max_transfer : 0;
	st->buf_align = buf_align > 1 ? (uint32_t)buf_align : 1;
	return 0;
}

static int start_instance(struct vd_bnode *bs, struct file_state *st)
{
	int ret = vdisk_create(st->driver, &st->v);

	if (ret == 0)
		ret = configure(bs, st, st->v);
	if (ret == 0)
		ret = vdisk_connect(st->v); /* its message names the file */
	if (ret == 0)
		ret = read_limits(bs, st);
	if (ret == 0)
		ret = vdisk_set_int(st->v, "num-queues", 1);
	if (ret == 0)
		ret = vdisk_start(st->v);
	if (ret == 0 && !(st->q = vdisk_get_queue(st->v, 0)))
		ret = -EINVAL;
	if (ret == 0)
		ret = vd_loop_add_queue(vd_loop_get(), st->q);
	if (ret < 0) {
		vdisk_destroy(&st->v);
		st->q = NULL;
	}
	return ret;
}

static void stop_instance(struct file_state *st)
{
	if (st->q)
		vd_loop_del_queue(vd_loop_get(), st->q);
	st->q = NULL;
	vdisk_destroy(&st->v);
}

/* ---- open / close ---------------------------------------------------------------------- */

static int file_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct file_state *st = bs->opaque;
	int ret;

	(void)flags;
	st->fd = -1;
	vd_co_queue_init(&st->resize_done);
	vd_co_queue_init(&st->drained);
	if (!bs->filename || !bs->filename[0])
		return vd_error(EINVAL, "driver 'file' needs a 'filename'");
	ret = aio_to_driver(bs, vd_opt_str(opts, "aio", "io_uring"), &st->driver);
	if (ret < 0)
		return ret;
	ret = start_instance(bs, st);
	if (ret < 0)
		return ret;
	st->fd = open(bs->filename, (bs->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (st->fd < 0) {
		ret = vd_error(errno, "file '%s': %s", bs->filename, strerror(errno));
		stop_instance(st);
	}
	return ret;
}

static void file_close(struct vd_bnode *bs)
{
	struct file_state *st = bs->opaque;

	stop_instance(st);
	if (st->fd >= 0)
		close(st->fd);
	st->fd = -1;
}

/* ---- requests -------------------------------------------------------------------------- */

/* Enter the node's I/O section: wait out a resize; -EIO if the instance is gone. */
static int io_begin(struct vd_bnode *bs, struct file_state *st)
{
	while (st->resizing)
		vd_co_queue_wait(&st->resize_done, NULL);
	if (!st->q)
		return vd_error(EIO, "file '%s': no I/O instance (a resize failed to restart it)", bs->filename);
	st->in_flight++;
	return 0;
}

static void io_end(struct file_state *st)
{
	st->in_flight--;
	if (st->resizing && st->in_flight == 0)
		vd_co_queue_wake_all(&st->drained);
}

static int io_result(struct vd_bnode *bs, const char *op, uint64_t off, int ret)
{
	if (ret < 0)
		return vd_error_prefix(-ret, "file '%s': %s at %" PRIu64 ": ", bs->filename, op, off);
	return 0;
}

static uint32_t req_flags(int flags)
{
	uint32_t f = 0;

	if (flags & VD_BREQ_FUA)
		f |= VDISK_REQ_FUA;
	if (flags & VD_BREQ_NO_FALLBACK)
		f |= VDISK_REQ_NO_FALLBACK;
	return f;
}

/* O_DIRECT needs every buffer (address and length) aligned to buf-alignment. */
static bool needs_bounce(const struct file_state *st, const struct vd_qiov *q)
{
	if (q->niov > st->max_segments)
		return true;
	if (st->buf_align <= 1)
		return false;
	for (int i = 0; i < q->niov; i++)
		if (((uintptr_t)q->iov[i].iov_base | q->iov[i].iov_len) % st->buf_align)
			return true;
	return false;
}

static int rw(struct vd_bnode *bs, bool write, uint64_t off, const struct iovec *iov, int niov, int flags)
{
	struct file_state *st = bs->opaque;
	struct vd_io_wait w = { 0 };
	int ret = io_begin(bs, st);

	if (ret < 0)
		return ret;
	if (write)
		ret = vdiskq_writev(st->q, off, iov, niov, &w, req_flags(flags));
	else
		ret = vdiskq_readv(st->q, off, iov, niov, &w, 0);
	if (ret == 0)
		ret = vd_loop_co_wait_io(st->q, &w);
	io_end(st);
	return io_result(bs, write ? "write" : "read", off, ret);
}

static int rw_bounced(struct vd_bnode *bs, bool write, uint64_t off, uint64_t len, struct vd_qiov *qiov,
		      size_t qiov_off, int flags)
{
	void *buf = vd_blk_alloc(len);
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	int ret;

	if (!buf)
		return vd_error(ENOMEM, "file '%s': out of memory for a %" PRIu64 "-byte bounce buffer", bs->filename,
				len);
	if (write)
		vd_qiov_to_buf(qiov, qiov_off, buf, len);
	ret = rw(bs, write, off, &iov, 1, flags);
	if (ret == 0 && !write)
		vd_qiov_from_buf(qiov, qiov_off, buf, len);
	vd_blk_free(buf);
	return ret;
}

/*
 * With O_DIRECT and a file size that is not a multiple of the alignment, the
 * framework reads the last block whole, past the end; libvdisk refuses that.
 * Read what exists through the plain fd (one short synchronous read, only
 * ever for that block) and zero the rest, as a short O_DIRECT read would.
 */
static int read_past_eof(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off)
{
	struct file_state *st = bs->opaque;
	uint64_t avail = off < bs->size ? bs->size - off : 0;
	void *buf = vd_blk_alloc(len);
	ssize_t n = 0;

	if (!buf)
		return vd_error(ENOMEM, "file '%s': out of memory", bs->filename);
	memset(buf, 0, len);
	if (avail)
		n = pread(st->fd, buf, avail, (off_t)off);
	if (n >= 0)
		vd_qiov_from_buf(qiov, qiov_off, buf, len);
	vd_blk_free(buf);
	if (n < 0)
		return vd_error(errno, "file '%s': read at %" PRIu64 ": %s", bs->filename, off, strerror(errno));
	return 0;
}

static int file_rw(struct vd_bnode *bs, bool write, uint64_t off, uint64_t len, struct vd_qiov *qiov,
		   size_t qiov_off, int flags)
{
	struct file_state *st = bs->opaque;
	struct vd_qiov slice;
	int ret;

	if (off + len > bs->size) {
		if (!write)
			return read_past_eof(bs, off, len, qiov, qiov_off);
		return vd_error(EINVAL, "file '%s': cannot write the partial last block with O_DIRECT (size %" PRIu64
				" is not a multiple of %" PRIu32 ")", bs->filename, bs->size, bs->request_alignment);
	}
	vd_qiov_init(&slice);
	ret = vd_qiov_add_slice(&slice, qiov, qiov_off, len);
	if (ret < 0)
		ret = vd_error(-ret, "file '%s': bad I/O vector", bs->filename);
	else if (needs_bounce(st, &slice))
		ret = rw_bounced(bs, write, off, len, qiov, qiov_off, flags);
	else
		ret = rw(bs, write, off, slice.iov, slice.niov, flags);
	vd_qiov_destroy(&slice);
	return ret;
}

static int file_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	return file_rw(bs, false, off, len, qiov, qiov_off, flags);
}

static int file_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
			int flags)
{
	return file_rw(bs, true, off, len, qiov, qiov_off, flags);
}

enum range_op { OP_ZEROES, OP_DISCARD, OP_FLUSH };

static int range_request(struct vd_bnode *bs, enum range_op op, uint64_t off, uint64_t len, uint32_t flags)
{
	static const char *const names[] = { "write-zeroes", "discard", "flush" };
	struct file_state *st = bs->opaque;
	struct vd_io_wait w = { 0 };
	int ret = io_begin(bs, st);

	if (ret < 0)
		return ret;
	if (op == OP_ZEROES)
		ret = vdiskq_write_zeroes(st->q, off, len, &w, flags);
	else if (op == OP_DISCARD)
		ret = vdiskq_discard(st->q, off, len, &w, flags);
	else
		ret = vdiskq_flush(st->q, &w, flags);
	if (ret == 0)
		ret = vd_loop_co_wait_io(st->q, &w);
	io_end(st);
	return io_result(bs, names[op], off, ret);
}

static int file_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	uint32_t f = req_flags(flags);

	if (!(flags & VD_BREQ_MAY_UNMAP))
		f |= VDISK_REQ_NO_UNMAP;
	return range_request(bs, OP_ZEROES, off, len, f);
}

/* -ENOTSUP when the file cannot punch holes: callers decide whether that matters. */
static int file_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	return range_request(bs, OP_DISCARD, off, len, 0);
}

static int file_flush(struct vd_bnode *bs)
{
	return range_request(bs, OP_FLUSH, 0, 0, 0);
}

/* ---- block status ------------------------------------------------------------------------ */

static int file_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file)
{
	struct file_state *st = bs->opaque;
	off_t data = lseek(st->fd, (off_t)off, SEEK_DATA), hole;

	*map = off;
	*file = bs;
	*pnum = len;
	if (data < 0) {
		/* ENXIO: no data from off to EOF.  Anything else: cannot tell, say data. */
		return errno == ENXIO ? VD_BS_ZERO | VD_BS_OFFSET_VALID : VD_BS_DATA | VD_BS_OFFSET_VALID;
	}
	if ((uint64_t)data > off) {
		if ((uint64_t)data - off < len)
			*pnum = (uint64_t)data - off;
		return VD_BS_ZERO | VD_BS_OFFSET_VALID;
	}
	hole = lseek(st->fd, (off_t)off, SEEK_HOLE);
	if (hole > (off_t)off && (uint64_t)hole - off < len)
		*pnum = (uint64_t)hole - off;
	return VD_BS_DATA | VD_BS_OFFSET_VALID;
}

/* ---- resize ------------------------------------------------------------------------------- */

static int grow_prealloc(struct vd_bnode *bs, int fd, uint64_t from, uint64_t to, const char *prealloc)
{
	static const char zeroes[64 * 1024];

	if (!prealloc || !strcmp(prealloc, "off") || to <= from)
		return 0;
	if (!strcmp(prealloc, "falloc")) {
		if (fallocate(fd, 0, (off_t)from, (off_t)(to - from)) < 0)
			return vd_error(errno == EOPNOTSUPP ? ENOTSUP : errno, "file '%s': preallocation=falloc: %s",
					bs->filename, strerror(errno));
		return 0;
	}
	if (strcmp(prealloc, "full"))
		return vd_error(ENOTSUP, "file '%s': preallocation '%s' not supported (off, falloc, full)", bs->filename,
				prealloc);
	while (from < to) {
		size_t n = to - from < sizeof(zeroes) ? (size_t)(to - from) : sizeof(zeroes);
		ssize_t done = pwrite(fd, zeroes, n, (off_t)from);

		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0)
			return vd_error(done < 0 ? errno : EIO, "file '%s': preallocation=full: %s", bs->filename,
					done < 0 ? strerror(errno) : "short write");
		from += (uint64_t)done;
	}
	return 0;
}

static int resize_file(struct vd_bnode *bs, struct file_state *st, uint64_t size, const char *prealloc)
{
	uint64_t old = bs->size;

	if (ftruncate(st->fd, (off_t)size) < 0)
		return vd_error(errno, "file '%s': cannot resize to %" PRIu64 " bytes: %s", bs->filename, size,
				strerror(errno));
	return grow_prealloc(bs, st->fd, old, size, prealloc);
}

/* Wait until no request is in flight; new ones queue behind st->resizing. */
static void drain(struct file_state *st)
{
	while (st->in_flight)
		vd_co_queue_wait(&st->drained, NULL);
}

static int file_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	struct file_state *st = bs->opaque;
	int ret;

	if (!exact && size <= bs->size)
		return 0; /* "at least size" already holds */
	while (st->resizing)
		vd_co_queue_wait(&st->resize_done, NULL);
	st->resizing = true;
	drain(st);
	ret = resize_file(bs, st, size, prealloc);
	/* Restart even after a failed resize: the file may have changed size anyway. */
	stop_instance(st);
	if (start_instance(bs, st) < 0 && ret == 0)
		ret = vd_error_prefix(EIO, "file '%s': restarting I/O after resize: ", bs->filename);
	st->resizing = false;
	vd_co_queue_wake_all(&st->resize_done);
	return ret;
}

static int64_t file_allocated_size(struct vd_bnode *bs)
{
	struct file_state *st = bs->opaque;
	struct stat s;

	if (fstat(st->fd, &s) < 0)
		return vd_error(errno, "file '%s': fstat: %s", bs->filename, strerror(errno));
	return (int64_t)s.st_blocks * 512;
}

static int file_create(const struct vd_create_opts *o)
{
	return vd_create_file(o->filename, o->size, vd_opt_str(o->opts, "preallocation", NULL));
}

static const char *const file_options[] = { NULL }; /* filename, aio: generic */

const struct vd_format vd_format_file = {
	.name = "file",
	.state_size = sizeof(struct file_state),
	.options = file_options,
	.is_protocol = true,
	.supports_fua = true,
	.open = file_open,
	.close = file_close,
	.co_preadv = file_preadv,
	.co_pwritev = file_pwritev,
	.co_pwrite_zeroes = file_pwrite_zeroes,
	.co_pdiscard = file_pdiscard,
	.co_flush = file_flush,
	.co_block_status = file_block_status,
	.co_truncate = file_truncate,
	.get_allocated_size = file_allocated_size,
	.create = file_create,
};
