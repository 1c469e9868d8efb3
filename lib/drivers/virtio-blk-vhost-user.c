/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * virtio-blk-vhost-user: a vhost-user front-end driving a virtio-blk device
 * whose back-end is another process (qemu-storage-daemon's vhost-user-blk
 * export, SPDK, vdiskd ...).  Requests travel through split virtqueues in
 * shared memory: no copy and no syscall per request except the kick eventfd
 * (which the back-end may suppress) and the call eventfd.
 *
 * Target: 'path' = the back-end's Unix socket (or 'fd' = a connected socket;
 * we dup() it).  Driver properties (set in the created state):
 *   event-idx      bool, default true: negotiate VIRTIO_RING_F_EVENT_IDX
 *   indirect-desc  bool, default true: negotiate VIRTIO_RING_F_INDIRECT_DESC
 *   mem-slots      bool, default true: negotiate CONFIGURE_MEM_SLOTS (false:
 *                  always SET_MEM_TABLE, at most 7 regions; some back-ends,
 *                  qemu-storage-daemon 7.2 among them, remap every region on
 *                  SET_MEM_TABLE, so map/unmap while requests are in flight
 *                  can fail those requests there)
 *   discard, write-zeroes  bool, default true: negotiate VIRTIO_BLK_F_DISCARD /
 *                  VIRTIO_BLK_F_WRITE_ZEROES when offered (as QEMU's
 *                  virtio-blk device properties of the same names)
 *   strict-used-len  bool, default false: fail a request whose used-ring
 *                  length is past its device-writable bytes, or a read whose
 *                  length does not cover its data.  Off by default, as in
 *                  Linux's virtio-blk: real back-ends get len wrong
 *                  (qemu-storage-daemon 6.0-7.1 reports leftover memory)
 *   reply-timeout  int, seconds, default 30 (1..3600): how long any control
 *                  reply may take (a slower one kills the connection), and
 *                  how long destroy waits for requests in flight
 * and, once connected, read-only bools can-flush, can-discard,
 * can-write-zeroes (what the back-end offers).
 *
 * The file is in sections:
 *   1. wire format: vhost-user messages, virtio feature bits, virtio-blk
 *      requests, split virtqueue layout (all little-endian = host order on
 *      the hosts vhost-user runs on; we refuse to build elsewhere), shared
 *      with vdiskd's vhost-user-blk export in util/vhost-user.h;
 *   2. the control channel: one request/reply transaction at a time under a
 *      mutex, fds in SCM_RIGHTS, every wait bounded (reply-timeout);
 *   3. the connection: handshake at connect, written as named steps, and a
 *      monitor thread that notices the back-end going away;
 *   4. memory: the mem table (ADD_MEM_REG/REM_MEM_REG when the back-end
 *      negotiates CONFIGURE_MEM_SLOTS and REPLY_ACK, else SET_MEM_TABLE with
 *      every region) and the lookup that turns a buffer into a descriptor;
 *   5. virtqueues: rings, descriptors, kicks, the used ring;
 *   6. requests: virtio-blk requests built from vdisk requests;
 *   7. the driver ops.
 *
 * Handshake (connect): SET_OWNER, GET_FEATURES, [GET_PROTOCOL_FEATURES,
 * SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS)],
 * [GET_QUEUE_NUM], [GET_MAX_MEM_SLOTS], SET_FEATURES, GET_CONFIG.  The
 * config space gives capacity (512-byte sectors), blk_size (request-alignment),
 * seg_max (max-segments), size_max (max-transfer), num_queues (max-queues),
 * discard / write-zeroes limits.  A back-end that offers VIRTIO_BLK_F_RO
 * needs read-only=true (else -EROFS).  Without the CONFIG protocol feature
 * the capacity cannot be known: -ENOTSUP.  INFLIGHT_SHMFD is not negotiated
 * (we do not reconnect, and libvhost-user insists on an inflight area once
 * it is).
 *
 * Memory: vhost-user shares memory, it never copies, so every buffer must be
 * in a region the back-end has mapped: needs-mem-regions=true, buffers come
 * from vdisk_alloc_mem_region() (memfd) and are mapped with
 * vdisk_map_mem_region(), before or after start.  A request whose buffer is
 * not inside one mapped region fails with -EFAULT.  Addresses are identity
 * mapped: the "guest physical" address of a region is its address in this
 * process, so a descriptor's address is the buffer pointer.  The rings, the
 * per-request headers/status bytes, the indirect tables and the zero buffer
 * live in one more memfd region the driver owns ("rings region"), allocated
 * at start for all queues; it takes one of the back-end's slots, so
 * max-mem-regions = back-end slots - 1 (GET_MAX_MEM_SLOTS, or 8 for
 * SET_MEM_TABLE).  With SET_MEM_TABLE (back-end without CONFIGURE_MEM_SLOTS)
 * every map/unmap after start replaces the whole table: the back-end
 * re-maps everything, so do that only while no I/O is in flight.
 *
 * Queues: one virtqueue per vdisk queue (normal queues first, then poll
 * queues).  The call eventfd of a normal queue IS the queue's completion fd:
 * the back-end signals the application directly.  Interrupt suppression:
 * while the completion fd is enabled, notifications stay on (used_event
 * follows what we consumed, or VRING_AVAIL_F_NO_INTERRUPT clear).  When the
 * application turns it off (it blocks in do_io), the call fd becomes a
 * private eventfd (SET_VRING_CALL, so no stray wakeup reaches the
 * application) and notifications are on only while reap() sleeps.  Poll
 * queues spin on the used ring with notifications off; their call fd is the
 * private eventfd, never read (libvhost-user insists on having one).
 * Kicks: one per batch (commit, or reap when completions issued follow-up
 * requests), skipped when the back-end says so (VRING_USED_F_NO_NOTIFY or
 * avail_event).
 *
 * Requests: header descriptor, one data descriptor per non-empty iovec,
 * status byte.  With indirect descriptors (default when offered) a request
 * takes one ring slot and the ring has next_pow2(queue-size) entries (max
 * 1024); without, descriptors are chained from a 1024-entry table and
 * submit() answers -EAGAIN when it is full.  A vdisk request may need
 * several virtio requests ("subs"):
 *   - FUA: virtio-blk has no FUA, so write then FLUSH (when the back-end
 *     has a volatile cache, i.e. offers VIRTIO_BLK_F_FLUSH; without it writes
 *     are already stable);
 *   - discard / write-zeroes longer than the back-end's max_*_sectors are
 *     split, at most VU_WINDOW pieces in flight per request;
 *   - write-zeroes on a back-end without VIRTIO_BLK_F_WRITE_ZEROES is done
 *     as writes whose segments all point at one shared zero buffer, unless
 *     NO_FALLBACK (-ENOTSUP); NO_UNMAP -> unmap flag 0, else unmap flag 1;
 *   - flush without VIRTIO_BLK_F_FLUSH succeeds at once (nothing to flush),
 *     discard without VIRTIO_BLK_F_DISCARD fails with -ENOTSUP;
 *   - discard ranges not aligned to request-alignment shrink to the aligned
 *     part (discard is advisory); misaligned write-zeroes fail with -EINVAL.
 * Status VIRTIO_BLK_S_IOERR -> -EIO, VIRTIO_BLK_S_UNSUPP -> -ENOTSUP; a
 * status byte the back-end did not write (or an unknown value) -> -EIO, and
 * with strict-used-len a used length beyond the request's device-writable
 * bytes or a read whose used length does not cover its data -> -EIO.
 *
 * Disconnect: a monitor thread sleeps in poll() on the socket (POLLRDHUP
 * only: it never consumes replies) and on a stop eventfd.  When the
 * back-end goes away it marks the instance dead and writes every queue's
 * completion fd and private call fd, so blocked and event-driven callers
 * wake up; the queues then take what the back-end completed before dying,
 * fail the rest with -EIO "back-end disconnected (...)", and so every later
 * request.  A failed control transaction (send/recv error, EOF, timeout, a
 * malformed reply) or a malformed used ring marks the instance dead too.
 * No reconnection: the instance must be destroyed and created again.
 *
 * Teardown: queue_fini waits (at most reply-timeout while the back-end
 * lives) for requests in flight, since the back-end writes into caller
 * buffers until it completes them, then stops the ring (GET_VRING_BASE).
 *
 * Threads: the control channel is used by the configuring thread (connect,
 * start, map/unmap, destroy) and by vdiskq_set_completion_fd_enabled() in
 * a queue's thread, one transaction at a time under conn_lock; a queue's
 * ring is touched only by that queue's thread.  The region table read by
 * queue threads is this driver's fixed array with release/acquire accesses,
 * as in io_uring.c.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../vd-internal.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio-blk-vhost-user: big-endian hosts are not supported (virtio 1.x is little-endian)"
#endif

/* ==== 1. wire format ======================================================= */

#include "../../util/vhost-user.h"

/* Per ring slot, in the shared rings region: what the device reads and writes besides data. */
struct vu_slot_area {
	struct virtio_blk_outhdr hdr; /* device-readable */
	struct virtio_blk_dwz dwz;    /* device-readable (discard / write-zeroes) */
	uint8_t status;               /* device-writable */
	uint8_t pad[31];
};
_Static_assert(sizeof(struct vu_slot_area) == 64, "slot area is one cache line");

/* ==== tunables =============================================================== */

#define VU_REPLY_TIMEOUT_S 30      /* default reply-timeout: control replies, queue_fini's wait */
#define VU_MAX_REGIONS 512         /* our region table (max-mem-regions cap) */
#define VU_WINDOW 8                /* subs in flight per split discard / write-zeroes */
#define VU_ZERO_BUF (64u << 10)    /* zero buffer for emulated write-zeroes */
#define VU_ZERO_SEGS 16            /* segments per emulated write-zeroes sub */
#define VU_MAX_TRANSFER (1 << 30)  /* bytes per read/write (descriptor lengths are 32-bit) */
#define VU_SPIN_CLOCK_EVERY 256    /* poll queues: read the clock every N spins */

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

/* ==== state ================================================================== */

struct vu_region {
	/* Published to the queue threads: start (release/acquire), len. */
	uintptr_t start; /* 0: no usable region in this slot */
	size_t len;
	/* Control thread only. */
	uintptr_t addr;
	size_t size;
	int fd;          /* -1: slot free */
	int64_t fd_offset;
	bool sent;       /* the back-end has it */
};

/* Per instance (v->priv). */
struct vu_state {
	/* Properties. */
	bool prop_event_idx;
	bool prop_indirect;
	bool prop_mem_slots;
	bool prop_discard, prop_write_zeroes;
	bool strict_used_len;
	int reply_timeout; /* seconds */
	bool can_flush, can_discard, can_write_zeroes;

	/* Connection. */
	int sock;
	pthread_mutex_t conn_lock;
	bool conn_lock_ok;
	char target[112];
	uint64_t features;       /* acknowledged */
	uint64_t proto_features; /* acknowledged */
	bool reply_ack, mem_slots, event_idx, indirect;
	uint32_t size_max, max_discard, max_wz, discard_align; /* sectors */
	uint32_t blk_size;

