/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * nbd: an NBD client, built on libnbd's asynchronous API.
 *
 * Target (set in the created state; exactly one of):
 *   uri                 nbd://host[:port]/export, nbd+unix:///export?socket=PATH,
 *                       nbds://... (TLS; see nbd_connect_uri(3); the URI may
 *                       name local TLS files: tls-psk-file, tls-certificates)
 *   path                Unix socket (core property), with export-name
 *   host [+ port]       TCP (port: number or service name, default 10809),
 *                       with export-name
 *   fd                  an already connected socket (core property; we dup()
 *                       it, the caller keeps its own); one queue only
 * export-name defaults to "".  read-only=false on an export the server offers
 * read-only fails at connect with -EROFS (QEMU's behaviour without
 * auto-read-only).  direct has no meaning over NBD and is ignored.
 * connect-timeout (seconds, default 30, 0: none) bounds each connection's
 * socket connect and handshake (not a DNS lookup): a server that stops
 * answering mid-handshake fails vdisk_connect/vdisk_start with -ETIMEDOUT
 * instead of hanging them.
 *
 * Limits from the handshake: capacity = export size (rounded down to the
 * minimum block size: an unaligned tail cannot be reached by aligned
 * requests; a size of 2^63 or more fails with -EPROTO); request-alignment =
 * the server's minimum block size; optimal-io-size/-alignment = preferred
 * block size (4096 when not advertised, as the NBD spec says; at most
 * max-transfer); max-transfer = maximum block size, capped at 32 MiB (the
 * protocol's default payload limit).  Read-only bool properties can-flush,
 * can-fua, can-trim, can-zero, can-fast-zero, can-multi-conn report the
 * server's flags.
 *
 * Queues: one NBD connection per queue, driven only by the queue's thread
 * (connect() keeps its handle for queue 0).  Without multi-conn the NBD spec
 * does not promise that a flush on one connection covers writes made on
 * another, nor that connections see each other's writes, so max-queues is
 * 1 unless the server advertises multi-conn (then 16).  Poll queues are not
 * offered: there is no device to poll, only a socket.
 *
 * Requests: submit() issues nbd_aio_* with a completion callback.  libnbd
 * calls callbacks with its handle lock held (no nbd_* call allowed inside),
 * from whichever libnbd call made progress, so the callback only records the
 * result and puts the request on the queue's "ready" list; commit() and
 * reap() then advance ready requests outside libnbd: complete them, or issue
 * the next step.  A request may need several NBD commands:
 *   - readv/writev with more than one iovec go through a contiguous bounce
 *     buffer (NBD has no scatter-gather), taken from a per-queue pool so the
 *     hot path does not malloc once warm;
 *   - FUA maps to NBD_CMD_FLAG_FUA, or (server without FUA) write then flush;
 *   - discard and write-zeroes are split into 1 GiB commands (32-bit length
 *     on the wire), at most NBD_WINDOW in flight per request;
 *   - write-zeroes: NO_UNMAP -> NO_HOLE; NO_FALLBACK -> FAST_ZERO (a server
 *     that cannot zero fast answers ENOTSUP), or -ENOTSUP at once when the
 *     server lacks fast-zero; a server without WRITE_ZEROES gets writes from
 *     a zero buffer, unless NO_FALLBACK (-ENOTSUP);
 *   - discard on a server without TRIM fails with -ENOTSUP (not a silent
 *     no-op: the caller asked for the range to be deallocated);
 *   - flush on a server without FLUSH succeeds (the server says it has no
 *     volatile cache to flush, QEMU does the same).
 * Reads count the bytes the server's chunks cover (libnbd checks that only
 * in nbd_aio_command_completed(), which completion callbacks bypass): a
 * reply that covers less or more than the request (a DONE with data
 * missing, overlapping chunks) fails with -EIO instead of handing the
 * caller whatever its buffer held before.  Overlaps are found from the
 * ranges covered so far (cover()), so one that cancels a gap is caught too,
 * unless out-of-order chunks leave more than READ_SPANS separate ranges.
 * Errors: the server's error becomes -errno with a message (ESHUTDOWN:
 * "the server is shutting down"); when the connection dies (the server
 * closed it, or broke the protocol and libnbd dropped it) libnbd fails
 * every command with ENOTCONN, which we report as -EIO "connection to the
 * NBD server lost: <reason>"; later requests on that queue fail the same way
 * at once.  Nothing waits for a dead socket.  Destroying a queue sends
 * NBD_CMD_DISC and waits at most 2 s for the server to close (requests still
 * in flight are abandoned: libnbd no longer touches their buffers).
 *
 * Waiting: reap() polls the socket for the direction libnbd asks for
 * (nbd_aio_get_direction) until the deadline, then calls
 * nbd_aio_notify_read/write for as long as the socket stays ready: one
 * notify handles one reply and returns to READY, so stopping after one would
 * leave replies in the socket that no new wakeup announces.
 *
 * Completion fd: completions arrive on the socket, and only libnbd calls
 * (inside vdiskq_do_io) turn bytes into completions, so the core's eventfd
 * would never fire by itself.  No helper thread: each queue has a tiny
 * io_uring whose only job is a multishot POLLIN on the socket (plus a
 * one-shot POLLOUT while libnbd is blocked sending a large write), with the
 * queue's eventfd registered on the ring.  The kernel posts a CQE when data
 * arrives, which signals the eventfd: "completions may be available", and
 * the application's vdiskq_do_io(min=0) turns them into completions.  The CQ
 * is drained (shared memory, no syscall) in every commit/reap; a POLLIN that
 * ended (CQE without IORING_CQE_F_MORE: one-shot kernels, or a CQ overflow,
 * whose final CQE is flushed in from the kernel's overflow list) is re-armed
 * at the end of do_io, and arming checks readiness, so no wakeup is lost.
 * Trade-off chosen: no syscall per do_io for callers that block in do_io,
 * at the price of spurious wakeups for event-driven callers (data that a
 * do_io already consumed still posted a CQE), which the API allows.  Turning
 * the fd off toggles IORING_CQ_EVENTFD_DISABLED.  If io_uring is unavailable
 * the driver still works, but event-driven callers are signalled whenever
 * do_io leaves requests in flight (correct, but they busy-poll).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <liburing.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../vd-internal.h"

#define NBD_DEFAULT_PORT "10809"
#define NBD_MAX_PAYLOAD (32u << 20)   /* default max payload per the NBD spec */
#define NBD_DEFAULT_PREFERRED 4096
#define NBD_MAX_QUEUES_MULTI_CONN 16
#define NBD_RANGE_CHUNK (1ull << 30)  /* discard/write-zeroes per command */
#define NBD_ZERO_BUF_MAX (4u << 20)   /* zero-buffer writes (no WRITE_ZEROES) */
#define NBD_WINDOW 8                  /* commands in flight per split request */
#define NBD_BOUNCE_POOL_MAX (64u << 20) /* bytes of bounce buffers kept per queue */
#define NBD_BOUNCE_MIN (64u << 10)
#define NBD_RING_CQ 512
#define NBD_CLOSE_TIMEOUT_MS 2000
#define NBD_DRIVE_BATCH 1024          /* socket events handled per drive() */
#define NBD_CONNECT_TIMEOUT_S 30      /* default connect-timeout */
#define READ_SPANS 8                  /* separate ranges out-of-order read chunks may leave */

/* io_uring user_data tags. */
enum { TAG_NONE = 0, TAG_POLLIN = 1, TAG_POLLOUT = 2 };

/* Per instance (v->priv). */
struct nbd_state {
	/* Properties. */
	char *uri;
	char *host;
	char *port;
	char *export_name;
	int connect_timeout;    /* seconds, 0: none */
	/* From the handshake. */
	bool can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_multi_conn;
	const char *target;     /* for messages: points into target_buf */
	char target_buf[160];
	void *zero_buf;         /* mmap'd zeroes when the server lacks WRITE_ZEROES */
	size_t zero_len;
	struct nbd_handle *h0;  /* connect()'s handle, handed to queue 0 */
};

struct bounce {
	struct bounce *next;
	size_t cap;
	_Alignas(64) unsigned char data[];
};

struct nbd_req;

/* Per queue (q->priv). */
struct nbd_queue {
	struct nbd_handle *h;
	int fd;
	bool dead;
	char dead_msg[80];

	/* Requests whose NBD commands reported back, to be advanced. */
	struct nbd_req *ready_head, **ready_tail;
	/* Every request the driver holds (safety net if the handle dies). */
	struct nbd_req *active;

	struct bounce *pool;
	size_t pool_bytes;

	/* Completion-fd bridge. */
	struct io_uring ring;
	bool ring_ok;
	bool multishot;  /* kernel accepts IORING_POLL_ADD_MULTI */
	bool in_armed, out_armed;
	bool fallback_signal; /* no ring: signal the eventfd while requests are in flight */
	bool more;       /* drive() stopped with the socket still ready */
};

enum { STAGE_MAIN, STAGE_FLUSH };

/* Per request (r->priv). */
struct nbd_req {
	struct nbd_queue *nq;
	struct nbd_req *ready_next;
	struct nbd_req *act_prev, *act_next;
	struct bounce *bounce;
	uint64_t cursor, end; /* split discard/write-zeroes: next offset, end */
	unsigned inflight;    /* NBD commands outstanding */
	int err;              /* first errno reported (0: none) */
	uint32_t nbd_flags;   /* flags for each NBD command of the main stage */
	uint8_t stage;
	bool on_ready;
	bool flush_after;     /* FUA emulated with a flush */
	bool zero_fallback;   /* write-zeroes as writes of the zero buffer */
	bool msg_set;         /* r->msg already holds the reason for err */
	uint64_t seen;        /* read: bytes the server's chunks covered */
	bool overlap;         /* read: two chunks covered the same bytes */
	uint8_t n_spans;
	struct span {
		uint64_t start, end;
	} spans[READ_SPANS]; /* read: what the chunks covered so far, sorted, disjoint */
};

#define STR_PROP(n, f)                                                                                 \
	{ .name = n, .type = VD_PROP_STR, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,     \
	  .in_driver = true, .offset = offsetof(struct nbd_state, f) }
#define FLAG_PROP(n, f)                                                                                \
	{ .name = n, .type = VD_PROP_BOOL, .read_states = VD_CONNECTED | VD_STARTED,                  \
	  .write_states = VD_NEVER, .in_driver = true, .offset = offsetof(struct nbd_state, f) }

static const struct vd_prop nbd_props[] = {
	STR_PROP("uri", uri),
	STR_PROP("host", host),
	STR_PROP("port", port),
	STR_PROP("export-name", export_name),
	{ .name = "connect-timeout", .type = VD_PROP_INT, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct nbd_state, connect_timeout), .min = 0, .max = 86400 },
	FLAG_PROP("can-flush", can_flush),
	FLAG_PROP("can-fua", can_fua),
	FLAG_PROP("can-trim", can_trim),
	FLAG_PROP("can-zero", can_zero),
	FLAG_PROP("can-fast-zero", can_fast_zero),
	FLAG_PROP("can-multi-conn", can_multi_conn),
	{ .name = NULL },
};

