/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libvdisk internals shared by the core and the drivers.
 *
 * The core owns the lifecycle, the properties, request validation and the
 * per-queue request lists; a driver only turns valid requests into kernel I/O.
 * A driver is one file under lib/drivers/ exporting one `struct vd_driver`.
 *
 * Request flow on a queue (all in the queue's thread):
 *   vdiskq_*()   -> validated, appended to the pending list (or completed
 *                   at once with an error)
 *   do_io()      -> pending requests handed to ops->submit() while fewer than
 *                   queue-size are in flight; ops->commit() once per batch;
 *                   ops->reap() collects finished ones, which the driver
 *                   reports with vd_req_complete().
 */
#ifndef VD_INTERNAL_H
#define VD_INTERNAL_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "vdisk.h"

#define VD_EXPORT __attribute__((visibility("default")))
#define VD_PRINTF(a, b) __attribute__((format(printf, a, b)))

enum vd_state {
	VD_CREATED = 1,
	VD_CONNECTED = 2,
	VD_STARTED = 4,
};
#define VD_ANY_STATE (VD_CREATED | VD_CONNECTED | VD_STARTED)
#define VD_NEVER 0

enum vd_op {
	VD_OP_READ,
	VD_OP_WRITE,
	VD_OP_FLUSH,
	VD_OP_DISCARD,
	VD_OP_WRITE_ZEROES,
};

struct vd_request {
	struct vd_request *next;
	enum vd_op op;
	uint32_t flags;
	uint64_t offset;
	uint64_t len; /* total bytes (read/write: sum of iov) */
	const struct iovec *iov;
	int iovcnt;
	int ret;
	struct iovec iov1; /* storage for the single-buffer read/write */
	void *user_data;
	const char *error_msg; /* NULL, a static string or msg below */
	char msg[112];
	/* Driver-private per-request state (driver->req_priv_size bytes). */
	_Alignas(16) unsigned char priv[];
};

struct vdiskq {
	struct vdisk *v;
	int index;
	bool is_poll_queue;
	int completion_fd; /* eventfd, -1 for poll queues */
	bool completion_fd_enabled;

	struct vd_request *pending_head, **pending_tail;
	struct vd_request *done_head, **done_tail;
	struct vd_request *returned; /* handed out by the last do_io, freed next call */
	struct vd_request *free_list;
	void **slabs;
	int n_slabs;
	unsigned n_pending, n_inflight, n_done;
	unsigned queue_size;

	void *priv; /* driver per-queue state (driver->queue_priv_size bytes) */
};

enum vd_prop_type {
	VD_PROP_BOOL,
	VD_PROP_INT,
	VD_PROP_UINT64,
	VD_PROP_STR,
};

struct vd_prop {
	const char *name;
	enum vd_prop_type type;
	unsigned read_states;  /* mask of enum vd_state */
	unsigned write_states; /* mask of enum vd_state; 0 = read-only */
	bool in_driver;        /* field lives in v->priv, not struct vdisk */
	size_t offset;         /* bool: bool, int: int, uint64: uint64_t, str: char* */
	int64_t min, max;      /* range for int (and uint64 if max > 0) */
	/* Optional extra validation of a new value; sets the error message. */
	int (*check)(struct vdisk *v, const struct vd_prop *p, uint64_t value);
};

struct vd_driver {
	const char *name;
	size_t priv_size;       /* per instance, v->priv */
	size_t queue_priv_size; /* per queue, q->priv */
	size_t req_priv_size;   /* per request, r->priv */
	const struct vd_prop *props; /* driver-specific, ends with name == NULL */

	/* After create: set defaults in v and v->priv.  Optional. */
	int (*init)(struct vdisk *v);
	/* Open the device; fill capacity and limits.  Set the error message. */
	int (*connect)(struct vdisk *v);
	/* Validate queue configuration before queues are built.  Optional. */
	int (*start)(struct vdisk *v);
	/* Release what connect acquired.  Optional. */
	void (*destroy)(struct vdisk *v);

	int (*queue_init)(struct vdiskq *q);
	/*
	 * Tear a queue down.  Requests may still be in flight: wait for them
	 * (the kernel must not touch caller buffers after vdisk_destroy()).
	 */
	void (*queue_fini)(struct vdiskq *q);
	/*
	 * Take a valid request.  Return 0 when it is in flight or already
	 * completed (vd_req_complete), -EAGAIN when the driver has no room now
	 * (the core retries after the next reap).
	 */
	int (*submit)(struct vdiskq *q, struct vd_request *r);
	/* Push what submit() prepared to the kernel.  Optional. */
	int (*commit)(struct vdiskq *q);
	/*
	 * Report finished requests with vd_req_complete().  Only called with
	 * requests in flight.  With wait, block
	 * until at least one finished or the CLOCK_MONOTONIC deadline (NULL:
	 * none) passed (-ETIME).  Return 0 or -errno.
	 */
	int (*reap)(struct vdiskq *q, bool wait, const struct timespec *deadline);
	/* Optional: completion fd signalling was turned on/off. */
	void (*set_completion_fd_enabled)(struct vdiskq *q, bool enabled);

	/* Optional: memory region mapped into slot / unmapped from slot. */
	int (*map_mem_region)(struct vdisk *v, const struct vdisk_mem_region *r, int slot);
	void (*unmap_mem_region)(struct vdisk *v, const struct vdisk_mem_region *r, int slot);
};

struct vd_mapped_region {
	bool used;
	struct vdisk_mem_region r;
};

struct vdisk {
	const struct vd_driver *drv;
	enum vd_state state;

	/* Configuration. */
	char *path;
	int fd;       /* -1: open path; else caller's fd (not closed by us) */
	bool read_only;
	bool direct;
	int num_queues;
	int num_poll_queues;
	int queue_size;

	/* Limits, filled by connect. */
	uint64_t capacity;
	int request_alignment;
	int buf_alignment;
	int optimal_io_alignment;
	int optimal_io_size;
	int optimal_buf_alignment;
	int max_transfer; /* 0: none */
	int max_segments;
	int max_queues;
	uint64_t max_mem_regions;
	bool needs_mem_regions;
	uint64_t mem_region_alignment;
	bool can_poll; /* poll queues supported for this device */

	/* Runtime. */
	int dev_fd;       /* fd the driver does I/O on (-1 for null) */
	bool owns_dev_fd; /* we opened it */
	bool is_blockdev;
	struct vdiskq **queues;      /* num_queues */
	struct vdiskq **poll_queues; /* num_poll_queues */
	struct vd_mapped_region *regions;
	int n_regions_alloc;

	const char **prop_names; /* cache for vdisk_list_properties() */
	void *priv;
};

/* ---- errors (lib/error.c) ---- */
/* Set the thread's message (printf-style) and return -err (err > 0). */
#define VD_ERROR_MSG_MAX 512 /* the message's size, NUL included; block/block.h says the same */
int vd_error(int err, const char *fmt, ...) VD_PRINTF(2, 3);
void vd_error_clear(void);

/* ---- requests (lib/queue.c) ---- */
/* A driver reports a finished request; ret 0 or -errno. */
void vd_req_complete(struct vdiskq *q, struct vd_request *r, int ret);
/* Same, with a message (printf-style) kept in the request. */
void vd_req_fail(struct vdiskq *q, struct vd_request *r, int ret, const char *fmt, ...) VD_PRINTF(4, 5);
/* Deadline helpers. */
void vd_deadline_from_timeout(struct timespec *deadline, const struct timespec *timeout);
int vd_deadline_remaining_ms(const struct timespec *deadline); /* -1: no deadline */
/* Write 1 to the queue's completion eventfd if signalling is enabled. */
void vd_queue_signal(struct vdiskq *q);
struct vdiskq *vd_queue_new(struct vdisk *v, int index, bool poll);
void vd_queue_free(struct vdiskq *q);

/* ---- files (lib/file.c): shared by the file-based drivers ---- */
/* Open path/fd per read-only/direct, fill capacity and limits. */
int vd_file_connect(struct vdisk *v, const char *who);
void vd_file_close(struct vdisk *v);
/* The file's or device's size now (for vdisk_refresh_capacity). */
int vd_file_size(struct vdisk *v, const char *who, uint64_t *size);
/* Do one request synchronously on v->dev_fd; returns 0 or -errno (msg in r). */
int vd_file_execute(struct vdisk *v, struct vd_request *r);
/* Individual operations, also usable by async drivers for their fallbacks. */
int vd_file_flush(struct vdisk *v);
int vd_file_discard(struct vdisk *v, uint64_t offset, uint64_t len);
int vd_file_write_zeroes(struct vdisk *v, uint64_t offset, uint64_t len, uint32_t flags);

/* ---- memory regions (lib/mem.c) ---- */
/* Slot of the mapped region containing [addr, addr+len), or -1. */
int vd_mem_region_lookup(struct vdisk *v, const void *addr, size_t len);

/* ---- drivers ---- */
extern const struct vd_driver vd_driver_io_uring;
extern const struct vd_driver vd_driver_linux_aio;
extern const struct vd_driver vd_driver_posix_aio;
extern const struct vd_driver vd_driver_threads;
extern const struct vd_driver vd_driver_sync;
extern const struct vd_driver vd_driver_null;
extern const struct vd_driver vd_driver_nbd;
extern const struct vd_driver vd_driver_virtio_blk_vhost_user;

static inline void *vd_priv(struct vdisk *v)
{
	return v->priv;
}

#endif /* VD_INTERNAL_H */
