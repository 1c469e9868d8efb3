/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The FUSE export: a node shown as one regular file, mounted over an
 * existing regular file (the mountpoint), on the libfuse3 low-level API.
 *
 * Threads and parallelism.  The export runs in its node's home thread, like
 * every export: the /dev/fuse fd is a plain fd handler in that thread's
 * loop.  When it is readable we read requests one by one (each read() of
 * /dev/fuse returns one request) until it would block, let libfuse parse
 * each (fuse_session_process_buf), and run every I/O request in its own
 * coroutine on the node; so many requests are in flight at once while the
 * thread never blocks.  Several fds (FUSE_DEV_IOC_CLONE) would only help
 * with several threads, and a node graph lives in one thread; the kernel
 * is told it may keep up to MAX_BACKGROUND asynchronous requests in flight
 * (its default, 12, would cap a QD32 workload).
 *
 * Copies.  We read() each request into a buffer of our own, placed so that
 * a WRITE's payload lands page aligned (O_DIRECT nodes take it as is), and
 * libfuse hands the payload to us in place; a READ's data is read from the
 * node into the same buffer and sent with one writev().  The kernel copies
 * once in each direction, which is the minimum for a block layer working
 * on memory buffers (splice would only move the copy elsewhere).  Files are
 * opened with FOPEN_DIRECT_IO: no page cache in front of the node, so reads
 * always see the node and O_DIRECT opens work.
 *
 * Shutdown (block-export-del, daemon exit) stops reading, waits for the
 * requests in flight, then unmounts (closing the fd first, which aborts
 * what the kernel still queues, then a lazy unmount) so the mountpoint is
 * the plain file it was.  A daemon killed without unmounting leaves a
 * mount whose stat() fails (ENOTCONN, ECONNABORTED): we detect it at start.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include "daemon.h"
#include "export.h"

#define MAX_IO (1u << 20)           /* max_read/max_write: the kernel's limit (256 pages) */
#define PAGE 4096u
#define WRITE_HDR 80u               /* fuse_in_header + fuse_write_in: a WRITE's payload offset */
#define RX_OFF (PAGE - WRITE_HDR)   /* where a request is read into its buffer */
#define RX_SIZE (MAX_IO + PAGE)     /* the kernel wants room for max_write plus headers */
#define BUF_SIZE (RX_OFF + RX_SIZE)
#define MAX_INFLIGHT 128            /* requests in flight before we stop reading */
#define MAX_BACKGROUND 64           /* asynchronous requests the kernel may queue to us */
#define KEEP_BUFFERS 64             /* idle request buffers kept for reuse (only touched pages cost memory) */
#define RECV_BURST 32               /* requests read per wake-up before the loop runs again */
#define ZERO_CHUNK (256ull << 20)   /* largest write-zeroes request we issue */

enum allow_other { ALLOW_OTHER_OFF, ALLOW_OTHER_ON, ALLOW_OTHER_AUTO };

enum fop {
	FOP_NONE, /* answered while parsing */
	FOP_READ,
	FOP_WRITE,
	FOP_FLUSH,
	FOP_FALLOCATE,
	FOP_TRUNCATE,
	FOP_LSEEK,
};

struct fuse_exp;

struct freq {
	struct fuse_exp *fe;
	struct freq *next_free;
	uint8_t *mem; /* BUF_SIZE bytes, page aligned */
	fuse_req_t req;
	enum fop op;
	uint64_t off, len;
	const void *data; /* WRITE payload, inside mem */
	int mode;         /* fallocate mode, lseek whence */
	uint64_t t_start;
};

struct fuse_exp {
	struct vd_export *exp;
	struct fuse_exp *next; /* registry (main thread) */
	char *mountpoint;      /* as given */
	char *abs_path;        /* canonical, for the duplicate check */
	bool growable;
	enum allow_other allow_other;
	struct stat orig; /* the mountpoint file before we mounted */

	/* The export's thread. */
	struct fuse_session *se;
	struct vd_loop *loop;
	int fd;
	bool reading;   /* fd handler registered */
	bool stopping;  /* shutdown began */
	bool lost;      /* the kernel connection ended (unmounted or aborted behind our back) */
	bool allow_other_used;
	mode_t mode;
	uid_t uid;
	gid_t gid;
	struct timespec atime, mtime, ctime;
	unsigned inflight, max_inflight_seen;
	struct freq *free_reqs;
	unsigned n_free;
	struct freq *cur; /* the request libfuse is parsing */
	struct vd_co_queue drained;
	struct vd_co_mutex resize_lock;
	uint64_t requests;
};

