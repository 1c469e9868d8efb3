/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * posix-aio: POSIX asynchronous I/O (aio_read / aio_write / aio_fsync) as
 * glibc implements it, with its own pool of helper threads doing pread /
 * pwrite / fdatasync.  Works with direct=true and direct=false.
 *
 * Each request carries its struct aiocb in r->priv.  Completion is notified
 * with SIGEV_THREAD: the callback (in a glibc notification thread) appends
 * the request to the queue's mutex-protected done list, signals the queue's
 * condition variable and, when the list goes from empty to non-empty and
 * signalling is on, the queue's eventfd.  reap() runs in the queue thread,
 * takes the whole list under the lock and hands requests to the core with
 * vd_req_complete() (which is not thread-safe, so the callback never calls
 * it).
 *
 * glibc quirks this driver works around:
 *  - glibc runs the requests of one file descriptor one after another (it
 *    keys its queues by fd number), so one fd gives a queue depth of 1.
 *    Each queue therefore dup()s the device fd a few times (PA_MAX_FDS) and
 *    spreads requests round-robin over the copies.  The process-wide limit
 *    is glibc's aio thread count (20 by default, aio_init()).
 *  - There is no vectored aio operation.  A request with more than one
 *    segment goes through a bounce buffer: the queue owns queue-size bounce
 *    slots whose buffers are allocated on first use and kept (up to
 *    PA_BOUNCE_KEEP bytes each), so the hot path does not allocate once
 *    warmed up.  Splitting into one aiocb per segment was rejected: it costs
 *    one notification thread per segment, and with O_DIRECT the segment
 *    offsets need not be multiples of request-alignment.
 *  - Every SIGEV_THREAD notification starts a (detached) thread inside
 *    glibc; that is the price of POSIX AIO's notification model.
 *
 * FUA: once the write has completed, the same aiocb is submitted again as
 * aio_fsync(O_DSYNC) and the request completes when that does (falling back
 * to a synchronous fdatasync if glibc refuses).  Flush is aio_fsync(O_DSYNC).
 * Discard and write-zeroes run synchronously through the vd_file_* helpers.
 * Short transfers are finished synchronously in reap(); reads past end of
 * file zero-fill.
 */
#include <aio.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../vd-internal.h"

#define PA_MAX_FDS 16
#define PA_BOUNCE_KEEP (1u << 20)
#define PA_NOTIFY_STACK (256u << 10)

enum pa_phase {
	PA_IO,       /* the read / write / flush itself */
	PA_FUA_SYNC, /* aio_fsync after a FUA write */
};

struct pa_req {
	struct aiocb cb;
	struct vdiskq *q;
	struct vd_request *next; /* done list link */
	enum pa_phase phase;
	int bounce; /* bounce slot, -1 for none */
};

struct pa_bounce {
	void *buf;
	size_t size;
};

struct pa_queue {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* Under lock (shared with the notification threads). */
	struct vd_request *done_head, *done_tail;
	uint64_t notified; /* notifications that reached the done list */
	bool fd_enabled;
	/* Queue thread only. */
	uint64_t submitted; /* aio operations started (each notifies once) */
	int fds[PA_MAX_FDS];
	int nfds;
	unsigned next_fd;
	struct pa_bounce *bounce;
	int *free_slots;
	unsigned n_free;
	size_t bounce_align;
};

/* Detached, small-stack notification threads (glibc copies nothing: keep it forever). */
static pthread_attr_t notify_attr;
static bool notify_attr_ok;
static pthread_once_t notify_once = PTHREAD_ONCE_INIT;

static void notify_attr_init(void)
{
	if (pthread_attr_init(&notify_attr) != 0)
		return;
	if (pthread_attr_setdetachstate(&notify_attr, PTHREAD_CREATE_DETACHED) != 0)
		return;
	pthread_attr_setstacksize(&notify_attr, PA_NOTIFY_STACK); /* best effort */
	notify_attr_ok = true;
}

static int pa_connect(struct vdisk *v)
{
	v->can_poll = false;
	return vd_file_connect(v, "vdisk_connect: posix-aio");
}

static void pa_destroy(struct vdisk *v)
{
	vd_file_close(v);
}