	/* Death: set once (under dead_lock), read by queue threads (acquire). */
	int dead;
	char dead_msg[96];
	pthread_mutex_t dead_lock;
	bool dead_lock_ok;
	int wake_fds[VU_MAX_QUEUES][2]; /* call fds to write on death (under dead_lock) */

	/* Monitor thread. */
	pthread_t monitor;
	bool monitor_running;
	int monitor_stop_fd;

	/* Rings region (allocated at start). */
	int ring_fd;
	void *ring_mem;
	size_t ring_len;
	bool ring_sent;
	unsigned ring_num;       /* entries per virtqueue */
	unsigned ind_stride;     /* descriptors per indirect table */
	size_t queue_bytes;      /* bytes per virtqueue block */
	int n_vrings;
	void *zero_buf;          /* VU_ZERO_BUF zeroes inside the rings region, or NULL */
	bool mem_live;           /* start sent the mem table: maps go to the back-end at once */

	/* Mapped regions: index = the core's slot. */
	unsigned hi_slot; /* 1 + highest slot ever used (atomic) */
	struct vu_region regions[VU_MAX_REGIONS];
};

enum sub_kind { SUB_RW, SUB_FLUSH, SUB_RANGE, SUB_ZERO_WRITE };

/* Per ring head (private): which request a virtio request belongs to. */
struct vu_sub {
	struct vd_request *r;
	uint16_t ndesc;
	uint8_t kind;
};

struct vu_req;

/* Per queue (q->priv). */
struct vu_queue {
	struct vdiskq *q;
	int vring;
	bool ring_set;     /* the back-end knows this vring */
	bool poll;
	bool notify_on;    /* completion fd enabled: keep notifications on */
	bool dead;         /* this queue failed its requests after the back-end died */
	unsigned num, mask;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t *used_event;  /* &avail->ring[num] */
	uint16_t *avail_event; /* after used->ring[num] */
	struct vu_slot_area *area;
	struct vring_desc *ind; /* indirect tables, ind_stride per head, or NULL */
	unsigned ind_stride;

	uint16_t avail_idx;       /* next avail entry we write */
	uint16_t avail_published; /* what the device has seen */
	uint16_t last_used;
	uint16_t free_head;
	unsigned num_free;
	uint16_t *next;           /* private descriptor chain / free list */
	struct vu_sub *subs;      /* per head */
	unsigned subs_inflight;

	int kick_fd;
	int call_fd;       /* what the back-end writes: completion_fd or own_call_fd */
	int own_call_fd;   /* private eventfd: used while the completion fd is off */
	int hint;                 /* region slot of the last lookup */

	struct vu_req *wait_head, **wait_tail; /* requests waiting for ring room */
};

enum { STAGE_MAIN, STAGE_FLUSH };

/* Per request (r->priv). */
struct vu_req {
	struct vu_req *wait_next;
	uint64_t cursor, end; /* range ops: next byte, end */
	uint32_t wz_flags;    /* virtio write-zeroes flags */
	unsigned inflight;    /* subs in the ring */
	int err;              /* first error (positive errno), 0: none */
	uint8_t stage;
	bool main_issued;     /* rw / flush: the single sub went out */
	bool flush_after;
	bool zero_fallback;
	bool waiting;
	bool msg_set;
};

static const struct vd_prop vu_props[] = {
	{ .name = "event-idx", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, prop_event_idx) },
	{ .name = "indirect-desc", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, prop_indirect) },
	{ .name = "mem-slots", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, prop_mem_slots) },
	{ .name = "discard", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, prop_discard) },
	{ .name = "write-zeroes", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, prop_write_zeroes) },
	{ .name = "strict-used-len", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, strict_used_len) },
	{ .name = "reply-timeout", .type = VD_PROP_INT, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct vu_state, reply_timeout), .min = 1, .max = 3600 },
	{ .name = "can-flush", .type = VD_PROP_BOOL, .read_states = VD_CONNECTED | VD_STARTED,
	  .write_states = VD_NEVER, .in_driver = true, .offset = offsetof(struct vu_state, can_flush) },
	{ .name = "can-discard", .type = VD_PROP_BOOL, .read_states = VD_CONNECTED | VD_STARTED,
	  .write_states = VD_NEVER, .in_driver = true, .offset = offsetof(struct vu_state, can_discard) },
	{ .name = "can-write-zeroes", .type = VD_PROP_BOOL, .read_states = VD_CONNECTED | VD_STARTED,
	  .write_states = VD_NEVER, .in_driver = true, .offset = offsetof(struct vu_state, can_write_zeroes) },
	{ .name = NULL },
};

static inline struct vu_req *req_priv(struct vd_request *r)
{
	return (struct vu_req *)r->priv;
}

static inline struct vd_request *req_of(struct vu_req *p)
{
	return (struct vd_request *)((char *)p - offsetof(struct vd_request, priv));
}

static const char *op_name(enum vd_op op)
{
	static const char *const names[] = { "read", "write", "flush", "discard", "write-zeroes" };

	return names[op];
}

static const char *request_name(uint32_t req)
{
	switch (req) {
	case VHU_GET_FEATURES: return "GET_FEATURES";
	case VHU_SET_FEATURES: return "SET_FEATURES";
	case VHU_SET_OWNER: return "SET_OWNER";
	case VHU_SET_MEM_TABLE: return "SET_MEM_TABLE";
	case VHU_SET_VRING_NUM: return "SET_VRING_NUM";
	case VHU_SET_VRING_ADDR: return "SET_VRING_ADDR";
	case VHU_SET_VRING_BASE: return "SET_VRING_BASE";
	case VHU_GET_VRING_BASE: return "GET_VRING_BASE";
	case VHU_SET_VRING_KICK: return "SET_VRING_KICK";
	case VHU_SET_VRING_CALL: return "SET_VRING_CALL";
	case VHU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
	case VHU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
	case VHU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
	case VHU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
	case VHU_GET_CONFIG: return "GET_CONFIG";
	case VHU_GET_MAX_MEM_SLOTS: return "GET_MAX_MEM_SLOTS";
	case VHU_ADD_MEM_REG: return "ADD_MEM_REG";
	case VHU_REM_MEM_REG: return "REM_MEM_REG";
	}
	return "?";
}

static bool is_dead(struct vu_state *s)
{
	return __atomic_load_n(&s->dead, __ATOMIC_ACQUIRE) != 0;
}

static void wake_one(int fd)
{
	uint64_t one = 1;
	ssize_t n = write(fd, &one, sizeof(one));

	(void)n; /* EAGAIN: the counter is saturated, so the fd is readable anyway */
}

/*
 * The back-end is gone (or broke the protocol): remember why (first reason
 * wins) and wake every queue so nobody sleeps on a call fd that will never
 * be written again.  Any thread.
 */
static void mark_dead(struct vu_state *s, const char *fmt, ...) VD_PRINTF(2, 3);
static void mark_dead(struct vu_state *s, const char *fmt, ...)
{
	va_list ap;

	if (!s->dead_lock_ok)
		return;
	pthread_mutex_lock(&s->dead_lock);
	if (!s->dead) {
		va_start(ap, fmt);
		vsnprintf(s->dead_msg, sizeof(s->dead_msg), fmt, ap);
		va_end(ap);
		__atomic_store_n(&s->dead, 1, __ATOMIC_RELEASE);
		/*
		 * Hang up (the fd stays open until destroy): the queues fail their
		 * requests now, so a back-end that broke the protocol or stopped
		 * answering must stop using the rings and the caller's buffers.
		 */
		if (s->sock >= 0)
			shutdown(s->sock, SHUT_RDWR);
		for (int i = 0; i < VU_MAX_QUEUES; i++)
			for (int k = 0; k < 2; k++)
				if (s->wake_fds[i][k] >= 0)
					wake_one(s->wake_fds[i][k]);
	}
	pthread_mutex_unlock(&s->dead_lock);
}

/* The fds a queue may sleep on (-1: none); written at once if already dead. */
static void set_wake_fds(struct vu_state *s, int vring, int fd0, int fd1)
{
	pthread_mutex_lock(&s->dead_lock);
	s->wake_fds[vring][0] = fd0;
	s->wake_fds[vring][1] = fd1;
	for (int k = 0; k < 2 && s->dead; k++)
		if (s->wake_fds[vring][k] >= 0)
			wake_one(s->wake_fds[vring][k]);
	pthread_mutex_unlock(&s->dead_lock);
}

/* ==== 2. control channel ======================================================= */

static int64_t ms_until(const struct timespec *deadline)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
}

/* Wait for the socket to be ready for events; 0, or -errno (ETIMEDOUT). */
static int sock_wait(int fd, short events, const struct timespec *deadline)
{
	for (;;) {
		struct pollfd pfd = { .fd = fd, .events = events };
		int64_t ms = ms_until(deadline);
		int r;

		if (ms <= 0)
			return -ETIMEDOUT;
		r = poll(&pfd, 1, ms > INT_MAX ? INT_MAX : (int)ms);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -ETIMEDOUT;
		if (pfd.revents & (events | POLLHUP | POLLERR | POLLNVAL))
			return 0; /* the read/write itself reports a hangup */
	}
}

/* Send one message (header + payload, fds attached to it).  0 or -errno; the caller marks dead. */
static int vhu_send(struct vu_state *s, uint32_t req, uint32_t flags, const void *payload, uint32_t size,
		    const int *fds, int nfds, const struct timespec *deadline)
{
	struct vhu_hdr hdr = { .request = req, .flags = VHU_VERSION | flags, .size = size };
	union {
		char buf[CMSG_SPACE(sizeof(int) * VHU_MEM_TABLE_MAX)];
		struct cmsghdr align;
	} ctl;
	struct iovec iov[2] = { { &hdr, sizeof(hdr) }, { (void *)payload, size } };
	struct msghdr msg = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
	size_t total = sizeof(hdr) + size, sent = 0;
	bool fds_sent = false;

	if (nfds > VHU_MEM_TABLE_MAX)
		return -EINVAL;
	while (sent < total) {
		ssize_t n;
		int ret;

		if (nfds > 0 && !fds_sent) {
			struct cmsghdr *c;

			memset(&ctl, 0, sizeof(ctl));
			msg.msg_control = ctl.buf;
			msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
			c = CMSG_FIRSTHDR(&msg);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
			memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
		} else {
			msg.msg_control = NULL;
			msg.msg_controllen = 0;
		}
		n = sendmsg(s->sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				ret = sock_wait(s->sock, POLLOUT, deadline);
				if (ret < 0)
					return ret;
				continue;
			}
			return -errno;
		}
		fds_sent = true;
		sent += (size_t)n;
		/* Advance the iovecs past what went out. */
		while (n > 0 && msg.msg_iovlen > 0) {
			if ((size_t)n >= msg.msg_iov[0].iov_len) {
				n -= (ssize_t)msg.msg_iov[0].iov_len;
				msg.msg_iov++;
				msg.msg_iovlen--;
			} else {
				msg.msg_iov[0].iov_base = (char *)msg.msg_iov[0].iov_base + n;
				msg.msg_iov[0].iov_len -= (size_t)n;
				n = 0;
			}
		}
	}
	return 0;
}

