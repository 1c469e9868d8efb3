/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * linux-aio: the kernel's native AIO (io_setup / io_submit / io_getevents,
 * through libaio).
 *
 * O_DIRECT only: on buffered files io_submit() quietly performs the I/O
 * synchronously, which defeats the point, so connect refuses direct=false.
 *
 * One io_context per queue, sized queue-size (the core never has more than
 * queue-size requests in flight on a queue, so neither the kernel ring nor
 * the batch array below can overflow).  submit() prepares an iocb that lives
 * in the request itself (r->priv) and appends it to the queue's batch;
 * commit() hands the whole batch to io_submit() at once.  What the kernel
 * does not take (partial submission, -EAGAIN) stays in the batch and is
 * pushed again from reap(); if the kernel refuses with nothing of ours in
 * flight, the rest runs synchronously so that nothing can wait forever.
 *
 *   read / write   IO_CMD_PREADV / IO_CMD_PWRITEV
 *   FUA            RWF_DSYNC in aio_rw_flags (Linux >= 4.13)
 *   flush          IO_CMD_FDSYNC (Linux >= 4.18)
 *   discard,       no AIO opcode: done synchronously in submit() through the
 *   write-zeroes   vd_file_* helpers
 *
 * On a kernel that refuses aio_rw_flags or FDSYNC the queue notes it once and
 * falls back to fdatasync() after the write completes / instead of the flush.
 * Completions signal the queue's eventfd through IOCB_FLAG_RESFD while
 * completion fd signalling is enabled.  Short transfers are finished
 * synchronously; a read that hits end of file zero-fills the rest.
 */
#include <libaio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../vd-internal.h"

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

#define IOCB_FLAG_RESFD_BIT (1u << 0)

struct la_req {
	struct iocb iocb;
	bool emulate_fua; /* fdatasync() after the write completes */
};

struct la_queue {
	io_context_t ctx;
	struct iocb **batch; /* prepared, not yet accepted by the kernel */
	unsigned n_batch;
	struct io_event *events;
	unsigned nr_events; /* == queue-size: size of batch[], events[] and the ring */
	unsigned in_kernel; /* accepted by io_submit, not yet reaped */
	bool no_rw_flags;   /* kernel refused RWF_DSYNC in aio_rw_flags */
	bool no_fdsync;     /* kernel refused IO_CMD_FDSYNC */
};

static int la_connect(struct vdisk *v)
{
	if (!v->direct)
		return vd_error(EINVAL, "vdisk_connect: linux-aio requires direct=true "
					"(buffered I/O would block in io_submit)");
	v->can_poll = false;
	return vd_file_connect(v, "vdisk_connect: linux-aio");
}

static void la_destroy(struct vdisk *v)
{
	vd_file_close(v);
}

static int la_queue_init(struct vdiskq *q)
{
	struct la_queue *s = q->priv;
	int ret;

	s->nr_events = q->queue_size;
	s->ctx = 0;
	ret = io_setup((int)s->nr_events, &s->ctx);
	if (ret < 0)
		return vd_error(-ret, "vdisk_start: linux-aio: io_setup(%u) for queue %d: %s%s", s->nr_events,
				q->index, strerror(-ret),
				ret == -EAGAIN ? " (queue-size too large for /proc/sys/fs/aio-max-nr?)" : "");
	s->batch = calloc(s->nr_events, sizeof(*s->batch));
	s->events = calloc(s->nr_events, sizeof(*s->events));
	if (!s->batch || !s->events) {
		free(s->batch);
		free(s->events);
		io_destroy(s->ctx);
		return vd_error(ENOMEM, "vdisk_start: linux-aio: out of memory");
	}
	return 0;
}

static void la_queue_fini(struct vdiskq *q)
{
	struct la_queue *s = q->priv;

	/* io_destroy() waits for whatever the kernel still has in flight. */
	if (s->ctx)
		io_destroy(s->ctx);
	free(s->batch);
	free(s->events);
}

/*
 * Finish a read/write synchronously from byte `done` on (short transfer).
 * A read that reaches end of file zero-fills what is left.
 */
