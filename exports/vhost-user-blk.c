/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vhost-user-blk export: vdiskd is the vhost-user back end of a virtio-blk
 * device.  A front end (QEMU's vhost-user-blk-pci, our virtio-blk-vhost-user
 * driver, SPDK, ...) connects to a Unix socket we listen on, shares its RAM
 * with us (memfds passed over the socket), and places requests in split
 * virtqueues there; we read and write the data in place (zero copy) and
 * tell it when requests complete through eventfds.
 *
 * Why our own protocol code: DPDK's vhost library brings its whole runtime
 * (EAL, hugepage memory, lcores) into the daemon, and libvhost-user is not
 * packaged in Debian as a library (it lives in QEMU's source tree).  The
 * protocol subset a block back end needs is small, and doing it here lets
 * requests run as coroutines on our own event loop.  The wire format is
 * shared with the client driver (util/vhost-user.h).
 *
 *   --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=S
 *            [,writable=on][,num-queues=N][,queue-size=N][,logical-block-size=N]
 *            [,iothread=T | iothread.0=T0,iothread.1=T1...][,poll-us=N][,poll-max-us=N]
 *            [,serial=STR]
 *
 * num-queues: virtqueues offered (1..64, default 1); queue-size: the largest
 * ring a front end may set up (default 256, up to 1024; seg_max follows it);
 * logical-block-size: blk_size in the config space (512..64k, power of two);
 * poll-us: after a burst of requests keep checking the rings for this long
 * (notifications off) before going back to sleep on the kick eventfds;
 * poll-max-us: the same with a window each lane adapts (adapt_poll_window),
 * default 32 as QEMU's event loops; 0 turns polling off (on a host whose CPUs
 * are oversubscribed polling takes CPU time from the guests it serves).
 *
 * Threads: the listening socket and the front end's control channel run in
 * the export's thread (its node's home).  The virtqueues run in lanes
 * (struct vub_lane): one, the export's thread, unless iothread is a list
 * (QEMU's spelling), then virtqueue i runs in iothread i mod n: its kick
 * eventfd is an fd handler of that thread's loop, its requests are
 * coroutines there calling the node from there (the block layer runs them
 * in that thread or forwards them to the node's), and each lane has its own
 * poller.  Lane state is only touched in its thread: control messages about
 * a ring run there (on_lane, vdd_thread_call), connection-wide ones (memory
 * table, reset) visit every lane.  One front end at a time (as qemu-storage-daemon):
 * while one is connected we do not accept, so the next waits in the listen
 * backlog and is served when the first leaves.
 *
 * Control channel: one coroutine reads messages (header, payload, fds in
 * SCM_RIGHTS) and answers them in order.  A malformed message (bad
 * version, size, ring index or fd count) ends the connection, which resets
 * the device: rings stop, requests in flight finish, memory is unmapped,
 * and the next front end may connect (reconnect).  Messages that change
 * memory (SET_MEM_TABLE) or stop a ring (GET_VRING_BASE) first wait for
 * the requests they could affect.
 *
 * Requests: each avail ring entry becomes a coroutine on the node.  The
 * descriptor chain (direct or one indirect table) is copied descriptor by
 * descriptor out of shared memory before use, every address is translated
 * through the memory table with bounds checks, and the chain length is
 * bounded, so a front end that lies gets IOERR (bad buffer), UNSUPP
 * (unknown request), or -- when the chain itself is unusable (bad index,
 * loop, no status byte) -- a stopped virtqueue ("needs reset", logged); it
 * never makes us touch memory outside what it shared.  Completions go to
 * the used ring at once; the call eventfd is signalled once per loop
 * iteration and queue (respecting EVENT_IDX / NO_INTERRUPT).
 *
 * Inflight tracking (INFLIGHT_SHMFD): GET_INFLIGHT_FD hands out a sealed
 * memfd laid out as the vhost-user spec's split-ring area; with
 * SET_INFLIGHT_FD each ring flags the heads it takes (with an order counter)
 * and clears them once used (track_taken / push_used).  A ring that starts
 * over a used area (the front end reconnected after the back end died)
 * finishes the old back end's last used batch and resubmits what is still
 * flagged, oldest first, before taking new requests (track_recover).
 *
 * Shared memory that shrinks: every mapping of the front end's files is
 * guarded (daemon/memguard.c): a SIGBUS in it, from any thread, swaps in
 * anonymous memory and wakes fault_event, which resets the device.
 *
 * Not implemented: CONFIGURE_MEM_SLOTS, packed rings, migration (LOG_ALL).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "daemon.h"
#include "export.h"
#include "vhost-user.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vhost-user-blk export: big-endian hosts are not supported (virtio 1.x is little-endian)"
#endif

#define VUB_MAX_QUEUES 64
#define VUB_DEFAULT_QUEUE_SIZE 256
#define VUB_MAX_QUEUE_SIZE 1024
#define VUB_MAX_REGIONS VHU_MEM_TABLE_MAX
#define VUB_MAX_CONFIG 256              /* VHOST_USER_MAX_CONFIG_SIZE */
#define VUB_MAX_MSG (VUB_MAX_CONFIG + 12 + 64)
#define VUB_INDIRECT_MAX 1024          /* entries in one indirect table */
#define VUB_MAX_DWZ_SECTORS (1u << 21) /* 1 GiB per discard / write-zeroes */
#define VUB_DWZ_SEGS 1                 /* segments per discard / write-zeroes */
#define VUB_POLL_CHECK_EVERY 128       /* poller: look at the control socket every N spins */
#define VUB_DEFAULT_POLL_MAX_US 32     /* QEMU's default window (poll-max-ns=32768); see bench/RESULTS.md */

/* ---- state ----------------------------------------------------------------------------------------------- */

struct vub_region {
	uint64_t gpa, size, uva;
	uint8_t *host; /* mapping of [gpa, gpa+size) */
	void *map;
	size_t map_len;
	int guard; /* memguard slot: a SIGBUS in the mapping resets the device */
};

struct vub_req;

/*
 * A thread serving virtqueues: the export's own, or with an iothread list one
 * per iothread (virtqueue i -> lane i % n).  A lane's queues -- kick handlers,
 * requests, notifications, the poller -- live in its thread; the control
 * channel (export thread) changes them only through vdd_thread_call.
 */
struct vub_lane {
	struct vub_export *e;
	struct vdd_thread *thread;
	unsigned idx;
	/* Touched only in the lane's thread. */
	unsigned inflight; /* requests of its queues */
	bool paused;       /* waiting for requests in flight: take no new ones */
	bool poller_running;
	struct vd_co_queue drained;
	/*
	 * Adaptive polling: the current window, and the time of the lane's
	 * last event (kick, completion, end of polling) while it was not
	 * polling (0: none since the last wake-up).  completions counts finished
	 * requests (the poller treats them as activity, as QEMU's does its AIO
	 * completions); unanswered, those the guest has not yet followed with
	 * a new request (what the poller waits for).
	 */
	uint64_t poll_ns, asleep_since, completions, unanswered;
	unsigned wanted; /* atomic: the control channel waits to run something here (the poller makes way) */
};

struct vub_vq {
	struct vub_conn *c;
	struct vub_lane *lane;
	unsigned idx;
	unsigned num;
	uint64_t desc_uva, avail_uva, used_uva;
	bool addr_set;
	struct vring_desc *desc; /* NULL: not translated (no mem table / addresses) */
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t last_avail, used_idx, signalled_used;
	bool signalled_valid;
	int kick_fd, call_fd, err_fd;
	bool started, enabled, broken;
	bool notify_scheduled, starved;
	unsigned inflight;
	struct vub_req *reqs, *free_reqs;
	unsigned nreqs;
	struct vd_co_queue drained;
	/* Inflight tracking (INFLIGHT_SHMFD): this ring's region of the area, and heads to resubmit on start. */
	struct vhu_inflight_split *track;
	uint16_t *resubmit;
	unsigned nresubmit, resubmit_pos;
	uint64_t ifl_counter; /* next order number of a taken head */
};

struct vub_conn {
	struct vub_export *e;
	int fd;
	struct vdd_cofd cofd;
	uint64_t id;
	bool active;
	bool closing; /* atomic: read by the lanes */
	uint64_t features, proto;
	bool features_set;
	bool event_idx, indirect;
	struct vub_region regions[VUB_MAX_REGIONS];
	int nregions;
	struct vub_vq vqs[VUB_MAX_QUEUES];
	/* The inflight I/O tracking area (SET_INFLIGHT_FD): ifl_queues regions of ifl_qsize descriptors. */
	void *ifl_map;
	size_t ifl_map_len;
	uint8_t *ifl_base;
	unsigned ifl_queues, ifl_qsize;
	int ifl_guard;
};

struct vub_export {
	struct vd_export *exp;
	char *path;
	char *serial;
	unsigned num_queues, queue_size, lbs, poll_us, poll_max_us;
	struct vub_lane *lanes;
	unsigned nlanes;
	/* The export's thread. */
	int listen_fd;
	bool shutdown; /* atomic: read by the lanes */
	uint64_t next_id;
	uint64_t capacity; /* bytes, a multiple of lbs */
	struct virtio_blk_config cfg;
	uint64_t offered;
	struct vub_conn conn;
	int fault_fd; /* eventfd: memguard saw a SIGBUS in the front end's memory */
	uint64_t reqs_total, bad_requests, kicks, calls, resubmitted; /* atomic */
};

#define COUNT(x) __atomic_add_fetch(&(x), 1, __ATOMIC_RELAXED)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

static bool conn_closing(struct vub_conn *c)
{
	return __atomic_load_n(&c->closing, __ATOMIC_RELAXED) || __atomic_load_n(&c->e->shutdown, __ATOMIC_RELAXED);
}

static void conn_set_closing(struct vub_conn *c)
{
	__atomic_store_n(&c->closing, true, __ATOMIC_RELAXED);
}

/* The virtqueues of a lane. */
#define LANE_FOR_EACH_VQ(c, lane, vq)                                                                          \
	for (unsigned i_ = (lane)->idx; i_ < (c)->e->num_queues && ((vq) = &(c)->vqs[i_]); i_ += (c)->e->nlanes)

struct vub_req {
	struct vub_vq *vq;
	struct vub_req *next_free;
	uint16_t head;
	struct vd_qiov out, in; /* device-readable and device-writable buffers */
	uint8_t *status;
	bool bad; /* a buffer did not translate */
	uint64_t t_start;
};

/* ---- memory ---------------------------------------------------------------------------------------------- */

/* Append the guest buffer [gpa, gpa+len) to q (split where regions meet); -EFAULT if any byte is unmapped. */
static int map_gpa(struct vub_conn *c, uint64_t gpa, uint64_t len, struct vd_qiov *q)
{
	while (len) {
		struct vub_region *r = NULL;
		uint64_t n;

		for (int i = 0; i < c->nregions; i++) {
			if (gpa >= c->regions[i].gpa && gpa - c->regions[i].gpa < c->regions[i].size) {
				r = &c->regions[i];
				break;
			}
		}
		if (!r)
			return -EFAULT;
		n = r->size - (gpa - r->gpa);
		if (n > len)
			n = len;
		if (q && vd_qiov_add(q, r->host + (gpa - r->gpa), (size_t)n) < 0)
			return -ENOMEM;
		gpa += n;
		len -= n;
	}
	return 0;
}

/* A pointer to [gpa, gpa+len), which must lie inside one region. */
static void *gpa_ptr(struct vub_conn *c, uint64_t gpa, uint64_t len)
{
	for (int i = 0; i < c->nregions; i++) {
		struct vub_region *r = &c->regions[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

/* Same for a front-end virtual address (ring addresses). */
static void *uva_ptr(struct vub_conn *c, uint64_t uva, uint64_t len)
{
	for (int i = 0; i < c->nregions; i++) {
		struct vub_region *r = &c->regions[i];

		if (uva >= r->uva && uva - r->uva <= r->size && len <= r->size - (uva - r->uva))
			return r->host + (uva - r->uva);
	}
	return NULL;
}

static void unmap_region(struct vub_region *r)
{
	vdd_memguard_remove(r->guard);
	munmap(r->map, r->map_len);
}

static void unmap_regions(struct vub_conn *c)
{
	for (int i = 0; i < c->nregions; i++)
		unmap_region(&c->regions[i]);
	c->nregions = 0;
}

/* Did the front end shrink a file under one of our mappings (memguard replaced it)? */
static bool memory_faulted(struct vub_conn *c)
{
	for (int i = 0; i < c->nregions; i++)
		if (vdd_memguard_faulted(c->regions[i].guard))
			return true;
	return c->ifl_map && vdd_memguard_faulted(c->ifl_guard);
}

/* ---- virtqueues: rings and notifications ----------------------------------------------------------------- */

static uint16_t *avail_used_event(struct vub_vq *vq)
{
	return &vq->avail->ring[vq->num];
}

static uint16_t *used_avail_event(struct vub_vq *vq)
{
	return (uint16_t *)&vq->used->ring[vq->num];
}

/* Translate the ring addresses with the current memory table; false if they do not fit. */
static bool vq_translate(struct vub_vq *vq)
{
	struct vub_conn *c = vq->c;

	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	if (!vq->addr_set || !vq->num)
		return false;
	vq->desc = uva_ptr(c, vq->desc_uva, 16ull * vq->num);
	vq->avail = uva_ptr(c, vq->avail_uva, 6 + 2ull * vq->num);
	vq->used = uva_ptr(c, vq->used_uva, 6 + 8ull * vq->num);
	/* The front end's virtual addresses were checked for alignment, but mmap_offset may still misalign ours. */
	if (!vq->desc || !vq->avail || !vq->used || (uintptr_t)vq->desc % 16 || (uintptr_t)vq->avail % 2 ||
	    (uintptr_t)vq->used % 4) {
		vq->desc = NULL;
		vq->avail = NULL;
		vq->used = NULL;
		return false;
	}
	return true;
}

static bool vq_ready(struct vub_vq *vq)
{
	return vq->started && vq->enabled && !vq->broken && vq->desc && !vq->lane->paused && !conn_closing(vq->c);
}

static void vq_fail(struct vub_vq *vq, const char *why)
{
	if (!vq->broken)
		vdd_log("vhost-user-blk export '%s': virtqueue %u: %s: queue stopped until the front end resets it",
			vq->c->e->exp->id, vq->idx, why);
	vq->broken = true;
	COUNT(vq->c->e->bad_requests);
}

static bool should_notify(struct vub_vq *vq)
{
	uint16_t old, new;
	bool valid;

	/* Our used->idx store must be visible before we read the front end's suppression state. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!vq->c->event_idx)
		return !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
	valid = vq->signalled_valid;
	old = vq->signalled_used;
	new = vq->signalled_used = vq->used_idx;
	vq->signalled_valid = true;
	return !valid || vring_need_event(__atomic_load_n(avail_used_event(vq), __ATOMIC_RELAXED), new, old);
}

static void process_vq(struct vub_vq *vq);

/*
 * Signal the call eventfd if the front end asked for it (EVENT_IDX's
 * used_event, or no VRING_AVAIL_F_NO_INTERRUPT).  Done at each completion,
 * not once after a batch: the front end then starts reaping and refilling
 * while the rest of the batch is still being completed here, instead of the
 * two sides taking turns; the front end's own suppression (it stops asking
 * while it reaps) keeps the calls to about one per batch.
 */
static void notify_front_end(struct vub_vq *vq)
{
	if (vq->desc && vq->call_fd >= 0 && should_notify(vq)) {
		uint64_t one = 1;
		ssize_t n = write(vq->call_fd, &one, sizeof(one));

		(void)n; /* EAGAIN: the counter is already non-zero, the front end will look */
		COUNT(vq->c->e->calls);
	}
}

static void notify_co(void *opaque)
{
	struct vub_vq *vq = opaque;

	vq->notify_scheduled = false;
	notify_front_end(vq);
	if (vq->starved) {
		vq->starved = false;
		process_vq(vq);
	}
}

static void schedule_notify(struct vub_vq *vq)
{
	struct vd_co *co;

	if (vq->notify_scheduled)
		return;
	co = vd_co_create(notify_co, vq);
	if (!co)
		return; /* out of memory: the next completion tries again */
	vq->notify_scheduled = true;
	vd_loop_schedule(vd_loop_get(), co);
}

/*
 * Inflight tracking (vhost-user.rst, "Inflight I/O tracking", split rings):
 * a head taken from the avail ring gets the next counter value and its
 * inflight flag; a used one is put on the last-batch list (a batch of one
 * here) before used->idx moves, then loses its flag, then used_idx follows
 * used->idx.  A back end that dies anywhere in between leaves an area from
 * which the next one knows exactly what was in flight (track_recover).
 * Every field is shared with the front end: we only ever write it here and
 * bound what we read back.
 */
static void track_taken(struct vub_vq *vq, uint16_t head)
{
	struct vhu_inflight_desc *d;

	if (!vq->track)
		return;
	d = &vq->track->desc[head];
	__atomic_store_n(&d->counter, vq->ifl_counter++, __ATOMIC_RELAXED);
	__atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
}

static void push_used(struct vub_vq *vq, uint16_t head, uint32_t len)
{
	struct vring_used_elem *e = &vq->used->ring[vq->used_idx % vq->num];
	struct vhu_inflight_split *t = vq->track;

	e->id = head;
	e->len = len;
	if (t) {
		/* Every completion is a batch of its own: the chain ends at head (track_recover clears only it). */
		__atomic_store_n(&t->desc[head].next, head, __ATOMIC_RELAXED);
		__atomic_store_n(&t->last_batch_head, head, __ATOMIC_RELAXED);
	}
	__atomic_store_n(&vq->used->idx, ++vq->used_idx, __ATOMIC_RELEASE);
	if (t) {
		__atomic_store_n(&t->desc[head].inflight, 0, __ATOMIC_RELEASE);
		__atomic_store_n(&t->used_idx, vq->used_idx, __ATOMIC_RELEASE);
	}
}

/* ---- requests ---------------------------------------------------------------------------------------------- */

/* Copy one descriptor out of shared memory (the front end may change it under us). */
static struct vring_desc read_desc(const struct vring_desc *table, unsigned i)
{
	struct vring_desc d;

	d.addr = __atomic_load_n(&table[i].addr, __ATOMIC_RELAXED);
	d.len = __atomic_load_n(&table[i].len, __ATOMIC_RELAXED);
	d.flags = __atomic_load_n(&table[i].flags, __ATOMIC_RELAXED);
	d.next = __atomic_load_n(&table[i].next, __ATOMIC_RELAXED);
	return d;
}

static int add_buffer(struct vub_req *r, const struct vring_desc *d, bool *seen_write)
{
	struct vub_conn *c = r->vq->c;

	if (d->flags & VRING_DESC_F_WRITE) {
		*seen_write = true;
		if (map_gpa(c, d->addr, d->len, &r->in) < 0)
			r->bad = true;
		else if (d->len)
			r->status = (uint8_t *)r->in.iov[r->in.niov - 1].iov_base + r->in.iov[r->in.niov - 1].iov_len - 1;
		return 0;
	}
	if (*seen_write)
		return -EINVAL; /* readable after writable buffers */
	if (map_gpa(c, d->addr, d->len, &r->out) < 0)
		r->bad = true;
	return 0;
}

/*
 * Walk the chain at head into r->out / r->in.  Returns 0 (r->bad if a buffer
 * was outside shared memory), or -EINVAL with *why when the chain itself is
 * unusable.
 */
static int parse_chain(struct vub_req *r, uint16_t head, const char **why)
{
	struct vub_vq *vq = r->vq;
	const struct vring_desc *table = vq->desc;
	unsigned max = vq->num, i = head, count = 0;
	bool seen_write = false, indirect_done = false;

	vd_qiov_reset(&r->out);
	vd_qiov_reset(&r->in);
	r->status = NULL;
	r->bad = false;
	r->head = head;
	if (head >= vq->num) {
		*why = "descriptor head index out of range";
		return -EINVAL;
	}
	for (;;) {
		struct vring_desc d = read_desc(table, i);

		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (!vq->c->indirect || indirect_done || table != vq->desc || count || (d.flags & VRING_DESC_F_NEXT)) {
				*why = "misplaced or unnegotiated indirect descriptor";
				return -EINVAL;
			}
			if (d.len == 0 || d.len % sizeof(struct vring_desc) || d.len / sizeof(struct vring_desc) > VUB_INDIRECT_MAX) {
				*why = "bad indirect table length";
				return -EINVAL;
			}
			table = gpa_ptr(vq->c, d.addr, d.len);
			if (!table || (uintptr_t)table % 8) {
				*why = "indirect table outside shared memory";
				return -EINVAL;
			}
			indirect_done = true;
			max = d.len / sizeof(struct vring_desc);
			i = 0;
			continue;
		}
		if (++count > max) {
			*why = "descriptor chain too long or looping";
			return -EINVAL;
		}
		if (add_buffer(r, &d, &seen_write) < 0) {
			*why = "device-readable descriptor after a device-writable one";
			return -EINVAL;
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			break;
		i = d.next;
		if (i >= max) {
			*why = "next descriptor index out of range";
			return -EINVAL;
		}
	}
	if (!r->status) {
		*why = "request without a status byte";
		return -EINVAL;
	}
	return 0;
}

static enum vd_io_op io_op(uint32_t type)
{
	switch (type) {
	case VIRTIO_BLK_T_IN:
		return VD_IO_READ;
	case VIRTIO_BLK_T_OUT:
		return VD_IO_WRITE;
	case VIRTIO_BLK_T_FLUSH:
		return VD_IO_FLUSH;
	case VIRTIO_BLK_T_DISCARD:
		return VD_IO_DISCARD;
	case VIRTIO_BLK_T_WRITE_ZEROES:
		return VD_IO_WRITE_ZEROES;
	default:
		return VD_IO__MAX;
	}
}

/* Is [sector, +bytes) inside the disk and aligned to the logical block size? */
/* block_resize may change it while lanes serve requests. */
static uint64_t capacity(const struct vub_export *e)
{
	return __atomic_load_n(&e->capacity, __ATOMIC_RELAXED);
}

static bool range_ok(struct vub_export *e, uint64_t sector, uint64_t bytes)
{
	uint64_t off, cap = capacity(e);

	if (sector > cap / VIRTIO_BLK_SECTOR)
		return false;
	off = sector * VIRTIO_BLK_SECTOR;
	return off % e->lbs == 0 && bytes % e->lbs == 0 && bytes <= cap - off;
}

/*
 * block_resize: the config space shows the new capacity from now on.  The
 * front end is not notified (no back-end request channel): a guest sees
 * the new size when it reads the config again (virtio-blk rescans on a
 * config interrupt, so in practice after a reconnect or reboot).
 */
static void vub_resize(struct vd_export *exp, uint64_t size)
{
	struct vub_export *e = exp->opaque;

	__atomic_store_n(&e->capacity, size / e->lbs * e->lbs, __ATOMIC_RELAXED);
}

static uint8_t do_dwz(struct vub_req *r, uint32_t type)
{
	struct vub_export *e = r->vq->c->e;
	struct vd_bnode *bs = e->exp->bs;
	size_t segs_bytes = r->out.size - sizeof(struct virtio_blk_outhdr);
	struct virtio_blk_dwz seg;
	int ret;

	if (!e->exp->writable)
		return VIRTIO_BLK_S_IOERR;
	if (segs_bytes == 0 || segs_bytes % sizeof(seg) || segs_bytes / sizeof(seg) > VUB_DWZ_SEGS)
		return VIRTIO_BLK_S_UNSUPP;
	for (size_t o = sizeof(struct virtio_blk_outhdr); o < r->out.size; o += sizeof(seg)) {
		vd_qiov_to_buf(&r->out, o, &seg, sizeof(seg));
		if (type == VIRTIO_BLK_T_DISCARD ? seg.flags != 0 : (seg.flags & ~VIRTIO_BLK_WZ_F_UNMAP) != 0)
			return VIRTIO_BLK_S_UNSUPP;
		if (seg.num_sectors > VUB_MAX_DWZ_SECTORS ||
		    !range_ok(e, seg.sector, (uint64_t)seg.num_sectors * VIRTIO_BLK_SECTOR))
			return VIRTIO_BLK_S_IOERR;
		if (type == VIRTIO_BLK_T_DISCARD) {
			ret = vd_bnode_co_pdiscard(bs, seg.sector * VIRTIO_BLK_SECTOR,
						   (uint64_t)seg.num_sectors * VIRTIO_BLK_SECTOR);
			if (ret == -ENOTSUP)
				ret = 0; /* discard is a hint */
		} else {
			ret = vd_bnode_co_pwrite_zeroes(bs, seg.sector * VIRTIO_BLK_SECTOR,
							(uint64_t)seg.num_sectors * VIRTIO_BLK_SECTOR,
							(seg.flags & VIRTIO_BLK_WZ_F_UNMAP) ? VD_BREQ_MAY_UNMAP : 0);
		}
		if (ret < 0)
			return VIRTIO_BLK_S_IOERR;
	}
	return VIRTIO_BLK_S_OK;
}

/* Serve one request; returns the status and the bytes written to device-writable memory in *written. */
static uint8_t serve(struct vub_req *r, uint32_t type, uint64_t sector, uint32_t *written)
{
	struct vub_export *e = r->vq->c->e;
	struct vd_bnode *bs = e->exp->bs;
	size_t in_data = r->in.size - 1; /* the status byte is the last device-writable byte */
	size_t out_data = r->out.size - sizeof(struct virtio_blk_outhdr);
	int ret;

	*written = 1;
	switch (type) {
	case VIRTIO_BLK_T_IN:
		if (!range_ok(e, sector, in_data))
			return VIRTIO_BLK_S_IOERR;
		ret = in_data ? vd_bnode_co_preadv(bs, sector * VIRTIO_BLK_SECTOR, in_data, &r->in, 0, 0) : 0;
		*written = in_data < UINT32_MAX ? (uint32_t)(in_data + 1) : UINT32_MAX;
		return ret < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_OUT:
		if (!e->exp->writable || !range_ok(e, sector, out_data))
			return VIRTIO_BLK_S_IOERR;
		ret = out_data ? vd_bnode_co_pwritev(bs, sector * VIRTIO_BLK_SECTOR, out_data, &r->out,
						     sizeof(struct virtio_blk_outhdr), 0)
			       : 0;
		return ret < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_FLUSH:
		return vd_bnode_co_flush(bs) < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_GET_ID: {
		char id[VIRTIO_BLK_ID_BYTES] = { 0 };
		size_t n = in_data < sizeof(id) ? in_data : sizeof(id);

		memcpy(id, e->serial, strnlen(e->serial, sizeof(id)));
		vd_qiov_from_buf(&r->in, 0, id, n);
		*written = (uint32_t)(n + 1);
		return VIRTIO_BLK_S_OK;
	}
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES:
		if (!(e->offered & BIT(type == VIRTIO_BLK_T_DISCARD ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES)))
			return VIRTIO_BLK_S_UNSUPP;
		return do_dwz(r, type);
	default:
		(void)out_data;
		return VIRTIO_BLK_S_UNSUPP;
	}
}

static void lane_completed(struct vub_lane *lane);

static void req_done(struct vub_req *r, uint8_t status, uint32_t written)
{
	struct vub_vq *vq = r->vq;

	*r->status = status;
	push_used(vq, r->head, written);
	notify_front_end(vq);
	if (vq->starved)
		schedule_notify(vq); /* takes the requests waiting for this slot, outside this completion */
	r->next_free = vq->free_reqs;
	vq->free_reqs = r;
	vq->inflight--;
	vq->lane->inflight--;
	if (vq->inflight == 0 && !vq->started)
		vq->track = NULL; /* a stopped ring (kick fd hung up) stops tracking once idle */
	if (vq->inflight == 0)
		vd_co_queue_wake_all(&vq->drained);
	if (vq->lane->inflight == 0)
		vd_co_queue_wake_all(&vq->lane->drained);
	lane_completed(vq->lane);
}

static void req_co(void *opaque)
{
	struct vub_req *r = opaque;
	struct vub_export *e = r->vq->c->e;
	struct vd_export *exp = e->exp;
	struct virtio_blk_outhdr h;
	uint32_t written = 1;
	uint8_t status;
	uint64_t t_end;
	enum vd_io_op op = VD_IO__MAX;

	if (r->bad || r->out.size < sizeof(h)) {
		COUNT(e->bad_requests);
		status = VIRTIO_BLK_S_IOERR;
	} else {
		vd_qiov_to_buf(&r->out, 0, &h, sizeof(h));
		op = io_op(h.type);
		status = serve(r, h.type, h.sector, &written);
		/* memguard replaced pages of the front end's memory with zeroes: what we copied may be them. */
		if (status == VIRTIO_BLK_S_OK && memory_faulted(r->vq->c))
			status = VIRTIO_BLK_S_IOERR;
	}
	t_end = vdd_now_ns();
	if (op != VD_IO__MAX) {
		uint64_t bytes = op == VD_IO_READ ? r->in.size - 1
				 : op == VD_IO_WRITE ? r->out.size - sizeof(h)
						     : 0;

		vd_io_stats_account(&exp->stats, op, bytes, t_end - r->t_start, status != VIRTIO_BLK_S_OK);
		if (exp->node_stats)
			vd_io_stats_account(exp->node_stats, op, bytes, t_end - r->t_start, status != VIRTIO_BLK_S_OK);
	}
	req_done(r, status, written);
}

/* Take new requests off vq's avail ring (after those to resubmit); true if there were any. */
static bool take_requests(struct vub_vq *vq)
{
	bool any = false;

	while (vq_ready(vq)) {
		bool resubmit = vq->resubmit_pos < vq->nresubmit;
		uint16_t avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE), head;
		struct vub_req *r;
		const char *why = NULL;
		struct vd_co *co;

		if (!resubmit && avail_idx == vq->last_avail)
			break;
		if (!resubmit && (uint16_t)(avail_idx - vq->last_avail) > vq->num) {
			vq_fail(vq, "avail index moved by more than the ring size");
			break;
		}
		r = vq->free_reqs;
		if (!r) {
			vq->starved = true; /* a completion resumes us */
			break;
		}
		head = resubmit ? vq->resubmit[vq->resubmit_pos]
				: __atomic_load_n(&vq->avail->ring[vq->last_avail % vq->num], __ATOMIC_RELAXED);
		if (parse_chain(r, head, &why) < 0) {
			vq_fail(vq, why);
			break;
		}
		if (resubmit) {
			vq->resubmit_pos++;
			COUNT(vq->c->e->resubmitted);
		} else {
			vq->last_avail++;
			track_taken(vq, head);
			if (vq->lane->unanswered)
				vq->lane->unanswered--;
		}
		vq->free_reqs = r->next_free;
		vq->inflight++;
		vq->lane->inflight++;
		COUNT(vq->c->e->reqs_total);
		r->t_start = vdd_now_ns();
		any = true;
		co = vd_co_create(req_co, r);
		if (!co) {
			req_done(r, VIRTIO_BLK_S_IOERR, 1);
			continue;
		}
		vd_co_enter(co);
	}
	return any;
}

static void set_avail_event(struct vub_vq *vq)
{
	if (vq->c->event_idx)
		__atomic_store_n(used_avail_event(vq), vq->last_avail, __ATOMIC_RELAXED);
}

static void start_poller(struct vub_lane *lane);

/*
 * Take what is on the ring and ask for a kick at the next request; look once
 * more after asking (the front end may have added one just before).  With
 * EVENT_IDX the kick comes only when the front end moves avail->idx past
 * avail_event, so it must be exactly our last_avail once we stop looking.
 * Returns false when the queue cannot go on (stopped, or out of request slots).
 */
static bool drain_and_rearm(struct vub_vq *vq)
{
	for (;;) {
		take_requests(vq);
		if (!vq_ready(vq) || vq->starved)
			return false;
		set_avail_event(vq);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE) == vq->last_avail)
			return true;
	}
}

/*
 * Adaptive polling (poll-max-us, QEMU's scheme): a lane that went to sleep
 * and was woken -- by a kick or by a completion of the device under it --
 * within the maximum window would have caught that event by polling: grow its
 * window (4 us, then doubling, up to the maximum); a wake-up after longer than
 * that means polling would only have burnt CPU: no window until short sleeps
 * come back.  Counting the completions matters on a slow device at low queue
 * depth: the guest's next request follows a completion within microseconds,
 * but the device's answer takes longer than any window, and spinning through
 * that wait takes the CPU the guest (or the other queue's guest) needs.
 */
static void adapt_poll_window(struct vub_lane *lane)
{
	uint64_t max = (uint64_t)lane->e->poll_max_us * 1000, slept;

	if (!max || !lane->asleep_since)
		return;
	slept = vdd_now_ns() - lane->asleep_since;
	lane->asleep_since = 0;
	lane->poll_ns = vdd_poll_window_after_sleep(lane->poll_ns, slept, max);
}

static uint64_t poll_window_ns(struct vub_lane *lane)
{
	return lane->e->poll_us ? (uint64_t)lane->e->poll_us * 1000 : lane->poll_ns;
}

/*
 * Adaptive polling catches the guest's answer to a completion (its next
 * request, within microseconds); what follows a request is the device's
 * answer, which polling cannot bring closer.  Once every completion has
 * been answered there is nothing to poll for: sleep, and let the next
 * completion start polling again.  (On a slow device at low queue depth,
 * spinning through the device's latency only takes the CPU the guest and
 * the host's I/O need.)  A fixed poll-us window always polls.
 */
static bool worth_polling(struct vub_lane *lane)
{
	return poll_window_ns(lane) && (lane->e->poll_us || lane->unanswered);
}

static void process_vq(struct vub_vq *vq)
{
	if (!drain_and_rearm(vq))
		return;
	if (worth_polling(vq->lane))
		start_poller(vq->lane);
	else if (!vq->lane->poller_running)
		vq->lane->asleep_since = vdd_now_ns();
}

/*
 * A request of the lane finished.  The guest's next one usually follows
 * within microseconds (at queue depth 1 always): poll for it instead of
 * sleeping and being kicked.  The time the lane slept before this
 * completion adapts the window too: a device slower than the window drops
 * it, so that the next request taken is not followed by a spin through the
 * device's latency.
 */
static void lane_completed(struct vub_lane *lane)
{
	lane->completions++;
	lane->unanswered++;
	if (lane->poller_running || lane->paused)
		return;
	adapt_poll_window(lane);
	if (worth_polling(lane))
		start_poller(lane);
	else
		lane->asleep_since = vdd_now_ns();
}

static void vq_stop_kick(struct vub_vq *vq);

static void kick_event(void *opaque, int fd, int revents)
{
	struct vub_vq *vq = opaque;
	uint64_t n;
	ssize_t r = read(fd, &n, sizeof(n));

	/* An eventfd never hangs up or reads EOF; anything else (a pipe whose writer left) would wake us forever. */
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR) || (!(revents & POLLIN) && revents)) {
		vq_stop_kick(vq);
		if (!vq->inflight)
			vq->track = NULL; /* else the last completion clears it (req_done) */
		vq_fail(vq, "the kick fd hung up or failed");
		return;
	}
	COUNT(vq->c->e->kicks);
	adapt_poll_window(vq->lane);
	process_vq(vq);
}

/*
 * Polling (poll-us, or the adaptive window): while requests keep coming, look
 * at the avail rings every loop iteration with kicks suppressed (the loop
 * reaps the file driver's completions in the same iterations); after the
 * window without a new request, turn kicks back on and sleep.
 */
static void set_no_notify(struct vub_lane *lane, bool on)
{
	struct vub_conn *c = &lane->e->conn;
	struct vub_vq *vq;

	LANE_FOR_EACH_VQ(c, lane, vq) {
		if (!vq->started || !vq->desc || vq->broken)
			continue;
		if (c->event_idx) {
			/* With EVENT_IDX the flag is ignored: move avail_event out of reach instead. */
			__atomic_store_n(used_avail_event(vq), on ? (uint16_t)(vq->last_avail - 1) : vq->last_avail,
					 __ATOMIC_RELAXED);
		} else {
			__atomic_store_n(&vq->used->flags, on ? VRING_USED_F_NO_NOTIFY : 0, __ATOMIC_RELAXED);
		}
	}
}

static bool control_pending(struct vub_conn *c)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN };

	return poll(&p, 1, 0) > 0;
}