/* Read exactly len bytes; fds that arrive are closed (we never expect any). */
static int recv_all(struct vu_state *s, void *buf, size_t len, const struct timespec *deadline)
{
	size_t got = 0;

	while (got < len) {
		union {
			char buf[CMSG_SPACE(sizeof(int) * VHU_MEM_TABLE_MAX)];
			struct cmsghdr align;
		} ctl;
		struct iovec iov = { (char *)buf + got, len - got };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
				      .msg_controllen = sizeof(ctl.buf) };
		ssize_t n = recvmsg(s->sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		int ret;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				ret = sock_wait(s->sock, POLLIN, deadline);
				if (ret < 0)
					return ret;
				continue;
			}
			return -errno;
		}
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				int fd;

				for (size_t i = 0; i < nfd; i++) {
					memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					close(fd);
				}
			}
		}
		if (n == 0)
			return -ECONNRESET;
		got += (size_t)n;
	}
	return 0;
}

static void deadline_in(struct timespec *d, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, d);
	d->tv_sec += ms / 1000;
	d->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (d->tv_nsec >= 1000000000L) {
		d->tv_nsec -= 1000000000L;
		d->tv_sec++;
	}
}

/*
 * One transaction: send req, then, if reply is given, read a reply of
 * exactly reply_size bytes.  With ack (and REPLY_ACK negotiated), ask for
 * and check an ack instead.
 * Returns 0 or -errno with the error message set ("who: ..."); transport
 * failures mark the instance dead.
 */
static int vhu_call(struct vu_state *s, const char *who, uint32_t req, const void *payload, uint32_t size,
		    const int *fds, int nfds, bool ack, void *reply, uint32_t reply_size)
{
	struct timespec deadline;
	struct vhu_hdr hdr;
	uint32_t flags = 0;
	bool want_ack = ack && s->reply_ack && !reply;
	union {
		uint64_t u64;
		char buf[VHU_MAX_PAYLOAD];
	} in;
	int ret;

	if (is_dead(s))
		return vd_error(EIO, "%s: %s: the vhost-user back-end is disconnected (%s)", who, request_name(req),
				s->dead_msg);
	if (want_ack)
		flags |= VHU_FLAG_NEED_REPLY;
	deadline_in(&deadline, s->reply_timeout * 1000);
	pthread_mutex_lock(&s->conn_lock);
	ret = vhu_send(s, req, flags, payload, size, fds, nfds, &deadline);
	if (ret < 0) {
		pthread_mutex_unlock(&s->conn_lock);
		mark_dead(s, "sending %s failed: %s", request_name(req), strerror(-ret));
		return vd_error(EIO, "%s: sending %s to the vhost-user back-end failed: %s", who, request_name(req),
				strerror(-ret));
	}
	if (!reply && !want_ack) {
		pthread_mutex_unlock(&s->conn_lock);
		return 0;
	}
	ret = recv_all(s, &hdr, sizeof(hdr), &deadline);
	if (ret == 0 && hdr.size > sizeof(in.buf))
		ret = -EPROTO;
	if (ret == 0)
		ret = recv_all(s, in.buf, hdr.size, &deadline);
	pthread_mutex_unlock(&s->conn_lock);
	if (ret < 0) {
		const char *why = ret == -ECONNRESET ? "the back-end closed the connection"
			       : ret == -ETIMEDOUT ? "no reply in time (a back-end that serves one front-end at a "
						     "time answers only once the other one leaves)"
			       : ret == -EPROTO ? "reply too large" : strerror(-ret);

		mark_dead(s, "waiting for the reply to %s: %s", request_name(req), why);
		return vd_error(ret == -ETIMEDOUT ? ETIMEDOUT : EIO, "%s: %s: %s", who, request_name(req), why);
	}
	if (hdr.request != req || !(hdr.flags & VHU_FLAG_REPLY) || (hdr.flags & VHU_VERSION_MASK) != VHU_VERSION) {
		mark_dead(s, "protocol error: bad reply to %s", request_name(req));
		return vd_error(EPROTO, "%s: %s: the back-end sent a reply for request %u (flags 0x%x)", who,
				request_name(req), hdr.request, hdr.flags);
	}
	if (want_ack) {
		if (hdr.size != sizeof(uint64_t)) {
			mark_dead(s, "protocol error: bad ack to %s", request_name(req));
			return vd_error(EPROTO, "%s: %s: ack of %u bytes", who, request_name(req), hdr.size);
		}
		if (in.u64 != 0)
			return vd_error(EIO, "%s: the vhost-user back-end rejected %s (status %" PRIu64 ")", who,
					request_name(req), in.u64);
		return 0;
	}
	if (hdr.size != reply_size) {
		if (req == VHU_GET_CONFIG && hdr.size <= offsetof(struct vhu_config, cfg))
			return vd_error(EIO, "%s: the vhost-user back-end refused GET_CONFIG", who);
		mark_dead(s, "protocol error: %u-byte reply to %s", hdr.size, request_name(req));
		return vd_error(EPROTO, "%s: %s: expected a %u-byte reply, got %u bytes", who, request_name(req),
				reply_size, hdr.size);
	}
	memcpy(reply, in.buf, reply_size);
	return 0;
}

static int vhu_get_u64(struct vu_state *s, const char *who, uint32_t req, uint64_t *value)
{
	return vhu_call(s, who, req, NULL, 0, NULL, 0, false, value, sizeof(*value));
}

static int vhu_set_u64(struct vu_state *s, const char *who, uint32_t req, uint64_t value)
{
	return vhu_call(s, who, req, &value, sizeof(value), NULL, 0, true, NULL, 0);
}

static int vhu_vring_state(struct vu_state *s, const char *who, uint32_t req, unsigned vring, unsigned num)
{
	struct vhu_vring_state st = { .index = vring, .num = num };

	return vhu_call(s, who, req, &st, sizeof(st), NULL, 0, true, NULL, 0);
}

static int vhu_vring_fd(struct vu_state *s, const char *who, uint32_t req, unsigned vring, int fd)
{
	uint64_t u = vring & VHU_VRING_IDX_MASK;

	if (fd < 0)
		u |= VHU_VRING_NOFD;
	return vhu_call(s, who, req, &u, sizeof(u), fd >= 0 ? &fd : NULL, fd >= 0, true, NULL, 0);
}

/* ==== 3. connection ============================================================ */

/* Wait for the back-end to hang up (or for destroy); then wake everyone. */
static void *monitor_main(void *arg)
{
	struct vu_state *s = arg;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = s->sock, .events = POLLRDHUP },
			{ .fd = s->monitor_stop_fd, .events = POLLIN },
		};
		int r = poll(pfd, 2, -1);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (pfd[1].revents)
			break;
		if (pfd[0].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
			mark_dead(s, "the back-end closed the connection");
			break;
		}
	}
	return NULL;
}

static int monitor_start(struct vu_state *s, const char *who)
{
	int ret;

	s->monitor_stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->monitor_stop_fd < 0)
		return vd_error(errno, "%s: eventfd: %s", who, strerror(errno));
	ret = pthread_create(&s->monitor, NULL, monitor_main, s);
	if (ret) {
		close(s->monitor_stop_fd);
		s->monitor_stop_fd = -1;
		return vd_error(ret, "%s: cannot start the connection monitor thread: %s", who, strerror(ret));
	}
	s->monitor_running = true;
	return 0;
}

static void monitor_stop(struct vu_state *s)
{
	if (s->monitor_running) {
		wake_one(s->monitor_stop_fd);
		pthread_join(s->monitor, NULL);
		s->monitor_running = false;
	}
	if (s->monitor_stop_fd >= 0)
		close(s->monitor_stop_fd);
	s->monitor_stop_fd = -1;
}

static int vu_init(struct vdisk *v)
{
	struct vu_state *s = vd_priv(v);

	s->prop_event_idx = true;
	s->prop_indirect = true;
	s->prop_mem_slots = true;
	s->prop_discard = true;
	s->prop_write_zeroes = true;
	s->reply_timeout = VU_REPLY_TIMEOUT_S;
	s->sock = -1;
	s->ring_fd = -1;
	s->monitor_stop_fd = -1;
	for (int i = 0; i < VU_MAX_QUEUES; i++)
		s->wake_fds[i][0] = s->wake_fds[i][1] = -1;
	for (int i = 0; i < VU_MAX_REGIONS; i++)
		s->regions[i].fd = -1;
	if (pthread_mutex_init(&s->conn_lock, NULL) == 0)
		s->conn_lock_ok = true;
	if (pthread_mutex_init(&s->dead_lock, NULL) == 0)
		s->dead_lock_ok = true;
	if (!s->conn_lock_ok || !s->dead_lock_ok) {
		if (s->conn_lock_ok)
			pthread_mutex_destroy(&s->conn_lock);
		if (s->dead_lock_ok)
			pthread_mutex_destroy(&s->dead_lock);
		return vd_error(ENOMEM, "vdisk_create: virtio-blk-vhost-user: cannot create a mutex");
	}
	return 0;
}

/* Handshake steps (each sets the error message and returns -errno on failure). */

static int step_socket(struct vdisk *v, const char *who)
{
	struct vu_state *s = vd_priv(v);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	bool have_path = v->path && *v->path;

	if (have_path == (v->fd >= 0))
		return vd_error(EINVAL, "%s: set 'path' (the back-end's vhost-user socket) or 'fd' (a connected "
					"socket), not %s", who, have_path ? "both" : "neither");
	if (v->fd >= 0) {
		s->sock = fcntl(v->fd, F_DUPFD_CLOEXEC, 0);
		if (s->sock < 0)
			return vd_error(errno, "%s: dup(fd %d): %s", who, v->fd, strerror(errno));
		snprintf(s->target, sizeof(s->target), "fd %d", v->fd);
		return 0;
	}
	if (strlen(v->path) >= sizeof(sa.sun_path))
		return vd_error(ENAMETOOLONG, "%s: socket path '%s' is longer than %zu bytes", who, v->path,
				sizeof(sa.sun_path) - 1);
	memcpy(sa.sun_path, v->path, strlen(v->path) + 1);
	snprintf(s->target, sizeof(s->target), "%s", v->path);
	s->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->sock < 0)
		return vd_error(errno, "%s: socket: %s", who, strerror(errno));
	while (connect(s->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = errno;

		if (err == EINTR)
			continue;
		close(s->sock);
		s->sock = -1;
		return vd_error(err, "%s: cannot connect to the vhost-user socket '%s': %s%s", who, v->path,
				strerror(err), err == ECONNREFUSED ? " (is the back-end running?)" : "");
	}
	return 0;
}