static inline struct nbd_req *req_priv(struct vd_request *r)
{
	return (struct nbd_req *)r->priv;
}

static inline struct vd_request *req_of(struct nbd_req *p)
{
	return (struct vd_request *)((char *)p - offsetof(struct vd_request, priv));
}

static bool set(const char *s)
{
	return s && *s;
}

/* libnbd's errno for the last failed call in this thread (EIO if none). */
static int nbd_err(void)
{
	int e = nbd_get_errno();

	return e > 0 ? e : EIO;
}

/* ---- control path ---------------------------------------------------------- */

static int check_target(struct vdisk *v, struct nbd_state *s)
{
	int n = set(s->uri) + set(v->path) + set(s->host) + (v->fd >= 0);

	if (n == 0)
		return vd_error(EINVAL, "vdisk_connect: nbd: set 'uri', 'path' (Unix socket), 'host' (TCP) or 'fd'");
	if (n > 1)
		return vd_error(EINVAL, "vdisk_connect: nbd: 'uri', 'path', 'host' and 'fd' are alternatives; set only one");
	if (set(s->uri) && (set(s->export_name) || s->port))
		return vd_error(EINVAL, "vdisk_connect: nbd: 'export-name' and 'port' cannot be combined with 'uri' "
					"(the URI carries them)");
	if (s->port && !set(s->host))
		return vd_error(EINVAL, "vdisk_connect: nbd: 'port' needs 'host'");
	if (s->port && !*s->port)
		return vd_error(EINVAL, "vdisk_connect: nbd: 'port' must not be empty");

	if (set(s->uri))
		snprintf(s->target_buf, sizeof(s->target_buf), "%s", s->uri);
	else if (set(v->path))
		snprintf(s->target_buf, sizeof(s->target_buf), "unix:%s export '%s'", v->path,
			 s->export_name ? s->export_name : "");
	else if (set(s->host))
		snprintf(s->target_buf, sizeof(s->target_buf), "%s:%s export '%s'", s->host,
			 s->port ? s->port : NBD_DEFAULT_PORT, s->export_name ? s->export_name : "");
	else
		snprintf(s->target_buf, sizeof(s->target_buf), "fd %d export '%s'", v->fd,
			 s->export_name ? s->export_name : "");
	s->target = s->target_buf;
	return 0;
}