static void poller_co(void *opaque)
{
	struct vub_lane *lane = opaque;
	struct vub_conn *c = &lane->e->conn;
	uint64_t idle_since = 0, spins = 0, completions = lane->completions;
	bool adaptive = !lane->e->poll_us, idle;
	struct vub_vq *vq;

	set_no_notify(lane, true);
	while (!conn_closing(c) && !lane->paused) {
		bool took = false;

		LANE_FOR_EACH_VQ(c, lane, vq)
			took |= take_requests(vq);
		if (!worth_polling(lane))
			break;
		/* The adaptive window runs from the last completion; a fixed one from any activity. */
		idle = lane->completions == completions && (adaptive || !took);
		if (!idle) {
			completions = lane->completions;
			idle_since = 0; /* the clock is read only when idle: it is not free at a million requests a second */
		} else if (!idle_since) {
			idle_since = vdd_now_ns();
		} else if (vdd_now_ns() - idle_since > poll_window_ns(lane)) {
			lane->unanswered = 0; /* the guest did not answer them: nothing more to wait for */
			break;
		}
		/* While we are scheduled the loop looks at no fd: make way for the control channel. */
		if (__atomic_load_n(&lane->wanted, __ATOMIC_RELAXED))
			break;
		if (++spins % VUB_POLL_CHECK_EVERY == 0 && control_pending(c))
			break;
		/*
		 * The guest thread we just woke (call eventfd) is often queued on
		 * this CPU (wake-affine): while there is nothing to do, let it run
		 * instead of spinning in its way.  If something did run, the CPU
		 * is contended (more runnable threads than CPUs: guests, other
		 * lanes, the host's I/O), and polling would take from them what it
		 * saves us: adaptive polling then stops, it only spins on a CPU
		 * nobody else wants.
		 */
		if (idle && vdd_yield_was_contended() && adaptive)
			break;
		vd_loop_schedule(vd_loop_get(), vd_co_self());
		vd_co_yield();
	}
	lane->poller_running = false;
	lane->asleep_since = vdd_now_ns();
	if (!conn_closing(c)) {
		set_no_notify(lane, false);
		LANE_FOR_EACH_VQ(c, lane, vq)
			drain_and_rearm(vq); /* what arrived while kicks were off (nothing when paused) */
	}
	vd_co_queue_wake_all(&lane->drained);
}