static struct fuse_exp *fuse_exports; /* main thread */

/* ---- libfuse messages ----------------------------------------------------------------------------- */

/* libfuse reports mount errors through its log function: keep the last line for our error message. */
static _Thread_local char fuse_last_msg[512];

static void fuse_log_fn(enum fuse_log_level level, const char *fmt, va_list ap)
{
	size_t n;

	vsnprintf(fuse_last_msg, sizeof(fuse_last_msg), fmt, ap);
	n = strlen(fuse_last_msg);
	while (n && fuse_last_msg[n - 1] == '\n')
		fuse_last_msg[--n] = 0;
	if (vdd_verbose || level <= FUSE_LOG_ERR)
		vdd_log("fuse: %s", fuse_last_msg);
}

/* ---- request buffers ------------------------------------------------------------------------------- */

static struct freq *req_get(struct fuse_exp *fe)
{
	struct freq *r = fe->free_reqs;

	if (r) {
		fe->free_reqs = r->next_free;
		fe->n_free--;
		return r;
	}
	r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->mem = vd_blk_alloc(BUF_SIZE);
	if (!r->mem) {
		free(r);
		return NULL;
	}
	r->fe = fe;
	return r;
}

static void req_free(struct freq *r)
{
	vd_blk_free(r->mem);
	free(r);
}

static void req_put(struct fuse_exp *fe, struct freq *r)
{
	if (fe->n_free >= KEEP_BUFFERS) {
		req_free(r);
		return;
	}
	r->next_free = fe->free_reqs;
	fe->free_reqs = r;
	fe->n_free++;
}

static void reqs_drain(struct fuse_exp *fe)
{
	while (fe->free_reqs) {
		struct freq *r = fe->free_reqs;

		fe->free_reqs = r->next_free;
		req_free(r);
	}
	fe->n_free = 0;
}

/* ---- attributes ------------------------------------------------------------------------------------ */

static void fill_stat(struct fuse_exp *fe, struct stat *st)
{
	struct vd_bnode *bs = fe->exp->bs;
	int64_t alloc = vd_bnode_allocated_size(vd_export_unwrap(bs));

	memset(st, 0, sizeof(*st));
	st->st_ino = FUSE_ROOT_ID;
	st->st_mode = S_IFREG | fe->mode;
	st->st_nlink = 1;
	st->st_uid = fe->uid;
	st->st_gid = fe->gid;
	st->st_size = (off_t)bs->size;
	st->st_blksize = PAGE;
	/* What the image occupies on its host, as du(1) should see it; unknown: as if fully allocated. */
	st->st_blocks = (blkcnt_t)(((alloc >= 0 ? (uint64_t)alloc : bs->size) + 511) / 512);
	st->st_atim = fe->atime;
	st->st_mtim = fe->mtime;
	st->st_ctim = fe->ctime;
}

static int reply_attr(struct fuse_exp *fe, fuse_req_t req)
{
	struct stat st;

	fill_stat(fe, &st);
	/* No caching: size and block count change under the kernel's feet (writes, discards, resizes). */
	return fuse_reply_attr(req, &st, 0);
}

static int reply_err(fuse_req_t req, int err)
{
	/* The block layer's errors are negative errnos; keep them within what the kernel accepts. */
	if (err <= 0 || err >= 1000)
		err = EIO;
	return fuse_reply_err(req, err);
}

/* ---- block status -------------------------------------------------------------------------------- */

/*
 * Does [off, off+len) hold data (true) or read as a hole (false), looking
 * through the backing chain: data when the first layer that allocates the
 * range says DATA.  *pnum: bytes with that answer (> 0).
 */
static int data_walk(struct vd_bnode *layer, uint64_t off, uint64_t len, bool *data, uint64_t *pnum)
{
	for (;;) {
		uint64_t n = 0;
		int ret = vd_bnode_co_block_status(layer, off, len, &n, NULL, NULL);

		if (ret < 0)
			return ret;
		if (n == 0) { /* past this layer's end: reads as zeroes */
			*data = false;
			*pnum = len;
			return 0;
		}
		if (ret & VD_BS_ALLOCATED) {
			*data = (ret & VD_BS_DATA) != 0;
			*pnum = n;
			return 0;
		}
		layer = vd_export_backing(layer);
		if (!layer) {
			*data = false;
			*pnum = n;
			return 0;
		}
		len = n;
	}
}

