/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * io_uring: one ring per queue.
 *
 * - The device fd is a registered file (IOSQE_FIXED_FILE) in every ring.
 * - Mapped memory regions become registered buffers: each ring has a sparse
 *   buffer table (created when the first region is mapped) whose index is the
 *   core's region slot; single-buffer reads/writes inside a region use
 *   READ_FIXED/WRITE_FIXED.  A ring that cannot register a region (e.g.
 *   RLIMIT_MEMLOCK) silently uses plain reads/writes for it.
 * - submit() only fills SQEs; commit() is one io_uring_enter per batch;
 *   reap() drains the CQ in batches and, when asked to wait, sleeps in
 *   io_uring_enter until the deadline.
 * - Normal queues signal the core's completion eventfd (registered eventfd,
 *   toggled with IORING_CQ_EVENTFD_DISABLED).  Poll queues are IOPOLL rings,
 *   offered only when connect() proved that polled O_DIRECT reads work.
 * - Short transfers continue from where they stopped (asynchronously, with
 *   no allocation); reads that hit EOF are zero-filled.
 * - Write-zeroes is an async fallocate with the exact semantics of
 *   vd_file_write_zeroes(), which it falls back to when the filesystem cannot
 *   do it (so zero buffers are written the same way the sync driver does).
 *   Discard on block devices (BLKDISCARD) and every non-read/write request
 *   on poll queues (IOPOLL rings only accept reads and writes) run
 *   synchronously through lib/file.c.
 *
 * - Property "sqpoll" gives every ring its own kernel submission thread
 *   (idle after UR_SQ_THREAD_IDLE_MS), "sqpoll-cpu" pins those threads.
 * - vdisk_destroy() waits for requests still in flight before closing a
 *   ring, so the kernel never writes into buffers after it returns.
 *
 * Threads: a queue's ring is touched only by the queue's thread, except for
 * the registered-buffer table, which vdisk_map_mem_region() updates from the
 * control thread with io_uring_register() (serialised by the kernel).  The
 * per-ring "slot usable" bytes are written with release and read with
 * acquire ordering for that reason, and the region bounds live in this
 * driver's fixed-size table rather than in v->regions (which the core may
 * realloc while queue threads run).  No SINGLE_ISSUER/DEFER_TASKRUN (queues
 * may move between threads; buffers are registered from the control thread)
 * and no COOP_TASKRUN (a thread asleep in poll() on the completion fd would
 * never run the task work that posts the CQE and signals the eventfd).
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../vd-internal.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Registered-buffer table size per ring = max-mem-regions. */
#define UR_MAX_BUFS 1024
/* The kernel refuses to register a single buffer larger than this. */
#define UR_MAX_BUF_LEN (1ull << 30)
/* Kernel limit on SQ entries (IORING_MAX_ENTRIES); we pass IORING_SETUP_CLAMP. */
#define UR_MAX_ENTRIES 32768u
/* How long the SQPOLL thread spins before it sleeps (ms). */
#define UR_SQ_THREAD_IDLE_MS 1000
/* CQEs handled per peek. */
#define UR_CQE_BATCH 64

struct ur_buf {
	uintptr_t start; /* 0: slot not mapped */
	size_t len;
};

/* Per instance (v->priv). */
struct ur_state {
	bool sqpoll;     /* property "sqpoll" */
	int sqpoll_cpu;  /* property "sqpoll-cpu", -1: not pinned */
	bool inline_writes; /* buffered writes the kernel would punt to io-wq: see write_inline() */
	unsigned n_mapped;  /* regions mapped (atomic: read by queue threads) */
	unsigned hi_slot;   /* 1 + highest slot ever mapped (atomic) */
	struct ur_buf bufs[UR_MAX_BUFS]; /* fields accessed atomically */
};

/* Per queue (q->priv). */
struct ur_queue {
	struct io_uring ring;
	bool ring_ok;
	bool iopoll;           /* IOPOLL ring (poll queue): reads and writes only */
	bool sqpoll;           /* SQPOLL ring: the kernel thread also does the polling */
	bool buf_table;        /* sparse buffer table registered */
	int fd;                /* 0 (registered index) or v->dev_fd */
	unsigned char sqe_flags;
	int hint;              /* last slot used for a fixed buffer, -1 */
	bool pushed_early;     /* submit_early() pushed SQEs since the last reap */
	unsigned reads_in_ring;    /* reads submitted to the ring and not finished: see write_inline() */
	int64_t inline_paused_until; /* CLOCK_MONOTONIC ns: an inline write was slow, punt until then */
	unsigned char buf_ok[UR_MAX_BUFS]; /* slot registered in this ring (atomic) */
};