static void start_poller(struct vub_lane *lane)
{
	struct vd_co *co;

	if (lane->poller_running || conn_closing(&lane->e->conn))
		return;
	co = vd_co_create(poller_co, lane);
	if (!co)
		return;
	lane->poller_running = true;
	vd_loop_schedule(vd_loop_get(), co);
}

/* ---- virtqueue lifecycle ------------------------------------------------------------------------------------ */

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void vq_stop_kick(struct vub_vq *vq)
{
	if (vq->kick_fd >= 0)
		vd_loop_del_fd_handler(vd_loop_get(), vq->kick_fd);
	close_fd(&vq->kick_fd);
	vq->started = false;
}

static void vq_wait_idle(struct vub_vq *vq)
{
	while (vq->inflight)
		vd_co_queue_wait(&vq->drained, NULL);
}

static void vq_reset(struct vub_vq *vq)
{
	vq_stop_kick(vq);
	close_fd(&vq->call_fd);
	close_fd(&vq->err_fd);
	vq->num = 0;
	vq->addr_set = false;
	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	vq->last_avail = vq->used_idx = vq->signalled_used = 0;
	vq->signalled_valid = false;
	vq->enabled = false;
	vq->broken = false;
	vq->starved = false;
	vq->track = NULL;
	free(vq->resubmit);
	vq->resubmit = NULL;
	vq->nresubmit = vq->resubmit_pos = 0;
}

