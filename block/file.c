/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The "file" protocol: a leaf node over a regular file or block device,
 * doing its I/O through libvdisk.
 *
 * Options: filename (required); aio = io_uring (default) | native
 * (linux-aio, needs cache.direct as in QEMU) | threads | sync;
 * aio-threads = the number of worker threads of aio=threads (libvdisk's
 * num-threads, default 8) -- per thread that issues requests, since each
 * has its own instance (below).  cache.direct
 * opens with O_DIRECT; the framework then aligns requests to libvdisk's
 * request-alignment, and this file bounces buffers whose addresses are not
 * aligned to buf-alignment.
 *
 * Multiqueue.  Every thread that issues requests gets its own libvdisk
 * instance with one queue (a slot), started on its first request and
 * served by that thread's loop; requests use the calling thread's slot and
 * take no lock.  The home thread's slot is slot 0, started at open (it gives
 * the node its size and limits).  One instance per thread rather than one
 * instance with N queues: libvdisk fixes num-queues before start, and the
 * daemon's iothreads come and go; all instances open the same inode, so a
 * flush through any of them covers writes completed through the others
 * (fsync is per inode), which NBD multi-conn relies on.  Slots are only
 * appended (under st->lock), never moved, so the lock-free lookup is a scan
 * of a handful of entries.  A slot's instance is touched only by its own
 * thread; close (at home, with nothing in flight) hands the other threads'
 * instances to their loops to be destroyed there.  So a thread that used a
 * node must keep its loop until the node is closed (vdiskd stops its
 * iothreads after closing every node).
 *
 * co_truncate runs at home.  Growing resizes the file through a plain fd
 * and has the home instance read its size again (vdisk_refresh_capacity):
 * requests in flight are all below the old end, so nothing is drained and
 * nothing waits; the other slots refresh theirs on their next request
 * (st->size_gen).  Shrinking (or an instance that cannot refresh) drains the
 * node -- every slot's requests: each slot counts its requests in flight, a
 * request that finds `resizing` set backs out and waits -- resizes the file
 * and restarts the home instance, which sees the new capacity; the other
 * slots restart on their next request (st->gen).  The same plain fd (never
 * O_DIRECT) answers block status with
 * SEEK_DATA/SEEK_HOLE.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "block-int.h"

#define FILE_MAX_THREADS 64
#define FILE_MAX_AIO_THREADS 256 /* libvdisk's threads driver takes no more */

/* One thread's libvdisk instance; a cache line of its own (in_flight changes on every request). */
struct __attribute__((aligned(64))) file_slot {
	struct vd_loop *loop; /* its thread; set once, before the slot is published */
	struct vdisk *v;
	struct vdiskq *q;     /* NULL: not started, or a (re)start failed */
	unsigned gen;         /* st->gen the instance was started for */
	unsigned size_gen;    /* st->size_gen its capacity was read for */
	unsigned in_flight;   /* atomic: the resizer reads it from the home thread */
};

struct file_state {
	int fd;            /* plain fd: lseek, fstat, ftruncate */
	const char *driver; /* libvdisk driver */
	uint64_t aio_threads; /* aio=threads: worker threads per instance; 0: the driver's default */
	uint32_t buf_align;
	int max_segments;

	struct file_slot slots[FILE_MAX_THREADS];
	int n_slots;   /* atomic: slots published so far */
	unsigned gen;  /* atomic: bumped by every resize that restarts the home instance */
	unsigned size_gen; /* atomic: bumped by every growth in place */

	/* Resizing drains the node: requests wait while it runs.  Under lock. */
	pthread_mutex_t lock;
	bool resizing;                  /* also read without the lock (atomic) */
	struct vd_co_queue resize_done; /* requests waiting for the resize to finish */
	struct vd_co_queue drained;     /* the resize, waiting for every in_flight == 0 */
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
	if (ret == 0 && st->aio_threads)
		ret = vdisk_set_int(v, "num-threads", (int)st->aio_threads);
	return ret;
}