/* libnbd's message without the "nbd_aio_notify_read: " prefix naming our call. */
static const char *reason(const char *msg)
{
	const char *colon;

	if (msg && !strncmp(msg, "nbd_", 4) && (colon = strstr(msg, ": ")))
		return colon + 2;
	return msg;
}

/*
 * Finish the connection nbd_aio_connect_*() started.  nbd_connect_*() would
 * wait for ever on a server that stops answering mid-handshake; poll with a
 * deadline instead.  0, -ETIMEDOUT, or -1 with libnbd's error set (or none
 * if the server closed the connection).
 */
static int wait_connected(struct nbd_handle *h, int timeout_s)
{
	struct timespec deadline, ts = { .tv_sec = timeout_s, .tv_nsec = 0 };

	vd_deadline_from_timeout(&deadline, &ts);
	while (nbd_aio_is_connecting(h) == 1) {
		int ms = timeout_s > 0 ? vd_deadline_remaining_ms(&deadline) : -1;

		if (ms == 0)
			return -ETIMEDOUT;
		if (nbd_poll(h, ms) < 0)
			return -1;
	}
	return nbd_aio_is_ready(h) == 1 ? 0 : -1;
}

/* A new handle connected to the target; NULL with the error set (prefixed by who). */
static struct nbd_handle *open_handle(struct vdisk *v, const char *who, const char *name, int *err)
{
	struct nbd_state *s = vd_priv(v);
	struct nbd_handle *h = nbd_create();
	int ret, sock;

	if (!h) {
		*err = vd_error(nbd_err(), "%s: nbd_create: %s", who, nbd_get_error());
		return NULL;
	}
	nbd_set_handle_name(h, name);
	/* The buffer is entirely written on success, and not used on failure. */
	nbd_set_pread_initialize(h, false);
	nbd_set_request_block_size(h, true);
	if (!set(s->uri) && nbd_set_export_name(h, s->export_name ? s->export_name : "") < 0) {
		*err = vd_error(nbd_err(), "%s: export-name: %s", who, nbd_get_error());
		nbd_close(h);
		return NULL;
	}
	if (set(s->uri)) {
		/*
		 * The URI is the application's configuration (like 'path'), not
		 * data from the network: let it name TLS files (tls-psk-file,
		 * tls-certificates), as nbdcopy and nbdinfo do.
		 */
		nbd_set_uri_allow_local_file(h, true);
		ret = nbd_aio_connect_uri(h, s->uri);
	} else if (set(v->path)) {
		ret = nbd_aio_connect_unix(h, v->path);
	} else if (set(s->host)) {
		ret = nbd_aio_connect_tcp(h, s->host, s->port ? s->port : NBD_DEFAULT_PORT);
	} else {
		sock = fcntl(v->fd, F_DUPFD_CLOEXEC, 0); /* libnbd closes what it is given */
		if (sock < 0) {
			*err = vd_error(errno, "%s: dup(fd %d): %s", who, v->fd, strerror(errno));
			nbd_close(h);
			return NULL;
		}
		ret = nbd_aio_connect_socket(h, sock);
	}
	if (ret == 0)
		ret = wait_connected(h, s->connect_timeout);
	if (ret == -ETIMEDOUT) {
		*err = vd_error(ETIMEDOUT, "%s: connecting to %s failed: no handshake within connect-timeout (%d s)",
				who, s->target, s->connect_timeout);
		nbd_close(h);
		return NULL;
	}
	if (ret < 0) {
		*err = vd_error(nbd_err(), "%s: connecting to %s failed: %s", who, s->target,
				nbd_get_error() ? reason(nbd_get_error()) : "the server closed the connection");
		nbd_close(h);
		return NULL;
	}
	return h;
}