static int la_finish_rw(struct vdisk *v, struct vd_request *r, uint64_t done, int rwf)
{
	bool wr = r->op == VD_OP_WRITE;
	uint64_t off = r->offset + done, skip = done;

	for (int i = 0; i < r->iovcnt; i++) {
		char *p = r->iov[i].iov_base;
		size_t left = r->iov[i].iov_len;

		if (skip >= left) {
			skip -= left;
			continue;
		}
		p += skip;
		left -= (size_t)skip;
		skip = 0;
		while (left > 0) {
			struct iovec one = { .iov_base = p, .iov_len = left };
			ssize_t n = wr ? pwritev2(v->dev_fd, &one, 1, (off_t)off, rwf) : pread(v->dev_fd, p, left, (off_t)off);

			if (n < 0) {
				if (errno == EINTR)
					continue;
				return -errno;
			}
			if (n == 0) {
				if (wr)
					return -EIO;
				memset(p, 0, left);
				for (int j = i + 1; j < r->iovcnt; j++)
					memset(r->iov[j].iov_base, 0, r->iov[j].iov_len);
				return 0;
			}
			p += n;
			left -= (size_t)n;
			off += (uint64_t)n;
		}
	}
	return 0;
}

static int la_submit(struct vdiskq *q, struct vd_request *r)
{
	struct la_queue *s = q->priv;
	struct la_req *lr = (struct la_req *)r->priv;
	struct iocb *io = &lr->iocb;
	int fd = q->v->dev_fd;

	lr->emulate_fua = false;
	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		if (r->op == VD_OP_READ) {
			io_prep_preadv(io, fd, r->iov, r->iovcnt, (long long)r->offset);
		} else {
			io_prep_pwritev(io, fd, r->iov, r->iovcnt, (long long)r->offset);
			if (r->flags & VDISK_REQ_FUA) {
				if (s->no_rw_flags)
					lr->emulate_fua = true;
				else
					io->aio_rw_flags = RWF_DSYNC;
			}
		}
		break;
	case VD_OP_FLUSH:
		if (s->no_fdsync) {
			vd_req_complete(q, r, vd_file_flush(q->v));
			return 0;
		}
		io_prep_fdsync(io, fd);
		break;
	case VD_OP_DISCARD:
		vd_req_complete(q, r, vd_file_discard(q->v, r->offset, r->len));
		return 0;
	case VD_OP_WRITE_ZEROES:
		vd_req_complete(q, r, vd_file_write_zeroes(q->v, r->offset, r->len, r->flags));
		return 0;
	default:
		return -EINVAL;
	}
	io->data = r;
	if (q->completion_fd >= 0 && q->completion_fd_enabled)
		io_set_eventfd(io, q->completion_fd);
	s->batch[s->n_batch++] = io;
	return 0;
}

/* Push the batch to the kernel; whatever it does not take stays for later. */
static int la_commit(struct vdiskq *q)
{
	struct la_queue *s = q->priv;
	unsigned done = 0;

	while (done < s->n_batch) {
		struct iocb *io;
		struct vd_request *r;
		int ret = io_submit(s->ctx, (long)(s->n_batch - done), s->batch + done);

		if (ret > 0) {
			s->in_kernel += (unsigned)ret;
			done += (unsigned)ret;
			continue;
		}
		if (ret == -EINTR)
			continue;
		if (ret == 0 || ret == -EAGAIN) {
			if (s->in_kernel > 0)
				break; /* retried from reap() once completions free resources */
			/* Nothing of ours in flight that could free resources: do the rest now. */
			while (done < s->n_batch) {
				r = s->batch[done++]->data;
				vd_req_complete(q, r, vd_file_execute(q->v, r));
			}
			break;
		}
		/* The first iocb was refused. */
		io = s->batch[done];
		r = io->data;
		if ((ret == -EINVAL || ret == -EOPNOTSUPP) && io->aio_rw_flags) {
			/* Kernel without aio_rw_flags: emulate FUA with fdatasync(). */
			s->no_rw_flags = true;
			io->aio_rw_flags = 0;
			((struct la_req *)r->priv)->emulate_fua = true;
			continue;
		}
		done++;
		if (ret == -EINVAL && io->aio_lio_opcode == IO_CMD_FDSYNC) {
			s->no_fdsync = true;
			vd_req_complete(q, r, vd_file_flush(q->v));
			continue;
		}
		vd_req_fail(q, r, ret, "linux-aio: io_submit: %s", strerror(-ret));
	}
	if (done) {
		memmove(s->batch, s->batch + done, sizeof(*s->batch) * (s->n_batch - done));
		s->n_batch -= done;
	}
	return 0;
}