static int vq_alloc_reqs(struct vub_vq *vq, unsigned n)
{
	if (vq->nreqs >= n)
		return 0;
	for (unsigned i = 0; i < vq->nreqs; i++) {
		vd_qiov_destroy(&vq->reqs[i].out);
		vd_qiov_destroy(&vq->reqs[i].in);
	}
	free(vq->reqs);
	vq->nreqs = 0;
	vq->free_reqs = NULL;
	vq->reqs = calloc(n, sizeof(*vq->reqs));
	if (!vq->reqs)
		return -ENOMEM;
	vq->nreqs = n;
	for (unsigned i = 0; i < n; i++) {
		struct vub_req *r = &vq->reqs[n - 1 - i];

		r->vq = vq;
		vd_qiov_init(&r->out);
		vd_qiov_init(&r->in);
		r->next_free = vq->free_reqs;
		vq->free_reqs = r;
	}
	return 0;
}

static void vq_free_reqs(struct vub_vq *vq)
{
	for (unsigned i = 0; i < vq->nreqs; i++) {
		vd_qiov_destroy(&vq->reqs[i].out);
		vd_qiov_destroy(&vq->reqs[i].in);
	}
	free(vq->reqs);
	vq->reqs = NULL;
	vq->free_reqs = NULL;
	vq->nreqs = 0;
}

static struct vhu_inflight_split *inflight_region(struct vub_conn *c, unsigned i)
{
	return (struct vhu_inflight_split *)(c->ifl_base + i * vhu_inflight_queue_bytes((uint16_t)c->ifl_qsize));
}

struct taken {
	uint64_t counter;
	uint16_t head;
};

static int by_counter(const void *a, const void *b)
{
	const struct taken *x = a, *y = b;

	return x->counter < y->counter ? -1 : x->counter > y->counter;
}

/*
 * The area says what the last back end had in flight on this ring: finish
 * its last used batch (flags it had no time to clear), then queue the heads
 * still in flight for resubmission, oldest first.  They were taken from the
 * avail ring already, so ours continues after them: last_avail = used->idx +
 * their number (the front end's vring base cannot know it).
 */
static int track_recover(struct vub_vq *vq, struct vhu_inflight_split *t, uint16_t used)
{
	struct vub_conn *c = vq->c;
	uint16_t last_used = __atomic_load_n(&t->used_idx, __ATOMIC_ACQUIRE);
	struct taken *list;
	unsigned n = 0;

	if (last_used != used) {
		/*
		 * Our batches are of one head (push_used): only the last one can have been published without its
		 * flag cleared.  Following next further (by used - last_used) could clear heads really in flight.
		 */
		uint16_t h = __atomic_load_n(&t->last_batch_head, __ATOMIC_RELAXED);

		if (h < vq->num)
			__atomic_store_n(&t->desc[h].inflight, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&t->used_idx, used, __ATOMIC_RELEASE);
	}
	list = malloc(sizeof(*list) * vq->num);
	vq->resubmit = malloc(sizeof(*vq->resubmit) * vq->num);
	if (!list || !vq->resubmit) {
		free(list);
		return -ENOMEM;
	}
	for (unsigned h = 0; h < c->ifl_qsize; h++) {
		if (!__atomic_load_n(&t->desc[h].inflight, __ATOMIC_RELAXED))
			continue;
		if (h >= vq->num) {
			/* Not a head of this ring (it is smaller than the area says): nothing we could resubmit. */
			__atomic_store_n(&t->desc[h].inflight, 0, __ATOMIC_RELAXED);
			continue;
		}
		list[n].head = (uint16_t)h;
		list[n].counter = __atomic_load_n(&t->desc[h].counter, __ATOMIC_RELAXED);
		n++;
	}
	qsort(list, n, sizeof(*list), by_counter);
	/*
	 * The counters come from shared memory (any value, UINT64_MAX included): number the heads in flight
	 * 1..n in their order, so the heads we take next (n + 1 on) are newer without ever wrapping.
	 */
	for (unsigned i = 0; i < n; i++) {
		vq->resubmit[i] = list[i].head;
		__atomic_store_n(&t->desc[list[i].head].counter, (uint64_t)i + 1, __ATOMIC_RELAXED);
	}
	vq->ifl_counter = (uint64_t)n + 1;
	free(list);
	vq->nresubmit = n;
	vq->resubmit_pos = 0;
	vq->used_idx = used;
	vq->last_avail = (uint16_t)(used + n);
	vq->signalled_valid = false;
	if (n)
		vdd_log("vhost-user-blk export '%s': virtqueue %u: resubmitting %u request%s in flight before the "
			"reconnect", c->e->exp->id, vq->idx, n, n == 1 ? "" : "s");
	return 0;
}

/* Start tracking vq in the inflight area (if the front end gave us one); false if the ring cannot start. */
static bool track_start(struct vub_vq *vq)
{
	struct vub_conn *c = vq->c;
	struct vhu_inflight_split *t;
	uint16_t used;

	vq->track = NULL;
	if (!c->ifl_base || vq->idx >= c->ifl_queues)
		return true;
	if (vq->num > c->ifl_qsize) {
		vq_fail(vq, "ring larger than the inflight area's queue size");
		return false;
	}
	t = inflight_region(c, vq->idx);
	used = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	if (__atomic_load_n(&t->version, __ATOMIC_ACQUIRE) == VHU_INFLIGHT_VERSION) {
		if (track_recover(vq, t, used) < 0) {
			vq_fail(vq, "out of memory");
			return false;
		}
	} else {
		/* A new area (the front end zeroed what GET_INFLIGHT_FD gave it): nothing was in flight. */
		memset(t->desc, 0, sizeof(t->desc[0]) * c->ifl_qsize);
		t->features = 0;
		t->desc_num = (uint16_t)c->ifl_qsize;
		t->last_batch_head = 0;
		t->used_idx = used;
		__atomic_store_n(&t->version, VHU_INFLIGHT_VERSION, __ATOMIC_RELEASE);
	}
	vq->track = t;
	return true;
}

/* Make vq serve its ring if everything it needs is there. */
static void vq_maybe_start(struct vub_vq *vq)
{
	if (vq->kick_fd < 0 || !vq->desc || vq->started)
		return;
	if (vq_alloc_reqs(vq, vq->num) < 0) {
		vq_fail(vq, "out of memory");
		return;
	}
	free(vq->resubmit);
	vq->resubmit = NULL;
	vq->nresubmit = vq->resubmit_pos = 0;
	if (!track_start(vq))
		return;
	if (vd_loop_set_fd_handler(vd_loop_get(), vq->kick_fd, POLLIN, kick_event, vq) < 0) {
		vq_fail(vq, "cannot watch the kick eventfd");
		return;
	}
	vq->started = true;
	/* The front end may have queued requests before it gave us the kick fd. */
	process_vq(vq);
}

/* ---- the control channel ------------------------------------------------------------------------------------ */