/* Per request (r->priv). */
struct ur_req {
	uint64_t done;      /* bytes transferred so far (read/write) */
	struct iovec part;  /* remainder of a partially transferred iovec */
	int buf_index;      /* registered buffer, -1: none */
	int stage;          /* write-zeroes: 0 fallocate, 1 fdatasync (FUA) */
};

static const struct vd_prop ur_props[] = {
	{ .name = "sqpoll", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct ur_state, sqpoll) },
	{ .name = "sqpoll-cpu", .type = VD_PROP_INT, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct ur_state, sqpoll_cpu), .min = -1, .max = INT_MAX },
	{ .name = NULL },
};

static inline struct ur_req *req_priv(struct vd_request *r)
{
	return (struct ur_req *)r->priv;
}

static int64_t ns_until(const struct timespec *deadline)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(deadline->tv_sec - now.tv_sec) * 1000000000LL + (deadline->tv_nsec - now.tv_nsec);
}

/* ---- control path ---------------------------------------------------------- */

static int ur_init(struct vdisk *v)
{
	struct ur_state *s = vd_priv(v);

	s->sqpoll_cpu = -1;
	return 0;
}

/* Read /sys/dev/block/M:m/queue/io_poll (or the parent's, for partitions): 1, 0, or -1 if unknown. */
static int sysfs_io_poll(dev_t dev)
{
	static const char *const fmts[] = { "/sys/dev/block/%u:%u/queue/io_poll",
					    "/sys/dev/block/%u:%u/../queue/io_poll" };
	char path[96], c;

	for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
		int fd, n;

		snprintf(path, sizeof(path), fmts[i], major(dev), minor(dev));
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		n = (int)read(fd, &c, 1);
		close(fd);
		if (n == 1)
			return c == '1';
	}
	return -1;
}

/*
 * Can an IOPOLL ring do I/O on this device?  Ask sysfs whether the block
 * device underneath polls, then prove it with one polled O_DIRECT read.  The
 * read must reach the device: on a regular file it targets allocated data
 * (SEEK_DATA), because reading a hole completes without any bio and would
 * "succeed" on any device.
 */
static bool probe_iopoll(struct vdisk *v)
{
	struct io_uring ring;
	struct io_uring_cqe *cqe;
	struct io_uring_sqe *sqe;
	struct timespec deadline;
	struct stat st;
	uint64_t align, len, off = 0;
	int sysfs, ret;
	void *buf;
	bool ok = false;

	if (!v->direct || fstat(v->dev_fd, &st) < 0)
		return false;
	sysfs = sysfs_io_poll(v->is_blockdev ? st.st_rdev : st.st_dev);
	if (sysfs == 0)
		return false;

	align = v->request_alignment > 1 ? (uint64_t)v->request_alignment : 512;
	len = align >= 4096 ? align : (4096 / align) * align;
	if (v->capacity < len)
		len = align;
	if (v->capacity < len)
		return false;
	if (!v->is_blockdev) {
		off_t data = lseek(v->dev_fd, 0, SEEK_DATA);

		if (data < 0) /* no data anywhere: nothing would reach the device */
			return sysfs == 1;
		off = (uint64_t)data / align * align;
		if (off + len > v->capacity)
			off = (v->capacity - len) / align * align;
	}

	if (posix_memalign(&buf, 4096, (size_t)len))
		return false;
	if (io_uring_queue_init(2, &ring, IORING_SETUP_IOPOLL) < 0) {
		free(buf);
		return false;
	}
	sqe = io_uring_get_sqe(&ring);
	io_uring_prep_read(sqe, v->dev_fd, buf, (unsigned)len, off);
	io_uring_sqe_set_data64(sqe, 1);
	if (io_uring_submit(&ring) != 1) {
		io_uring_queue_exit(&ring);
		free(buf);
		return false;
	}
	/* IOPOLL waits spin in the kernel; bound the probe in case the device stalls. */
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += 5;
	for (;;) {
		struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

		ret = io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
		if (ret == 0) {
			ok = cqe->res >= 0;
			io_uring_cqe_seen(&ring, cqe);
			break;
		}
		if ((ret != -ETIME && ret != -EINTR && ret != -EAGAIN) || ns_until(&deadline) <= 0) {
			/* Still in flight (or unknown): the kernel may write buf later, so leak it. */
			io_uring_queue_exit(&ring);
			return false;
		}
	}
	io_uring_queue_exit(&ring);
	free(buf);
	return ok;
}

/*
 * Does the file system hand buffered writes to io_uring's workers (io-wq)
 * instead of doing them in the submitting call?  ext4 (kernel 6.18) does:
 * it refuses RWF_NOWAIT buffered writes, so every write costs a worker
 * wake-up and a context switch (fio 4k randwrite QD1 on a cached file:
 * io_uring 35-38k IOPS, pwrite 129k).  Probed with a 1-byte RWF_NOWAIT
 * write into an unnamed temporary file (O_TMPFILE) beside the image.
 */
