/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Queues: request allocation, validation, the pending/done lists, and
 * vdiskq_do_io().  Everything here runs in the queue's own thread, so no
 * locks; drivers that complete in other threads hand requests over in their
 * reap() op.  Requests come from per-queue slabs and are recycled, so the hot
 * path never calls malloc once a queue has warmed up.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vd-internal.h"

#define SLAB_REQS 64

static size_t req_size(const struct vdisk *v)
{
	return (sizeof(struct vd_request) + v->drv->req_priv_size + 15) & ~(size_t)15;
}

static bool grow_free_list(struct vdiskq *q)
{
	size_t sz = req_size(q->v);
	void **slabs = realloc(q->slabs, sizeof(void *) * (size_t)(q->n_slabs + 1));
	char *slab;

	if (!slabs)
		return false;
	q->slabs = slabs;
	slab = aligned_alloc(16, sz * SLAB_REQS);
	if (!slab)
		return false;
	memset(slab, 0, sz * SLAB_REQS);
	q->slabs[q->n_slabs++] = slab;
	for (int i = SLAB_REQS - 1; i >= 0; i--) {
		struct vd_request *r = (struct vd_request *)(slab + sz * (size_t)i);

		r->next = q->free_list;
		q->free_list = r;
	}
	return true;
}

static struct vd_request *req_alloc(struct vdiskq *q)
{
	struct vd_request *r;

	if (!q->free_list && !grow_free_list(q))
		return NULL;
	r = q->free_list;
	q->free_list = r->next;
	r->next = NULL;
	r->error_msg = NULL;
	r->ret = 0;
	return r;
}

static void req_free_list(struct vdiskq *q, struct vd_request *list)
{
	while (list) {
		struct vd_request *next = list->next;

		list->next = q->free_list;
		q->free_list = list;
		list = next;
	}
}

struct vdiskq *vd_queue_new(struct vdisk *v, int index, bool poll)
{
	struct vdiskq *q = calloc(1, sizeof(*q));
	int ret;

	if (!q) {
		errno = -vd_error(ENOMEM, "vdisk_start: out of memory");
		return NULL;
	}
	q->v = v;
	q->index = index;
	q->is_poll_queue = poll;
	q->queue_size = (unsigned)v->queue_size;
	q->pending_tail = &q->pending_head;
	q->done_tail = &q->done_head;
	q->completion_fd = -1;
	q->completion_fd_enabled = true;
	if (!poll) {
		q->completion_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (q->completion_fd < 0) {
			errno = -vd_error(errno, "vdisk_start: eventfd: %s", strerror(errno));
			free(q);
			return NULL;
		}
	}
	if (v->drv->queue_priv_size) {
		q->priv = calloc(1, v->drv->queue_priv_size);
		if (!q->priv) {
			errno = -vd_error(ENOMEM, "vdisk_start: out of memory");
			vd_queue_free(q);
			return NULL;
		}
	}
	ret = v->drv->queue_init ? v->drv->queue_init(q) : 0;
	if (ret < 0) {
		free(q->priv); /* a failing queue_init cleans up after itself */
		q->priv = NULL;
		if (q->completion_fd >= 0)
			close(q->completion_fd);
		free(q);
		errno = -ret;
		return NULL;
	}
	return q;
}

void vd_queue_free(struct vdiskq *q)
{
	if (q->priv && q->v->drv->queue_fini)
		q->v->drv->queue_fini(q);
	free(q->priv);
	if (q->completion_fd >= 0)
		close(q->completion_fd);
	for (int i = 0; i < q->n_slabs; i++)
		free(q->slabs[i]);
	free(q->slabs);
	free(q);
}

void vd_queue_signal(struct vdiskq *q)
{
	uint64_t one = 1;

	if (q->completion_fd >= 0 && q->completion_fd_enabled) {
		ssize_t n = write(q->completion_fd, &one, sizeof(one));
		(void)n; /* EAGAIN only if the counter is saturated: already readable */
	}
}

void vd_req_complete(struct vdiskq *q, struct vd_request *r, int ret)
{
	r->ret = ret;
	if (ret < 0 && !r->error_msg)
		r->error_msg = strerror(-ret);
	r->next = NULL;
	*q->done_tail = r;
	q->done_tail = &r->next;
	q->n_done++;
	q->n_inflight--;
}

void vd_req_fail(struct vdiskq *q, struct vd_request *r, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
	va_end(ap);
	r->error_msg = r->msg;
	vd_req_complete(q, r, ret);
}