struct vub_msg {
	struct vhu_hdr hdr;
	union {
		uint64_t u64;
		struct vhu_vring_state state;
		struct vhu_vring_addr addr;
		struct vhu_mem_table mem;
		struct vhu_config config;
		struct vhu_inflight inflight;
		uint8_t raw[VUB_MAX_MSG];
	} p;
	int fds[VHU_MEM_TABLE_MAX];
	int nfds;
};

static void msg_close_fds(struct vub_msg *m)
{
	for (int i = 0; i < m->nfds; i++)
		close_fd(&m->fds[i]);
	m->nfds = 0;
}

/* Read up to len bytes (fds too, when fds != NULL); 0 = EOF, <0 error or closing. */
static ssize_t recv_some(struct vub_conn *c, void *buf, size_t len, struct vub_msg *m)
{
	for (;;) {
		struct iovec iov = { .iov_base = buf, .iov_len = len };
		union {
			char buf[CMSG_SPACE(sizeof(int) * VHU_MEM_TABLE_MAX)];
			struct cmsghdr align;
		} u;
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
				     .msg_controllen = sizeof(u.buf) };
		ssize_t n;

		if (conn_closing(c))
			return -ECANCELED;
		n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			vdd_cofd_wait(&c->cofd, POLLIN);
			continue;
		}
		if (n < 0)
			return -errno;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
				int fd;

				memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
				if (m->nfds < VHU_MEM_TABLE_MAX)
					m->fds[m->nfds++] = fd;
				else
					close(fd);
			}
		}
		if (mh.msg_flags & MSG_CTRUNC)
			return -EMSGSIZE;
		return n;
	}
}

static int recv_exact(struct vub_conn *c, void *buf, size_t len, struct vub_msg *m)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = recv_some(c, (uint8_t *)buf + done, len - done, m);

		if (n <= 0)
			return n == 0 ? -ECONNRESET : (int)n;
		done += (size_t)n;
	}
	return 0;
}

/* Read one message; -errno (EPROTO: malformed) ends the connection. */
static int recv_msg(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	int ret;

	m->nfds = 0;
	ret = recv_exact(c, &m->hdr, sizeof(m->hdr), m);
	if (ret < 0)
		return ret;
	if ((m->hdr.flags & VHU_VERSION_MASK) != VHU_VERSION) {
		*why = "unsupported protocol version";
		return -EPROTO;
	}
	if (m->hdr.size > sizeof(m->p)) {
		*why = "message payload too large";
		return -EPROTO;
	}
	return recv_exact(c, &m->p, m->hdr.size, m);
}

static int send_all(struct vub_conn *c, const void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = send(c->fd, (const uint8_t *)buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (conn_closing(c))
				return -ECANCELED;
			vdd_cofd_wait(&c->cofd, POLLOUT);
			continue;
		}
		if (n < 0)
			return -errno;
		done += (size_t)n;
	}
	return 0;
}

/* A reply, with one fd when fd >= 0 (GET_INFLIGHT_FD). */
static int send_reply_fd(struct vub_conn *c, const struct vub_msg *req, const void *payload, uint32_t size, int fd)
{
	struct {
		struct vhu_hdr hdr;
		uint8_t p[VUB_MAX_MSG];
	} out;
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = &out, .iov_len = sizeof(out.hdr) + size };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;
	ssize_t n;

	out.hdr.request = req->hdr.request;
	out.hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
	out.hdr.size = size;
	memcpy(out.p, payload, size);
	if (fd < 0)
		return send_all(c, &out, sizeof(out.hdr) + size);
	mh.msg_control = u.buf;
	mh.msg_controllen = sizeof(u.buf);
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	for (;;) {
		n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (conn_closing(c))
				return -ECANCELED;
			vdd_cofd_wait(&c->cofd, POLLOUT);
			continue;
		}
		if (n < 0)
			return -errno;
		break;
	}
	/* The fd went with the first byte; the rest (rarely any) goes as plain data. */
	return send_all(c, (uint8_t *)&out + n, sizeof(out.hdr) + size - (size_t)n);
}

static int send_reply(struct vub_conn *c, const struct vub_msg *req, const void *payload, uint32_t size)
{
	return send_reply_fd(c, req, payload, size, -1);
}

static int reply_u64(struct vub_conn *c, const struct vub_msg *req, uint64_t v)
{
	return send_reply(c, req, &v, sizeof(v));
}

/* ---- message handlers ---------------------------------------------------------------------------------------- */

/* Result of a handler: 0 ok, >0 failed (reported with REPLY_ACK), <0 protocol error (hang up). */
#define MSG_FAILED 1

static int need_payload(struct vub_msg *m, size_t size, const char **why)
{
	if (m->hdr.size < size) {
		*why = "payload too short";
		return -EPROTO;
	}
	return 0;
}

static struct vub_vq *msg_vq(struct vub_conn *c, uint32_t index, const char **why)
{
	if (index >= c->e->num_queues) {
		*why = "virtqueue index out of range";
		return NULL;
	}
	return &c->vqs[index];
}

/* In the lane's thread: take no new requests and wait for those in flight (and the poller) to finish. */
static void lane_pause(struct vub_lane *lane)
{
	lane->paused = true;
	while (lane->inflight || lane->poller_running)
		vd_co_queue_wait(&lane->drained, NULL);
}

/* In the lane's thread: serve the rings again, including what was kicked while paused. */
static void lane_resume(struct vub_lane *lane)
{
	struct vub_conn *c = &lane->e->conn;
	struct vub_vq *vq;

	lane->paused = false;
	LANE_FOR_EACH_VQ(c, lane, vq)
		if (vq_ready(vq))
			process_vq(vq);
}

static void lane_pause_fn(void *opaque)
{
	lane_pause(opaque);
}

/* From the control channel: run fn(arg) in the lane's thread and wait (its poller makes way meanwhile). */
static void lane_call(struct vub_lane *lane, void (*fn)(void *), void *arg)
{
	__atomic_add_fetch(&lane->wanted, 1, __ATOMIC_RELAXED);
	vdd_thread_call(lane->thread, fn, arg);
	__atomic_sub_fetch(&lane->wanted, 1, __ATOMIC_RELAXED);
}

/* From the control channel: pause every lane (each in its thread). */
static void conn_pause(struct vub_conn *c)
{
	for (unsigned i = 0; i < c->e->nlanes; i++)
		lane_call(&c->e->lanes[i], lane_pause_fn, &c->e->lanes[i]);
}

static void lane_resume_fn(void *opaque)
{
	lane_resume(opaque);
}

/* From the control channel: let every lane serve its rings again. */
static void conn_resume(struct vub_conn *c)
{
	for (unsigned i = 0; i < c->e->nlanes; i++)
		lane_call(&c->e->lanes[i], lane_resume_fn, &c->e->lanes[i]);
}

typedef int (*vub_handler)(struct vub_conn *c, struct vub_msg *m, const char **why);

struct lane_msg {
	struct vub_lane *lane;
	struct vub_conn *c;
	struct vub_msg *m;
	const char **why;
	vub_handler fn;
	bool pause;
	int ret;
};

static void lane_msg_fn(void *opaque)
{
	struct lane_msg *k = opaque;

	if (k->pause)
		lane_pause(k->lane);
	k->ret = k->fn(k->c, k->m, k->why);
	if (k->pause)
		lane_resume(k->lane);
}

/*
 * Run the handler of a message about one virtqueue in that virtqueue's lane
 * (pausing the lane first: the message may change the ring or its request
 * slots under requests in flight).  A message too short to name a valid
 * queue is left to the handler here, which refuses it.
 */
static int on_lane(struct vub_conn *c, struct vub_msg *m, const char **why, vub_handler fn, bool pause)
{
	bool fd_msg = m->hdr.request == VHU_SET_VRING_KICK || m->hdr.request == VHU_SET_VRING_CALL ||
		      m->hdr.request == VHU_SET_VRING_ERR;
	uint32_t index = fd_msg ? (uint32_t)(m->p.u64 & VHU_VRING_IDX_MASK) : m->p.state.index;
	struct lane_msg k = { .c = c, .m = m, .why = why, .fn = fn, .pause = pause };

	if (m->hdr.size < sizeof(uint64_t) || index >= c->e->num_queues)
		return fn(c, m, why);
	k.lane = c->vqs[index].lane;
	lane_call(k.lane, lane_msg_fn, &k);
	return k.ret;
}

/* In the lane's thread, after a new memory table: translate its rings again, start those now complete, resume. */
static void lane_remap_fn(void *opaque)
{
	struct vub_lane *lane = opaque;
	struct vub_conn *c = &lane->e->conn;
	struct vub_vq *vq;

	LANE_FOR_EACH_VQ(c, lane, vq)
		if (vq->addr_set && !vq_translate(vq))
			vq_fail(vq, "rings outside the new memory table");
	lane_resume(lane);
	LANE_FOR_EACH_VQ(c, lane, vq)
		vq_maybe_start(vq);
}

static int h_set_mem_table(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vhu_mem_table *t = &m->p.mem;
	struct vub_region nr[VUB_MAX_REGIONS];

	if (need_payload(m, 8, why) < 0)
		return -EPROTO;
	if (t->nregions == 0 || t->nregions > VUB_MAX_REGIONS || m->hdr.size < 8 + 32ull * t->nregions ||
	    (unsigned)m->nfds != t->nregions) {
		*why = "bad memory table (region count, size or fds)";
		return -EPROTO;
	}
	for (uint32_t i = 0; i < t->nregions; i++) {
		struct vhu_mem_region *r = &t->regions[i];
		uint64_t len = r->memory_size + r->mmap_offset;
		struct stat st;
		void *p;

		if (!r->memory_size || len < r->memory_size || len > SIZE_MAX || r->guest_phys_addr + r->memory_size < r->guest_phys_addr ||
		    r->userspace_addr + r->memory_size < r->userspace_addr) {
			*why = "bad memory region";
			for (uint32_t j = 0; j < i; j++)
				unmap_region(&nr[j]);
			return -EPROTO;
		}
		/* Touching a mapping beyond the end of a file is SIGBUS: the file must be as large as the region. */
		if (fstat(m->fds[i], &st) < 0 || (S_ISREG(st.st_mode) && (uint64_t)st.st_size < len)) {
			vdd_log("vhost-user-blk export '%s': memory region %u ends beyond its file", c->e->exp->id, i);
			for (uint32_t j = 0; j < i; j++)
				unmap_region(&nr[j]);
			return MSG_FAILED;
		}
		p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, m->fds[i], 0);
		if (p == MAP_FAILED) {
			vdd_log("vhost-user-blk export '%s': cannot map a memory region of %" PRIu64 " bytes: %s",
				c->e->exp->id, len, strerror(errno));
			for (uint32_t j = 0; j < i; j++)
				unmap_region(&nr[j]);
			return MSG_FAILED;
		}
		nr[i] = (struct vub_region){ .gpa = r->guest_phys_addr, .size = r->memory_size, .uva = r->userspace_addr,
					     .host = (uint8_t *)p + r->mmap_offset, .map = p, .map_len = (size_t)len };
		/* The front end can still shrink the file later (unless sealed): survive the SIGBUS, reset the device. */
		nr[i].guard = vdd_memguard_add(p, (size_t)len, c->e->fault_fd);
		if (nr[i].guard < 0) {
			vdd_log("vhost-user-blk export '%s': cannot guard a memory region: %s", c->e->exp->id,
				strerror(-nr[i].guard));
			for (uint32_t j = 0; j <= i; j++)
				unmap_region(&nr[j]);
			return MSG_FAILED;
		}
	}
	/* Requests in flight point into the old mappings. */
	conn_pause(c);
	unmap_regions(c);
	memcpy(c->regions, nr, sizeof(nr[0]) * t->nregions);
	c->nregions = (int)t->nregions;
	for (unsigned i = 0; i < c->e->nlanes; i++)
		lane_call(&c->e->lanes[i], lane_remap_fn, &c->e->lanes[i]);
	return 0;
}