static bool fs_punts_buffered_writes(struct vdisk *v)
{
	char dir[PATH_MAX];
	const char *slash = v->path ? strrchr(v->path, '/') : NULL;
	struct iovec iov = { .iov_base = (char[1]){ 0 }, .iov_len = 1 };
	bool punts;
	int fd;

	if (!v->path || strlen(v->path) >= sizeof(dir))
		return false;
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == v->path)
		snprintf(dir, sizeof(dir), "/");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - v->path), v->path);
	fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0)
		return false;
	punts = pwritev2(fd, &iov, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP;
	close(fd);
	return punts;
}

static int ur_connect(struct vdisk *v)
{
	struct io_uring ring;
	int ret = vd_file_connect(v, "vdisk_connect: io_uring");

	if (ret < 0)
		return ret;
	/* Fail here, with a clear reason, rather than at start. */
	ret = io_uring_queue_init(1, &ring, 0);
	if (ret < 0) {
		vd_file_close(v);
		return vd_error(-ret, "vdisk_connect: io_uring: io_uring_setup failed: %s%s", strerror(-ret),
				ret == -EPERM || ret == -ENOSYS ? " (io_uring disabled by kernel.io_uring_disabled or seccomp?)"
								: "");
	}
	io_uring_queue_exit(&ring);
	v->max_segments = IOV_MAX;
	v->max_mem_regions = UR_MAX_BUFS;
	v->can_poll = probe_iopoll(v);
	{
		struct ur_state *st = v->priv;
		struct stat sb;

		st->inline_writes = !v->direct && !v->read_only && !v->is_blockdev && fstat(v->dev_fd, &sb) == 0 &&
				    S_ISREG(sb.st_mode) && fs_punts_buffered_writes(v);
	}
	return 0;
}

static void ur_destroy(struct vdisk *v)
{
	vd_file_close(v);
}

/* Make slot usable for fixed I/O in this ring (best effort). */
static void register_buf(struct vdisk *v, struct ur_queue *uq, int slot)
{
	struct ur_state *s = vd_priv(v);
	struct iovec iov = { .iov_base = (void *)s->bufs[slot].start, .iov_len = s->bufs[slot].len };
	int ret;

	if (!iov.iov_base || iov.iov_len == 0 || iov.iov_len > UR_MAX_BUF_LEN)
		return;
	if (!uq->buf_table) {
		if (io_uring_register_buffers_sparse(&uq->ring, UR_MAX_BUFS) < 0)
			return; /* kernel < 5.19: no fixed buffers on this ring */
		uq->buf_table = true;
	}
	ret = io_uring_register_buffers_update_tag(&uq->ring, (unsigned)slot, &iov, NULL, 1);
	if (ret == 1)
		__atomic_store_n(&uq->buf_ok[slot], 1, __ATOMIC_RELEASE);
}

static void unregister_buf(struct vdisk *v, struct ur_queue *uq, int slot)
{
	struct iovec iov = { .iov_base = NULL, .iov_len = 0 };

	(void)v;
	if (!__atomic_load_n(&uq->buf_ok[slot], __ATOMIC_RELAXED))
		return;
	__atomic_store_n(&uq->buf_ok[slot], 0, __ATOMIC_RELEASE);
	/* Requests still in flight keep their own reference to the old buffer. */
	io_uring_register_buffers_update_tag(&uq->ring, (unsigned)slot, &iov, NULL, 1);
}

/* Apply fn to every live ring of the instance (queues exist only once started). */
static void each_ring(struct vdisk *v, void (*fn)(struct vdisk *, struct ur_queue *, int), int slot)
{
	for (int pass = 0; pass < 2; pass++) {
		struct vdiskq **qs = pass ? v->poll_queues : v->queues;
		int n = pass ? v->num_poll_queues : v->num_queues;

		for (int i = 0; qs && i < n; i++) {
			struct ur_queue *uq = qs[i] ? qs[i]->priv : NULL;

			if (uq && uq->ring_ok)
				fn(v, uq, slot);
		}
	}
}

static int ur_map_mem_region(struct vdisk *v, const struct vdisk_mem_region *r, int slot)
{
	struct ur_state *s = vd_priv(v);

	if (slot < 0 || slot >= UR_MAX_BUFS)
		return 0; /* cannot happen (max-mem-regions); plain I/O works anyway */
	__atomic_store_n(&s->bufs[slot].len, r->len, __ATOMIC_RELAXED);
	__atomic_store_n(&s->bufs[slot].start, (uintptr_t)r->addr, __ATOMIC_RELEASE);
	if ((unsigned)slot + 1 > __atomic_load_n(&s->hi_slot, __ATOMIC_RELAXED))
		__atomic_store_n(&s->hi_slot, (unsigned)slot + 1, __ATOMIC_RELEASE);
	__atomic_add_fetch(&s->n_mapped, 1, __ATOMIC_RELEASE);
	each_ring(v, register_buf, slot);
	return 0; /* registration is an optimisation: never fail the mapping for it */
}