static void pa_queue_cleanup(struct vdiskq *q)
{
	struct pa_queue *s = q->priv;

	for (int i = 1; i < s->nfds; i++)
		close(s->fds[i]);
	s->nfds = 0;
	if (s->bounce)
		for (unsigned i = 0; i < q->queue_size; i++)
			free(s->bounce[i].buf);
	free(s->bounce);
	free(s->free_slots);
	s->bounce = NULL;
	s->free_slots = NULL;
}

static int pa_queue_init(struct vdiskq *q)
{
	struct pa_queue *s = q->priv;
	struct vdisk *v = q->v;
	pthread_condattr_t ca;
	int want, err;

	pthread_once(&notify_once, notify_attr_init);
	s->fd_enabled = q->completion_fd_enabled;
	s->bounce_align = v->buf_alignment > 4096 ? (size_t)v->buf_alignment : 4096;

	/* Several descriptors per queue: glibc serialises the requests of one fd. */
	s->fds[0] = v->dev_fd;
	s->nfds = 1;
	want = q->queue_size < PA_MAX_FDS ? (int)q->queue_size : PA_MAX_FDS;
	while (s->nfds < want) {
		int fd = fcntl(v->dev_fd, F_DUPFD_CLOEXEC, 0);

		if (fd < 0)
			break; /* EMFILE: fewer in parallel, still correct */
		s->fds[s->nfds++] = fd;
	}

	s->bounce = calloc(q->queue_size, sizeof(*s->bounce));
	s->free_slots = calloc(q->queue_size, sizeof(*s->free_slots));
	if (!s->bounce || !s->free_slots) {
		pa_queue_cleanup(q);
		return vd_error(ENOMEM, "vdisk_start: posix-aio: out of memory");
	}
	for (unsigned i = 0; i < q->queue_size; i++)
		s->free_slots[i] = (int)(q->queue_size - 1 - i);
	s->n_free = q->queue_size;

	err = pthread_condattr_init(&ca);
	if (!err) {
		err = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		if (!err)
			err = pthread_cond_init(&s->cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (err) {
		pa_queue_cleanup(q);
		return vd_error(err, "vdisk_start: posix-aio: pthread_cond_init: %s", strerror(err));
	}
	err = pthread_mutex_init(&s->lock, NULL);
	if (err) {
		pthread_cond_destroy(&s->cond);
		pa_queue_cleanup(q);
		return vd_error(err, "vdisk_start: posix-aio: pthread_mutex_init: %s", strerror(err));
	}
	return 0;
}

static void pa_queue_fini(struct vdiskq *q)
{
	struct pa_queue *s = q->priv;

	/* Wait until no notification can touch this queue any more. */
	pthread_mutex_lock(&s->lock);
	while (s->notified != s->submitted)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	pa_queue_cleanup(q);
}

/* SIGEV_THREAD callback, in a glibc notification thread. */
static void pa_notify(union sigval sv)
{
	struct vd_request *r = sv.sival_ptr;
	struct pa_req *pr = (struct pa_req *)r->priv;
	struct vdiskq *q = pr->q;
	struct pa_queue *s = q->priv;

	pr->next = NULL;
	pthread_mutex_lock(&s->lock);
	if (s->done_head) {
		((struct pa_req *)s->done_tail->priv)->next = r;
	} else {
		s->done_head = r;
		/*
		 * Empty -> non-empty: signal the eventfd.  Done under the lock so
		 * that the signal for a request is out before reap() can take it
		 * (no stale wakeup after the application reaped it or turned
		 * signalling off), and before queue_fini() can close the fd.
		 */
		if (s->fd_enabled) {
			uint64_t one = 1;
			ssize_t n = write(q->completion_fd, &one, sizeof(one));

			(void)n; /* EAGAIN only when the counter is saturated: readable anyway */
		}
	}
	s->done_tail = r;
	s->notified++;
	pthread_cond_signal(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

static int pa_take_bounce(struct vdiskq *q, struct pa_req *pr, size_t len)
{
	struct pa_queue *s = q->priv;
	struct pa_bounce *b;
	int slot;

	if (s->n_free == 0)
		return -EAGAIN; /* cannot happen: at most queue-size requests in flight */
	slot = s->free_slots[s->n_free - 1];
	b = &s->bounce[slot];
	if (b->size < len) {
		size_t size = (len + s->bounce_align - 1) & ~(s->bounce_align - 1);
		void *buf;

		if (posix_memalign(&buf, s->bounce_align, size))
			return -ENOMEM;
		free(b->buf);
		b->buf = buf;
		b->size = size;
	}
	s->n_free--;
	pr->bounce = slot;
	return 0;
}

static void pa_release_bounce(struct vdiskq *q, struct pa_req *pr)
{
	struct pa_queue *s = q->priv;
	struct pa_bounce *b;

	if (pr->bounce < 0)
		return;
	b = &s->bounce[pr->bounce];
	if (b->size > PA_BOUNCE_KEEP) {
		free(b->buf);
		b->buf = NULL;
		b->size = 0;
	}
	s->free_slots[s->n_free++] = pr->bounce;
	pr->bounce = -1;
}

static void pa_prep(struct vdiskq *q, struct vd_request *r)
{
	struct pa_queue *s = q->priv;
	struct pa_req *pr = (struct pa_req *)r->priv;

	memset(&pr->cb, 0, sizeof(pr->cb));
	pr->cb.aio_fildes = s->fds[s->next_fd];
	if (++s->next_fd >= (unsigned)s->nfds)
		s->next_fd = 0;
	pr->cb.aio_sigevent.sigev_notify = SIGEV_THREAD;
	pr->cb.aio_sigevent.sigev_notify_function = pa_notify;
	pr->cb.aio_sigevent.sigev_notify_attributes = notify_attr_ok ? &notify_attr : NULL;
	pr->cb.aio_sigevent.sigev_value.sival_ptr = r;
	pr->q = q;
}

static int pa_submit(struct vdiskq *q, struct vd_request *r)
{
	struct pa_queue *s = q->priv;
	struct pa_req *pr = (struct pa_req *)r->priv;
	int ret;

	switch (r->op) {
	case VD_OP_DISCARD:
		vd_req_complete(q, r, vd_file_discard(q->v, r->offset, r->len));
		return 0;
	case VD_OP_WRITE_ZEROES:
		vd_req_complete(q, r, vd_file_write_zeroes(q->v, r->offset, r->len, r->flags));
		return 0;
	case VD_OP_READ:
	case VD_OP_WRITE:
		break;
	case VD_OP_FLUSH:
		break;
	default:
		return -EINVAL;
	}

	pr->phase = PA_IO;
	pr->bounce = -1;
	pa_prep(q, r);
	if (r->op == VD_OP_FLUSH) {
		ret = aio_fsync(O_DSYNC, &pr->cb);
	} else {
		void *buf = r->iov[0].iov_base;

		if (r->iovcnt > 1) {
			if (pa_take_bounce(q, pr, r->len) < 0)
				goto sync; /* out of memory for the bounce: do it in place */
			buf = s->bounce[pr->bounce].buf;
			if (r->op == VD_OP_WRITE) {
				char *p = buf;

				for (int i = 0; i < r->iovcnt; i++) {
					memcpy(p, r->iov[i].iov_base, r->iov[i].iov_len);
					p += r->iov[i].iov_len;
				}
			}
		}
		pr->cb.aio_buf = buf;
		pr->cb.aio_nbytes = r->len;
		pr->cb.aio_offset = (off_t)r->offset;
		ret = r->op == VD_OP_READ ? aio_read(&pr->cb) : aio_write(&pr->cb);
	}
	if (ret < 0) {
		int err = errno;

		pa_release_bounce(q, pr);
		if (err == EAGAIN || err == ENOMEM || err == ENOSYS)
			goto sync; /* glibc out of resources: never leave the request stranded */
		vd_req_fail(q, r, -err, "posix-aio: %s: %s",
			    r->op == VD_OP_FLUSH ? "aio_fsync" : r->op == VD_OP_READ ? "aio_read" : "aio_write",
			    strerror(err));
		return 0;
	}
	s->submitted++;
	return 0;
sync:
	vd_req_complete(q, r, vd_file_execute(q->v, r));
	return 0;
}

/* Finish a short transfer synchronously on one contiguous buffer; reads past EOF zero-fill. */
static int pa_finish_rw(struct vdisk *v, bool wr, char *p, size_t left, uint64_t off)
{
	while (left > 0) {
		ssize_t n = wr ? pwrite(v->dev_fd, p, left, (off_t)off) : pread(v->dev_fd, p, left, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			if (wr)
				return -EIO;
			memset(p, 0, left);
			return 0;
		}
		p += n;
		left -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* Same over the request's own iovec, from byte `done` on. */
static int pa_finish_iov(struct vdisk *v, struct vd_request *r, uint64_t done)
{
	uint64_t off = r->offset + done, skip = done;
	bool wr = r->op == VD_OP_WRITE;

	for (int i = 0; i < r->iovcnt; i++) {
		size_t len = r->iov[i].iov_len;
		int ret;

		if (skip >= len) {
			skip -= len;
			continue;
		}
		ret = pa_finish_rw(v, wr, (char *)r->iov[i].iov_base + skip, len - (size_t)skip, off);
		if (ret < 0)
			return ret;
		off += len - skip;
		skip = 0;
	}
	return 0;
}

/* A notified request, in the queue thread. */
static void pa_finish(struct vdiskq *q, struct vd_request *r)
{
	struct pa_queue *s = q->priv;
	struct pa_req *pr = (struct pa_req *)r->priv;
	int err = aio_error(&pr->cb);
	ssize_t n = aio_return(&pr->cb);
	int ret = err ? -err : 0;

	if (pr->phase == PA_FUA_SYNC || r->op == VD_OP_FLUSH) {
		if (ret == -EINVAL) /* no fdatasync through aio for this file: do it here */
			ret = vd_file_flush(q->v);
		vd_req_complete(q, r, ret);
		return;
	}
	if (ret == 0 && (uint64_t)n < r->len) {
		if (pr->bounce >= 0) {
			char *buf = s->bounce[pr->bounce].buf;

			ret = pa_finish_rw(q->v, r->op == VD_OP_WRITE, buf + n, r->len - (uint64_t)n,
					   r->offset + (uint64_t)n);
		} else {
			ret = pa_finish_iov(q->v, r, (uint64_t)n);
		}
	}
	if (ret == 0 && r->op == VD_OP_READ && pr->bounce >= 0) {
		const char *p = s->bounce[pr->bounce].buf;

		for (int i = 0; i < r->iovcnt; i++) {
			memcpy(r->iov[i].iov_base, p, r->iov[i].iov_len);
			p += r->iov[i].iov_len;
		}
	}
	pa_release_bounce(q, pr);
	if (ret == 0 && r->op == VD_OP_WRITE && (r->flags & VDISK_REQ_FUA)) {
		/* The data is written; make it stable before completing. */
		pr->phase = PA_FUA_SYNC;
		pa_prep(q, r);
		if (aio_fsync(O_DSYNC, &pr->cb) == 0) {
			s->submitted++;
			return;
		}
		ret = vd_file_flush(q->v);
	}
	vd_req_complete(q, r, ret);
}

static int pa_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct pa_queue *s = q->priv;
	struct vd_request *list;
	bool timed_out = false;

	pthread_mutex_lock(&s->lock);
	while (wait && !s->done_head && s->notified != s->submitted) {
		int err = deadline ? pthread_cond_timedwait(&s->cond, &s->lock, deadline)
				   : pthread_cond_wait(&s->cond, &s->lock);

		if (err == ETIMEDOUT) {
			timed_out = !s->done_head;
			break;
		}
	}
	list = s->done_head;
	s->done_head = s->done_tail = NULL;
	pthread_mutex_unlock(&s->lock);

	if (timed_out)
		return -ETIME;
	while (list) {
		struct vd_request *r = list;

		list = ((struct pa_req *)r->priv)->next;
		pa_finish(q, r);
	}
	return 0;
}

static void pa_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct pa_queue *s = q->priv;
	bool pending;

	pthread_mutex_lock(&s->lock);
	s->fd_enabled = enabled;
	pending = enabled && s->done_head;
	pthread_mutex_unlock(&s->lock);
	if (pending)
		vd_queue_signal(q); /* completions arrived while signalling was off */
}

const struct vd_driver vd_driver_posix_aio = {
	.name = "posix-aio",
	.queue_priv_size = sizeof(struct pa_queue),
	.req_priv_size = sizeof(struct pa_req),
	.connect = pa_connect,
	.destroy = pa_destroy,
	.queue_init = pa_queue_init,
	.queue_fini = pa_queue_fini,
	.submit = pa_submit,
	.reap = pa_reap,
	.set_completion_fd_enabled = pa_set_completion_fd_enabled,
};