static int nbd_connect(struct vdisk *v)
{
	static const char who[] = "vdisk_connect: nbd";
	struct nbd_state *s = vd_priv(v);
	struct nbd_handle *h;
	int64_t size, min, pref, max;
	int ret;

	ret = check_target(v, s);
	if (ret < 0)
		return ret;
	h = open_handle(v, who, "vdisk-nbd", &ret);
	if (!h)
		return ret;

	size = nbd_get_size(h);
	if (size < 0 && nbd_is_read_only(h) < 0) {
		ret = vd_error(EPROTO, "%s: %s: the server finished the handshake without sending the export size",
			       who, s->target);
		goto fail;
	}
	if (size < 0) { /* libnbd passes a wire size of 2^63 or more on as a negative int64 */
		ret = vd_error(EPROTO, "%s: %s: server advertises an export size of 2^63 bytes or more (%" PRIu64 ")",
			       who, s->target, (uint64_t)size);
		goto fail;
	}
	if (nbd_is_read_only(h) == 1 && !v->read_only) {
		ret = vd_error(EROFS, "%s: the server offers %s read-only; set read-only=true", who, s->target);
		goto fail;
	}
	s->can_flush = nbd_can_flush(h) == 1;
	s->can_fua = nbd_can_fua(h) == 1;
	s->can_trim = nbd_can_trim(h) == 1;
	s->can_zero = nbd_can_zero(h) == 1;
	s->can_fast_zero = s->can_zero && nbd_can_fast_zero(h) == 1;
	s->can_multi_conn = nbd_can_multi_conn(h) == 1;

	min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
	pref = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
	max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	if (min <= 0)
		min = 1;
	if (min > 65536 || (min & (min - 1))) { /* the spec allows powers of two up to 64 KiB */
		ret = vd_error(EPROTO, "%s: %s: server advertises an invalid minimum block size %" PRId64, who,
			       s->target, min);
		goto fail;
	}
	if (pref <= 0)
		pref = NBD_DEFAULT_PREFERRED;
	if (pref < min)
		pref = min;
	if (max <= 0 || max > NBD_MAX_PAYLOAD)
		max = NBD_MAX_PAYLOAD;
	max -= max % min;
	if (max < min)
		max = min;
	/* A preferred size past what one request may carry is no use (max 0xffffffff allows any). */
	if (pref > max)
		pref = max;

	v->capacity = (uint64_t)size - (uint64_t)size % (uint64_t)min;
	v->request_alignment = (int)min;
	v->buf_alignment = 1;
	v->optimal_io_size = (int)pref;
	v->optimal_io_alignment = v->optimal_io_size;
	v->optimal_buf_alignment = 64;
	v->max_transfer = (int)max;
	v->needs_mem_regions = false;
	v->can_poll = false;
	v->max_queues = s->can_multi_conn && v->fd < 0 ? NBD_MAX_QUEUES_MULTI_CONN : 1;

	if (!s->can_zero && !v->read_only) {
		s->zero_len = (size_t)max < NBD_ZERO_BUF_MAX ? (size_t)max : NBD_ZERO_BUF_MAX;
		s->zero_buf = mmap(NULL, s->zero_len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (s->zero_buf == MAP_FAILED) {
			s->zero_buf = NULL;
			ret = vd_error(ENOMEM, "%s: out of memory", who);
			goto fail;
		}
	}
	s->h0 = h;
	return 0;

fail:
	nbd_close(h);
	return ret;
}

static int nbd_init(struct vdisk *v)
{
	struct nbd_state *s = vd_priv(v);

	s->connect_timeout = NBD_CONNECT_TIMEOUT_S;
	return 0;
}

static void nbd_destroy(struct vdisk *v)
{
	struct nbd_state *s = vd_priv(v);

	nbd_close(s->h0);
	s->h0 = NULL;
	if (s->zero_buf)
		munmap(s->zero_buf, s->zero_len);
	s->zero_buf = NULL;
	free(s->uri);
	free(s->host);
	free(s->port);
	free(s->export_name);
	s->uri = s->host = s->port = s->export_name = NULL;
}

/* ---- completion-fd bridge (io_uring poll on the socket) ---------------------- */

static void ring_setup(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;
	struct io_uring_params p;

	if (q->completion_fd < 0)
		return;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
	p.cq_entries = NBD_RING_CQ;
	if (io_uring_queue_init_params(4, &nq->ring, &p) < 0) {
		nq->fallback_signal = true;
		return;
	}
	if (io_uring_register_eventfd(&nq->ring, q->completion_fd) < 0) {
		io_uring_queue_exit(&nq->ring);
		nq->fallback_signal = true;
		return;
	}
	nq->ring_ok = true;
	nq->multishot = true;
	if (!q->completion_fd_enabled)
		io_uring_cq_eventfd_toggle(&nq->ring, false);
}

/*
 * Consume the ring's CQEs (memory only, no syscall, unless the CQ overflowed).
 * Every socket wakeup can post a POLLIN CQE, so a long drive() may overflow
 * the CQ; the kernel then ends the multishot poll with a final CQE kept in
 * its overflow list, which must be flushed in or the poll would never be
 * re-armed.
 */
static void ring_drain(struct nbd_queue *nq)
{
	struct io_uring_cqe *cqe;
	unsigned head, n;

	do {
		if (io_uring_cq_has_overflow(&nq->ring))
			io_uring_get_events(&nq->ring);
		n = 0;
		io_uring_for_each_cqe(&nq->ring, head, cqe) {
			n++;
			if (cqe->user_data == TAG_POLLIN && !(cqe->flags & IORING_CQE_F_MORE)) {
				nq->in_armed = false;
				if (cqe->res == -EINVAL && nq->multishot)
					nq->multishot = false; /* kernel < 5.13: re-arm one-shot */
			} else if (cqe->user_data == TAG_POLLOUT) {
				nq->out_armed = false;
			}
		}
		if (n)
			io_uring_cq_advance(&nq->ring, n);
	} while (io_uring_cq_has_overflow(&nq->ring));
}

/* Make sure the socket's readiness will signal the completion fd. */
static void arm(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;
	struct io_uring_sqe *sqe;
	bool queued = false;
	unsigned dir;

	if (nq->more || (nq->fallback_signal && q->n_inflight > 0)) {
		nq->more = false;
		vd_queue_signal(q);
	}
	if (nq->fallback_signal)
		return;
	if (!nq->ring_ok)
		return;
	ring_drain(nq);
	if (nq->dead)
		return;
	if (!nq->in_armed && (sqe = io_uring_get_sqe(&nq->ring))) {
		io_uring_prep_poll_add(sqe, nq->fd, POLLIN);
		if (nq->multishot)
			sqe->len |= IORING_POLL_ADD_MULTI;
		io_uring_sqe_set_data64(sqe, TAG_POLLIN);
		nq->in_armed = queued = true;
	}
	dir = nbd_aio_get_direction(nq->h);
	if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !nq->out_armed && (sqe = io_uring_get_sqe(&nq->ring))) {
		io_uring_prep_poll_add(sqe, nq->fd, POLLOUT);
		io_uring_sqe_set_data64(sqe, TAG_POLLOUT);
		nq->out_armed = queued = true;
	}
	if (queued && io_uring_submit(&nq->ring) < 0) {
		/* Cannot arm: fall back to signalling while requests are in flight. */
		nq->in_armed = nq->out_armed = false;
		nq->fallback_signal = true;
		if (q->n_inflight > 0)
			vd_queue_signal(q);
	}
}