/* Limits the framework and the I/O path need, read once connected. */
static int read_limits(struct vd_bnode *bs, struct file_state *st, struct vdisk *v)
{
	int align = 1, buf_align = 1, max_transfer = 0;
	uint64_t capacity = 0;
	int ret = vdisk_get_uint64(v, "capacity", &capacity);

	if (ret == 0)
		ret = vdisk_get_int(v, "request-alignment", &align);
	if (ret == 0)
		ret = vdisk_get_int(v, "buf-alignment", &buf_align);
	if (ret == 0)
		ret = vdisk_get_int(v, "max-transfer", &max_transfer);
	if (ret == 0)
		ret = vdisk_get_int(v, "max-segments", &st->max_segments);
	if (ret < 0)
		return ret;
	vd_bnode_set_size(bs, capacity);
	bs->request_alignment = align > 1 ? (uint32_t)align : 1;
	bs->max_transfer = max_transfer > 0 ? (uint32_t)max_transfer : 0;
	st->buf_align = buf_align > 1 ? (uint32_t)buf_align : 1;
	return 0;
}

/* Start slot's instance in the calling thread (its own); home: also read the node's size and limits. */
static int start_instance(struct vd_bnode *bs, struct file_state *st, struct file_slot *slot, bool home)
{
	int ret = vdisk_create(st->driver, &slot->v);

	if (ret == 0)
		ret = configure(bs, st, slot->v);
	if (ret == 0)
		ret = vdisk_connect(slot->v); /* its message names the file */
	if (ret == 0 && home)
		ret = read_limits(bs, st, slot->v);
	if (ret == 0)
		ret = vdisk_set_int(slot->v, "num-queues", 1);
	if (ret == 0)
		ret = vdisk_start(slot->v);
	if (ret == 0 && !(slot->q = vdisk_get_queue(slot->v, 0)))
		ret = -EINVAL;
	if (ret == 0)
		ret = vd_loop_add_queue(vd_loop_get(), slot->q);
	if (ret < 0) {
		vdisk_destroy(&slot->v);
		slot->q = NULL;
	}
	return ret;
}

static void destroy_instance(struct vd_loop *loop, struct vdisk **v, struct vdiskq *q)
{
	if (q)
		vd_loop_del_queue(loop, q);
	vdisk_destroy(v);
}

/* In slot's own thread. */
static void stop_instance(struct file_slot *slot)
{
	destroy_instance(slot->loop, &slot->v, slot->q);
	slot->q = NULL;
}

/* Another thread's instance, destroyed in that thread (close). */
struct remote_stop {
	struct vd_loop_msg msg;
	struct vd_loop *loop;
	struct vdisk *v;
	struct vdiskq *q;
};

static void remote_stop_run(void *opaque)
{
	struct remote_stop *r = opaque;

	destroy_instance(r->loop, &r->v, r->q);
	free(r);
}

static void stop_remote_instance(struct file_slot *slot)
{
	struct remote_stop *r;

	if (!slot->v)
		return;
	r = malloc(sizeof(*r));
	if (!r || !vd_loop_accepts_remote(slot->loop)) {
		/* Cannot reach it: leak the instance rather than touch another thread's loop. */
		fprintf(stderr, "vdisk: file node: cannot release a thread's I/O instance\n");
		free(r);
		return;
	}
	*r = (struct remote_stop){ .msg = { .fn = remote_stop_run, .arg = r }, .loop = slot->loop, .v = slot->v,
				   .q = slot->q };
	slot->v = NULL;
	slot->q = NULL;
	vd_loop_post_msg(slot->loop, &r->msg);
}

/* The calling thread's slot: a lock-free scan, or a new slot (not started yet). */
static struct file_slot *my_slot(struct vd_bnode *bs, struct file_state *st)
{
	struct vd_loop *self = vd_loop_get();
	int n = __atomic_load_n(&st->n_slots, __ATOMIC_ACQUIRE);
	struct file_slot *slot = NULL;