static int h_vring_num(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vub_vq *vq;

	if (need_payload(m, sizeof(m->p.state), why) < 0 || !(vq = msg_vq(c, m->p.state.index, why)))
		return -EPROTO;
	if (vq->started) {
		*why = "SET_VRING_NUM on a running ring";
		return -EPROTO;
	}
	if (m->p.state.num == 0 || m->p.state.num > c->e->queue_size || (m->p.state.num & (m->p.state.num - 1))) {
		vdd_log("vhost-user-blk export '%s': ring size %u refused (power of two up to queue-size=%u)",
			c->e->exp->id, m->p.state.num, c->e->queue_size);
		return MSG_FAILED;
	}
	vq->num = m->p.state.num;
	if (vq->addr_set)
		vq_translate(vq);
	return 0;
}

static int h_vring_addr(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vhu_vring_addr *a = &m->p.addr;
	struct vub_vq *vq;

	if (need_payload(m, sizeof(*a), why) < 0 || !(vq = msg_vq(c, a->index, why)))
		return -EPROTO;
	if (a->desc_user_addr % 16 || a->avail_user_addr % 2 || a->used_user_addr % 4) {
		*why = "misaligned ring address";
		return -EPROTO;
	}
	vq->desc_uva = a->desc_user_addr;
	vq->avail_uva = a->avail_user_addr;
	vq->used_uva = a->used_user_addr;
	vq->addr_set = true;
	if (!vq_translate(vq)) {
		vdd_log("vhost-user-blk export '%s': virtqueue %u: ring addresses outside shared memory", c->e->exp->id,
			vq->idx);
		return MSG_FAILED;
	}
	vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_RELAXED);
	vq->signalled_valid = false;
	vq_maybe_start(vq);
	return 0;
}

static int h_vring_base(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vub_vq *vq;

	if (need_payload(m, sizeof(m->p.state), why) < 0 || !(vq = msg_vq(c, m->p.state.index, why)))
		return -EPROTO;
	if (vq->started) {
		*why = "SET_VRING_BASE on a running ring";
		return -EPROTO;
	}
	vq->last_avail = (uint16_t)m->p.state.num;
	vq->used_idx = (uint16_t)m->p.state.num;
	return 0;
}

/* Run the heads left to resubmit while the ring can serve them (GET_VRING_BASE must not count heads never run). */
static void vq_finish_resubmit(struct vub_vq *vq)
{
	while (vq->resubmit_pos < vq->nresubmit && vq_ready(vq)) {
		unsigned pos = vq->resubmit_pos;

		take_requests(vq);
		if (vq->inflight)
			vq_wait_idle(vq);
		else if (vq->resubmit_pos == pos)
			break;
	}
}

/* Complete the heads left to resubmit that the ring could not run (stopped, disabled, broken) with an error. */
static void vq_fail_resubmit(struct vub_vq *vq)
{
	unsigned failed = 0;

	while (vq->resubmit_pos < vq->nresubmit && vq->desc && vq->free_reqs && !conn_closing(vq->c)) {
		uint16_t head = vq->resubmit[vq->resubmit_pos++];
		struct vub_req *r = vq->free_reqs;
		const char *why = NULL;

		if (parse_chain(r, head, &why) < 0) {
			push_used(vq, head, 0);
		} else {
			*r->status = VIRTIO_BLK_S_IOERR;
			push_used(vq, head, 1);
		}
		failed++;
	}
	vq->resubmit_pos = vq->nresubmit;
	if (failed) {
		schedule_notify(vq);
		vdd_log("vhost-user-blk export '%s': virtqueue %u stopped before resubmitting %u request%s: failed "
			"them", vq->c->e->exp->id, vq->idx, failed, failed == 1 ? "" : "s");
	}
}

/* GET_VRING_BASE, in the ring's lane: stop it; the answer replaces the request's payload. */
static int h_stop_vring(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vub_vq *vq;

	if (need_payload(m, sizeof(m->p.state), why) < 0 || !(vq = msg_vq(c, m->p.state.index, why)))
		return -EPROTO;
	vq_finish_resubmit(vq);
	vq_stop_kick(vq);
	/* The front end owns the ring again once we answer: finish what we took from it first. */
	vq_wait_idle(vq);
	vq_fail_resubmit(vq);
	vq->track = NULL;
	m->p.state.index = vq->idx;
	m->p.state.num = vq->last_avail;
	close_fd(&vq->call_fd);
	vq->broken = false;
	vq->enabled = false;
	return 0;
}

static int h_get_vring_base(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	int ret = on_lane(c, m, why, h_stop_vring, false);

	if (ret)
		return ret;
	return send_reply(c, m, &m->p.state, sizeof(m->p.state)) < 0 ? -EIO : 0;
}

/* SET_VRING_KICK / CALL / ERR: u64 = index | NOFD flag, and one fd unless NOFD. */
static int h_vring_fd(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	uint64_t v;
	struct vub_vq *vq;
	int fd = -1;

	if (need_payload(m, sizeof(uint64_t), why) < 0)
		return -EPROTO;
	v = m->p.u64;
	if (!(vq = msg_vq(c, (uint32_t)(v & VHU_VRING_IDX_MASK), why)))
		return -EPROTO;
	if (v & VHU_VRING_NOFD) {
		if (m->nfds) {
			*why = "fd sent with the no-fd flag";
			return -EPROTO;
		}
	} else {
		if (m->nfds != 1) {
			*why = "expected exactly one fd";
			return -EPROTO;
		}
		fd = m->fds[0];
		m->fds[0] = -1;
		m->nfds = 0;
		/*
		 * Never block on the front end's fds: a call eventfd whose counter it set near the maximum would make
		 * our write sleep forever.  (This changes the front end's file description too; its own eventfds
		 * are non-blocking already.)
		 */
		if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
			close(fd);
			*why = "bad fd";
			return -EPROTO;
		}
	}
	switch (m->hdr.request) {
	case VHU_SET_VRING_KICK:
		vq_stop_kick(vq);
		vq->kick_fd = fd;
		if (fd < 0) {
			vdd_log("vhost-user-blk export '%s': virtqueue %u: polling without a kick fd is not supported",
				c->e->exp->id, vq->idx);
			return MSG_FAILED;
		}
		/* Without PROTOCOL_FEATURES a ring is enabled as soon as it starts. */
		if (!(c->features & BIT(VHOST_USER_F_PROTOCOL_FEATURES)))
			vq->enabled = true;
		vq_maybe_start(vq);
		break;
	case VHU_SET_VRING_CALL:
		close_fd(&vq->call_fd);
		vq->call_fd = fd;
		vq->signalled_valid = false;
		/*
		 * A ring restarted from an inflight area may have completions the front end was never told about
		 * (finished after it went away, or published by the back end before us): one spurious call.
		 */
		if (fd >= 0 && vq->started && vq->track) {
			uint64_t one = 1;
			ssize_t n = write(fd, &one, sizeof(one));

			(void)n;
		}
		break;
	default:
		close_fd(&vq->err_fd);
		vq->err_fd = fd;
		break;
	}
	return 0;
}

static int h_vring_enable(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vub_vq *vq;

	if (need_payload(m, sizeof(m->p.state), why) < 0 || !(vq = msg_vq(c, m->p.state.index, why)))
		return -EPROTO;
	vq->enabled = m->p.state.num != 0;
	if (vq->enabled && vq->started)
		process_vq(vq);
	return 0;
}

static int h_get_config(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	uint8_t space[VUB_MAX_CONFIG] = { 0 };
	uint64_t sectors;
	struct vhu_config *cfg = &m->p.config;
	struct {
		uint32_t offset, size, flags;
		uint8_t data[VUB_MAX_CONFIG];
	} __attribute__((packed)) out;

	if (need_payload(m, 12, why) < 0)
		return -EPROTO;
	if (cfg->offset > VUB_MAX_CONFIG || cfg->size > VUB_MAX_CONFIG - cfg->offset || m->hdr.size < 12 + cfg->size) {
		*why = "bad config space range";
		return -EPROTO;
	}
	memcpy(space, &c->e->cfg, sizeof(c->e->cfg));
	sectors = capacity(c->e) / VIRTIO_BLK_SECTOR; /* block_resize may have changed it */
	memcpy(space + offsetof(struct virtio_blk_config, capacity), &sectors, sizeof(sectors));
	out.offset = cfg->offset;
	out.size = cfg->size;
	out.flags = cfg->flags;
	memcpy(out.data, space + cfg->offset, cfg->size);
	return send_reply(c, m, &out, 12 + cfg->size) < 0 ? -EIO : 0;
}

/* The geometry of an inflight area a front end asks for or hands us; NULL if we can serve it. */
static const char *inflight_geometry_error(struct vub_conn *c, const struct vhu_inflight *in)
{
	if (in->num_queues == 0 || in->num_queues > c->e->num_queues)
		return "inflight area: queue count 0 or above num-queues";
	if (in->queue_size == 0 || in->queue_size > VU_RING_MAX)
		return "inflight area: queue size 0 or above 1024";
	return NULL;
}

/*
 * GET_INFLIGHT_FD: a new, zeroed area for num_queues rings of queue_size
 * descriptors, in a memfd sealed against resizing (the front end keeps it and
 * hands it back with SET_INFLIGHT_FD, to us or to the back end that replaces
 * us).  mmap_size 0 and no fd tells the front end to do without.
 */
static int h_get_inflight_fd(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vhu_inflight out = { 0 };
	const char *bad;
	int fd, ret;

	if (need_payload(m, offsetof(struct vhu_inflight, padding), why) < 0)
		return -EPROTO;
	out.num_queues = m->p.inflight.num_queues;
	out.queue_size = m->p.inflight.queue_size;
	bad = inflight_geometry_error(c, &m->p.inflight);
	if (bad) {
		vdd_log("vhost-user-blk export '%s': GET_INFLIGHT_FD for %u queues of %u: %s", c->e->exp->id,
			out.num_queues, out.queue_size, bad);
		return send_reply(c, m, &out, sizeof(out)) < 0 ? -EIO : 0;
	}
	out.mmap_size = out.num_queues * vhu_inflight_queue_bytes(out.queue_size);
	fd = memfd_create("vdiskd-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, (off_t)out.mmap_size) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		vdd_log("vhost-user-blk export '%s': cannot create the inflight area: %s", c->e->exp->id,
			strerror(errno));
		if (fd >= 0)
			close(fd);
		out.mmap_size = 0;
		return send_reply(c, m, &out, sizeof(out)) < 0 ? -EIO : 0;
	}
	ret = send_reply_fd(c, m, &out, sizeof(out), fd);
	close(fd);
	return ret < 0 ? -EIO : 0;
}

static void inflight_unmap(struct vub_conn *c)
{
	if (!c->ifl_map)
		return;
	vdd_memguard_remove(c->ifl_guard);
	munmap(c->ifl_map, c->ifl_map_len);
	c->ifl_map = NULL;
	c->ifl_base = NULL;
	c->ifl_queues = c->ifl_qsize = 0;
}