static int step_features(struct vdisk *v, const char *who)
{
	struct vu_state *s = vd_priv(v);
	uint64_t offered, want;
	int ret;

	ret = vhu_call(s, who, VHU_SET_OWNER, NULL, 0, NULL, 0, false, NULL, 0);
	if (ret == 0)
		ret = vhu_get_u64(s, who, VHU_GET_FEATURES, &offered);
	if (ret < 0)
		return ret;
	want = BIT(VIRTIO_F_VERSION_1) | BIT(VHOST_USER_F_PROTOCOL_FEATURES) | BIT(VIRTIO_BLK_F_SIZE_MAX) |
	       BIT(VIRTIO_BLK_F_SEG_MAX) | BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_FLUSH) |
	       BIT(VIRTIO_BLK_F_MQ) | BIT(VIRTIO_BLK_F_RO) | BIT(VIRTIO_BLK_F_TOPOLOGY);
	if (s->prop_discard)
		want |= BIT(VIRTIO_BLK_F_DISCARD);
	if (s->prop_write_zeroes)
		want |= BIT(VIRTIO_BLK_F_WRITE_ZEROES);
	if (s->prop_event_idx)
		want |= BIT(VIRTIO_RING_F_EVENT_IDX);
	if (s->prop_indirect)
		want |= BIT(VIRTIO_RING_F_INDIRECT_DESC);
	s->features = offered & want;
	s->event_idx = s->features & BIT(VIRTIO_RING_F_EVENT_IDX);
	s->indirect = s->features & BIT(VIRTIO_RING_F_INDIRECT_DESC);
	return 0;
}

static int step_protocol(struct vdisk *v, const char *who)
{
	struct vu_state *s = vd_priv(v);
	uint64_t offered;
	int ret;

	if (!(s->features & BIT(VHOST_USER_F_PROTOCOL_FEATURES)))
		return 0;
	ret = vhu_get_u64(s, who, VHU_GET_PROTOCOL_FEATURES, &offered);
	if (ret < 0)
		return ret;
	s->proto_features = offered & (BIT(VHU_PF_MQ) | BIT(VHU_PF_REPLY_ACK) | BIT(VHU_PF_CONFIG) |
				       (s->prop_mem_slots ? BIT(VHU_PF_CONFIGURE_MEM_SLOTS) : 0));
	ret = vhu_set_u64(s, who, VHU_SET_PROTOCOL_FEATURES, s->proto_features);
	if (ret < 0)
		return ret;
	s->reply_ack = s->proto_features & BIT(VHU_PF_REPLY_ACK);
	/*
	 * ADD/REM_MEM_REG replies differ between back-end versions unless the
	 * front-end asks for one (NEED_REPLY), so use them only with REPLY_ACK.
	 */
	s->mem_slots = (s->proto_features & BIT(VHU_PF_CONFIGURE_MEM_SLOTS)) && s->reply_ack;
	return 0;
}

static int step_limits(struct vdisk *v, const char *who)
{
	struct vu_state *s = vd_priv(v);
	uint64_t queues = 1, slots = VHU_MEM_TABLE_MAX;
	struct vhu_config cfg_req = { .offset = 0, .size = sizeof(struct virtio_blk_config), .flags = 0 };
	struct vhu_config cfg_rep;
	struct virtio_blk_config *c = &cfg_rep.cfg;
	uint32_t seg_max, blk;
	int ret;

	if (s->proto_features & BIT(VHU_PF_MQ)) {
		ret = vhu_get_u64(s, who, VHU_GET_QUEUE_NUM, &queues);
		if (ret < 0)
			return ret;
	}
	if (s->mem_slots) {
		ret = vhu_get_u64(s, who, VHU_GET_MAX_MEM_SLOTS, &slots);
		if (ret < 0)
			return ret;
		if (slots < 2)
			s->mem_slots = false; /* no room for rings + one buffer: use SET_MEM_TABLE */
	}
	if (!s->mem_slots)
		slots = VHU_MEM_TABLE_MAX;
	ret = vhu_set_u64(s, who, VHU_SET_FEATURES, s->features);
	if (ret < 0)
		return ret;
	if (!(s->proto_features & BIT(VHU_PF_CONFIG)))
		return vd_error(ENOTSUP, "%s: the vhost-user back-end at %s does not expose the virtio-blk "
					 "configuration space (protocol feature CONFIG), so the disk size is unknown",
				who, s->target);
	ret = vhu_call(s, who, VHU_GET_CONFIG, &cfg_req, sizeof(cfg_req), NULL, 0, false, &cfg_rep, sizeof(cfg_rep));
	if (ret < 0)
		return ret;

	if ((s->features & BIT(VIRTIO_BLK_F_RO)) && !v->read_only)
		return vd_error(EROFS, "%s: the vhost-user back-end at %s exports the disk read-only; set read-only=true",
				who, s->target);

	blk = VIRTIO_BLK_SECTOR;
	if ((s->features & BIT(VIRTIO_BLK_F_BLK_SIZE)) && c->blk_size >= VIRTIO_BLK_SECTOR &&
	    c->blk_size <= 65536 && !(c->blk_size & (c->blk_size - 1)))
		blk = c->blk_size;
	s->blk_size = blk;
	seg_max = (s->features & BIT(VIRTIO_BLK_F_SEG_MAX)) && c->seg_max ? c->seg_max : 1;
	if (seg_max > VU_RING_MAX - 2)
		seg_max = VU_RING_MAX - 2;
	if (seg_max > IOV_MAX)
		seg_max = IOV_MAX;
	s->size_max = (s->features & BIT(VIRTIO_BLK_F_SIZE_MAX)) ? c->size_max : 0;

	s->can_flush = s->features & BIT(VIRTIO_BLK_F_FLUSH);
	s->can_discard = s->features & BIT(VIRTIO_BLK_F_DISCARD);
	s->can_write_zeroes = s->features & BIT(VIRTIO_BLK_F_WRITE_ZEROES);
	s->max_discard = s->can_discard && c->max_discard_sectors ? c->max_discard_sectors : UINT32_MAX;
	s->discard_align = s->can_discard ? c->discard_sector_alignment : 0;
	s->max_wz = s->can_write_zeroes && c->max_write_zeroes_sectors ? c->max_write_zeroes_sectors : UINT32_MAX;

	/* Sizes are off_t (signed 64-bit) to every user of the capacity. */
	if (c->capacity > (uint64_t)INT64_MAX / VIRTIO_BLK_SECTOR)
		return vd_error(EPROTO, "%s: the back-end reports an impossible capacity of %" PRIu64 " sectors", who,
				c->capacity);
	v->capacity = c->capacity * VIRTIO_BLK_SECTOR;
	v->request_alignment = (int)blk;
	v->buf_alignment = 1;
	v->optimal_buf_alignment = 64;
	v->optimal_io_alignment = (int)blk;
	v->optimal_io_size = (int)blk;
	if (s->features & BIT(VIRTIO_BLK_F_TOPOLOGY)) {
		uint64_t phys = (uint64_t)blk << (c->physical_block_exp < 16 ? c->physical_block_exp : 0);
		uint64_t opt = (uint64_t)c->opt_io_size * blk;

		if (phys <= 65536)
			v->optimal_io_alignment = (int)phys;
		if (opt > (uint64_t)v->optimal_io_size && opt <= (1u << 30))
			v->optimal_io_size = (int)opt;
	}
	v->max_segments = (int)seg_max;
	v->max_transfer = VU_MAX_TRANSFER;
	if (s->size_max && s->size_max < (uint32_t)v->max_transfer) {
		/* size_max bounds every segment; the request as a whole is the safe unit. */
		uint32_t mt = s->size_max / blk * blk;

		v->max_transfer = (int)(mt ? mt : blk);
	}
	if (!(s->features & BIT(VIRTIO_BLK_F_MQ)) || c->num_queues == 0)
		v->max_queues = 1;
	else
		v->max_queues = c->num_queues;
	if (s->proto_features & BIT(VHU_PF_MQ) && queues < (uint64_t)v->max_queues)
		v->max_queues = queues ? (int)queues : 1;
	if (v->max_queues > VU_MAX_QUEUES)
		v->max_queues = VU_MAX_QUEUES;
	v->needs_mem_regions = true;
	v->max_mem_regions = slots - 1 < VU_MAX_REGIONS ? slots - 1 : VU_MAX_REGIONS;
	v->mem_region_alignment = (uint64_t)sysconf(_SC_PAGESIZE);
	v->can_poll = true;
	v->dev_fd = -1;
	return 0;
}

static void close_connection(struct vu_state *s)
{
	monitor_stop(s);
	if (s->sock >= 0)
		close(s->sock);
	s->sock = -1;
}

static int vu_connect(struct vdisk *v)
{
	static const char who[] = "vdisk_connect: virtio-blk-vhost-user";
	static int (*const steps[])(struct vdisk *, const char *) = {
		step_socket, step_features, step_protocol, step_limits,
	};
	struct vu_state *s = vd_priv(v);
	int ret;

	/* A failed connect may be retried: start from a clean slate. */
	s->dead = 0;
	s->dead_msg[0] = '\0';
	s->features = s->proto_features = 0;
	s->reply_ack = s->mem_slots = false;
	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		ret = steps[i](v, who);
		if (ret < 0)
			goto fail;
	}
	ret = monitor_start(s, who);
	if (ret < 0)
		goto fail;
	return 0;

fail:
	close_connection(s);
	return ret;
}

static void free_rings(struct vu_state *s)
{
	if (s->ring_mem)
		munmap(s->ring_mem, s->ring_len);
	if (s->ring_fd >= 0)
		close(s->ring_fd);
	s->ring_mem = NULL;
	s->ring_fd = -1;
	s->ring_len = 0;
	s->zero_buf = NULL;
	s->ring_sent = false;
}

static void vu_destroy(struct vdisk *v)
{
	struct vu_state *s = vd_priv(v);

	close_connection(s);
	free_rings(s);
	pthread_mutex_destroy(&s->conn_lock);
	pthread_mutex_destroy(&s->dead_lock);
	s->conn_lock_ok = s->dead_lock_ok = false;
}

/* ==== 4. memory ================================================================ */

static struct vhu_mem_region wire_region(uintptr_t addr, size_t len, int64_t off)
{
	/* Identity mapping: guest physical address = our address. */
	return (struct vhu_mem_region){ .guest_phys_addr = addr, .memory_size = len, .userspace_addr = addr,
					.mmap_offset = (uint64_t)off };
}