static void ur_unmap_mem_region(struct vdisk *v, const struct vdisk_mem_region *r, int slot)
{
	struct ur_state *s = vd_priv(v);

	(void)r;
	if (slot < 0 || slot >= UR_MAX_BUFS || !s->bufs[slot].start)
		return;
	each_ring(v, unregister_buf, slot);
	__atomic_store_n(&s->bufs[slot].start, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&s->bufs[slot].len, 0, __ATOMIC_RELAXED);
	__atomic_sub_fetch(&s->n_mapped, 1, __ATOMIC_RELEASE);
}

static int ur_queue_init(struct vdiskq *q)
{
	struct vdisk *v = q->v;
	struct ur_state *s = vd_priv(v);
	struct ur_queue *uq = q->priv;
	struct io_uring_params p;
	unsigned entries = 1, base_flags;
	int ret;

	while (entries < q->queue_size && entries < UR_MAX_ENTRIES)
		entries <<= 1;
	base_flags = IORING_SETUP_CLAMP;
	if (q->is_poll_queue)
		base_flags |= IORING_SETUP_IOPOLL;
	if (s->sqpoll)
		base_flags |= IORING_SETUP_SQPOLL | (s->sqpoll_cpu >= 0 ? IORING_SETUP_SQ_AFF : 0);

	/* SUBMIT_ALL (5.18): an SQE failing at submission does not hold back the rest. */
	for (int attempt = 0; attempt < 2; attempt++) {
		memset(&p, 0, sizeof(p));
		p.flags = base_flags | (attempt == 0 ? IORING_SETUP_SUBMIT_ALL : 0);
		if (s->sqpoll) {
			p.sq_thread_idle = UR_SQ_THREAD_IDLE_MS;
			if (s->sqpoll_cpu >= 0)
				p.sq_thread_cpu = (unsigned)s->sqpoll_cpu;
		}
		ret = io_uring_queue_init_params(entries, &uq->ring, &p);
		if (ret != -EINVAL)
			break;
	}
	if (ret < 0) {
		const char *hint = "";

		if (ret == -ENOMEM)
			hint = " (out of locked memory? check RLIMIT_MEMLOCK / queue-size)";
		else if (s->sqpoll && (ret == -EPERM || ret == -EINVAL))
			hint = " (sqpoll not permitted, or sqpoll-cpu not a valid online CPU)";
		return vd_error(-ret, "vdisk_start: io_uring: creating the ring for %squeue %d (%u entries%s) failed: %s%s",
				q->is_poll_queue ? "poll " : "", q->index, entries, s->sqpoll ? ", sqpoll" : "",
				strerror(-ret), hint);
	}
	uq->ring_ok = true;
	uq->iopoll = q->is_poll_queue;
	uq->sqpoll = s->sqpoll;
	uq->hint = -1;

	if (io_uring_register_files(&uq->ring, &v->dev_fd, 1) == 0) {
		uq->fd = 0;
		uq->sqe_flags = IOSQE_FIXED_FILE;
	} else {
		uq->fd = v->dev_fd;
		uq->sqe_flags = 0;
	}

	if (q->completion_fd >= 0) {
		ret = io_uring_register_eventfd(&uq->ring, q->completion_fd);
		if (ret < 0) {
			io_uring_queue_exit(&uq->ring);
			uq->ring_ok = false;
			return vd_error(-ret, "vdisk_start: io_uring: registering the completion eventfd of queue %d: %s",
					q->index, strerror(-ret));
		}
		if (!q->completion_fd_enabled)
			io_uring_cq_eventfd_toggle(&uq->ring, false);
	}

	/* Regions mapped before start. */
	for (unsigned slot = 0; slot < s->hi_slot; slot++)
		register_buf(v, uq, (int)slot);
	return 0;
}

static int ur_reap(struct vdiskq *q, bool wait, const struct timespec *deadline);

static void ur_queue_fini(struct vdiskq *q)
{
	struct ur_queue *uq = q->priv;

	if (!uq->ring_ok)
		return;
	/*
	 * Closing the ring does not stop requests already issued: the kernel
	 * could still write into the caller's buffers after vdisk_destroy()
	 * returned.  Wait for them.
	 */
	while (q->n_inflight > 0 && ur_reap(q, true, NULL) == 0)
		;
	io_uring_queue_exit(&uq->ring);
	uq->ring_ok = false;
}