static void nbd_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct nbd_queue *nq = q->priv;

	if (nq->ring_ok)
		io_uring_cq_eventfd_toggle(&nq->ring, enabled);
}

/* ---- queues ---------------------------------------------------------------- */

static void mark_dead(struct nbd_queue *nq, const char *why)
{
	if (nq->dead)
		return;
	nq->dead = true;
	why = reason(why); /* the reason has little room in a request's message */
	snprintf(nq->dead_msg, sizeof(nq->dead_msg), "%s", why && *why ? why : "connection closed");
}

static int nbd_queue_init(struct vdiskq *q)
{
	struct vdisk *v = q->v;
	struct nbd_state *s = vd_priv(v);
	struct nbd_queue *nq = q->priv;
	char who[64], name[48];
	int ret;

	nq->ready_tail = &nq->ready_head;
	snprintf(who, sizeof(who), "vdisk_start: nbd: queue %d", q->index);
	snprintf(name, sizeof(name), "vdisk-nbd-q%d", q->index);
	if (!q->is_poll_queue && q->index == 0 && s->h0) {
		nq->h = s->h0;
		s->h0 = NULL;
		nbd_set_handle_name(nq->h, name);
	} else {
		nq->h = open_handle(v, who, name, &ret);
		if (!nq->h)
			return ret;
		/* Multi-conn promises the same export on every connection: check it. */
		if (nbd_get_size(nq->h) != (int64_t)v->capacity ||
		    (s->can_multi_conn && nbd_can_multi_conn(nq->h) != 1) ||
		    (nbd_is_read_only(nq->h) == 1 && !v->read_only)) {
			nbd_close(nq->h);
			nq->h = NULL;
			return vd_error(EPROTO, "%s: the server changed the export (size, multi-conn or read-only) "
						"between connections to %s", who, s->target);
		}
	}
	nq->fd = nbd_aio_get_fd(nq->h);
	if (nq->fd < 0) {
		ret = vd_error(nbd_err(), "%s: %s", who, nbd_get_error());
		nbd_close(nq->h);
		nq->h = NULL;
		return ret;
	}
	ring_setup(q);
	arm(q);
	return 0;
}

static void drive(struct vdiskq *q, const struct timespec *timeout);

static void nbd_queue_fini(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;
	struct bounce *b;

	if (nq->ring_ok) {
		io_uring_queue_exit(&nq->ring); /* cancels the polls */
		nq->ring_ok = false;
	}
	if (nq->h) {
		/*
		 * Say goodbye (NBD_CMD_DISC after whatever is still queued), but
		 * never wait long for a server that does not answer.  Commands
		 * still in flight only put their requests on the ready list.
		 */
		if (!nq->dead && (nbd_aio_is_ready(nq->h) == 1 || nbd_aio_is_processing(nq->h) == 1)) {
			struct timespec deadline, ts;

			if (nbd_aio_disconnect(nq->h, 0) == 0) {
				ts.tv_sec = NBD_CLOSE_TIMEOUT_MS / 1000;
				ts.tv_nsec = (NBD_CLOSE_TIMEOUT_MS % 1000) * 1000000L;
				vd_deadline_from_timeout(&deadline, &ts);
				while (!nq->dead && nbd_aio_is_closed(nq->h) != 1 && nbd_aio_is_dead(nq->h) != 1) {
					int ms = vd_deadline_remaining_ms(&deadline);

					if (ms <= 0)
						break;
					ts.tv_sec = ms / 1000;
					ts.tv_nsec = (ms % 1000) * 1000000L;
					drive(q, &ts);
				}
			}
		}
		nbd_close(nq->h);
		nq->h = NULL;
	}
	while ((b = nq->pool)) {
		nq->pool = b->next;
		free(b);
	}
	nq->pool_bytes = 0;
}

/*
 * Wait (timeout NULL: forever; 0: not at all) for the socket to be ready in
 * the direction libnbd wants, then let libnbd make progress for as long as
 * the socket stays ready: one nbd_aio_notify_read() handles one reply and
 * returns to READY, so a single call would leave further replies in the
 * socket, where no new wakeup would announce them to an event-driven caller.
 */