/* The walk holds the chain: a block-stream finishing meanwhile cannot free the layers it reads. */
static int data_above(struct vd_bnode *bs, uint64_t off, uint64_t len, bool *data, uint64_t *pnum)
{
	struct vd_bnode *top = vd_export_unwrap(bs);
	int ret;

	vd_bnode_chain_hold(top);
	ret = data_walk(top, off, len, data, pnum);
	vd_bnode_chain_release(top);
	return ret;
}

/* ---- operations (coroutines) ----------------------------------------------------------------------- */

/* Make the node at least `end` bytes long (growable exports). */
static int grow_to(struct fuse_exp *fe, uint64_t end, const char *prealloc)
{
	struct vd_bnode *bs = fe->exp->bs;
	int ret = 0;

	vd_co_mutex_lock(&fe->resize_lock);
	if (end > bs->size) {
		ret = vd_bnode_co_truncate(bs, end, false, prealloc);
		if (ret == -ENOTSUP && strcmp(prealloc, "off"))
			ret = vd_bnode_co_truncate(bs, end, false, "off");
	}
	vd_co_mutex_unlock(&fe->resize_lock);
	return ret < 0 ? ret : 0;
}

static void touch_mtime(struct fuse_exp *fe)
{
	clock_gettime(CLOCK_REALTIME, &fe->mtime);
	fe->ctime = fe->mtime;
}

static int op_read(struct freq *r)
{
	struct vd_bnode *bs = r->fe->exp->bs;
	struct vd_qiov q;
	uint64_t len = r->len;
	int ret;

	if (r->off >= bs->size)
		return fuse_reply_buf(r->req, NULL, 0), 0;
	if (len > bs->size - r->off)
		len = bs->size - r->off;
	vd_qiov_init_buf(&q, r->mem, len);
	ret = vd_bnode_co_preadv(bs, r->off, len, &q, 0, 0);
	if (ret < 0)
		return ret;
	r->len = len;
	fuse_reply_buf(r->req, (const char *)r->mem, len);
	return 0;
}

static int op_write(struct freq *r)
{
	struct fuse_exp *fe = r->fe;
	struct vd_bnode *bs = fe->exp->bs;
	uint64_t len = r->len;
	struct vd_qiov q;
	int ret;

	if (!fe->exp->writable)
		return -EROFS;
	if (len == 0)
		return fuse_reply_write(r->req, 0), 0;
	if (r->off + len > bs->size) {
		if (fe->growable) {
			ret = grow_to(fe, r->off + len, "off");
			if (ret < 0)
				return ret;
		} else if (r->off >= bs->size) {
			return -ENOSPC; /* as a block device does */
		} else {
			len = bs->size - r->off; /* a short write; the rest gets ENOSPC */
		}
	}
	vd_qiov_init_buf(&q, (void *)r->data, len);
	ret = vd_bnode_co_pwritev(bs, r->off, len, &q, 0, 0);
	if (ret < 0)
		return ret;
	r->len = len;
	touch_mtime(fe);
	fuse_reply_write(r->req, len);
	return 0;
}

static int op_flush(struct freq *r)
{
	int ret = r->fe->exp->writable ? vd_bnode_co_flush(r->fe->exp->bs) : 0;

	if (ret < 0)
		return ret;
	fuse_reply_err(r->req, 0);
	return 0;
}