/* SET_MEM_TABLE with the rings region and every mapped region except skip_slot. */
static int send_mem_table(struct vu_state *s, const char *who, int skip_slot)
{
	struct vhu_mem_table t;
	int fds[VHU_MEM_TABLE_MAX];
	unsigned n = 0;
	int ret;

	memset(&t, 0, sizeof(t));
	if (s->ring_mem) {
		t.regions[n] = wire_region((uintptr_t)s->ring_mem, s->ring_len, 0);
		fds[n++] = s->ring_fd;
	}
	for (int i = 0; i < VU_MAX_REGIONS; i++) {
		struct vu_region *g = &s->regions[i];

		if (i == skip_slot || g->fd < 0)
			continue;
		if (n == VHU_MEM_TABLE_MAX)
			return vd_error(ENOSPC, "%s: more than %d memory regions", who, VHU_MEM_TABLE_MAX - 1);
		t.regions[n] = wire_region(g->addr, g->size, g->fd_offset);
		fds[n++] = g->fd;
	}
	t.nregions = n;
	ret = vhu_call(s, who, VHU_SET_MEM_TABLE, &t, (uint32_t)(offsetof(struct vhu_mem_table, regions) +
								 n * sizeof(struct vhu_mem_region)),
		       fds, (int)n, true, NULL, 0);
	if (ret < 0)
		return ret;
	s->ring_sent = s->ring_mem != NULL;
	for (int i = 0; i < VU_MAX_REGIONS; i++)
		s->regions[i].sent = i != skip_slot && s->regions[i].fd >= 0;
	return 0;
}

static int add_mem_reg(struct vu_state *s, const char *who, uintptr_t addr, size_t len, int fd, int64_t off)
{
	struct vhu_single_region m = { .padding = 0, .region = wire_region(addr, len, off) };

	return vhu_call(s, who, VHU_ADD_MEM_REG, &m, sizeof(m), &fd, 1, true, NULL, 0);
}

static int rem_mem_reg(struct vu_state *s, const char *who, uintptr_t addr, size_t len, int64_t off)
{
	struct vhu_single_region m = { .padding = 0, .region = wire_region(addr, len, off) };

	return vhu_call(s, who, VHU_REM_MEM_REG, &m, sizeof(m), NULL, 0, true, NULL, 0);
}

static int vu_map_mem_region(struct vdisk *v, const struct vdisk_mem_region *r, int slot)
{
	static const char who[] = "vdisk_map_mem_region: virtio-blk-vhost-user";
	struct vu_state *s = vd_priv(v);
	struct vu_region *g;
	int ret;

	if (slot < 0 || slot >= VU_MAX_REGIONS)
		return vd_error(ENOSPC, "%s: no region slot %d", who, slot);
	if (r->fd < 0)
		return vd_error(EINVAL, "%s: the region has no file descriptor; the vhost-user back-end can only "
					"access memory from vdisk_alloc_mem_region()", who);
	if (r->fd_offset < 0)
		return vd_error(EINVAL, "%s: negative fd_offset", who);
	g = &s->regions[slot];
	g->fd = r->fd;
	g->fd_offset = r->fd_offset;
	g->addr = (uintptr_t)r->addr;
	g->size = r->len;
	g->sent = false;
	if (s->mem_live) {
		if (s->mem_slots)
			ret = add_mem_reg(s, who, g->addr, g->size, g->fd, g->fd_offset);
		else
			ret = send_mem_table(s, who, -1);
		if (ret < 0) {
			g->fd = -1;
			g->sent = false;
			return ret;
		}
		g->sent = true;
	}
	/* Publish to the queue threads (lookups read start with acquire). */
	__atomic_store_n(&g->len, g->size, __ATOMIC_RELAXED);
	__atomic_store_n(&g->start, g->addr, __ATOMIC_RELEASE);
	if ((unsigned)slot + 1 > __atomic_load_n(&s->hi_slot, __ATOMIC_RELAXED))
		__atomic_store_n(&s->hi_slot, (unsigned)slot + 1, __ATOMIC_RELEASE);
	return 0;
}

static void vu_unmap_mem_region(struct vdisk *v, const struct vdisk_mem_region *r, int slot)
{
	static const char who[] = "vdisk_unmap_mem_region: virtio-blk-vhost-user";
	struct vu_state *s = vd_priv(v);
	struct vu_region *g;

	(void)r;
	if (slot < 0 || slot >= VU_MAX_REGIONS)
		return;
	g = &s->regions[slot];
	if (g->fd < 0)
		return;
	__atomic_store_n(&g->start, 0, __ATOMIC_RELEASE); /* new requests fail with -EFAULT */
	if (g->sent && !is_dead(s)) {
		int ret = s->mem_slots ? rem_mem_reg(s, who, g->addr, g->size, g->fd_offset)
				       : send_mem_table(s, who, slot);

		/*
		 * Transport failures already killed the connection; a rejection must
		 * too: the back-end still maps memory the caller frees or maps anew
		 * (maybe at the same address), and would read and write the stale pages.
		 */
		if (ret < 0)
			mark_dead(s, "the back-end did not drop an unmapped memory region");
	}
	g->fd = -1;
	g->sent = false;
}

/* Slot of the mapped region holding [addr, addr+len), or -1.  Queue threads. */
static int region_lookup(struct vu_state *s, struct vu_queue *vq, const void *addr, size_t len)
{
	uintptr_t a = (uintptr_t)addr;
	unsigned hi = __atomic_load_n(&s->hi_slot, __ATOMIC_ACQUIRE);
	int hint = vq->hint;

	if (hint >= 0 && (unsigned)hint < hi) {
		uintptr_t st = __atomic_load_n(&s->regions[hint].start, __ATOMIC_ACQUIRE);
		size_t l = __atomic_load_n(&s->regions[hint].len, __ATOMIC_RELAXED);

		if (st && a >= st && a - st <= l && len <= l - (a - st))
			return hint;
	}
	for (unsigned i = 0; i < hi; i++) {
		uintptr_t st = __atomic_load_n(&s->regions[i].start, __ATOMIC_ACQUIRE);
		size_t l = __atomic_load_n(&s->regions[i].len, __ATOMIC_RELAXED);

		if (st && a >= st && a - st <= l && len <= l - (a - st)) {
			vq->hint = (int)i;
			return (int)i;
		}
	}
	return -1;
}

/* ==== 5. virtqueues ============================================================= */

static size_t align_up(size_t x, size_t a)
{
	return (x + a - 1) / a * a;
}

/* Offsets inside one virtqueue block. */
struct vq_layout {
	size_t desc, avail, used, area, ind, total;
};

static struct vq_layout vq_layout(unsigned num, unsigned ind_stride)
{
	struct vq_layout l;

	l.desc = 0;
	l.avail = align_up(l.desc + sizeof(struct vring_desc) * num, 64);
	l.used = align_up(l.avail + 4 + 2 * (size_t)num + 2, 64);
	l.area = align_up(l.used + 4 + sizeof(struct vring_used_elem) * num + 2, 64);
	l.ind = align_up(l.area + sizeof(struct vu_slot_area) * num, 64);
	l.total = l.ind + (size_t)num * ind_stride * sizeof(struct vring_desc);
	return l;
}