/* Complete a request that never reached the driver. */
static void reject(struct vdiskq *q, struct vd_request *r, int ret, const char *fmt, ...) VD_PRINTF(4, 5);
static void reject(struct vdiskq *q, struct vd_request *r, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
	va_end(ap);
	r->error_msg = r->msg;
	q->n_inflight++; /* vd_req_complete() accounts it as leaving flight */
	vd_req_complete(q, r, ret);
}

static const char *op_name(enum vd_op op)
{
	static const char *const names[] = { "read", "write", "flush", "discard", "write-zeroes" };

	return names[op];
}

static const uint32_t allowed_flags[] = {
	[VD_OP_READ] = 0,
	[VD_OP_WRITE] = VDISK_REQ_FUA,
	[VD_OP_FLUSH] = 0,
	[VD_OP_DISCARD] = 0,
	[VD_OP_WRITE_ZEROES] = VDISK_REQ_FUA | VDISK_REQ_NO_UNMAP | VDISK_REQ_NO_FALLBACK,
};

/* The core validates so that drivers never see an invalid request. */
static int validate(struct vdiskq *q, struct vd_request *r)
{
	struct vdisk *v = q->v;
	const char *op = op_name(r->op);

	if (r->flags & ~allowed_flags[r->op]) {
		reject(q, r, -EINVAL, "%s: unsupported flags 0x%x", op, r->flags & ~allowed_flags[r->op]);
		return -1;
	}
	if (r->op != VD_OP_READ && v->read_only) {
		reject(q, r, -EBADF, "%s: instance is read-only", op);
		return -1;
	}
	if (r->op == VD_OP_FLUSH)
		return 0;
	if (r->offset > v->capacity || r->len > v->capacity - r->offset) {
		reject(q, r, -EINVAL, "%s: range [%" PRIu64 ", +%" PRIu64 ") is past capacity %" PRIu64, op,
		       r->offset, r->len, v->capacity);
		return -1;
	}
	if (r->op != VD_OP_READ && r->op != VD_OP_WRITE)
		return 0;
	if (r->iovcnt < 0 || r->iovcnt > v->max_segments) {
		reject(q, r, -EINVAL, "%s: %d segments, max-segments is %d", op, r->iovcnt, v->max_segments);
		return -1;
	}
	if (v->max_transfer && r->len > (uint64_t)v->max_transfer) {
		reject(q, r, -EINVAL, "%s: length %" PRIu64 " exceeds max-transfer %d", op, r->len, v->max_transfer);
		return -1;
	}
	if (v->request_alignment > 1 &&
	    ((r->offset | r->len) & (uint64_t)(v->request_alignment - 1))) {
		reject(q, r, -EINVAL, "%s: offset %" PRIu64 " / length %" PRIu64 " not a multiple of request-alignment %d",
		       op, r->offset, r->len, v->request_alignment);
		return -1;
	}
	if (v->buf_alignment > 1) {
		uintptr_t mask = (uintptr_t)v->buf_alignment - 1;

		for (int i = 0; i < r->iovcnt; i++) {
			if (((uintptr_t)r->iov[i].iov_base | r->iov[i].iov_len) & mask) {
				reject(q, r, -EINVAL, "%s: buffer %d (%p, %zu bytes) not aligned to buf-alignment %d", op,
				       i, r->iov[i].iov_base, r->iov[i].iov_len, v->buf_alignment);
				return -1;
			}
		}
	}
	return 0;
}

static int enqueue(struct vdiskq *q, enum vd_op op, uint64_t offset, uint64_t len, const struct iovec *iov,
		    int iovcnt, void *user_data, uint32_t flags)
{
	struct vd_request *r;

	if (!q)
		return vd_error(EINVAL, "vdiskq_%s: queue is NULL", op_name(op));
	r = req_alloc(q);
	if (!r)
		return vd_error(ENOMEM, "vdiskq_%s: out of memory", op_name(op));
	r->op = op;
	r->flags = flags;
	r->offset = offset;
	r->len = len;
	r->iov = iov;
	r->iovcnt = iovcnt;
	r->user_data = user_data;
	if (op == VD_OP_READ || op == VD_OP_WRITE) {
		uint64_t total = 0;

		for (int i = 0; i < iovcnt; i++)
			total += iov[i].iov_len;
		r->len = total;
	}
	if (validate(q, r) < 0)
		return 0; /* completes with the error */
	if (op != VD_OP_FLUSH && r->len == 0) {
		/* Nothing to transfer: every driver would complete it at once, so the core does. */
		q->n_inflight++; /* vd_req_complete() accounts it as leaving flight */
		vd_req_complete(q, r, 0);
		return 0;
	}
	r->next = NULL;
	*q->pending_tail = r;
	q->pending_tail = &r->next;
	q->n_pending++;
	return 0;
}