static void la_complete_event(struct vdiskq *q, const struct io_event *ev)
{
	struct la_queue *s = q->priv;
	struct vd_request *r = ev->data;
	struct la_req *lr = (struct la_req *)r->priv;
	long res = (long)ev->res;
	int ret = 0;

	if (r->op == VD_OP_FLUSH) {
		if (res == -EINVAL) { /* filesystem without aio fsync */
			s->no_fdsync = true;
			res = vd_file_flush(q->v);
		}
		vd_req_complete(q, r, res < 0 ? (int)res : 0);
		return;
	}
	if (res < 0) {
		vd_req_complete(q, r, (int)res);
		return;
	}
	if ((uint64_t)res < r->len) {
		int rwf = (r->flags & VDISK_REQ_FUA) && !lr->emulate_fua ? RWF_DSYNC : 0;

		ret = la_finish_rw(q->v, r, (uint64_t)res, rwf);
	}
	if (ret == 0 && lr->emulate_fua)
		ret = vd_file_flush(q->v);
	vd_req_complete(q, r, ret);
}

/*
 * The completion ring the kernel maps at the io_context address (the layout
 * is ABI; libaio and fio read it the same way).  Peeking at it lets a
 * non-blocking reap skip the io_getevents() syscall when nothing finished.
 */
struct la_ring {
	unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
};
#define LA_RING_MAGIC 0xa10a10a1u

static bool la_ring_empty(io_context_t ctx)
{
	struct la_ring *ring = (struct la_ring *)ctx;

	if (ring->magic != LA_RING_MAGIC || ring->incompat_features != 0)
		return false; /* unknown layout: ask the kernel */
	return __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE) == __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

static int la_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct la_queue *s = q->priv;
	int ret;

	if (s->n_batch)
		la_commit(q);
	if (s->in_kernel == 0)
		return 0; /* everything completed synchronously */
	if (!wait && la_ring_empty(s->ctx))
		return 0;
	for (;;) {
		struct timespec ts = { 0, 0 }, *tsp = &ts;

		if (wait && deadline) {
			struct timespec now;

			clock_gettime(CLOCK_MONOTONIC, &now);
			ts.tv_sec = deadline->tv_sec - now.tv_sec;
			ts.tv_nsec = deadline->tv_nsec - now.tv_nsec;
			if (ts.tv_nsec < 0) {
				ts.tv_nsec += 1000000000L;
				ts.tv_sec--;
			}
			if (ts.tv_sec < 0)
				ts.tv_sec = ts.tv_nsec = 0;
		} else if (wait) {
			tsp = NULL;
		}
		ret = io_getevents(s->ctx, wait ? 1 : 0, (long)s->nr_events, s->events, tsp);
		if (ret != -EINTR)
			break;
	}
	if (ret < 0)
		return vd_error(-ret, "vdiskq_do_io: linux-aio: io_getevents: %s", strerror(-ret));
	if (ret == 0 && wait)
		return -ETIME;
	for (int i = 0; i < ret; i++) {
		s->in_kernel--;
		la_complete_event(q, &s->events[i]);
	}
	if (s->n_batch)
		la_commit(q); /* the kernel has room again */
	return 0;
}

/* Prepared but unsubmitted iocbs follow the new setting too. */
static void la_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct la_queue *s = q->priv;

	for (unsigned i = 0; i < s->n_batch; i++) {
		struct iocb *io = s->batch[i];

		if (enabled) {
			io_set_eventfd(io, q->completion_fd);
		} else {
			io->u.c.flags &= ~IOCB_FLAG_RESFD_BIT;
			io->u.c.resfd = 0;
		}
	}
}

const struct vd_driver vd_driver_linux_aio = {
	.name = "linux-aio",
	.queue_priv_size = sizeof(struct la_queue),
	.req_priv_size = sizeof(struct la_req),
	.connect = la_connect,
	.destroy = la_destroy,
	.queue_init = la_queue_init,
	.queue_fini = la_queue_fini,
	.submit = la_submit,
	.commit = la_commit,
	.reap = la_reap,
	.set_completion_fd_enabled = la_set_completion_fd_enabled,
};