/* Publish what submit() wrote and kick the back-end if it wants to know. */
static void vq_flush(struct vu_queue *vq)
{
	uint16_t old = vq->avail_published, now = vq->avail_idx;
	bool kick;

	if (old == now)
		return;
	__atomic_store_n(&vq->avail->idx, now, __ATOMIC_RELEASE);
	vq->avail_published = now;
	/* The avail index must be visible before we read what the device wants. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (vq->avail_event)
		kick = vring_need_event(__atomic_load_n(vq->avail_event, __ATOMIC_RELAXED), now, old);
	else
		kick = !(__atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
	if (kick)
		wake_one(vq->kick_fd);
}

/*
 * Ask the device to signal the call fd for the next used entry.  Returns
 * false if entries arrived meanwhile (process them instead of sleeping).
 */
static bool vq_notify_enable(struct vu_queue *vq)
{
	if (vq->used_event)
		__atomic_store_n(vq->used_event, vq->last_used, __ATOMIC_RELAXED);
	else
		__atomic_store_n(&vq->avail->flags, 0, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE) == vq->last_used;
}

/* Back to the quiet mode (completion fd off, not sleeping). */
static void vq_notify_disable(struct vu_queue *vq)
{
	/* With event idx, a used_event the device has passed suppresses by itself. */
	if (!vq->used_event)
		__atomic_store_n(&vq->avail->flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
}

/* Take n descriptors; returns the head.  The caller checked num_free. */
static uint16_t desc_take(struct vu_queue *vq, unsigned n)
{
	uint16_t head = vq->free_head, last = head;

	for (unsigned i = 1; i < n; i++)
		last = vq->next[last];
	vq->free_head = vq->next[last];
	vq->num_free -= n;
	return head;
}

static void desc_put(struct vu_queue *vq, uint16_t head, unsigned n)
{
	uint16_t last = head;

	for (unsigned i = 1; i < n; i++)
		last = vq->next[last];
	vq->next[last] = vq->free_head;
	vq->free_head = head;
	vq->num_free += n;
}

/* Descriptors a sub with nseg data segments needs in the ring. */
static unsigned ring_descs(const struct vu_queue *vq, unsigned nseg)
{
	return vq->ind ? 1 : nseg + 2;
}

/*
 * Builder for one virtio request: the caller adds segments between
 * sub_begin() and sub_end().  Descriptors go to the indirect table of the
 * head, or are chained in the ring.
 */
struct sub_builder {
	struct vu_queue *vq;
	uint16_t head;
	unsigned n, total;     /* descriptors written / reserved */
	struct vring_desc *tab; /* indirect table, or NULL */
	uint16_t cur;           /* ring: current descriptor index */
};

static void sub_add(struct sub_builder *b, uint64_t addr, uint32_t len, uint16_t flags)
{
	struct vring_desc *d;
	bool last = b->n + 1 == b->total;

	if (b->tab) {
		d = &b->tab[b->n];
		d->next = (uint16_t)(b->n + 1);
	} else {
		d = &b->vq->desc[b->cur];
		d->next = b->vq->next[b->cur];
		if (!last)
			b->cur = b->vq->next[b->cur];
	}
	d->addr = addr;
	d->len = len;
	d->flags = (uint16_t)(flags | (last ? 0 : VRING_DESC_F_NEXT));
	b->n++;
}

/* Reserve room for a sub with nseg data segments; false if the ring is full. */
static bool sub_begin(struct sub_builder *b, struct vu_queue *vq, struct vd_request *r, enum sub_kind kind,
		      unsigned nseg, uint32_t type, uint64_t sector)
{
	unsigned need = ring_descs(vq, nseg);
	struct vu_slot_area *a;

	if (vq->num_free < need)
		return false;
	b->vq = vq;
	b->head = desc_take(vq, need);
	b->n = 0;
	b->total = nseg + 2;
	b->cur = b->head;
	b->tab = vq->ind ? &vq->ind[(size_t)b->head * vq->ind_stride] : NULL;
	vq->subs[b->head] = (struct vu_sub){ .r = r, .ndesc = (uint16_t)need, .kind = (uint8_t)kind };
	vq->subs_inflight++;
	a = &vq->area[b->head];
	a->hdr.type = type;
	a->hdr.ioprio = 0;
	a->hdr.sector = sector;
	a->status = 0xff; /* a back-end that never writes it is caught */
	sub_add(b, (uintptr_t)&a->hdr, sizeof(a->hdr), 0);
	return true;
}

static void sub_end(struct sub_builder *b)
{
	struct vu_queue *vq = b->vq;
	struct vu_slot_area *a = &vq->area[b->head];

	sub_add(b, (uintptr_t)&a->status, 1, VRING_DESC_F_WRITE);
	if (b->tab) {
		struct vring_desc *d = &vq->desc[b->head];

		d->addr = (uintptr_t)b->tab;
		d->len = b->total * (uint32_t)sizeof(struct vring_desc);
		d->flags = VRING_DESC_F_INDIRECT;
	}
	vq->avail->ring[vq->avail_idx & vq->mask] = b->head;
	vq->avail_idx++;
}

/* ==== 6. requests ============================================================== */

static void fail_req(struct vu_req *p, int err, const char *fmt, ...) VD_PRINTF(3, 4);
static void fail_req(struct vu_req *p, int err, const char *fmt, ...)
{
	struct vd_request *r = req_of(p);
	va_list ap;

	if (p->err)
		return;
	p->err = err;
	if (!p->msg_set) {
		va_start(ap, fmt);
		vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
		va_end(ap);
		p->msg_set = true;
	}
}

static void finish(struct vdiskq *q, struct vu_req *p)
{
	struct vd_request *r = req_of(p);

	if (p->err && p->msg_set)
		r->error_msg = r->msg;
	vd_req_complete(q, r, p->err ? -p->err : 0);
}

static void wait_add(struct vu_queue *vq, struct vu_req *p)
{
	if (p->waiting)
		return;
	p->waiting = true;
	p->wait_next = NULL;
	*vq->wait_tail = p;
	vq->wait_tail = &p->wait_next;
}

/* Issue the read/write sub.  false: no room. */
static bool issue_rw(struct vdisk *v, struct vu_queue *vq, struct vd_request *r)
{
	struct sub_builder b;
	unsigned nseg = 0;
	bool wr = r->op == VD_OP_WRITE;

	for (int i = 0; i < r->iovcnt; i++)
		nseg += r->iov[i].iov_len > 0;
	if (!sub_begin(&b, vq, r, SUB_RW, nseg, wr ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
		       r->offset / VIRTIO_BLK_SECTOR))
		return false;
	(void)v;
	for (int i = 0; i < r->iovcnt; i++)
		if (r->iov[i].iov_len > 0)
			sub_add(&b, (uintptr_t)r->iov[i].iov_base, (uint32_t)r->iov[i].iov_len,
				wr ? 0 : VRING_DESC_F_WRITE);
	sub_end(&b);
	return true;
}

static bool issue_flush(struct vu_queue *vq, struct vd_request *r)
{
	struct sub_builder b;

	if (!sub_begin(&b, vq, r, SUB_FLUSH, 0, VIRTIO_BLK_T_FLUSH, 0))
		return false;
	sub_end(&b);
	return true;
}

/* Bytes per discard / write-zeroes piece. */
static uint64_t range_chunk(struct vu_state *s, struct vdisk *v, bool discard)
{
	uint64_t sectors = discard ? s->max_discard : s->max_wz;
	uint64_t align = (uint64_t)v->request_alignment;
	uint64_t chunk;

	if (discard && s->discard_align > 1 && (uint64_t)s->discard_align * VIRTIO_BLK_SECTOR > align)
		align = (uint64_t)s->discard_align * VIRTIO_BLK_SECTOR;
	chunk = sectors * VIRTIO_BLK_SECTOR / align * align;
	return chunk ? chunk : align;
}

/* Issue the next piece of a range request.  false: no room. */
static bool issue_range_piece(struct vdisk *v, struct vu_queue *vq, struct vd_request *r)
{
	struct vu_state *s = vd_priv(v);
	struct vu_req *p = req_priv(r);
	struct sub_builder b;
	uint64_t left = p->end - p->cursor;

	if (p->zero_fallback) {
		uint64_t seg = VU_ZERO_BUF, n;
		unsigned nseg, max_nseg = (unsigned)v->max_segments < VU_ZERO_SEGS ? (unsigned)v->max_segments
										    : VU_ZERO_SEGS;

		if (s->size_max && s->size_max < seg)
			seg = s->size_max / VIRTIO_BLK_SECTOR * VIRTIO_BLK_SECTOR;
		if (seg == 0)
			seg = VIRTIO_BLK_SECTOR;
		n = seg * max_nseg;
		if (n > (uint64_t)v->max_transfer)
			n = (uint64_t)v->max_transfer / seg * seg;
		if (n == 0)
			n = seg;
		if (n > left)
			n = left;
		nseg = (unsigned)((n + seg - 1) / seg);
		if (!sub_begin(&b, vq, r, SUB_ZERO_WRITE, nseg, VIRTIO_BLK_T_OUT, p->cursor / VIRTIO_BLK_SECTOR))
			return false;
		for (uint64_t done = 0; done < n; done += seg)
			sub_add(&b, (uintptr_t)s->zero_buf, (uint32_t)(n - done < seg ? n - done : seg), 0);
		sub_end(&b);
		p->cursor += n;
		return true;
	} else {
		bool discard = r->op == VD_OP_DISCARD;
		uint64_t n = range_chunk(s, v, discard);
		struct vu_slot_area *a;

		if (n > left)
			n = left;
		if (!sub_begin(&b, vq, r, SUB_RANGE, 1, discard ? VIRTIO_BLK_T_DISCARD : VIRTIO_BLK_T_WRITE_ZEROES, 0))
			return false;
		a = &vq->area[b.head];
		a->dwz.sector = p->cursor / VIRTIO_BLK_SECTOR;
		a->dwz.num_sectors = (uint32_t)(n / VIRTIO_BLK_SECTOR);
		a->dwz.flags = discard ? 0 : p->wz_flags;
		sub_add(&b, (uintptr_t)&a->dwz, sizeof(a->dwz), 0);
		sub_end(&b);
		p->cursor += n;
		return true;
	}
}

/*
 * Move a request forward: issue what it may issue now, complete it when
 * everything is done.  Requests that need ring room while none of their
 * subs is in flight wait on the queue's wait list.
 */
static void advance(struct vdiskq *q, struct vu_req *p)
{
	struct vu_queue *vq = q->priv;
	struct vd_request *r = req_of(p);

	for (;;) {
		if (p->err) {
			if (p->inflight == 0)
				finish(q, p);
			return;
		}
		if (p->stage == STAGE_MAIN) {
			bool more, blocked = false;

			if (r->op == VD_OP_DISCARD || r->op == VD_OP_WRITE_ZEROES) {
				while (p->cursor < p->end && p->inflight < VU_WINDOW) {
					if (!issue_range_piece(q->v, vq, r)) {
						blocked = true;
						break;
					}
					p->inflight++;
				}
				more = p->cursor < p->end;
			} else {
				if (!p->main_issued) {
					if (r->op == VD_OP_FLUSH ? issue_flush(vq, r) : issue_rw(q->v, vq, r)) {
						p->main_issued = true;
						p->inflight++;
					} else {
						blocked = true;
					}
				}
				more = !p->main_issued;
			}
			if (more && blocked && p->inflight == 0)
				wait_add(vq, p);
			if (more || p->inflight > 0)
				return;
			if (!p->flush_after) {
				finish(q, p);
				return;
			}
			p->stage = STAGE_FLUSH;
			p->main_issued = false;
			continue;
		}
		/* STAGE_FLUSH: FUA emulated with a flush after the write. */
		if (!p->main_issued) {
			if (!issue_flush(vq, r)) {
				if (p->inflight == 0)
					wait_add(vq, p);
				return;
			}
			p->main_issued = true;
			p->inflight++;
			return;
		}
		if (p->inflight == 0)
			finish(q, p);
		return;
	}
}

/* Give waiting requests the room that completions freed. */
static void run_wait_list(struct vdiskq *q)
{
	struct vu_queue *vq = q->priv;
	struct vu_req *p;

	while ((p = vq->wait_head)) {
		vq->wait_head = p->wait_next;
		if (!vq->wait_head)
			vq->wait_tail = &vq->wait_head;
		p->waiting = false;
		advance(q, p);
		if (p->waiting)
			break; /* still no room: the rest wait too */
	}
}

static int status_errno(uint8_t status)
{
	switch (status) {
	case VIRTIO_BLK_S_OK: return 0;
	case VIRTIO_BLK_S_UNSUPP: return ENOTSUP;
	default: return EIO;
	}
}

/* One used entry: the sub at head finished, writing len bytes (the device's word). */
static void sub_done(struct vdiskq *q, uint16_t head, uint32_t len)
{
	struct vu_queue *vq = q->priv;
	struct vu_sub *sub = &vq->subs[head];
	struct vd_request *r = sub->r;
	struct vu_req *p = req_priv(r);
	uint8_t status = vq->area[head].status;
	int err = status_errno(status);
	bool rd = sub->kind == SUB_RW && r->op == VD_OP_READ;
	uint64_t writable = rd ? r->len + 1 : 1; /* read data, then the status byte */
	bool strict = ((struct vu_state *)vd_priv(q->v))->strict_used_len;

	desc_put(vq, head, sub->ndesc);
	sub->r = NULL;
	vq->subs_inflight--;
	p->inflight--;
	if (strict && len > writable) {
		fail_req(p, EIO, "vhost-user: %s at %" PRIu64 ": the back-end claims %" PRIu32 " bytes written into "
			 "%" PRIu64 " device-writable bytes", op_name(r->op), r->offset, len, writable);
	} else if (strict && rd && !err && len < r->len) {
		/*
		 * The data beyond len is not the device's (virtio 1.1 2.6.8.2): do not
		 * pass the buffer's old contents off as a successful read.  (The status
		 * byte itself is left out of the check: some back-ends do not count it.)
		 */
		fail_req(p, EIO, "vhost-user: read at %" PRIu64 ": the back-end reports only %" PRIu32 " of %" PRIu64
			 " bytes read", r->offset, len, r->len);
	} else if (err) {
		const char *what = sub->kind == SUB_FLUSH && r->op != VD_OP_FLUSH ? "flush after FUA write"
				 : sub->kind == SUB_ZERO_WRITE ? "write of zeroes (write-zeroes fallback)"
				 : op_name(r->op);

		if (status > VIRTIO_BLK_S_UNSUPP)
			fail_req(p, EIO, "vhost-user: %s at %" PRIu64 ": the back-end set no valid status (0x%02x)",
				 what, r->offset, status);
		else if (err == ENOTSUP)
			fail_req(p, ENOTSUP, "vhost-user: %s: not supported by the back-end (VIRTIO_BLK_S_UNSUPP)",
				 what);
		else
			fail_req(p, EIO, "vhost-user: %s at %" PRIu64 ": the back-end reported an I/O error "
				 "(VIRTIO_BLK_S_IOERR)", what, r->offset);
	}
	advance(q, p);
}

/* Consume the used ring.  Returns the number of entries, or -1 on a protocol violation. */
static int process_used(struct vdiskq *q)
{
	struct vu_queue *vq = q->priv;
	uint16_t used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	int n = 0;

	if ((uint16_t)(used_idx - vq->last_used) > vq->num)
		return -1;
	while (vq->last_used != used_idx) {
		struct vring_used_elem *e = &vq->used->ring[vq->last_used & vq->mask];
		uint32_t id = e->id;

		if (id >= vq->num || !vq->subs[id].r)
			return -1;
		vq->last_used++;
		sub_done(q, (uint16_t)id, e->len);
		n++;
	}
	return n;
}

/*
 * The back-end is gone: fail every request this queue holds.  Their subs
 * stay "in flight" in the ring (nobody will complete them), which is fine:
 * the queue never issues again.
 */
static void fail_all(struct vdiskq *q, const char *why)
{
	struct vu_queue *vq = q->priv;
	struct vu_req *p;

	vq->dead = true;
	for (unsigned h = 0; h < vq->num; h++) {
		struct vu_sub *sub = &vq->subs[h];

		if (!sub->r)
			continue;
		p = req_priv(sub->r);
		sub->r = NULL;
		vq->subs_inflight--;
		p->inflight--;
		fail_req(p, EIO, "vhost-user: %s: %s", op_name(req_of(p)->op), why);
		if (p->inflight == 0 && !p->waiting)
			finish(q, p);
	}
	while ((p = vq->wait_head)) {
		vq->wait_head = p->wait_next;
		p->waiting = false;
		fail_req(p, EIO, "vhost-user: %s: %s", op_name(req_of(p)->op), why);
		if (p->inflight == 0)
			finish(q, p);
	}
	vq->wait_tail = &vq->wait_head;
}

static const char *dead_reason(struct vu_state *s, char *buf, size_t len)
{
	snprintf(buf, len, "back-end disconnected (%.80s)", s->dead_msg);
	return buf;
}

/* ==== 7. driver ops ============================================================ */

static int vu_start(struct vdisk *v)
{
	static const char who[] = "vdisk_start: virtio-blk-vhost-user";
	struct vu_state *s = vd_priv(v);
	unsigned num = 1, stride;
	size_t qbytes, total, zoff = 0;
	long page = sysconf(_SC_PAGESIZE);
	void *mem;
	int fd, ret;

	if (is_dead(s))
		return vd_error(EIO, "%s: the vhost-user back-end is disconnected (%s)", who, s->dead_msg);
	if (s->ring_mem) {
		/* A previous start failed after registering its rings: drop them. */
		if (s->ring_sent && s->mem_slots)
			rem_mem_reg(s, who, (uintptr_t)s->ring_mem, s->ring_len, 0);
		free_rings(s);
	}
	if (s->indirect) {
		while (num < (unsigned)v->queue_size && num < VU_RING_MAX)
			num <<= 1;
	} else {
		num = VU_RING_MAX;
	}
	stride = s->indirect ? (unsigned)v->max_segments + 2 : 0;
	qbytes = align_up(vq_layout(num, stride).total, (size_t)page);
	s->n_vrings = v->num_queues + v->num_poll_queues;
	total = qbytes * (size_t)s->n_vrings;
	if (!s->can_write_zeroes && !v->read_only) {
		zoff = total;
		total += VU_ZERO_BUF;
	}
	fd = memfd_create("vdisk-vhost-user-rings", MFD_CLOEXEC);
	if (fd < 0)
		return vd_error(errno, "%s: memfd_create: %s", who, strerror(errno));
	if (ftruncate(fd, (off_t)total) < 0) {
		ret = vd_error(errno, "%s: ftruncate(%zu): %s", who, total, strerror(errno));
		close(fd);
		return ret;
	}
	mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED) {
		ret = vd_error(errno, "%s: mmap(%zu): %s", who, total, strerror(errno));
		close(fd);
		return ret;
	}
	s->ring_fd = fd;
	s->ring_mem = mem;
	s->ring_len = total;
	s->ring_num = num;
	s->ind_stride = stride;
	s->queue_bytes = qbytes;
	s->zero_buf = zoff ? (char *)mem + zoff : NULL;

	/* The back-end learns the rings region and the regions mapped so far. */
	if (s->mem_slots) {
		ret = add_mem_reg(s, who, (uintptr_t)mem, total, fd, 0);
		if (ret < 0) {
			free_rings(s);
			return ret;
		}
		s->ring_sent = true;
		for (int i = 0; i < VU_MAX_REGIONS; i++) {
			struct vu_region *g = &s->regions[i];

			if (g->fd < 0 || g->sent)
				continue;
			ret = add_mem_reg(s, who, g->addr, g->size, g->fd, g->fd_offset);
			if (ret < 0)
				return ret; /* the rings stay registered; a retry removes them */
			g->sent = true;
		}
	} else {
		ret = send_mem_table(s, who, -1);
		if (ret < 0)
			return ret;
	}
	s->mem_live = true;
	return 0;
}

static void vu_queue_release(struct vu_queue *vq)
{
	if (vq->kick_fd >= 0)
		close(vq->kick_fd);
	vq->kick_fd = -1;
	if (vq->own_call_fd >= 0)
		close(vq->own_call_fd);
	vq->own_call_fd = -1;
	vq->call_fd = -1;
	free(vq->next);
	free(vq->subs);
	vq->next = NULL;
	vq->subs = NULL;
}

static int vu_queue_init(struct vdiskq *q)
{
	struct vdisk *v = q->v;
	struct vu_state *s = vd_priv(v);
	struct vu_queue *vq = q->priv;
	char who[96];
	struct vq_layout l;
	struct vhu_vring_addr addr;
	char *base;
	int ret;

	snprintf(who, sizeof(who), "vdisk_start: virtio-blk-vhost-user: %squeue %d", q->is_poll_queue ? "poll " : "",
		 q->index);
	vq->q = q;
	vq->vring = q->is_poll_queue ? v->num_queues + q->index : q->index;
	vq->poll = q->is_poll_queue;
	vq->kick_fd = -1;
	vq->own_call_fd = -1;
	vq->hint = -1;
	vq->wait_tail = &vq->wait_head;
	vq->notify_on = !vq->poll && q->completion_fd_enabled;
	vq->num = s->ring_num;
	vq->mask = s->ring_num - 1;
	vq->ind_stride = s->ind_stride;
	if (vq->vring >= s->n_vrings || !s->ring_mem)
		return vd_error(EINVAL, "%s: no ring memory for vring %d", who, vq->vring);
	l = vq_layout(vq->num, vq->ind_stride);
	base = (char *)s->ring_mem + (size_t)vq->vring * s->queue_bytes;
	memset(base, 0, s->queue_bytes);
	vq->desc = (struct vring_desc *)(base + l.desc);
	vq->avail = (struct vring_avail *)(base + l.avail);
	vq->used = (struct vring_used *)(base + l.used);
	vq->area = (struct vu_slot_area *)(base + l.area);
	vq->ind = s->indirect ? (struct vring_desc *)(base + l.ind) : NULL;
	if (s->event_idx) {
		vq->used_event = &vq->avail->ring[vq->num];
		vq->avail_event = (uint16_t *)&vq->used->ring[vq->num];
	}
	vq->next = calloc(vq->num, sizeof(*vq->next));
	vq->subs = calloc(vq->num, sizeof(*vq->subs));
	if (!vq->next || !vq->subs) {
		vu_queue_release(vq);
		return vd_error(ENOMEM, "%s: out of memory", who);
	}
	for (unsigned i = 0; i < vq->num; i++)
		vq->next[i] = (uint16_t)((i + 1) % vq->num);
	vq->free_head = 0;
	vq->num_free = vq->num;
	/* Poll queues never want interrupts; others start quiet unless the fd is on. */
	if (vq->poll || !vq->notify_on)
		vq_notify_disable(vq);
	if (vq->poll && vq->used_event)
		*vq->used_event = 0x8000; /* far ahead: the device never needs to signal */
	/*
	 * Every queue has a private call eventfd: the back-end writes it while
	 * the completion fd is off (so stray wakeups never reach the
	 * application), and poll queues always use it (libvhost-user cannot do
	 * without a call fd: it writes it on its first completion even with
	 * notifications suppressed, and a missing fd is fatal to it).
	 */
	vq->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	vq->own_call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); /* reap() sleeps in ppoll() on it */
	vq->call_fd = vq->notify_on ? q->completion_fd : vq->own_call_fd;
	if (vq->kick_fd < 0 || vq->own_call_fd < 0) {
		ret = vd_error(errno, "%s: eventfd: %s", who, strerror(errno));
		vu_queue_release(vq);
		return ret;
	}

	addr = (struct vhu_vring_addr){
		.index = (uint32_t)vq->vring,
		.flags = 0,
		.desc_user_addr = (uintptr_t)vq->desc,
		.used_user_addr = (uintptr_t)vq->used,
		.avail_user_addr = (uintptr_t)vq->avail,
		.log_guest_addr = 0,
	};
	vq->ring_set = true; /* from here on, fini stops the ring */
	ret = vhu_vring_state(s, who, VHU_SET_VRING_NUM, (unsigned)vq->vring, vq->num);
	if (ret == 0)
		ret = vhu_vring_state(s, who, VHU_SET_VRING_BASE, (unsigned)vq->vring, 0);
	if (ret == 0)
		ret = vhu_call(s, who, VHU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0, true, NULL, 0);
	if (ret == 0)
		ret = vhu_vring_fd(s, who, VHU_SET_VRING_CALL, (unsigned)vq->vring, vq->call_fd);
	if (ret == 0)
		ret = vhu_vring_fd(s, who, VHU_SET_VRING_KICK, (unsigned)vq->vring, vq->kick_fd);
	if (ret == 0 && (s->features & BIT(VHOST_USER_F_PROTOCOL_FEATURES)))
		ret = vhu_vring_state(s, who, VHU_SET_VRING_ENABLE, (unsigned)vq->vring, 1);
	if (ret < 0) {
		char msg[512];

		snprintf(msg, sizeof(msg), "%s", vdisk_get_error_msg());
		if (!is_dead(s)) {
			struct vhu_vring_state st = { .index = (uint32_t)vq->vring, .num = 0 };

			vhu_call(s, who, VHU_GET_VRING_BASE, &st, sizeof(st), NULL, 0, false, &st, sizeof(st));
		}
		vu_queue_release(vq);
		vd_error(-ret, "%s", msg);
		return ret;
	}
	set_wake_fds(s, vq->vring, vq->own_call_fd, q->completion_fd);
	return 0;
}