static void drive(struct vdiskq *q, const struct timespec *timeout)
{
	static const struct timespec zero = { 0, 0 };
	struct nbd_queue *nq = q->priv;

	for (int i = 0; !nq->dead; i++) {
		struct pollfd pfd = { .fd = nq->fd, .events = 0 };
		unsigned dir = nbd_aio_get_direction(nq->h);
		int r;

		if (dir & LIBNBD_AIO_DIRECTION_READ)
			pfd.events |= POLLIN;
		if (dir & LIBNBD_AIO_DIRECTION_WRITE)
			pfd.events |= POLLOUT;
		if (!pfd.events) {
			if (nbd_aio_is_dead(nq->h) == 1 || nbd_aio_is_closed(nq->h) == 1)
				mark_dead(nq, nbd_aio_is_closed(nq->h) == 1 ? "the connection was closed" : NULL);
			return;
		}
		if (i == NBD_DRIVE_BATCH) {
			nq->more = true; /* still ready: make sure the caller comes back */
			return;
		}
		r = ppoll(&pfd, 1, i == 0 ? timeout : &zero, NULL);
		if (r <= 0)
			return; /* not ready, timeout or EINTR: the caller checks its deadline */
		/* As nbd_poll(): prefer reading (replies are for older commands). */
		if (pfd.revents & (POLLIN | POLLHUP | POLLERR))
			r = nbd_aio_notify_read(nq->h);
		else if (pfd.revents & POLLOUT)
			r = nbd_aio_notify_write(nq->h);
		else
			r = 0;
		if (nbd_aio_is_dead(nq->h) == 1)
			mark_dead(nq, r < 0 ? nbd_get_error() : NULL);
		else if (nbd_aio_is_closed(nq->h) == 1)
			mark_dead(nq, "the server closed the connection");
	}
}

/* ---- bounce buffers ----------------------------------------------------------- */

static struct bounce *bounce_get(struct nbd_queue *nq, size_t len)
{
	struct bounce *b = nq->pool;
	size_t cap;

	if (b) {
		nq->pool = b->next;
		nq->pool_bytes -= b->cap;
		if (b->cap >= len)
			return b;
		free(b);
	}
	cap = len < NBD_BOUNCE_MIN ? NBD_BOUNCE_MIN : (len + NBD_BOUNCE_MIN - 1) & ~(size_t)(NBD_BOUNCE_MIN - 1);
	b = aligned_alloc(64, (sizeof(*b) + cap + 63) & ~(size_t)63);
	if (b)
		b->cap = cap;
	return b;
}

static void bounce_put(struct nbd_queue *nq, struct bounce *b)
{
	if (nq->pool_bytes + b->cap > NBD_BOUNCE_POOL_MAX) {
		free(b);
		return;
	}
	b->next = nq->pool;
	nq->pool = b;
	nq->pool_bytes += b->cap;
}

/* ---- data path ----------------------------------------------------------------- */

/*
 * Note that a read chunk covered [start, end) in p->spans; false when it
 * overlaps what an earlier chunk covered.  Chunks in order keep a single
 * span; should out-of-order ones leave more separate ranges than fit, the
 * check falls back to counting bytes alone.
 */
static bool cover(struct nbd_req *p, uint64_t start, uint64_t end)
{
	struct span *sp = p->spans;
	int i = 0, n = p->n_spans;

	while (i < n && sp[i].end < start)
		i++;
	if (i < n && sp[i].start < end && start < sp[i].end)
		return false;
	if (i < n && sp[i].end == start) { /* extends span i */
		if (i + 1 < n && sp[i + 1].start < end)
			return false;
		sp[i].end = end;
		if (i + 1 < n && sp[i + 1].start == end) { /* and closes the gap to the next */
			sp[i].end = sp[i + 1].end;
			memmove(&sp[i + 1], &sp[i + 2], (size_t)(n - i - 2) * sizeof(*sp));
			p->n_spans--;
		}
		return true;
	}
	if (i < n && sp[i].start == end) {
		sp[i].start = start;
		return true;
	}
	if (n < READ_SPANS) {
		memmove(&sp[i + 1], &sp[i], (size_t)(n - i) * sizeof(*sp));
		sp[i] = (struct span){ start, end };
		p->n_spans++;
	}
	return true;
}

/* Read chunk callback: note what the server covered (libnbd checks each chunk is inside the request). */
static int read_chunk(void *opaque, const void *subbuf, size_t count, uint64_t offset, unsigned status, int *error)
{
	struct nbd_req *p = opaque;

	(void)subbuf;
	(void)error;
	if ((status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE) && count) {
		p->seen += count;
		if (!cover(p, offset, offset + count))
			p->overlap = true;
	}
	return 0;
}

static int cmd_done(void *opaque, int *error)
{
	struct nbd_req *p = opaque;
	struct nbd_queue *nq = p->nq;
	struct vd_request *r = req_of(p);

	p->inflight--;
	/* Success with the buffer not exactly covered: part of it is stale. */
	if (!*error && r->op == VD_OP_READ && (p->seen != r->len || p->overlap) && !p->err) {
		if (p->overlap)
			snprintf(r->msg, sizeof(r->msg), "nbd: read at offset %" PRIu64 ": the server's reply has "
				 "overlapping chunks", r->offset);
		else
			snprintf(r->msg, sizeof(r->msg), "nbd: read at offset %" PRIu64 ": the server's reply covered "
				 "%" PRIu64 " of %" PRIu64 " bytes", r->offset, p->seen, r->len);
		p->msg_set = true;
		p->err = EIO;
	}
	if (*error && !p->err)
		p->err = *error;
	if (!p->on_ready) {
		p->on_ready = true;
		p->ready_next = NULL;
		*nq->ready_tail = p;
		nq->ready_tail = &p->ready_next;
	}
	return 1; /* retire the command: nothing asks about it later */
}

static const char *op_name(enum vd_op op)
{
	static const char *const names[] = { "read", "write", "flush", "discard", "write-zeroes" };

	return names[op];
}

static void finish(struct vdiskq *q, struct nbd_req *p, int ret)
{
	struct nbd_queue *nq = p->nq;
	struct vd_request *r = req_of(p);

	if (p->act_prev)
		p->act_prev->act_next = p->act_next;
	else
		nq->active = p->act_next;
	if (p->act_next)
		p->act_next->act_prev = p->act_prev;
	p->act_prev = p->act_next = NULL;
	if (p->bounce) {
		bounce_put(nq, p->bounce);
		p->bounce = NULL;
	}
	if (ret < 0 && p->msg_set)
		r->error_msg = r->msg;
	vd_req_complete(q, r, ret);
}