static void ur_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct ur_queue *uq = q->priv;

	if (uq->ring_ok)
		io_uring_cq_eventfd_toggle(&uq->ring, enabled);
}

/* ---- data path ------------------------------------------------------------- */

/* Registered buffer holding [base, base+len) in this ring, or -1. */
static int fixed_index(struct vdisk *v, struct ur_queue *uq, const void *base, size_t len)
{
	struct ur_state *s = vd_priv(v);
	uintptr_t a = (uintptr_t)base;
	unsigned hi;
	int h = uq->hint;

	if (!uq->buf_table || !__atomic_load_n(&s->n_mapped, __ATOMIC_RELAXED) || len > UINT32_MAX)
		return -1;
	if (h >= 0 && __atomic_load_n(&uq->buf_ok[h], __ATOMIC_ACQUIRE)) {
		uintptr_t start = __atomic_load_n(&s->bufs[h].start, __ATOMIC_RELAXED);
		size_t blen = __atomic_load_n(&s->bufs[h].len, __ATOMIC_RELAXED);

		if (start && a >= start && a - start <= blen && len <= blen - (a - start))
			return h;
	}
	hi = __atomic_load_n(&s->hi_slot, __ATOMIC_ACQUIRE);
	for (unsigned i = 0; i < hi; i++) {
		uintptr_t start;
		size_t blen;

		if (!__atomic_load_n(&uq->buf_ok[i], __ATOMIC_ACQUIRE))
			continue;
		start = __atomic_load_n(&s->bufs[i].start, __ATOMIC_RELAXED);
		blen = __atomic_load_n(&s->bufs[i].len, __ATOMIC_RELAXED);
		if (start && a >= start && a - start <= blen && len <= blen - (a - start)) {
			uq->hint = (int)i;
			return (int)i;
		}
	}
	return -1;
}

/*
 * Where a read/write continues after p->done bytes: either a tail of the
 * caller's iovec array, or (mid-iovec) just the rest of that one iovec.
 */
static const struct iovec *rw_position(struct vd_request *r, struct ur_req *p, int *cnt)
{
	const struct iovec *iov = r->iov;
	uint64_t skip = p->done;
	int n = r->iovcnt;

	if (skip == 0) {
		*cnt = n;
		return iov;
	}
	while (n > 0 && skip >= iov->iov_len) {
		skip -= iov->iov_len;
		iov++;
		n--;
	}
	if (skip) {
		p->part.iov_base = (char *)iov->iov_base + skip;
		p->part.iov_len = iov->iov_len - (size_t)skip;
		*cnt = 1;
		return &p->part;
	}
	*cnt = n;
	return iov;
}

static void prep_rw(struct ur_queue *uq, struct vd_request *r, struct io_uring_sqe *sqe)
{
	struct ur_req *p = req_priv(r);
	bool wr = r->op == VD_OP_WRITE;
	uint64_t off = r->offset + p->done;
	int cnt;
	const struct iovec *iov = rw_position(r, p, &cnt);

	if (cnt == 1 && p->buf_index >= 0) {
		if (wr)
			io_uring_prep_write_fixed(sqe, uq->fd, iov->iov_base, (unsigned)iov->iov_len, off, p->buf_index);
		else
			io_uring_prep_read_fixed(sqe, uq->fd, iov->iov_base, (unsigned)iov->iov_len, off, p->buf_index);
	} else if (cnt == 1 && iov->iov_len <= UINT32_MAX) {
		if (wr)
			io_uring_prep_write(sqe, uq->fd, iov->iov_base, (unsigned)iov->iov_len, off);
		else
			io_uring_prep_read(sqe, uq->fd, iov->iov_base, (unsigned)iov->iov_len, off);
	} else if (wr) {
		io_uring_prep_writev(sqe, uq->fd, iov, (unsigned)cnt, off);
	} else {
		io_uring_prep_readv(sqe, uq->fd, iov, (unsigned)cnt, off);
	}
	if (wr && (r->flags & VDISK_REQ_FUA))
		sqe->rw_flags = RWF_DSYNC;
	sqe->flags |= uq->sqe_flags;
	io_uring_sqe_set_data(sqe, r);
}

/* Zero what is left of a read that hit end of file. */
static void zero_rest(struct vd_request *r, uint64_t done)
{
	for (int i = 0; i < r->iovcnt; i++) {
		size_t l = r->iov[i].iov_len;

		if (done >= l) {
			done -= l;
			continue;
		}
		memset((char *)r->iov[i].iov_base + done, 0, l - (size_t)done);
		done = 0;
	}
}