static int vu_reap(struct vdiskq *q, bool wait, const struct timespec *deadline);

static void vu_queue_fini(struct vdiskq *q)
{
	struct vdisk *v = q->v;
	struct vu_state *s = vd_priv(v);
	struct vu_queue *vq = q->priv;
	struct timespec limit;

	if (!vq->next)
		return; /* queue_init failed and cleaned up */
	/* The back-end writes into caller buffers until it completes a request: wait. */
	if (q->n_inflight > 0 && !is_dead(s)) {
		deadline_in(&limit, s->reply_timeout * 1000);
		while (q->n_inflight > 0 && !is_dead(s) && vu_reap(q, true, &limit) == 0)
			;
		/* Give up on this back-end: the other queues must not wait (and stall) again. */
		if (q->n_inflight > 0)
			mark_dead(s, "%u requests got no completion within reply-timeout", q->n_inflight);
	}
	set_wake_fds(s, vq->vring, -1, -1);
	if (vq->ring_set && !is_dead(s)) {
		struct vhu_vring_state st = { .index = (uint32_t)vq->vring, .num = 0 };

		/* Stop the ring; errors only mean the connection is going away anyway. */
		vhu_call(s, "vdisk_destroy: virtio-blk-vhost-user", VHU_GET_VRING_BASE, &st, sizeof(st), NULL, 0,
			 false, &st, sizeof(st));
	}
	vq->ring_set = false;
	vu_queue_release(vq);
}