static int zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	while (len) {
		uint64_t n = len < ZERO_CHUNK ? len : ZERO_CHUNK;
		int ret = vd_bnode_co_pwrite_zeroes(bs, off, n, flags);

		if (ret < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

/* Plain allocation inside the image: allocate the ranges that read as holes (data stays as it is). */
static int allocate(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	while (len) {
		uint64_t n;
		bool data;
		int ret = data_above(bs, off, len, &data, &n);

		if (ret < 0)
			return ret;
		if (n > len)
			n = len;
		if (!data && (ret = zeroes(bs, off, n, 0)) < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

static int op_fallocate(struct freq *r)
{
	struct fuse_exp *fe = r->fe;
	struct vd_bnode *bs = fe->exp->bs;
	bool keep_size = r->mode & FALLOC_FL_KEEP_SIZE;
	int mode = r->mode & ~FALLOC_FL_KEEP_SIZE;
	uint64_t end = r->off + r->len, size = bs->size;
	int ret;

	if (!fe->exp->writable)
		return -EROFS;
	if (mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) || mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
		return -EOPNOTSUPP;
	if (end < r->off)
		return -EINVAL;
	if (end > size && !keep_size) {
		if (!fe->growable)
			return -EPERM;
		/* The new tail reads as zeroes: growing is all a zero range or an allocation needs there. */
		ret = grow_to(fe, end, mode ? "off" : "falloc");
		if (ret < 0)
			return ret;
	}
	if (end > size)
		end = size;
	if (r->off < end) {
		if (mode == FALLOC_FL_PUNCH_HOLE)
			/*
			 * A discard that must read back as zeroes (a plain discard on a
			 * qcow2 with a backing file would expose the backing data).
			 */
			ret = zeroes(bs, r->off, end - r->off, VD_BREQ_MAY_UNMAP);
		else if (mode == FALLOC_FL_ZERO_RANGE)
			ret = zeroes(bs, r->off, end - r->off, 0);
		else
			ret = allocate(bs, r->off, end - r->off);
		if (ret < 0)
			return ret;
	}
	touch_mtime(fe);
	fuse_reply_err(r->req, 0);
	return 0;
}

static int op_truncate(struct freq *r)
{
	struct fuse_exp *fe = r->fe;
	struct vd_bnode *bs = fe->exp->bs;
	int ret = 0;

	if (!fe->exp->writable)
		return -EROFS;
	if (r->off != bs->size) {
		if (!fe->growable)
			return -EPERM; /* the image's size is fixed */
		vd_co_mutex_lock(&fe->resize_lock);
		ret = vd_bnode_co_truncate(bs, r->off, true, "off");
		vd_co_mutex_unlock(&fe->resize_lock);
		if (ret < 0)
			return ret;
		touch_mtime(fe);
	}
	reply_attr(fe, r->req);
	return 0;
}

static int op_lseek(struct freq *r)
{
	struct vd_bnode *bs = r->fe->exp->bs;
	uint64_t off = r->off, size = bs->size;

	if (r->mode != SEEK_DATA && r->mode != SEEK_HOLE)
		return -EINVAL;
	while (off < size) {
		uint64_t n;
		bool data;
		int ret = data_above(bs, off, size - off, &data, &n);

		if (ret < 0)
			return ret;
		if (data == (r->mode == SEEK_DATA))
			return fuse_reply_lseek(r->req, (off_t)off), 0;
		off += n;
	}
	/* Past the last data there is no more data, and the end of the file is a hole. */
	if (r->mode == SEEK_DATA || r->off >= size)
		return -ENXIO;
	fuse_reply_lseek(r->req, (off_t)size);
	return 0;
}

static enum vd_io_op io_op(const struct freq *r)
{
	switch (r->op) {
	case FOP_READ:
		return VD_IO_READ;
	case FOP_WRITE:
	case FOP_TRUNCATE:
		return VD_IO_WRITE;
	case FOP_FLUSH:
		return VD_IO_FLUSH;
	case FOP_FALLOCATE:
		return (r->mode & FALLOC_FL_PUNCH_HOLE) ? VD_IO_DISCARD : VD_IO_WRITE_ZEROES;
	default:
		return VD_IO_BLOCK_STATUS;
	}
}

static void start_reading(struct fuse_exp *fe);

static void req_co(void *opaque)
{
	struct freq *r = opaque;
	struct fuse_exp *fe = r->fe;
	struct vd_export *exp = fe->exp;
	uint64_t t_io = vdd_now_ns(), t_end;
	int ret;

	switch (r->op) {
	case FOP_READ:
		ret = op_read(r);
		break;
	case FOP_WRITE:
		ret = op_write(r);
		break;
	case FOP_FLUSH:
		ret = op_flush(r);
		break;
	case FOP_FALLOCATE:
		ret = op_fallocate(r);
		break;
	case FOP_TRUNCATE:
		ret = op_truncate(r);
		break;
	default:
		ret = op_lseek(r);
		break;
	}
	if (ret < 0)
		reply_err(r->req, -ret);
	t_end = vdd_now_ns();
	if (r->op != FOP_TRUNCATE) {
		enum vd_io_op op = io_op(r);
		uint64_t bytes = op == VD_IO_FLUSH || op == VD_IO_BLOCK_STATUS ? 0 : r->len;

		vd_io_stats_account(&exp->stats, op, bytes, t_end - r->t_start, ret < 0);
		if (exp->node_stats)
			vd_io_stats_account(exp->node_stats, op, bytes, t_end - t_io, ret < 0);
	}
	if (ret < 0 && vdd_verbose && ret != -ENXIO)
		vdd_log("fuse export '%s': request %d [%" PRIu64 ", +%" PRIu64 ") failed: %s", exp->id, r->op, r->off,
			r->len, strerror(-ret));
	req_put(fe, r);
	fe->inflight--;
	if (fe->inflight == 0 && !vd_co_queue_empty(&fe->drained))
		vd_co_queue_wake_all(&fe->drained);
	if (!fe->reading && !fe->stopping && !fe->lost && fe->inflight < MAX_INFLIGHT)
		start_reading(fe);
}

/* ---- libfuse callbacks (called while a request is parsed) ------------------------------------------ */

/* Queue the request being parsed to run in a coroutine once libfuse is done with it. */
static void defer(fuse_req_t req, enum fop op, uint64_t off, uint64_t len, int mode)
{
	struct fuse_exp *fe = fuse_req_userdata(req);
	struct freq *r = fe->cur;

	r->req = req;
	r->op = op;
	r->off = off;
	r->len = len;
	r->mode = mode;
}

static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	conn->max_write = MAX_IO;
	conn->max_background = MAX_BACKGROUND;
	conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
	/* O_TRUNC as a separate setattr (refused on fixed-size exports); no splice (see the top comment). */
	conn->want &= ~(FUSE_CAP_ATOMIC_O_TRUNC | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
	conn->time_gran = 1;
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	reply_attr(fuse_req_userdata(req), req);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
	struct fuse_exp *fe = fuse_req_userdata(req);
	struct timespec now;

	(void)ino;
	(void)fi;
	clock_gettime(CLOCK_REALTIME, &now);
	if ((to_set & FUSE_SET_ATTR_SIZE) && !fe->exp->writable) {
		fuse_reply_err(req, EROFS);
		return;
	}
	if (to_set & FUSE_SET_ATTR_MODE) {
		/* A read-only export never offers write permission. */
		fe->mode = attr->st_mode & 07777 & (fe->exp->writable ? 07777 : ~0222);
	}
	if (to_set & FUSE_SET_ATTR_UID)
		fe->uid = attr->st_uid;
	if (to_set & FUSE_SET_ATTR_GID)
		fe->gid = attr->st_gid;
	if (to_set & FUSE_SET_ATTR_ATIME)
		fe->atime = (to_set & FUSE_SET_ATTR_ATIME_NOW) ? now : attr->st_atim;
	if (to_set & FUSE_SET_ATTR_MTIME)
		fe->mtime = (to_set & FUSE_SET_ATTR_MTIME_NOW) ? now : attr->st_mtim;
	if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))
		fe->ctime = now;
	if (to_set & FUSE_SET_ATTR_SIZE) {
		defer(req, FOP_TRUNCATE, (uint64_t)attr->st_size, 0, 0);
		return;
	}
	reply_attr(fe, req);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fuse_exp *fe = fuse_req_userdata(req);

	(void)ino;
	if ((fi->flags & O_ACCMODE) != O_RDONLY && !fe->exp->writable) {
		fuse_reply_err(req, EROFS);
		return;
	}
	fi->direct_io = 1;  /* every read and write reaches the node; O_DIRECT works */
	fi->keep_cache = 0;
	if (fuse_reply_open(req, fi) == 0) {
		fe->exp->connections++;
		fe->exp->connections_total++;
	}
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fuse_exp *fe = fuse_req_userdata(req);

	(void)ino;
	(void)fi;
	if (fe->exp->connections)
		fe->exp->connections--;
	fuse_reply_err(req, 0);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if (size > MAX_IO) { /* the kernel never sends more than max_read; the buffer holds no more */
		fuse_reply_err(req, EINVAL);
		return;
	}
	defer(req, FOP_READ, (uint64_t)off, size, 0);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct fuse_exp *fe = fuse_req_userdata(req);

	(void)ino;
	(void)fi;
	defer(req, FOP_WRITE, (uint64_t)off, size, 0);
	fe->cur->data = buf; /* in fe->cur->mem: ours until the reply */
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	defer(req, FOP_FLUSH, 0, 0, 0);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	(void)datasync;
	(void)fi;
	defer(req, FOP_FLUSH, 0, 0, 0);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if (off < 0 || len <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	defer(req, FOP_FALLOCATE, (uint64_t)off, (uint64_t)len, mode);
}

static void ll_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if (off < 0) {
		fuse_reply_err(req, ENXIO);
		return;
	}
	defer(req, FOP_LSEEK, (uint64_t)off, 0, whence);
}

static const struct fuse_lowlevel_ops ll_ops = {
	.init = ll_init,
	.getattr = ll_getattr,
	.setattr = ll_setattr,
	.open = ll_open,
	.release = ll_release,
	.read = ll_read,
	.write = ll_write,
	.flush = ll_flush,
	.fsync = ll_fsync,
	.fallocate = ll_fallocate,
	.lseek = ll_lseek,
};

/* ---- receiving ------------------------------------------------------------------------------------- */

static void fd_readable(void *opaque, int fd, int revents);

static void start_reading(struct fuse_exp *fe)
{
	if (vd_loop_set_fd_handler(fe->loop, fe->fd, POLLIN, fd_readable, fe) == 0)
		fe->reading = true;
}

static void stop_reading(struct fuse_exp *fe)
{
	if (fe->reading)
		vd_loop_del_fd_handler(fe->loop, fe->fd);
	fe->reading = false;
}

/* The kernel side is gone (someone unmounted us, or aborted the connection). */
static void connection_lost(struct fuse_exp *fe, int err)
{
	stop_reading(fe);
	fe->lost = true;
	vdd_log("fuse export '%s': the kernel connection of %s ended (%s); the export serves nothing until deleted",
		fe->exp->id, fe->mountpoint, err == ENODEV ? "unmounted" : strerror(err));
}

/* Read one request; false when there is nothing (more) to read now. */
static bool receive_one(struct fuse_exp *fe)
{
	struct freq *r = req_get(fe);
	struct fuse_buf fb = { 0 };
	struct vd_co *co;
	ssize_t n;

	if (!r) {
		/* Out of memory: retry when a request in flight gives its buffer back. */
		if (fe->inflight)
			stop_reading(fe);
		return false;
	}
	n = read(fe->fd, r->mem + RX_OFF, RX_SIZE);
	if (n <= 0) {
		int err = n < 0 ? errno : ENODEV;

		req_put(fe, r);
		if (err == EINTR || err == ENOENT) /* ENOENT: the request was interrupted before we read it */
			return true;
		if (err != EAGAIN)
			connection_lost(fe, err);
		return false;
	}
	r->t_start = vdd_now_ns();
	r->op = FOP_NONE;
	r->data = NULL;
	fe->cur = r;
	fb.size = (size_t)n;
	fb.mem = r->mem + RX_OFF;
	fuse_session_process_buf(fe->se, &fb);
	fe->cur = NULL;
	fe->requests++;
	if (r->op == FOP_NONE) {
		req_put(fe, r);
		return true;
	}
	co = vd_co_create(req_co, r);
	if (!co) {
		reply_err(r->req, ENOMEM);
		req_put(fe, r);
		return true;
	}
	if (++fe->inflight > fe->max_inflight_seen)
		fe->max_inflight_seen = fe->inflight;
	vd_co_enter(co);
	return true;
}

static void fd_readable(void *opaque, int fd, int revents)
{
	struct fuse_exp *fe = opaque;

	(void)fd;
	(void)revents;
	for (int i = 0; i < RECV_BURST && fe->reading; i++) {
		if (fe->inflight >= MAX_INFLIGHT) {
			stop_reading(fe); /* req_co resumes us */
			return;
		}
		if (!receive_one(fe))
			return;
	}
}

/* ==== the export type ================================================================================ */

static const char *const fuse_options[] = { "mountpoint", "growable", "allow-other", NULL };

/* A directory's canonical path, from the kernel (see canonical()); NULL if it is none. */
static char *real_dir(const char *dir)
{
	char proc[64], buf[PATH_MAX];
	int fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return NULL;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	n = readlink(proc, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0 || buf[0] != '/')
		return NULL;
	buf[n] = 0;
	return strdup(buf);
}

/*
 * The mountpoint's canonical path, found without stat()ing the file itself:
 * it may be one of our own live mounts named another way (./, //, a
 * symlinked directory, a symlink), and a stat() there waits for a GETATTR
 * that this very thread may have to answer.  The directory is resolved
 * by opening it O_PATH|O_DIRECTORY and reading its /proc/self/fd link, the
 * last component's symlinks with readlink(): the kernel answers these
 * without asking a FUSE file system mounted on the way (one of ours there
 * gives ENOTDIR or EINVAL).  NULL: out of memory.
 */
static char *canonical(const char *path)
{
	char *cur = strdup(path), *out = NULL;

	for (int hops = 0; cur && !out; hops++) {
		char *slash = strrchr(cur, '/'), *dir, *rdir, link[PATH_MAX], *next = NULL;
		const char *base = slash ? slash + 1 : cur;
		ssize_t n;

		dir = slash ? strndup(cur, slash == cur ? 1 : (size_t)(slash - cur)) : strdup(".");
		rdir = dir ? real_dir(dir) : NULL;
		free(dir);
		if (!rdir) {
			/* No such directory (the stat() that follows says so) or no memory: keep the path as is. */
			if (cur[0] == '/' || !getcwd(link, sizeof(link)))
				out = strdup(cur);
			else if (asprintf(&out, "%s/%s", link, cur) < 0)
				out = NULL;
			break;
		}
		n = hops < 40 ? readlink(cur, link, sizeof(link) - 1) : -1;
		if (n < 0) {
			if (asprintf(&out, "%s/%s", strcmp(rdir, "/") ? rdir : "", base) < 0)
				out = NULL;
			free(rdir);
			break;
		}
		link[n] = 0;
		if (link[0] == '/')
			next = strdup(link);
		else if (asprintf(&next, "%s/%s", rdir, link) < 0)
			next = NULL;
		free(rdir);
		free(cur);
		cur = next;
	}
	free(cur);
	return out;
}

static int check_mountpoint(struct fuse_exp *fe, char **errp)
{
	const char *mp = fe->mountpoint;

	for (struct fuse_exp *o = fuse_exports; o; o = o->next)
		if (!strcmp(o->abs_path, fe->abs_path))
			return vdd_error(errp, "mountpoint '%s' is already used by FUSE export '%s'", mp, o->exp->id);
	if (stat(mp, &fe->orig) < 0) {
		/* A FUSE mount whose daemon died: ENOTCONN, or ECONNABORTED on recent kernels. */
		if (errno == ENOTCONN || errno == ECONNABORTED)
			return vdd_error(errp,
					 "mountpoint '%s' is a stale FUSE mount (its daemon is gone): unmount it first "
					 "(fusermount3 -u %s, or umount -l %s as root)",
					 mp, mp, mp);
		return vdd_error(errp, "mountpoint '%s': %s (it must be an existing regular file)", mp, strerror(errno));
	}
	if (S_ISDIR(fe->orig.st_mode))
		return vdd_error(errp, "mountpoint '%s' is a directory: a FUSE export is mounted over a regular file, "
				       "which then shows the image", mp);
	if (!S_ISREG(fe->orig.st_mode))
		return vdd_error(errp, "mountpoint '%s' is not a regular file", mp);
	return 0;
}

static int fuse_create(struct vd_export *exp, json_t *opts, char **errp)
{
	struct fuse_exp *fe = exp->opaque;
	const char *mp, *ao;

	if (vdd_arg_str(opts, "mountpoint", true, NULL, &mp, errp) < 0 ||
	    vdd_arg_bool(opts, "growable", false, &fe->growable, errp) < 0 ||
	    vdd_arg_str(opts, "allow-other", false, "auto", &ao, errp) < 0)
		return -1;
	if (!mp[0])
		return vdd_error(errp, "block-export-add: 'mountpoint' must not be empty");
	if (!strcmp(ao, "on"))
		fe->allow_other = ALLOW_OTHER_ON;
	else if (!strcmp(ao, "off"))
		fe->allow_other = ALLOW_OTHER_OFF;
	else if (!strcmp(ao, "auto"))
		fe->allow_other = ALLOW_OTHER_AUTO;
	else
		return vdd_error(errp, "block-export-add: allow-other must be on, off or auto");
	if (fe->growable && !exp->writable)
		return vdd_error(errp, "block-export-add: growable=on needs writable=on");
	fe->exp = exp;
	fe->fd = -1;
	if (!(fe->mountpoint = strdup(mp)) || !(fe->abs_path = canonical(mp))) {
		free(fe->mountpoint);
		return vdd_error(errp, "out of memory");
	}
	if (check_mountpoint(fe, errp) < 0) {
		vdd_error_prefix(errp, "block-export-add: ");
		free(fe->mountpoint);
		free(fe->abs_path);
		return -1;
	}
	fe->next = fuse_exports;
	fuse_exports = fe;
	return 0;
}

/* A session mounted on the mountpoint; NULL with the reason in fuse_last_msg. */
static struct fuse_session *mount_session(struct fuse_exp *fe, bool allow_other)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_session *se = NULL;
	char opts[128];

	snprintf(opts, sizeof(opts), "fsname=vdiskd,subtype=vdiskd,default_permissions%s",
		 allow_other ? ",allow_other" : "");
	fuse_last_msg[0] = 0;
	if (fuse_opt_add_arg(&args, "vdiskd") < 0 || fuse_opt_add_arg(&args, "-o") < 0 ||
	    fuse_opt_add_arg(&args, opts) < 0) {
		snprintf(fuse_last_msg, sizeof(fuse_last_msg), "out of memory");
		goto out;
	}
	se = fuse_session_new(&args, &ll_ops, sizeof(ll_ops), fe);
	if (!se)
		goto out;
	if (fuse_session_mount(se, fe->mountpoint) < 0) {
		fuse_session_destroy(se);
		se = NULL;
	}
out:
	fuse_opt_free_args(&args);
	return se;
}

static int fuse_start(struct vd_export *exp, char **errp)
{
	struct fuse_exp *fe = exp->opaque;
	bool ao = fe->allow_other != ALLOW_OTHER_OFF;
	int fl;

	fuse_set_log_func(fuse_log_fn);
	fe->mode = fe->orig.st_mode & 07777 & (exp->writable ? 07777 : ~0222);
	fe->uid = fe->orig.st_uid;
	fe->gid = fe->orig.st_gid;
	fe->atime = fe->orig.st_atim;
	fe->mtime = fe->orig.st_mtim;
	fe->ctime = fe->orig.st_ctim;
	vd_co_queue_init(&fe->drained);
	vd_co_mutex_init(&fe->resize_lock);
	fe->se = mount_session(fe, ao);
	if (!fe->se && fe->allow_other == ALLOW_OTHER_AUTO) {
		/* As QEMU: allow_other needs user_allow_other in /etc/fuse.conf for non-root users. */
		ao = false;
		fe->se = mount_session(fe, false);
	}
	if (!fe->se)
		return vdd_error(errp, "cannot mount FUSE export '%s' on '%s': %s", exp->id, fe->mountpoint,
				 fuse_last_msg[0] ? fuse_last_msg : "fuse_session_mount failed");
	fe->allow_other_used = ao;
	fe->fd = fuse_session_fd(fe->se);
	fl = fcntl(fe->fd, F_GETFL);
	if (fl < 0 || fcntl(fe->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		int err = errno;

		fuse_session_unmount(fe->se);
		fuse_session_destroy(fe->se);
		fe->se = NULL;
		return vdd_error(errp, "FUSE export '%s': cannot make /dev/fuse non-blocking: %s", exp->id, strerror(err));
	}
	fe->loop = vd_loop_get();
	start_reading(fe);
	if (!fe->reading) {
		fuse_session_unmount(fe->se);
		fuse_session_destroy(fe->se);
		fe->se = NULL;
		return vdd_error(errp, "out of memory");
	}
	vdd_log("fuse export '%s' mounted on %s%s", exp->id, fe->mountpoint, ao ? " (allow_other)" : "");
	return 0;
}

/* The export's thread, in a coroutine: stop, let requests finish, unmount. */
static void fuse_shutdown(struct vd_export *exp)
{
	struct fuse_exp *fe = exp->opaque;

	fe->stopping = true;
	stop_reading(fe);
	while (fe->inflight)
		vd_co_queue_wait(&fe->drained, NULL);
	if (fe->se) {
		/* libfuse closes the fd first (aborting what the kernel still queues), then unmounts lazily. */
		fuse_session_exit(fe->se);
		fuse_session_unmount(fe->se);
		fuse_session_destroy(fe->se);
		fe->se = NULL;
		fe->fd = -1;
		vdd_log("fuse export '%s': unmounted %s", exp->id, fe->mountpoint);
	}
	exp->connections = 0;
	reqs_drain(fe);
}

static void fuse_destroy(struct vd_export *exp)
{
	struct fuse_exp *fe = exp->opaque;

	for (struct fuse_exp **pp = &fuse_exports; *pp; pp = &(*pp)->next) {
		if (*pp == fe) {
			*pp = fe->next;
			break;
		}
	}
	free(fe->mountpoint);
	free(fe->abs_path);
}

static void fuse_query(struct vd_export *exp, json_t *info)
{
	struct fuse_exp *fe = exp->opaque;

	json_object_set_new(info, "mountpoint", json_string(fe->mountpoint));
	json_object_set_new(info, "growable", json_boolean(fe->growable));
	json_object_set_new(info, "allow-other", json_boolean(fe->allow_other_used));
}

static void fuse_query_stats(struct vd_export *exp, json_t *stats)
{
	struct fuse_exp *fe = exp->opaque;

	json_object_set_new(stats, "requests", json_integer((json_int_t)fe->requests));
	json_object_set_new(stats, "in-flight", json_integer(fe->inflight));
	json_object_set_new(stats, "max-in-flight", json_integer(fe->max_inflight_seen));
	json_object_set_new(stats, "mounted", json_boolean(fe->se && !fe->lost));
}

const struct vd_export_type vd_export_type_fuse = {
	.name = "fuse",
	.state_size = sizeof(struct fuse_exp),
	.options = fuse_options,
	.create = fuse_create,
	.start = fuse_start,
	.shutdown = fuse_shutdown,
	.destroy = fuse_destroy,
	.query = fuse_query,
	.query_stats = fuse_query_stats,
};