/* SET_INFLIGHT_FD: the area to track requests in; rings that start from now on resubmit what it says. */
static int h_set_inflight_fd(struct vub_conn *c, struct vub_msg *m, const char **why)
{
	struct vhu_inflight in;
	uint64_t need, len;
	struct stat st;
	void *p;
	int guard;

	if (need_payload(m, offsetof(struct vhu_inflight, padding), why) < 0)
		return -EPROTO;
	if (m->nfds != 1) {
		*why = "expected exactly one fd";
		return -EPROTO;
	}
	in = m->p.inflight;
	if ((*why = inflight_geometry_error(c, &in)))
		return -EPROTO;
	need = in.num_queues * vhu_inflight_queue_bytes(in.queue_size);
	if (in.mmap_size < need || in.mmap_offset > SIZE_MAX - need || in.mmap_offset % 8) {
		*why = "inflight area too small for its queues, or misplaced";
		return -EPROTO;
	}
	for (unsigned i = 0; i < c->e->num_queues; i++) {
		if (__atomic_load_n(&c->vqs[i].started, __ATOMIC_RELAXED)) {
			vdd_log("vhost-user-blk export '%s': SET_INFLIGHT_FD while virtqueue %u runs: refused",
				c->e->exp->id, i);
			return MSG_FAILED;
		}
	}
	len = in.mmap_offset + need; /* we map only what we use */
	if (fstat(m->fds[0], &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < len) {
		vdd_log("vhost-user-blk export '%s': the inflight area is not a file of at least %" PRIu64 " bytes",
			c->e->exp->id, len);
		return MSG_FAILED;
	}
	p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, m->fds[0], 0);
	if (p == MAP_FAILED) {
		vdd_log("vhost-user-blk export '%s': cannot map the inflight area: %s", c->e->exp->id, strerror(errno));
		return MSG_FAILED;
	}
	guard = vdd_memguard_add(p, (size_t)len, c->e->fault_fd);
	if (guard < 0) {
		vdd_log("vhost-user-blk export '%s': cannot guard the inflight area: %s", c->e->exp->id,
			strerror(-guard));
		munmap(p, (size_t)len);
		return MSG_FAILED;
	}
	/*
	 * A ring that stopped (its kick fd hung up) may still have requests in flight whose completions write the
	 * old area: pause every lane (they finish), refuse if a ring restarted meanwhile, and let no ring keep a
	 * pointer into the area we unmap.
	 */
	conn_pause(c);
	for (unsigned i = 0; i < c->e->num_queues; i++) {
		if (c->vqs[i].started || c->vqs[i].inflight) {
			conn_resume(c);
			vdd_memguard_remove(guard);
			munmap(p, (size_t)len);
			vdd_log("vhost-user-blk export '%s': SET_INFLIGHT_FD while virtqueue %u runs: refused",
				c->e->exp->id, i);
			return MSG_FAILED;
		}
		c->vqs[i].track = NULL;
	}
	inflight_unmap(c);
	c->ifl_map = p;
	c->ifl_map_len = (size_t)len;
	c->ifl_base = (uint8_t *)p + in.mmap_offset;
	c->ifl_guard = guard;
	c->ifl_queues = in.num_queues;
	c->ifl_qsize = in.queue_size;
	conn_resume(c);
	return 0;
}

/*
 * SET_FEATURES: the lanes read event_idx and indirect on every request: change them only while every lane is
 * paused, then let the rings look again (with or without EVENT_IDX, the next notification decision starts afresh).
 */
static int h_set_features(struct vub_conn *c, uint64_t features)
{
	conn_pause(c);
	c->features = features;
	c->features_set = true;
	c->event_idx = features & BIT(VIRTIO_RING_F_EVENT_IDX);
	c->indirect = features & BIT(VIRTIO_RING_F_INDIRECT_DESC);
	for (unsigned i = 0; i < c->e->num_queues; i++)
		c->vqs[i].signalled_valid = false;
	conn_resume(c);
	return 0;
}

static const char *request_name(uint32_t r)
{
	static const char *const names[] = {
		[VHU_GET_FEATURES] = "GET_FEATURES",
		[VHU_SET_FEATURES] = "SET_FEATURES",
		[VHU_SET_OWNER] = "SET_OWNER",
		[VHU_RESET_OWNER] = "RESET_OWNER",
		[VHU_SET_MEM_TABLE] = "SET_MEM_TABLE",
		[VHU_SET_VRING_NUM] = "SET_VRING_NUM",
		[VHU_SET_VRING_ADDR] = "SET_VRING_ADDR",
		[VHU_SET_VRING_BASE] = "SET_VRING_BASE",
		[VHU_GET_VRING_BASE] = "GET_VRING_BASE",
		[VHU_SET_VRING_KICK] = "SET_VRING_KICK",
		[VHU_SET_VRING_CALL] = "SET_VRING_CALL",
		[VHU_SET_VRING_ERR] = "SET_VRING_ERR",
		[VHU_GET_PROTOCOL_FEATURES] = "GET_PROTOCOL_FEATURES",
		[VHU_SET_PROTOCOL_FEATURES] = "SET_PROTOCOL_FEATURES",
		[VHU_GET_QUEUE_NUM] = "GET_QUEUE_NUM",
		[VHU_SET_VRING_ENABLE] = "SET_VRING_ENABLE",
		[VHU_GET_CONFIG] = "GET_CONFIG",
		[VHU_SET_CONFIG] = "SET_CONFIG",
		[VHU_GET_INFLIGHT_FD] = "GET_INFLIGHT_FD",
		[VHU_SET_INFLIGHT_FD] = "SET_INFLIGHT_FD",
	};

	return r < sizeof(names) / sizeof(names[0]) && names[r] ? names[r] : "?";
}

static void conn_reset_rings(struct vub_conn *c);

/* Handle one message; returns like the handlers (replies of their own are sent here). */
static int handle(struct vub_conn *c, struct vub_msg *m, bool *replied, const char **why)
{
	const uint64_t proto_offered =
		BIT(VHU_PF_MQ) | BIT(VHU_PF_REPLY_ACK) | BIT(VHU_PF_CONFIG) | BIT(VHU_PF_INFLIGHT_SHMFD);
	struct vub_export *e = c->e;

	*replied = true;
	switch (m->hdr.request) {
	case VHU_GET_FEATURES:
		return reply_u64(c, m, e->offered) < 0 ? -EIO : 0;
	case VHU_GET_PROTOCOL_FEATURES:
		return reply_u64(c, m, proto_offered) < 0 ? -EIO : 0;
	case VHU_GET_QUEUE_NUM:
		return reply_u64(c, m, e->num_queues) < 0 ? -EIO : 0;
	case VHU_GET_VRING_BASE:
		return h_get_vring_base(c, m, why);
	case VHU_GET_CONFIG:
		return h_get_config(c, m, why);
	case VHU_GET_INFLIGHT_FD:
		if (c->proto & BIT(VHU_PF_INFLIGHT_SHMFD))
			return h_get_inflight_fd(c, m, why);
		/* Its reply is an inflight description, never an ack: a front end that sends it unnegotiated is lost. */
		*why = "GET_INFLIGHT_FD without INFLIGHT_SHMFD";
		return -EPROTO;
	}
	*replied = false;
	switch (m->hdr.request) {
	case VHU_SET_FEATURES:
		if (need_payload(m, 8, why) < 0)
			return -EPROTO;
		if (m->p.u64 & ~e->offered) {
			vdd_log("vhost-user-blk export '%s': front end acknowledged features %#" PRIx64 " we did not offer",
				e->exp->id, m->p.u64 & ~e->offered);
			return MSG_FAILED;
		}
		return h_set_features(c, m->p.u64);
	case VHU_SET_PROTOCOL_FEATURES:
		if (need_payload(m, 8, why) < 0)
			return -EPROTO;
		c->proto = m->p.u64 & proto_offered;
		return 0;
	case VHU_SET_OWNER:
		return 0;
	case VHU_RESET_OWNER:
		conn_reset_rings(c);
		return 0;
	case VHU_SET_MEM_TABLE:
		return h_set_mem_table(c, m, why);
	case VHU_SET_VRING_NUM:
	case VHU_SET_VRING_ADDR:
	case VHU_SET_VRING_BASE:
	case VHU_SET_VRING_KICK: {
		int ret;

		/*
		 * These may change the ring size, the ring pointers or the request slots (a new kick fd restarts
		 * the ring) under requests in flight, which still complete into the used ring: let them finish.
		 */
		ret = on_lane(c, m, why,
			      m->hdr.request == VHU_SET_VRING_NUM    ? h_vring_num
			      : m->hdr.request == VHU_SET_VRING_ADDR ? h_vring_addr
			      : m->hdr.request == VHU_SET_VRING_BASE ? h_vring_base
								     : h_vring_fd,
			      true);
		return ret;
	}
	case VHU_SET_VRING_CALL:
	case VHU_SET_VRING_ERR:
		return on_lane(c, m, why, h_vring_fd, false);
	case VHU_SET_VRING_ENABLE:
		return on_lane(c, m, why, h_vring_enable, false);
	case VHU_SET_CONFIG:
		return MSG_FAILED; /* nothing in our config space is writable (no CONFIG_WCE) */
	case VHU_SET_INFLIGHT_FD:
		if (!(c->proto & BIT(VHU_PF_INFLIGHT_SHMFD)))
			break;
		return h_set_inflight_fd(c, m, why);
	default:
		break;
	}
	vdd_log("vhost-user-blk export '%s': unsupported request %u", e->exp->id, m->hdr.request);
	return MSG_FAILED;
}

/* ---- connections ----------------------------------------------------------------------------------------------- */

static void lane_reset_fn(void *opaque)
{
	struct vub_lane *lane = opaque;
	struct vub_conn *c = &lane->e->conn;
	struct vub_vq *vq;

	LANE_FOR_EACH_VQ(c, lane, vq)
		vq_stop_kick(vq);
	lane_pause(lane);
	LANE_FOR_EACH_VQ(c, lane, vq)
		vq_reset(vq);
	lane->paused = false;
}

/* Stop every ring and wait for the requests in flight (RESET_OWNER, disconnect). */
static void conn_reset_rings(struct vub_conn *c)
{
	for (unsigned i = 0; i < c->e->nlanes; i++)
		lane_call(&c->e->lanes[i], lane_reset_fn, &c->e->lanes[i]);
}

static void listen_again(struct vub_export *e);

static void conn_co(void *opaque)
{
	struct vub_conn *c = opaque;
	struct vub_export *e = c->e;
	struct vd_export *exp = e->exp;
	struct vub_msg *m = malloc(sizeof(*m));
	const char *why = NULL;
	char peer[64];

	snprintf(peer, sizeof(peer), "unix:%s", e->path);
	exp->connections++;
	exp->connections_total++;
	vd_export_client_event(exp, true, c->id, peer);
	vdd_log("vhost-user-blk export '%s': front end %" PRIu64 " connected", exp->id, c->id);
	while (m) {
		bool replied;
		int ret;

		why = NULL;
		ret = recv_msg(c, m, &why);
		if (ret < 0)
			break;
		if (vdd_verbose)
			vdd_log("vhost-user-blk export '%s': %s (%u)", exp->id, request_name(m->hdr.request),
				m->hdr.request);
		ret = handle(c, m, &replied, &why);
		msg_close_fds(m);
		if (ret < 0)
			break;
		if (!replied && (c->proto & BIT(VHU_PF_REPLY_ACK)) && (m->hdr.flags & VHU_FLAG_NEED_REPLY) &&
		    reply_u64(c, m, ret ? 1 : 0) < 0)
			break;
	}
	if (m)
		msg_close_fds(m);
	if (why)
		vdd_log("vhost-user-blk export '%s': front end %" PRIu64 ": %s (request %u %s): resetting the device",
			exp->id, c->id, why, m ? m->hdr.request : 0, m ? request_name(m->hdr.request) : "");
	free(m);
	conn_set_closing(c);
	conn_reset_rings(c);
	for (unsigned i = 0; i < e->num_queues; i++)
		vq_free_reqs(&c->vqs[i]);
	unmap_regions(c);
	inflight_unmap(c);
	vdd_cofd_detach(&c->cofd);
	close(c->fd);
	c->fd = -1;
	c->active = false;
	listen_again(e);
	exp->connections--;
	vd_export_client_event(exp, false, c->id, peer);
	vdd_log("vhost-user-blk export '%s': front end %" PRIu64 " disconnected", exp->id, c->id);
	vd_export_unref(exp);
}