/* Finish a read/write with preadv2/pwritev2 (no SQE available for the rest). */
static int rw_finish_sync(struct vdisk *v, struct vd_request *r)
{
	struct ur_req *p = req_priv(r);
	bool wr = r->op == VD_OP_WRITE;
	int rwf = wr && (r->flags & VDISK_REQ_FUA) ? RWF_DSYNC : 0;

	while (p->done < r->len) {
		int cnt;
		const struct iovec *iov = rw_position(r, p, &cnt);
		off_t off = (off_t)(r->offset + p->done);
		ssize_t n = wr ? pwritev2(v->dev_fd, iov, cnt, off, rwf) : preadv2(v->dev_fd, iov, cnt, off, 0);

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0) {
			if (wr)
				return -EIO;
			zero_rest(r, p->done);
			return 0;
		}
		p->done += (uint64_t)n;
	}
	return 0;
}

/* An SQE, or NULL when the SQ is full even after pushing it to the kernel. */
static struct io_uring_sqe *get_sqe(struct ur_queue *uq)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&uq->ring);

	if (!sqe) {
		io_uring_submit(&uq->ring);
		sqe = io_uring_get_sqe(&uq->ring);
	}
	return sqe;
}

/*
 * The kernel plugs a multi-SQE submission: no request of the batch reaches
 * the device until the whole batch has gone through the submission path
 * (file system, block layer), so a batch of 32 O_DIRECT 4k random reads
 * keeps the device waiting.  Pushing every UR_SUBMIT_BATCH SQEs lets the
 * device start on the first ones while the rest are prepared, and small
 * batches still merge adjacent requests in the plug.  Measured on a virtio
 * disk (bench --direct=1 4k QD32, one queue): random reads 76k IOPS with
 * whole batches, 85-95k with 8 (fio and qemu-img bench: 95-105k);
 * sequential reads 190-220k either way (one SQE per submission: 100k).
 */
#define UR_SUBMIT_BATCH 8

static void submit_early(struct ur_queue *uq)
{
	if (uq->sqpoll || io_uring_sq_ready(&uq->ring) < UR_SUBMIT_BATCH)
		return;
	if (io_uring_submit(&uq->ring) > 0) /* a failure is retried (and reported) by the next push() */
		uq->pushed_early = true;
}

/* Write-zeroes as one fallocate; mode chosen exactly as vd_file_write_zeroes() does. */
static int zeroes_mode(struct vdisk *v, uint32_t flags)
{
	bool unmap = !(flags & VDISK_REQ_NO_UNMAP);

	if (v->is_blockdev) {
		if (!unmap && (flags & VDISK_REQ_NO_FALLBACK))
			return -ENOTSUP;
		return unmap || (flags & VDISK_REQ_NO_FALLBACK) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
								: FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	}
	return unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
}

/*
 * A buffered write the kernel would punt to io-wq is done right here, with
 * pwritev2, when no read of the queue is in the ring.  io-wq runs buffered
 * writes to one file one after the other anyway (it hashes them on the
 * inode), so writing in the submitting thread loses no parallelism between
 * writes, and saves a worker wake-up and two context switches per write (4k
 * randwrite QD32 over NBD on a cached ext4 file: 82-122k IOPS through io-wq,
 * 144-176k inline; at QD1 the hand-off is pure latency).  What it risks is a
 * write that blocks (dirty page throttling) holding up the thread, so:
 * while a read is in the ring, writes go to io-wq, and a read that comes
 * meanwhile waits at most for the one write in progress; and an inline
 * write slower than INLINE_SLOW_NS sends the writes of the next
 * INLINE_PAUSE_NS to io-wq (except a lone write: nothing waits behind it).
 */
#define INLINE_SLOW_NS 1000000LL
#define INLINE_PAUSE_NS 1000000000LL

static int64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static bool write_inline(struct vdiskq *q, struct vd_request *r)
{
	const struct ur_state *st = q->v->priv;
	const struct ur_queue *uq = q->priv;

	if (!st->inline_writes || uq->iopoll || uq->sqpoll || uq->reads_in_ring)
		return false;
	if (q->n_inflight == 1 && !r->next)
		return true;
	return !uq->inline_paused_until || mono_ns() >= uq->inline_paused_until;
}

static int write_now(struct vdiskq *q, struct vd_request *r)
{
	struct ur_queue *uq = q->priv;
	int64_t t0 = mono_ns(), t1;
	int ret = rw_finish_sync(q->v, r);

	t1 = mono_ns();
	if (t1 - t0 > INLINE_SLOW_NS)
		uq->inline_paused_until = t1 + INLINE_PAUSE_NS;
	else if (uq->inline_paused_until && t1 >= uq->inline_paused_until)
		uq->inline_paused_until = 0; /* a fast lone write during the pause does not end it early */
	return ret;
}