VD_EXPORT int vdiskq_read(struct vdiskq *q, uint64_t offset, void *buf, size_t len, void *user_data, uint32_t flags)
{
	struct vd_request *r;

	/* The single buffer lives in the request itself; peek at the next free one. */
	if (!q)
		return vd_error(EINVAL, "vdiskq_read/write: queue is NULL");
	if (!q->free_list && !grow_free_list(q))
		return vd_error(ENOMEM, "vdiskq_read/write: out of memory");
	r = q->free_list;
	r->iov1.iov_base = buf;
	r->iov1.iov_len = len;
	return enqueue(q, VD_OP_READ, offset, len, &r->iov1, 1, user_data, flags);
}

VD_EXPORT int vdiskq_write(struct vdiskq *q, uint64_t offset, const void *buf, size_t len, void *user_data,
			    uint32_t flags)
{
	struct vd_request *r;

	if (!q)
		return vd_error(EINVAL, "vdiskq_read/write: queue is NULL");
	if (!q->free_list && !grow_free_list(q))
		return vd_error(ENOMEM, "vdiskq_read/write: out of memory");
	r = q->free_list;
	r->iov1.iov_base = (void *)buf;
	r->iov1.iov_len = len;
	return enqueue(q, VD_OP_WRITE, offset, len, &r->iov1, 1, user_data, flags);
}

VD_EXPORT int vdiskq_readv(struct vdiskq *q, uint64_t offset, const struct iovec *iov, int iovcnt, void *user_data,
			    uint32_t flags)
{
	return enqueue(q, VD_OP_READ, offset, 0, iov, iovcnt, user_data, flags);
}

VD_EXPORT int vdiskq_writev(struct vdiskq *q, uint64_t offset, const struct iovec *iov, int iovcnt,
			     void *user_data, uint32_t flags)
{
	return enqueue(q, VD_OP_WRITE, offset, 0, iov, iovcnt, user_data, flags);
}

VD_EXPORT int vdiskq_flush(struct vdiskq *q, void *user_data, uint32_t flags)
{
	return enqueue(q, VD_OP_FLUSH, 0, 0, NULL, 0, user_data, flags);
}

VD_EXPORT int vdiskq_discard(struct vdiskq *q, uint64_t offset, uint64_t len, void *user_data, uint32_t flags)
{
	return enqueue(q, VD_OP_DISCARD, offset, len, NULL, 0, user_data, flags);
}

VD_EXPORT int vdiskq_write_zeroes(struct vdiskq *q, uint64_t offset, uint64_t len, void *user_data,
				   uint32_t flags)
{
	return enqueue(q, VD_OP_WRITE_ZEROES, offset, len, NULL, 0, user_data, flags);
}

/* Hand pending requests to the driver while there is room in flight. */
static int submit_pending(struct vdiskq *q)
{
	const struct vd_driver *drv = q->v->drv;
	bool submitted = false;
	int ret;

	while (q->pending_head && q->n_inflight < q->queue_size) {
		struct vd_request *r = q->pending_head;
		struct vd_request *next = r->next;

		q->n_inflight++;
		ret = drv->submit(q, r);
		if (ret == -EAGAIN) {
			q->n_inflight--;
			break;
		}
		q->pending_head = next;
		if (!next)
			q->pending_tail = &q->pending_head;
		q->n_pending--;
		submitted = true;
		if (ret < 0 && ret != -EAGAIN)
			vd_req_complete(q, r, ret);
	}
	if (submitted && drv->commit) {
		ret = drv->commit(q);
		if (ret < 0)
			return ret;
	}
	return 0;
}

void vd_deadline_from_timeout(struct timespec *deadline, const struct timespec *timeout)
{
	clock_gettime(CLOCK_MONOTONIC, deadline);
	deadline->tv_sec += timeout->tv_sec;
	deadline->tv_nsec += timeout->tv_nsec;
	while (deadline->tv_nsec >= 1000000000L) {
		deadline->tv_nsec -= 1000000000L;
		deadline->tv_sec++;
	}
}

static int64_t remaining_ns(const struct timespec *deadline)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(deadline->tv_sec - now.tv_sec) * 1000000000LL + (deadline->tv_nsec - now.tv_nsec);
}