/*
 * The completion fd on: the back-end writes it directly.  Off: it writes our
 * private eventfd instead (SET_VRING_CALL with an ack, so once this returns
 * the back-end uses the new fd), and only while reap() sleeps.
 */
static void vu_set_completion_fd_enabled(struct vdiskq *q, bool enabled)
{
	struct vu_state *s = vd_priv(q->v);
	struct vu_queue *vq = q->priv;
	int fd = enabled ? q->completion_fd : vq->own_call_fd;

	if (vq->poll || !vq->next || vq->notify_on == enabled)
		return;
	if (fd != vq->call_fd && !is_dead(s) &&
	    vhu_vring_fd(s, "vdiskq_set_completion_fd_enabled: virtio-blk-vhost-user", VHU_SET_VRING_CALL,
			 (unsigned)vq->vring, fd) == 0)
		vq->call_fd = fd;
	vq->notify_on = enabled;
	if (!enabled)
		vq_notify_disable(vq);
	else if (!vq_notify_enable(vq) || vq->call_fd != fd)
		vd_queue_signal(q); /* completions are already waiting (or the switch failed): say so */
}

/* Check every buffer; -EFAULT (message in r) if one is not inside a mapped region. */
static int check_buffers(struct vu_state *s, struct vu_queue *vq, struct vd_request *r)
{
	for (int i = 0; i < r->iovcnt; i++) {
		const struct iovec *iov = &r->iov[i];

		if (iov->iov_len == 0)
			continue;
		if (region_lookup(s, vq, iov->iov_base, iov->iov_len) < 0) {
			snprintf(r->msg, sizeof(r->msg),
				 "vhost-user: %s: buffer %d (%p+%zu) is not in a mapped memory region "
				 "(vdisk_map_mem_region)",
				 op_name(r->op), i, iov->iov_base, iov->iov_len);
			r->error_msg = r->msg;
			return -EFAULT;
		}
	}
	return 0;
}

static int vu_submit(struct vdiskq *q, struct vd_request *r)
{
	struct vdisk *v = q->v;
	struct vu_state *s = vd_priv(v);
	struct vu_queue *vq = q->priv;
	struct vu_req *p = req_priv(r);
	unsigned need = 1;
	int ret;

	if (vq->dead || is_dead(s)) {
		char why[128];

		vd_req_fail(q, r, -EIO, "vhost-user: %s: %s", op_name(r->op),
			    dead_reason(s, why, sizeof(why)));
		return 0;
	}
	memset(p, 0, sizeof(*p));

	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		ret = check_buffers(s, vq, r);
		if (ret < 0) {
			vd_req_complete(q, r, ret);
			return 0;
		}
		if (!vq->ind) {
			need = 2;
			for (int i = 0; i < r->iovcnt; i++)
				need += r->iov[i].iov_len > 0;
		}
		if (r->op == VD_OP_WRITE && (r->flags & VDISK_REQ_FUA))
			p->flush_after = s->can_flush;
		break;

	case VD_OP_FLUSH:
		if (!s->can_flush) {
			vd_req_complete(q, r, 0); /* no volatile cache: nothing to flush */
			return 0;
		}
		need = ring_descs(vq, 0);
		break;

	case VD_OP_DISCARD: {
		uint64_t a = (uint64_t)v->request_alignment;
		uint64_t start = (r->offset + a - 1) / a * a, end = (r->offset + r->len) / a * a;

		if (!s->can_discard) {
			vd_req_fail(q, r, -ENOTSUP, "vhost-user: discard: not offered by the back-end "
				    "(no VIRTIO_BLK_F_DISCARD)");
			return 0;
		}
		if (start >= end) {
			vd_req_complete(q, r, 0); /* nothing aligned to discard */
			return 0;
		}
		p->cursor = start;
		p->end = end;
		need = ring_descs(vq, 1);
		break;
	}

	case VD_OP_WRITE_ZEROES:
		if (!s->can_write_zeroes && (r->flags & VDISK_REQ_NO_FALLBACK)) {
			vd_req_fail(q, r, -ENOTSUP, "vhost-user: write-zeroes: NO_FALLBACK, and the back-end lacks "
				    "VIRTIO_BLK_F_WRITE_ZEROES");
			return 0;
		}
		if ((r->offset | r->len) & (uint64_t)(v->request_alignment - 1)) {
			vd_req_fail(q, r, -EINVAL, "vhost-user: write-zeroes: offset %" PRIu64 " / length %"
				    PRIu64 " not a multiple of request-alignment %d", r->offset, r->len,
				    v->request_alignment);
			return 0;
		}
		p->cursor = r->offset;
		p->end = r->offset + r->len;
		p->wz_flags = (r->flags & VDISK_REQ_NO_UNMAP) ? 0 : VIRTIO_BLK_WZ_F_UNMAP;
		p->flush_after = (r->flags & VDISK_REQ_FUA) && s->can_flush;
		if (!s->can_write_zeroes) {
			if (!s->zero_buf) {
				vd_req_fail(q, r, -ENOTSUP, "vhost-user: write-zeroes: no zero buffer");
				return 0;
			}
			p->zero_fallback = true;
			need = ring_descs(vq, VU_ZERO_SEGS);
		} else {
			need = ring_descs(vq, 1);
		}
		break;
	}
	if (vq->num_free < need || vq->wait_head)
		return -EAGAIN; /* the core retries after the next reap; keep FIFO order behind waiters */
	advance(q, p);
	return 0;
}

static int vu_commit(struct vdiskq *q)
{
	vq_flush(q->priv);
	return 0;
}

static bool check_dead(struct vdiskq *q)
{
	struct vu_state *s = vd_priv(q->v);
	struct vu_queue *vq = q->priv;
	char why[128];

	if (!is_dead(s))
		return false;
	if (!vq->dead || vq->subs_inflight || vq->wait_head)
		fail_all(q, dead_reason(s, why, sizeof(why)));
	return true;
}

/* Consume completions, let waiters in, publish and kick. */
static int harvest(struct vdiskq *q)
{
	struct vu_queue *vq = q->priv;
	int n = process_used(q);

	if (n < 0) {
		struct vu_state *s = vd_priv(q->v);

		/* Short: requests carry it in a 112-byte message after "<op>: back-end disconnected (". */
		mark_dead(s, "protocol error: bad used ring entry on queue %d", vq->vring);
		check_dead(q);
		return 0;
	}
	if (vq->wait_head && vq->num_free > 0)
		run_wait_list(q);
	vq_flush(vq);
	return n;
}

static bool past(const struct timespec *deadline)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > deadline->tv_sec || (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

static int vu_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	struct vu_queue *vq = q->priv;
	unsigned start = q->n_done;
	unsigned spins = 0;

	for (;;) {
		struct timespec ts, *tsp = NULL;
		struct pollfd pfd;
		int r;

		/* Completions the back-end published before dying are real: take them first. */
		if (!vq->dead)
			harvest(q);
		if (check_dead(q))
			return 0;
		if (q->n_done > start || !wait || q->n_inflight == 0) {
			/* Event-driven callers: a completion after this point must signal. */
			/* harvest() may find a bad entry and kill the queue: it stays unconsumed, stop. */
			while (vq->notify_on && !vq->dead && !vq_notify_enable(vq))
				harvest(q);
			return 0;
		}
		if (vq->subs_inflight == 0) /* requests in flight but none in the ring: never sleep on that */
			return vd_error(EIO, "vdiskq_do_io: virtio-blk-vhost-user: %u requests stuck outside the ring",
					q->n_inflight);
		if (vq->poll) {
			/* Spin on the used ring; look at the clock now and then. */
			while (__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE) == vq->last_used) {
				cpu_relax();
				if (++spins % VU_SPIN_CLOCK_EVERY == 0) {
					/*
					 * Let a runnable thread on this CPU in: the back-end
					 * may share it, and spinning until the tick starves it.
					 */
					sched_yield();
					if (deadline && past(deadline))
						return -ETIME;
					if (is_dead(vd_priv(q->v)))
						break;
				}
			}
			continue;
		}
		/* Sleep on the call fd with notifications on (unless entries arrived meanwhile). */
		if (!vq_notify_enable(vq))
			continue;
		if (deadline) {
			struct timespec now;
			int64_t ns;

			clock_gettime(CLOCK_MONOTONIC, &now);
			ns = (int64_t)(deadline->tv_sec - now.tv_sec) * 1000000000LL + (deadline->tv_nsec - now.tv_nsec);
			if (ns <= 0) {
				if (!vq->notify_on)
					vq_notify_disable(vq);
				return -ETIME;
			}
			ts.tv_sec = ns / 1000000000LL;
			ts.tv_nsec = ns % 1000000000LL;
			tsp = &ts;
		}
		/*
		 * Sleep in ppoll, never in a blocking read(): the back-end holds the
		 * same open file description of our eventfd (SCM_RIGHTS) and may set
		 * O_NONBLOCK on it (vdiskd and qemu-storage-daemon both do), after
		 * which a "blocking" read returns EAGAIN and reap spins on a CPU.
		 */
		pfd = (struct pollfd){ .fd = vq->call_fd, .events = POLLIN };
		r = ppoll(&pfd, 1, tsp, NULL);
		if (r > 0) {
			uint64_t cnt;
			ssize_t n = read(vq->call_fd, &cnt, sizeof(cnt));

			(void)n; /* EAGAIN: someone else consumed it; the used ring is what counts */
		}
		if (!vq->notify_on)
			vq_notify_disable(vq);
		if (r < 0 && errno != EINTR)
			return vd_error(errno, "vdiskq_do_io: virtio-blk-vhost-user: poll: %s", strerror(errno));
	}
}

const struct vd_driver vd_driver_virtio_blk_vhost_user = {
	.name = "virtio-blk-vhost-user",
	.priv_size = sizeof(struct vu_state),
	.queue_priv_size = sizeof(struct vu_queue),
	.req_priv_size = sizeof(struct vu_req),
	.props = vu_props,
	.init = vu_init,
	.connect = vu_connect,
	.start = vu_start,
	.destroy = vu_destroy,
	.queue_init = vu_queue_init,
	.queue_fini = vu_queue_fini,
	.submit = vu_submit,
	.commit = vu_commit,
	.reap = vu_reap,
	.set_completion_fd_enabled = vu_set_completion_fd_enabled,
	.map_mem_region = vu_map_mem_region,
	.unmap_mem_region = vu_unmap_mem_region,
};