static int ur_submit(struct vdiskq *q, struct vd_request *r)
{
	struct vdisk *v = q->v;
	struct ur_queue *uq = q->priv;
	struct ur_req *p = req_priv(r);
	struct io_uring_sqe *sqe;
	int mode;

	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		if (r->op == VD_OP_WRITE && write_inline(q, r)) {
			p->done = 0;
			vd_req_complete(q, r, write_now(q, r));
			return 0;
		}
		sqe = get_sqe(uq);
		if (!sqe)
			return -EAGAIN;
		p->done = 0;
		p->buf_index = r->iovcnt == 1 ? fixed_index(v, uq, r->iov[0].iov_base, r->iov[0].iov_len) : -1;
		prep_rw(uq, r, sqe);
		uq->reads_in_ring += r->op == VD_OP_READ;
		submit_early(uq);
		return 0;

	case VD_OP_FLUSH:
		if (uq->iopoll) /* IOPOLL rings take reads and writes only */
			break;
		sqe = get_sqe(uq);
		if (!sqe)
			return -EAGAIN;
		io_uring_prep_fsync(sqe, uq->fd, IORING_FSYNC_DATASYNC);
		sqe->flags |= uq->sqe_flags;
		io_uring_sqe_set_data(sqe, r);
		return 0;

	case VD_OP_DISCARD:
		if (uq->iopoll || v->is_blockdev) /* BLKDISCARD has no io_uring opcode here */
			break;
		sqe = get_sqe(uq);
		if (!sqe)
			return -EAGAIN;
		io_uring_prep_fallocate(sqe, uq->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)r->offset,
					(off_t)r->len);
		sqe->flags |= uq->sqe_flags;
		io_uring_sqe_set_data(sqe, r);
		return 0;

	case VD_OP_WRITE_ZEROES:
		if (uq->iopoll)
			break;
		mode = zeroes_mode(v, r->flags);
		if (mode < 0) {
			vd_req_complete(q, r, mode);
			return 0;
		}
		sqe = get_sqe(uq);
		if (!sqe)
			return -EAGAIN;
		p->stage = 0;
		io_uring_prep_fallocate(sqe, uq->fd, mode, (off_t)r->offset, (off_t)r->len);
		sqe->flags |= uq->sqe_flags;
		io_uring_sqe_set_data(sqe, r);
		return 0;
	}
	/* Done here, synchronously. */
	vd_req_complete(q, r, vd_file_execute(v, r));
	return 0;
}

/* Queue a follow-up SQE for r from reap(); false if the SQ is full. */
static bool resubmit_rw(struct ur_queue *uq, struct vd_request *r)
{
	struct io_uring_sqe *sqe = get_sqe(uq);

	if (!sqe)
		return false;
	prep_rw(uq, r, sqe);
	return true;
}

/* One CQE.  Returns true if r finished (vd_req_complete), false if it continues. */
static bool handle_cqe(struct vdiskq *q, struct vd_request *r, int res)
{
	struct ur_queue *uq = q->priv;
	struct ur_req *p = req_priv(r);
	struct io_uring_sqe *sqe;

	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		if (res == -EAGAIN || res == -EINTR) {
			if (resubmit_rw(uq, r))
				return false;
			vd_req_complete(q, r, rw_finish_sync(q->v, r));
			return true;
		}
		if (res < 0) {
			vd_req_complete(q, r, res);
			return true;
		}
		p->done += (uint64_t)res;
		if (p->done >= r->len) {
			vd_req_complete(q, r, 0);
			return true;
		}
		if (res == 0) { /* EOF */
			if (r->op == VD_OP_WRITE) {
				vd_req_complete(q, r, -EIO);
			} else {
				zero_rest(r, p->done);
				vd_req_complete(q, r, 0);
			}
			return true;
		}
		/* Short transfer: continue with the rest. */
		if (resubmit_rw(uq, r))
			return false;
		vd_req_complete(q, r, rw_finish_sync(q->v, r));
		return true;

	case VD_OP_FLUSH:
	case VD_OP_DISCARD:
		vd_req_complete(q, r, res == -EOPNOTSUPP ? -ENOTSUP : res);
		return true;

	case VD_OP_WRITE_ZEROES:
		if (p->stage == 1) {
			vd_req_complete(q, r, res);
			return true;
		}
		if (res == -EOPNOTSUPP || res == -ENOTSUP || res == -EINVAL || res == -ENODEV) {
			/* No efficient zeroing here: the shared helper writes zero buffers (or refuses). */
			vd_req_complete(q, r, (r->flags & VDISK_REQ_NO_FALLBACK)
						      ? -ENOTSUP
						      : vd_file_write_zeroes(q->v, r->offset, r->len, r->flags));
			return true;
		}
		if (res == 0 && (r->flags & VDISK_REQ_FUA)) {
			sqe = get_sqe(uq);
			if (sqe) {
				p->stage = 1;
				io_uring_prep_fsync(sqe, uq->fd, IORING_FSYNC_DATASYNC);
				sqe->flags |= uq->sqe_flags;
				io_uring_sqe_set_data(sqe, r);
				return false;
			}
			res = vd_file_flush(q->v);
		}
		vd_req_complete(q, r, res);
		return true;
	}
	vd_req_complete(q, r, -EINVAL);
	return true;
}