/* Turn the errno a command reported into the request's result and message. */
static int reported_error(struct nbd_req *p)
{
	struct vd_request *r = req_of(p);
	int err = p->err;

	if (p->msg_set)
		return err == ENOTCONN ? -EIO : -err;
	p->msg_set = true;
	if (err == ENOTCONN || p->nq->dead) {
		snprintf(r->msg, sizeof(r->msg), "nbd: %s: connection to the NBD server lost: %.56s", op_name(r->op),
			 p->nq->dead ? p->nq->dead_msg : "not connected");
		return -EIO;
	}
	if (err == EOPNOTSUPP)
		err = ENOTSUP;
	if (err == ENOTSUP && (p->nbd_flags & LIBNBD_CMD_FLAG_FAST_ZERO))
		snprintf(r->msg, sizeof(r->msg), "nbd: write-zeroes: the server cannot zero this range fast "
			 "(NO_FALLBACK)");
	else if (err == ESHUTDOWN)
		snprintf(r->msg, sizeof(r->msg), "nbd: %s at offset %" PRIu64 ": the server is shutting down",
			 op_name(r->op), r->offset);
	else
		snprintf(r->msg, sizeof(r->msg), "nbd: %s at offset %" PRIu64 ": server replied: %s", op_name(r->op),
			 r->offset, strerror(err));
	return -err;
}

/* An nbd_aio_* call failed before reaching the wire: record why. */
static void issue_failed(struct nbd_req *p, const char *what)
{
	struct vd_request *r = req_of(p);
	int err = nbd_err();

	if (p->err)
		return;
	if (nbd_aio_is_dead(p->nq->h) == 1 || nbd_aio_is_closed(p->nq->h) == 1) {
		mark_dead(p->nq, nbd_get_error());
		err = ENOTCONN;
	} else {
		snprintf(r->msg, sizeof(r->msg), "nbd: %s: %s", what, nbd_get_error());
		p->msg_set = true;
	}
	p->err = err;
}

static nbd_completion_callback completion(struct nbd_req *p)
{
	return (nbd_completion_callback){ .callback = cmd_done, .user_data = p };
}

/* Issue the read/write of the main stage (one command). */
static void issue_rw(struct nbd_req *p, void *buf)
{
	struct vd_request *r = req_of(p);
	struct nbd_handle *h = p->nq->h;
	int64_t c;

	p->inflight++;
	if (r->op == VD_OP_READ)
		c = nbd_aio_pread_structured(h, buf, (size_t)r->len, r->offset,
					     (nbd_chunk_callback){ .callback = read_chunk, .user_data = p },
					     completion(p), 0);
	else
		c = nbd_aio_pwrite(h, buf, (size_t)r->len, r->offset, completion(p), p->nbd_flags);
	if (c < 0) {
		p->inflight--;
		issue_failed(p, r->op == VD_OP_READ ? "nbd_aio_pread_structured" : "nbd_aio_pwrite");
	}
}

/* Issue more pieces of a split discard / write-zeroes, up to the window. */
static void issue_range(struct vdisk *v, struct nbd_req *p)
{
	struct nbd_state *s = vd_priv(v);
	struct vd_request *r = req_of(p);
	struct nbd_handle *h = p->nq->h;

	while (!p->err && p->cursor < p->end && p->inflight < NBD_WINDOW) {
		uint64_t left = p->end - p->cursor;
		uint64_t n;
		int64_t c;

		p->inflight++;
		if (p->zero_fallback) {
			n = left < s->zero_len ? left : s->zero_len;
			c = nbd_aio_pwrite(h, s->zero_buf, (size_t)n, p->cursor, completion(p), p->nbd_flags);
		} else {
			n = left < NBD_RANGE_CHUNK ? left : NBD_RANGE_CHUNK;
			if (r->op == VD_OP_DISCARD)
				c = nbd_aio_trim(h, n, p->cursor, completion(p), p->nbd_flags);
			else
				c = nbd_aio_zero(h, n, p->cursor, completion(p), p->nbd_flags);
		}
		if (c < 0) {
			p->inflight--;
			issue_failed(p, p->zero_fallback ? "nbd_aio_pwrite" :
					r->op == VD_OP_DISCARD ? "nbd_aio_trim" : "nbd_aio_zero");
			return;
		}
		p->cursor += n;
	}
}

static void issue_flush(struct nbd_req *p)
{
	p->inflight++;
	if (nbd_aio_flush(p->nq->h, completion(p), 0) < 0) {
		p->inflight--;
		issue_failed(p, "nbd_aio_flush");
	}
}

/* Scatter a bounced read into the caller's iovecs. */
static void scatter(struct vd_request *r, const unsigned char *src)
{
	for (int i = 0; i < r->iovcnt; i++) {
		memcpy(r->iov[i].iov_base, src, r->iov[i].iov_len);
		src += r->iov[i].iov_len;
	}
}

/* Move a request on after its commands reported back (or failed to issue). */
static void advance(struct vdiskq *q, struct nbd_req *p)
{
	struct vd_request *r = req_of(p);

	for (;;) {
		/* A command failed synchronously inside an issue call: process_ready() has it. */
		if (p->on_ready)
			return;
		if (p->inflight > 0) {
			if (!p->err && p->stage == STAGE_MAIN && p->cursor < p->end)
				issue_range(q->v, p);
			if (p->inflight > 0)
				return; /* the rest reports back later */
			continue;
		}
		if (p->err) {
			finish(q, p, reported_error(p));
			return;
		}
		if (p->stage == STAGE_MAIN && p->cursor < p->end) {
			issue_range(q->v, p);
			continue;
		}
		if (p->stage == STAGE_MAIN && p->flush_after) {
			p->stage = STAGE_FLUSH;
			issue_flush(p);
			continue;
		}
		if (r->op == VD_OP_READ && p->bounce)
			scatter(r, p->bounce->data);
		finish(q, p, 0);
		return;
	}
}