	for (int i = 0; i < n; i++)
		if (st->slots[i].loop == self)
			return &st->slots[i];
	pthread_mutex_lock(&st->lock);
	n = st->n_slots; /* only this thread adds its own slot: no one else added it meanwhile */
	if (n < FILE_MAX_THREADS) {
		slot = &st->slots[n];
		slot->loop = self;
		slot->q = NULL;
		__atomic_store_n(&st->n_slots, n + 1, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&st->lock);
	if (!slot)
		vd_error(EMFILE, "file '%s': more than %d threads issue requests", bs->filename, FILE_MAX_THREADS);
	return slot;
}

/* ---- open / close ---------------------------------------------------------------------- */

static int file_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct file_state *st = bs->opaque;
	int ret;

	(void)flags;
	st->fd = -1;
	pthread_mutex_init(&st->lock, NULL);
	vd_co_queue_init(&st->resize_done);
	vd_co_queue_init(&st->drained);
	st->slots[0].loop = vd_loop_get();
	st->n_slots = 1;
	if (!bs->filename || !bs->filename[0])
		return vd_error(EINVAL, "driver 'file' needs a 'filename'");
	ret = aio_to_driver(bs, vd_opt_str(opts, "aio", "io_uring"), &st->driver);
	if (ret == 0)
		ret = vd_opt_u64(opts, "aio-threads", 0, &st->aio_threads);
	if (ret < 0)
		return ret;
	if (json_object_get(opts, "aio-threads") && (strcmp(st->driver, "threads") || st->aio_threads < 1 ||
						     st->aio_threads > FILE_MAX_AIO_THREADS))
		return vd_error(EINVAL, "file '%s': aio-threads must be 1..%d and needs aio=threads", bs->filename,
				FILE_MAX_AIO_THREADS);
	ret = start_instance(bs, st, &st->slots[0], true);
	if (ret < 0)
		goto fail;
	st->fd = open(bs->filename, (bs->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (st->fd < 0) {
		ret = vd_error(errno, "file '%s': %s", bs->filename, strerror(errno));
		stop_instance(&st->slots[0]);
		goto fail;
	}
	return 0;
fail:
	pthread_mutex_destroy(&st->lock);
	return ret;
}

static void file_close(struct vd_bnode *bs)
{
	struct file_state *st = bs->opaque;

	stop_instance(&st->slots[0]);
	for (int i = 1; i < st->n_slots; i++)
		stop_remote_instance(&st->slots[i]);
	if (st->fd >= 0)
		close(st->fd);
	st->fd = -1;
	pthread_mutex_destroy(&st->lock);
}

/* ---- requests -------------------------------------------------------------------------- */

/* A resize is running: park until it is over. */
static void wait_resize(struct file_state *st)
{
	pthread_mutex_lock(&st->lock);
	while (st->resizing)
		vd_co_queue_wait_mt(&st->resize_done, &st->lock);
	pthread_mutex_unlock(&st->lock);
}

static void io_end(struct file_state *st, struct file_slot *slot)
{
	/* seq_cst pairs with the resizer's: it sees our count, or we see its flag and wake it. */
	if (__atomic_sub_fetch(&slot->in_flight, 1, __ATOMIC_SEQ_CST) == 0 &&
	    __atomic_load_n(&st->resizing, __ATOMIC_SEQ_CST)) {
		pthread_mutex_lock(&st->lock);
		vd_co_queue_wake_all(&st->drained);
		pthread_mutex_unlock(&st->lock);
	}
}

/*
 * Enter the node's I/O section in the calling thread's slot: wait out a
 * resize; (re)start the slot's instance if it has none or an old one.
 * NULL with the message set if it cannot be started.
 */
static struct file_slot *io_begin(struct vd_bnode *bs, struct file_state *st)
{
	struct file_slot *slot = my_slot(bs, st);
	unsigned gen, size_gen;

	if (!slot)
		return NULL;
	for (;;) {
		__atomic_add_fetch(&slot->in_flight, 1, __ATOMIC_SEQ_CST);
		if (!__atomic_load_n(&st->resizing, __ATOMIC_SEQ_CST))
			break;
		io_end(st, slot);
		wait_resize(st);
	}
	/* No resize can start its restart while we count as in flight. */
	gen = __atomic_load_n(&st->gen, __ATOMIC_ACQUIRE);
	/* Pairs with grow_in_place(): a node size this request was checked against implies its generation. */
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	size_gen = __atomic_load_n(&st->size_gen, __ATOMIC_RELAXED);
	if (slot->q && slot->gen == gen) {
		/* The file grew since this instance last looked: it reads the size again. */
		if (slot->size_gen != size_gen && vdisk_refresh_capacity(slot->v) == 0)
			slot->size_gen = size_gen;
		if (slot->size_gen == size_gen)
			return slot;
	}
	if (slot != &st->slots[0]) {
		if (slot->v)
			stop_instance(slot);
		if (start_instance(bs, st, slot, false) == 0) {
			slot->gen = gen;
			slot->size_gen = size_gen;
		}
	}
	if (!slot->q) {
		vd_error_prefix(EIO, "file '%s': cannot start I/O in this thread: ", bs->filename);
		io_end(st, slot);
		return NULL;
	}
	return slot;
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
	struct file_slot *slot = io_begin(bs, st);
	int ret;

	if (!slot)
		return -EIO;
	if (write)
		ret = vdiskq_writev(slot->q, off, iov, niov, &w, req_flags(flags));
	else
		ret = vdiskq_readv(slot->q, off, iov, niov, &w, 0);
	if (ret == 0)
		ret = vd_loop_co_wait_io(slot->q, &w);
	io_end(st, slot);
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
	uint64_t size = vd_bnode_size(bs), avail = off < size ? size - off : 0;
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

	if (off + len > vd_bnode_size(bs)) {
		if (!write)
			return read_past_eof(bs, off, len, qiov, qiov_off);
		return vd_error(EINVAL, "file '%s': cannot write the partial last block with O_DIRECT (size %" PRIu64
				" is not a multiple of %" PRIu32 ")", bs->filename, vd_bnode_size(bs), bs->request_alignment);
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
	struct file_slot *slot = io_begin(bs, st);
	int ret;

	if (!slot)
		return -EIO;
	if (op == OP_ZEROES)
		ret = vdiskq_write_zeroes(slot->q, off, len, &w, flags);
	else if (op == OP_DISCARD)
		ret = vdiskq_discard(slot->q, off, len, &w, flags);
	else
		ret = vdiskq_flush(slot->q, &w, flags);
	if (ret == 0)
		ret = vd_loop_co_wait_io(slot->q, &w);
	io_end(st, slot);
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

static unsigned total_in_flight(struct file_state *st)
{
	int n = __atomic_load_n(&st->n_slots, __ATOMIC_ACQUIRE);
	unsigned sum = 0;

	for (int i = 0; i < n; i++)
		sum += __atomic_load_n(&st->slots[i].in_flight, __ATOMIC_SEQ_CST);
	return sum;
}

/* Become the one resize, and wait until no thread has a request in flight; new ones wait. */
static void drain_begin(struct file_state *st)
{
	pthread_mutex_lock(&st->lock);
	while (st->resizing)
		vd_co_queue_wait_mt(&st->resize_done, &st->lock);
	__atomic_store_n(&st->resizing, true, __ATOMIC_SEQ_CST);
	while (total_in_flight(st))
		vd_co_queue_wait_mt(&st->drained, &st->lock);
	pthread_mutex_unlock(&st->lock);
}

static void drain_end(struct file_state *st)
{
	pthread_mutex_lock(&st->lock);
	__atomic_store_n(&st->resizing, false, __ATOMIC_SEQ_CST);
	vd_co_queue_wake_all(&st->resize_done);
	pthread_mutex_unlock(&st->lock);
}

/*
 * Grow without draining: resize_file() does not yield, so no request of the
 * home thread starts meanwhile, and those in flight (in any thread) are
 * below the old end.  Returns false when the home instance cannot see the
 * new size (then it must be restarted); *ret is resize_file()'s result.
 */
static bool grow_in_place(struct vd_bnode *bs, struct file_state *st, uint64_t size, const char *prealloc,
			  int *ret)
{
	struct file_slot *home = &st->slots[0];
	char why[VD_ERROR_MSG_MAX];
	uint64_t capacity;
	bool refreshed;

	*ret = resize_file(bs, st, size, prealloc);
	snprintf(why, sizeof(why), "%s", vdisk_get_error_msg());
	/* Refresh even after a failed resize: the file may have grown anyway. */
	refreshed = vdisk_refresh_capacity(home->v) == 0 && vdisk_get_uint64(home->v, "capacity", &capacity) == 0;
	if (*ret < 0)
		vd_error(-*ret, "%s", why); /* the libvdisk calls above cleared the resize's message */
	if (!refreshed)
		return false;
	/*
	 * The new generation before the new node size (release fence), so that
	 * a thread that saw the size and then fences in io_begin() sees the
	 * generation and refreshes its own instance before it submits.
	 */
	home->size_gen = __atomic_add_fetch(&st->size_gen, 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	vd_bnode_set_size(bs, capacity);
	return true;
}

static int file_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	struct file_state *st = bs->opaque;
	struct file_slot *home = &st->slots[0];
	char why[VD_ERROR_MSG_MAX];
	bool resized = false;
	int ret = 0;

	if (!exact && size <= vd_bnode_size(bs))
		return 0; /* "at least size" already holds */
	wait_resize(st); /* a shrink in progress */
	if (size >= vd_bnode_size(bs) && home->q) {
		if (grow_in_place(bs, st, size, prealloc, &ret))
			return ret;
		resized = true; /* the instance did not take it: restart below */
	}
	drain_begin(st);
	if (!resized)
		ret = resize_file(bs, st, size, prealloc);
	snprintf(why, sizeof(why), "%s", vdisk_get_error_msg());
	/* Restart even after a failed resize: the file may have changed size anyway. */
	stop_instance(home);
	if (start_instance(bs, st, home, true) < 0 && ret == 0)
		ret = vd_error_prefix(EIO, "file '%s': restarting I/O after resize: ", bs->filename);
	else if (ret < 0)
		vd_error(-ret, "%s", why); /* the restart's libvdisk calls cleared the resize's message */
	/* The other threads' instances still have the old capacity: they restart on their next request. */
	__atomic_add_fetch(&st->gen, 1, __ATOMIC_RELEASE);
	home->gen = st->gen;
	home->size_gen = __atomic_load_n(&st->size_gen, __ATOMIC_ACQUIRE);
	drain_end(st);
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

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* Linux 6.5; glibc 2.36 has no wrapper */
#endif

struct page_cache_range {
	uint64_t off, len;
};

struct page_cache_stat {
	uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/*
 * Is every page of [off, off+len) in the page cache?  Then splicing it
 * takes page references without waiting for the disk.  -ENOSYS (older
 * kernels) is remembered: nothing is ever spliced there.
 */
static bool range_cached(int fd, uint64_t off, uint64_t len)
{
	static int unsupported;
	struct page_cache_range range = { off, len };
	struct page_cache_stat cs;
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t pages = (off + len + page - 1) / page - off / page;

	if (__atomic_load_n(&unsupported, __ATOMIC_RELAXED))
		return false;
	if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0) {
		if (errno == ENOSYS)
			__atomic_store_n(&unsupported, 1, __ATOMIC_RELAXED);
		return false;
	}
	return cs.nr_cache >= pages;
}

/*
 * Buffered only (with cache.direct the page cache must stay out of the
 * data path), and only ranges already cached: -EAGAIN for the others, whose
 * read the caller does the usual way (asynchronously, filling the cache).
 */
static int file_map_to_fd(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off)
{
	struct file_state *st = bs->opaque;

	if (bs->cache.direct || st->fd < 0 || __atomic_load_n(&st->resizing, __ATOMIC_SEQ_CST))
		return -ENOTSUP;
	if (!range_cached(st->fd, off, len))
		return -EAGAIN;
	*fd = st->fd;
	*fd_off = off;
	return 0;
}

static int file_create(const struct vd_create_opts *o)
{
	return vd_create_file(o->filename, o->size, vd_opt_str(o->opts, "preallocation", NULL));
}

static const char *const file_options[] = { "aio-threads", NULL }; /* filename, aio: generic */

const struct vd_format vd_format_file = {
	.name = "file",
	.state_size = sizeof(struct file_state),
	.options = file_options,
	.is_protocol = true,
	.multiqueue = true,
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
	.map_to_fd = file_map_to_fd,
	.create = file_create,
};