/* Handle every CQE available now; returns how many requests finished. */
static unsigned drain(struct vdiskq *q)
{
	struct ur_queue *uq = q->priv;
	struct io_uring_cqe *cqes[UR_CQE_BATCH];
	unsigned finished = 0, n;

	do {
		n = io_uring_peek_batch_cqe(&uq->ring, cqes, UR_CQE_BATCH);
		for (unsigned i = 0; i < n; i++) {
			struct vd_request *r = io_uring_cqe_get_data(cqes[i]);

			if (r && cqes[i]->user_data != LIBURING_UDATA_TIMEOUT) {
				bool read = r->op == VD_OP_READ; /* r may be reused once finished */

				if (handle_cqe(q, r, cqes[i]->res)) {
					finished++;
					uq->reads_in_ring -= read;
				}
			}
		}
		io_uring_cq_advance(&uq->ring, n);
	} while (n == UR_CQE_BATCH);
	return finished;
}

/* io_uring_submit(), treating "try again later" as success (reap retries). */
static int push(struct ur_queue *uq, const char *who)
{
	int ret;

	if (!io_uring_sq_ready(&uq->ring))
		return 0;
	ret = io_uring_submit(&uq->ring);
	if (ret >= 0 || ret == -EAGAIN || ret == -EBUSY || ret == -EINTR)
		return 0;
	return vd_error(-ret, "%s: io_uring_submit: %s", who, strerror(-ret));
}

static int ur_commit(struct vdiskq *q)
{
	return push(q->priv, "vdiskq_do_io");
}

static int ur_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct ur_queue *uq = q->priv;

	for (;;) {
		struct __kernel_timespec ts, *tsp = NULL;
		struct io_uring_cqe *cqe;
		unsigned finished = drain(q);
		int ret;

		if (finished == 0 && uq->iopoll && !uq->sqpoll && !wait) {
			/* IOPOLL completions appear only when someone polls: poll once. */
			io_uring_get_events(&uq->ring);
			finished = drain(q);
		}
		if (finished > 0 || !wait || q->n_inflight == 0) {
			bool submitting = uq->pushed_early || io_uring_sq_ready(&uq->ring) > 0;
			int ret = push(uq, "vdiskq_do_io");

			uq->pushed_early = false;

			/*
			 * Buffered reads that hit the page cache (and other requests the
			 * kernel finishes in the submitting call) are complete now: hand
			 * them back in this call, not after a trip through the caller's
			 * event loop and the completion fd.
			 */
			if (ret == 0 && submitting) {
				drain(q);
				/* A completion may have queued a continuation (short transfer, FUA's fsync). */
				ret = push(uq, "vdiskq_do_io");
			}
			return ret;
		}

		if (deadline) {
			int64_t ns = ns_until(deadline);

			if (ns <= 0) {
				ret = push(uq, "vdiskq_do_io");
				return ret < 0 ? ret : -ETIME;
			}
			ts.tv_sec = ns / 1000000000LL;
			ts.tv_nsec = ns % 1000000000LL;
			tsp = &ts;
		}
		/* Submits anything a continuation queued, then sleeps (or polls) for a CQE. */
		ret = io_uring_submit_and_wait_timeout(&uq->ring, &cqe, 1, tsp, NULL);
		if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			return vd_error(-ret, "vdiskq_do_io: io_uring wait: %s", strerror(-ret));
		/* Loop: drain what arrived; the deadline is checked again before sleeping. */
	}
}

const struct vd_driver vd_driver_io_uring = {
	.name = "io_uring",
	.priv_size = sizeof(struct ur_state),
	.queue_priv_size = sizeof(struct ur_queue),
	.req_priv_size = sizeof(struct ur_req),
	.props = ur_props,
	.init = ur_init,
	.connect = ur_connect,
	.destroy = ur_destroy,
	.queue_init = ur_queue_init,
	.queue_fini = ur_queue_fini,
	.submit = ur_submit,
	.commit = ur_commit,
	.reap = ur_reap,
	.set_completion_fd_enabled = ur_set_completion_fd_enabled,
	.map_mem_region = ur_map_mem_region,
	.unmap_mem_region = ur_unmap_mem_region,
};