/* Advance every request whose commands reported back. */
static void process_ready(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;
	struct nbd_req *p;

	while ((p = nq->ready_head)) {
		nq->ready_head = p->ready_next;
		if (!nq->ready_head)
			nq->ready_tail = &nq->ready_head;
		p->ready_next = NULL;
		p->on_ready = false;
		advance(q, p);
	}
}

/*
 * The handle died: libnbd has failed every command it held (ENOTCONN), so
 * nothing should be left waiting; fail whatever is (never hang).
 */
static void reap_dead(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;
	struct nbd_req *p, *next;

	process_ready(q);
	for (p = nq->active; p; p = next) {
		next = p->act_next;
		if (p->on_ready)
			continue;
		if (!p->err)
			p->err = ENOTCONN;
		p->inflight = 0;
		p->cursor = p->end;
		advance(q, p);
	}
	process_ready(q);
}

static int nbd_submit(struct vdiskq *q, struct vd_request *r)
{
	struct vdisk *v = q->v;
	struct nbd_state *s = vd_priv(v);
	struct nbd_queue *nq = q->priv;
	struct nbd_req *p = req_priv(r);
	void *buf;

	memset(p, 0, sizeof(*p));
	p->nq = nq;
	p->act_next = nq->active;
	if (nq->active)
		nq->active->act_prev = p;
	nq->active = p;

	if (nq->dead) {
		p->err = ENOTCONN;
		advance(q, p);
		return 0;
	}

	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		if (r->op == VD_OP_WRITE && (r->flags & VDISK_REQ_FUA)) {
			if (s->can_fua)
				p->nbd_flags |= LIBNBD_CMD_FLAG_FUA;
			else
				p->flush_after = s->can_flush;
		}
		if (r->iovcnt == 1) {
			buf = r->iov[0].iov_base;
		} else {
			p->bounce = bounce_get(nq, (size_t)r->len);
			if (!p->bounce) {
				p->err = ENOMEM;
				p->msg_set = true;
				snprintf(r->msg, sizeof(r->msg), "nbd: %s: out of memory for a %" PRIu64 "-byte bounce buffer",
					 op_name(r->op), r->len);
				break;
			}
			buf = p->bounce->data;
			if (r->op == VD_OP_WRITE) {
				unsigned char *d = buf;

				for (int i = 0; i < r->iovcnt; i++) {
					memcpy(d, r->iov[i].iov_base, r->iov[i].iov_len);
					d += r->iov[i].iov_len;
				}
			}
		}
		issue_rw(p, buf);
		break;

	case VD_OP_FLUSH:
		if (s->can_flush)
			issue_flush(p);
		break;

	case VD_OP_DISCARD:
		if (!s->can_trim) {
			p->err = ENOTSUP;
			p->msg_set = true;
			snprintf(r->msg, sizeof(r->msg), "nbd: discard: the server does not support trim");
			break;
		}
		p->cursor = r->offset;
		p->end = r->offset + r->len;
		issue_range(v, p);
		break;

	case VD_OP_WRITE_ZEROES:
		if ((r->flags & VDISK_REQ_NO_FALLBACK) && !s->can_fast_zero) {
			p->err = ENOTSUP;
			p->msg_set = true;
			snprintf(r->msg, sizeof(r->msg), "nbd: write-zeroes: the server %s (NO_FALLBACK)",
				 s->can_zero ? "cannot promise fast zeroing" : "does not support write-zeroes");
			break;
		}
		if (r->flags & VDISK_REQ_FUA) {
			if (s->can_fua)
				p->nbd_flags |= LIBNBD_CMD_FLAG_FUA;
			else
				p->flush_after = s->can_flush;
		}
		if (s->can_zero) {
			if (r->flags & VDISK_REQ_NO_UNMAP)
				p->nbd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
			if (r->flags & VDISK_REQ_NO_FALLBACK)
				p->nbd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
		} else {
			p->zero_fallback = true; /* writes of zeroes: always allocated, NO_UNMAP holds */
		}
		p->cursor = r->offset;
		p->end = r->offset + r->len;
		issue_range(v, p);
		break;
	}
	/* Nothing went out (empty request, no-op flush, or an error): finish now. */
	if (p->inflight == 0 && !p->on_ready)
		advance(q, p);
	return 0;
}

static int nbd_commit(struct vdiskq *q)
{
	struct nbd_queue *nq = q->priv;

	process_ready(q);
	if (nq->dead)
		reap_dead(q);
	arm(q);
	return 0;
}

static int nbd_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct nbd_queue *nq = q->priv;
	unsigned start = q->n_done;
	struct timespec zero = { 0, 0 }, ts;
	const struct timespec *tsp = &zero;
	int ret = 0;

	for (;;) {
		drive(q, tsp);
		process_ready(q);
		if (nq->dead)
			reap_dead(q);
		if (q->n_done > start || !wait || q->n_inflight == 0)
			break;
		if (deadline) {
			struct timespec now;
			int64_t ns;

			clock_gettime(CLOCK_MONOTONIC, &now);
			ns = (int64_t)(deadline->tv_sec - now.tv_sec) * 1000000000LL + (deadline->tv_nsec - now.tv_nsec);
			if (ns <= 0) {
				ret = -ETIME;
				break;
			}
			ts.tv_sec = ns / 1000000000LL;
			ts.tv_nsec = ns % 1000000000LL;
			tsp = &ts;
		} else {
			tsp = NULL;
		}
	}
	arm(q);
	return ret;
}

const struct vd_driver vd_driver_nbd = {
	.name = "nbd",
	.priv_size = sizeof(struct nbd_state),
	.queue_priv_size = sizeof(struct nbd_queue),
	.req_priv_size = sizeof(struct nbd_req),
	.props = nbd_props,
	.init = nbd_init,
	.connect = nbd_connect,
	.destroy = nbd_destroy,
	.queue_init = nbd_queue_init,
	.queue_fini = nbd_queue_fini,
	.submit = nbd_submit,
	.commit = nbd_commit,
	.reap = nbd_reap,
	.set_completion_fd_enabled = nbd_set_completion_fd_enabled,
};