int vd_deadline_remaining_ms(const struct timespec *deadline)
{
	int64_t ns;

	if (!deadline)
		return -1;
	ns = remaining_ns(deadline);
	if (ns <= 0)
		return 0;
	return (int)((ns + 999999) / 1000000);
}

static void write_back_timeout(struct timespec *timeout, const struct timespec *deadline)
{
	int64_t ns;

	if (!timeout)
		return;
	ns = remaining_ns(deadline);
	if (ns < 0)
		ns = 0;
	timeout->tv_sec = ns / 1000000000LL;
	timeout->tv_nsec = ns % 1000000000LL;
}

VD_EXPORT int vdiskq_do_io(struct vdiskq *q, struct vdisk_completion *completions, int min_completions,
			   int max_completions, struct timespec *timeout)
{
	const struct vd_driver *drv;
	struct timespec deadline;
	int n = 0, ret;

	vd_error_clear();
	if (!q)
		return vd_error(EINVAL, "vdiskq_do_io: queue is NULL");
	drv = q->v->drv;
	req_free_list(q, q->returned);
	q->returned = NULL;
	if (min_completions < 0 || max_completions < 0 || min_completions > max_completions ||
	    (max_completions > 0 && !completions))
		return vd_error(EINVAL, "vdiskq_do_io: need 0 <= min_completions (%d) <= max_completions (%d)",
				min_completions, max_completions);
	if ((unsigned)min_completions > q->n_pending + q->n_inflight + q->n_done)
		return vd_error(EINVAL, "vdiskq_do_io: min_completions %d exceeds the %u requests outstanding",
				min_completions, q->n_pending + q->n_inflight + q->n_done);
	if (timeout)
		vd_deadline_from_timeout(&deadline, timeout);

	ret = submit_pending(q);
	if (ret < 0)
		return ret;
	if (q->n_inflight > 0) {
		ret = drv->reap(q, false, NULL);
		if (ret < 0)
			return ret;
	}
	while (q->n_done < (unsigned)min_completions) {
		if (q->n_inflight == 0) {
			/* The non-blocking reap freed every slot: submit what is pending. */
			unsigned done_before = q->n_done;

			if (q->pending_head && (ret = submit_pending(q)) < 0)
				return ret;
			if (q->n_inflight == 0 && q->n_done == done_before)
				return vd_error(EIO, "vdiskq_do_io: driver '%s' accepted none of %u pending requests",
						drv->name, q->n_pending);
			continue;
		}
		ret = drv->reap(q, true, timeout ? &deadline : NULL);
		if (ret == -ETIME || (timeout && remaining_ns(&deadline) <= 0 && q->n_done < (unsigned)min_completions)) {
			write_back_timeout(timeout, &deadline);
			return vd_error(ETIME, "vdiskq_do_io: timed out with %u of %d completions", q->n_done,
					min_completions);
		}
		if (ret < 0)
			return ret;
		ret = submit_pending(q);
		if (ret < 0)
			return ret;
	}
	/* Requests freed slots: submit more now so the device stays busy. */
	if (q->pending_head && (ret = submit_pending(q)) < 0)
		return ret;

	while (n < max_completions && q->done_head) {
		struct vd_request *r = q->done_head;

		q->done_head = r->next;
		if (!q->done_head)
			q->done_tail = &q->done_head;
		q->n_done--;
		completions[n].user_data = r->user_data;
		completions[n].ret = r->ret;
		completions[n].error_msg = r->ret < 0 ? r->error_msg : NULL;
		memset(completions[n].reserved_, 0, sizeof(completions[n].reserved_));
		r->next = q->returned;
		q->returned = r;
		n++;
	}
	if (q->done_head)
		vd_queue_signal(q); /* event-driven callers must come back for the rest */
	if (timeout)
		write_back_timeout(timeout, &deadline);
	return n;
}

VD_EXPORT int vdiskq_get_completion_fd(struct vdiskq *q)
{
	if (!q)
		return vd_error(EINVAL, "vdiskq_get_completion_fd: queue is NULL");
	if (q->completion_fd < 0)
		return vd_error(ENOTSUP, "vdiskq_get_completion_fd: poll queues have no completion fd");
	return q->completion_fd;
}

VD_EXPORT void vdiskq_set_completion_fd_enabled(struct vdiskq *q, bool enable)
{
	if (!q || q->completion_fd < 0)
		return;
	q->completion_fd_enabled = enable;
	if (q->v->drv->set_completion_fd_enabled)
		q->v->drv->set_completion_fd_enabled(q, enable);
}