static void conn_init(struct vub_conn *c, struct vub_export *e, int fd)
{
	memset(c, 0, sizeof(*c));
	c->e = e;
	c->fd = fd;
	c->active = true;
	c->id = ++e->next_id;
	c->ifl_guard = -1;
	for (unsigned i = 0; i < VUB_MAX_QUEUES; i++) {
		struct vub_vq *vq = &c->vqs[i];

		vq->c = c;
		vq->lane = &e->lanes[i % e->nlanes];
		vq->idx = i;
		vq->kick_fd = vq->call_fd = vq->err_fd = -1;
		vd_co_queue_init(&vq->drained);
	}
	vdd_cofd_init(&c->cofd, fd);
}

/* memguard replaced a mapping the front end shrank under us: reset the device (the daemon lives on). */
static void fault_event(void *opaque, int fd, int revents)
{
	struct vub_export *e = opaque;
	struct vub_conn *c = &e->conn;
	uint64_t n;
	ssize_t r = read(fd, &n, sizeof(n));

	(void)r;
	(void)revents;
	if (!c->active || conn_closing(c) || !memory_faulted(c))
		return;
	vdd_log("vhost-user-blk export '%s': front end %" PRIu64 ": its shared memory shrank under us (SIGBUS, "
		"survived): resetting the device", e->exp->id, c->id);
	COUNT(e->bad_requests);
	conn_set_closing(c);
	vdd_cofd_wake(&c->cofd);
}

static void accept_event(void *opaque, int fd, int revents);

static void listen_again(struct vub_export *e)
{
	if (!e->shutdown && e->listen_fd >= 0)
		vd_loop_set_fd_handler(vd_loop_get(), e->listen_fd, POLLIN, accept_event, e);
}

static void accept_event(void *opaque, int fd, int revents)
{
	struct vub_export *e = opaque;
	int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	struct vd_co *co;

	(void)revents;
	if (cfd < 0)
		return;
	if (e->shutdown || vd_export_is_shutting_down(e->exp)) {
		close(cfd);
		return;
	}
	conn_init(&e->conn, e, cfd);
	/* One front end at a time: the next one waits in the listen backlog until this one leaves. */
	vd_loop_del_fd_handler(vd_loop_get(), e->listen_fd);
	vd_export_ref(e->exp);
	co = vd_co_create(conn_co, &e->conn);
	if (!co) {
		e->conn.active = false;
		close(cfd);
		vd_export_unref(e->exp);
		listen_again(e);
		return;
	}
	vd_co_enter(co);
}

/* ---- the export type ---------------------------------------------------------------------------------------- */

static const char *const vub_options[] = { "addr",    "num-queues",  "queue-size", "logical-block-size",
					   "poll-us", "poll-max-us", "serial",     NULL };

static int vub_create(struct vd_export *exp, json_t *opts, char **errp)
{
	struct vub_export *e = exp->opaque;
	json_t *addr = json_object_get(opts, "addr");
	const char *type, *path, *serial;
	uint64_t nq, qs, lbs, poll_us, poll_max_us;
	char *err = NULL;

	e->exp = exp;
	e->listen_fd = -1;
	e->fault_fd = -1;
	if (!json_is_object(addr))
		return vdd_error(errp, "vhost-user-blk export: 'addr' is required (addr.type=unix,addr.path=PATH)");
	if (vdd_arg_str(addr, "type", true, NULL, &type, errp) < 0 || vdd_arg_str(addr, "path", true, NULL, &path, errp) < 0)
		return -1;
	if (strcmp(type, "unix"))
		return vdd_error(errp, "vhost-user-blk export: addr.type must be 'unix'");
	if (vdd_arg_u64(opts, "num-queues", 1, &nq, errp) < 0 ||
	    vdd_arg_u64(opts, "queue-size", VUB_DEFAULT_QUEUE_SIZE, &qs, errp) < 0 ||
	    vdd_arg_u64(opts, "logical-block-size", 512, &lbs, errp) < 0 ||
	    vdd_arg_u64(opts, "poll-us", 0, &poll_us, errp) < 0 ||
	    vdd_arg_u64(opts, "poll-max-us", VUB_DEFAULT_POLL_MAX_US, &poll_max_us, errp) < 0 ||
	    vdd_arg_str(opts, "serial", false, exp->id, &serial, errp) < 0)
		return -1;
	if (nq < 1 || nq > VUB_MAX_QUEUES)
		return vdd_error(errp, "vhost-user-blk export: num-queues must be between 1 and %d", VUB_MAX_QUEUES);
	if (qs < 4 || qs > VUB_MAX_QUEUE_SIZE || (qs & (qs - 1)))
		return vdd_error(errp, "vhost-user-blk export: queue-size must be a power of two between 4 and %d",
				 VUB_MAX_QUEUE_SIZE);
	if (lbs < 512 || lbs > 65536 || (lbs & (lbs - 1)))
		return vdd_error(errp, "vhost-user-blk export: logical-block-size must be a power of two between 512 and 64k");
	if (poll_us > 1000000 || poll_max_us > 1000000)
		return vdd_error(errp, "vhost-user-blk export: poll-us and poll-max-us must be at most 1000000");
	{
		struct sockaddr_un sa;

		if (!*path)
			return vdd_error(errp, "vhost-user-blk export: the socket path is empty");
		if (strlen(path) >= sizeof(sa.sun_path))
			return vdd_error(errp, "vhost-user-blk export: socket path '%s' is too long", path);
	}
	e->num_queues = (unsigned)nq;
	e->queue_size = (unsigned)qs;
	e->lbs = (unsigned)lbs;
	e->poll_us = (unsigned)poll_us;
	e->poll_max_us = poll_us ? 0 : (unsigned)poll_max_us; /* a fixed window replaces the adaptive one */
	e->path = strdup(path);
	e->serial = strdup(serial);
	e->nlanes = (unsigned)exp->n_threads;
	e->lanes = calloc(e->nlanes, sizeof(*e->lanes));
	if (!e->path || !e->serial || !e->lanes) {
		free(e->path);
		free(e->serial);
		free(e->lanes);
		e->path = e->serial = NULL;
		e->lanes = NULL;
		return vdd_error(errp, "out of memory");
	}
	for (unsigned i = 0; i < e->nlanes; i++) {
		e->lanes[i] = (struct vub_lane){ .e = e, .thread = exp->threads[i], .idx = i };
		vd_co_queue_init(&e->lanes[i].drained);
	}
	(void)err;
	return 0;
}

static void fill_config(struct vub_export *e)
{
	struct virtio_blk_config *cfg = &e->cfg;
	uint64_t f = BIT(VIRTIO_F_VERSION_1) | BIT(VHOST_USER_F_PROTOCOL_FEATURES) | BIT(VIRTIO_BLK_F_SEG_MAX) |
		     BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_MQ) |
		     BIT(VIRTIO_RING_F_INDIRECT_DESC) | BIT(VIRTIO_RING_F_EVENT_IDX);

	if (e->exp->writable)
		f |= BIT(VIRTIO_BLK_F_DISCARD) | BIT(VIRTIO_BLK_F_WRITE_ZEROES);
	else
		f |= BIT(VIRTIO_BLK_F_RO);
	e->offered = f;
	memset(cfg, 0, sizeof(*cfg));
	cfg->capacity = capacity(e) / VIRTIO_BLK_SECTOR;
	cfg->seg_max = e->queue_size - 2;
	cfg->blk_size = e->lbs;
	cfg->num_queues = (uint16_t)e->num_queues;
	cfg->max_discard_sectors = VUB_MAX_DWZ_SECTORS;
	cfg->max_discard_seg = VUB_DWZ_SEGS;
	cfg->discard_sector_alignment = e->lbs / VIRTIO_BLK_SECTOR;
	cfg->max_write_zeroes_sectors = VUB_MAX_DWZ_SECTORS;
	cfg->max_write_zeroes_seg = VUB_DWZ_SEGS;
	cfg->write_zeroes_may_unmap = 1;
}

static int vub_start(struct vd_export *exp, char **errp)
{
	struct vub_export *e = exp->opaque;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd;

	e->capacity = exp->bs->size / e->lbs * e->lbs;
	fill_config(e);
	memcpy(sa.sun_path, e->path, strlen(e->path) + 1); /* length checked in create */
	if (stat(e->path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(e->path); /* a stale socket of an earlier run */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return vdd_error(errp, "socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 16) < 0) {
		vdd_error(errp, "vhost-user-blk export: cannot listen on '%s': %s", e->path, strerror(errno));
		close(fd);
		return -1;
	}
	if (vd_loop_set_fd_handler(vd_loop_get(), fd, POLLIN, accept_event, e) < 0) {
		close(fd);
		unlink(e->path);
		return vdd_error(errp, "out of memory");
	}
	e->fault_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (e->fault_fd < 0 || vd_loop_set_fd_handler(vd_loop_get(), e->fault_fd, POLLIN, fault_event, e) < 0) {
		vdd_error(errp, "vhost-user-blk export: eventfd: %s", strerror(errno));
		vd_loop_del_fd_handler(vd_loop_get(), fd);
		close(fd);
		unlink(e->path);
		if (e->fault_fd >= 0)
			close(e->fault_fd);
		e->fault_fd = -1;
		return -1;
	}
	e->listen_fd = fd;
	vdd_log("vhost-user-blk export '%s': listening on unix:%s", exp->id, e->path);
	return 0;
}

static void vub_shutdown(struct vd_export *exp)
{
	struct vub_export *e = exp->opaque;

	__atomic_store_n(&e->shutdown, true, __ATOMIC_RELAXED);
	if (e->listen_fd >= 0) {
		vd_loop_del_fd_handler(vd_loop_get(), e->listen_fd);
		close(e->listen_fd);
		e->listen_fd = -1;
		unlink(e->path);
	}
	if (e->fault_fd >= 0)
		vd_loop_del_fd_handler(vd_loop_get(), e->fault_fd);
	if (e->conn.active) {
		conn_set_closing(&e->conn);
		vdd_cofd_wake(&e->conn.cofd);
	}
	/* The export is destroyed once the connection dropped its reference. */
}

static void vub_destroy(struct vd_export *exp)
{
	struct vub_export *e = exp->opaque;

	free(e->path);
	free(e->serial);
	free(e->lanes);
	if (e->fault_fd >= 0)
		close(e->fault_fd); /* the connection, which guarded memory with it, is gone */
}

static void vub_query(struct vd_export *exp, json_t *info)
{
	struct vub_export *e = exp->opaque;

	json_object_set_new(info, "addr", json_pack("{s:s, s:s}", "type", "unix", "path", e->path));
	json_object_set_new(info, "num-queues", json_integer(e->num_queues));
	json_object_set_new(info, "queue-size", json_integer(e->queue_size));
	json_object_set_new(info, "logical-block-size", json_integer(e->lbs));
	json_object_set_new(info, "poll-us", json_integer(e->poll_us));
	json_object_set_new(info, "poll-max-us", json_integer(e->poll_max_us));
}

static void vub_query_stats(struct vd_export *exp, json_t *stats)
{
	struct vub_export *e = exp->opaque;

	json_object_set_new(stats, "vhost-user-blk",
			    json_pack("{s:I, s:I, s:I, s:I, s:I}", "requests", (json_int_t)LOAD(e->reqs_total),
				      "bad-requests", (json_int_t)LOAD(e->bad_requests), "kicks", (json_int_t)LOAD(e->kicks),
				      "calls", (json_int_t)LOAD(e->calls), "resubmitted", (json_int_t)LOAD(e->resubmitted)));
}

const struct vd_export_type vd_export_type_vhost_user_blk = {
	.name = "vhost-user-blk",
	.state_size = sizeof(struct vub_export),
	.options = vub_options,
	.create = vub_create,
	.start = vub_start,
	.shutdown = vub_shutdown,
	.destroy = vub_destroy,
	.query = vub_query,
	.query_stats = vub_query_stats,
	.resize = vub_resize,
	.multi_thread = true,
};
