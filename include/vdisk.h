/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libvdisk — one multi-queue block I/O API over many kernel interfaces.
 *
 * Lifecycle:
 *
 *   vdisk_create("io_uring", &v)      state CREATED
 *   vdisk_set_str(v, "path", "disk.img")
 *   vdisk_connect(v)                  state CONNECTED: device opened, limits known
 *   vdisk_set_int(v, "num-queues", 2)
 *   vdisk_start(v)                    state STARTED: queues exist
 *   q = vdisk_get_queue(v, 0)
 *   vdiskq_read(q, 0, buf, 4096, tag, 0)
 *   vdiskq_do_io(q, comps, 1, 16, NULL)
 *   vdisk_destroy(&v)
 *
 * Errors: every function that can fail returns a negative errno and leaves a
 * readable message, prefixed with the function name, in thread-local storage
 * (vdisk_get_error_msg()).  Request errors are reported per request in
 * struct vdisk_completion (ret = -errno, error_msg).
 *
 * Threads: a struct vdisk may be configured from one thread at a time.  Each
 * queue is independent and is used by one thread at a time; different queues
 * may be used concurrently from different threads without locking.
 */
#ifndef VDISK_H
#define VDISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VDISK_VERSION_MAJOR 0
#define VDISK_VERSION_MINOR 1
#define VDISK_VERSION_MICRO 0

struct vdisk;
struct vdiskq;

/* Request flags. */
enum {
	/* Write: complete only once the data is on stable storage. */
	VDISK_REQ_FUA = 1u << 0,
	/* Write-zeroes: keep the range allocated (do not punch a hole). */
	VDISK_REQ_NO_UNMAP = 1u << 1,
	/* Write-zeroes: fail with -ENOTSUP rather than writing zero buffers. */
	VDISK_REQ_NO_FALLBACK = 1u << 2,
};

/* One finished request, as returned by vdiskq_do_io(). */
struct vdisk_completion {
	void *user_data;       /* as passed when the request was enqueued */
	const char *error_msg; /* NULL on success; valid until the next do_io on this queue */
	int ret;               /* 0 or -errno */
	uint32_t reserved_[3];
};

/* A buffer that every driver accepts (see vdisk_alloc_mem_region()). */
struct vdisk_mem_region {
	void *addr;
	size_t len;
	int fd;            /* memfd backing the region, or -1 */
	int64_t fd_offset; /* offset of addr within fd */
};

/* ---- Instance lifecycle ------------------------------------------------ */

/*
 * Create an instance of the named driver ("io_uring", "linux-aio",
 * "posix-aio", "threads", "sync", "null", "nbd", "virtio-blk-vhost-user").
 * Returns 0, -ENOENT (unknown driver), -ENOMEM.
 */
int vdisk_create(const char *driver, struct vdisk **out);

/*
 * Open the device and discover its limits (capacity, alignment, ...).
 * Returns 0, -EINVAL (wrong state or missing/contradictory properties),
 * or the errno of opening the file (-ENOENT, -EACCES, -EISDIR, -EROFS ...).
 */
int vdisk_connect(struct vdisk *v);

/*
 * Create the queues (num-queues + num-poll-queues) and start I/O.
 * Returns 0, -EINVAL (wrong state), -ENOTSUP (e.g. poll queues on a file that
 * cannot be polled), -ENOMEM, or a driver errno.
 */
int vdisk_start(struct vdisk *v);

/*
 * Read the size of the file or block device again, after it grew (e.g. the
 * caller extended the file with ftruncate()), so that requests up to the new
 * end are accepted; requests in flight are not disturbed.  Connected or
 * started instances of the file drivers (io_uring, linux-aio, posix-aio,
 * threads, sync).  Returns 0 (capacity is the new size), -ENOTSUP (driver
 * without a local file: null, nbd, virtio-blk-vhost-user), -EINVAL (wrong
 * state, or the size shrank: requests in flight could be past the new end,
 * so that needs a new instance), or the errno of fstat/ioctl.  Queues on
 * other threads see the new capacity for requests they enqueue after they
 * have synchronised with this call's thread.
 */
int vdisk_refresh_capacity(struct vdisk *v);

/* Stop all I/O, free the instance and set *v to NULL.  NULL is fine. */
void vdisk_destroy(struct vdisk **v);

/* Message for the last failed call in this thread ("" if none). */
const char *vdisk_get_error_msg(void);

/* NULL-terminated list of the driver names built in. */
const char *const *vdisk_list_drivers(void);

/* ---- Properties ---------------------------------------------------------
 *
 * Properties are typed (bool, int, uint64, str); each may be read and written
 * in certain states only.  Common properties:
 *
 *   name                  type    read       write
 *   driver                str     any        never
 *   path                  str     any        created
 *   fd                    int     any        created
 *   read-only             bool    any        created
 *   direct                bool    any        created   (O_DIRECT)
 *   capacity              uint64  connected  never (null driver: "size")
 *   request-alignment     int     connected  never
 *   buf-alignment         int     connected  never
 *   optimal-io-alignment  int     connected  never
 *   optimal-io-size       int     connected  never
 *   optimal-buf-alignment int     connected  never
 *   max-transfer          int     connected  never     (0 = no limit)
 *   max-segments          int     connected  never
 *   max-queues            int     connected  never
 *   max-mem-regions       uint64  connected  never
 *   needs-mem-regions     bool    connected  never
 *   mem-region-alignment  uint64  connected  never
 *   num-queues            int     connected  connected (>= 0)
 *   num-poll-queues       int     connected  connected (>= 0)
 *   queue-size            int     connected  connected (max in flight per queue)
 *
 * Drivers add their own (io_uring: "sqpoll"; threads: "num-threads";
 * null: "size", "read-zeroes"; nbd: "uri", "host", "port", "export-name").  vdisk_list_properties() lists all of an instance's.
 *
 * Returns 0, -ENOENT (unknown name), -ENOTTY (wrong type), -EINVAL (value out
 * of range), -EBUSY (wrong state for this access), -EACCES (read-only
 * property), -ENOMEM.
 */
int vdisk_get_bool(struct vdisk *v, const char *name, bool *value);
int vdisk_get_int(struct vdisk *v, const char *name, int *value);
int vdisk_get_uint64(struct vdisk *v, const char *name, uint64_t *value);
/* *value is malloc'd; the caller frees it. */
int vdisk_get_str(struct vdisk *v, const char *name, char **value);
int vdisk_set_bool(struct vdisk *v, const char *name, bool value);
int vdisk_set_int(struct vdisk *v, const char *name, int value);
int vdisk_set_uint64(struct vdisk *v, const char *name, uint64_t value);
int vdisk_set_str(struct vdisk *v, const char *name, const char *value);

/* Names of the instance's properties, NULL-terminated (static storage). */
const char *const *vdisk_list_properties(struct vdisk *v);

/* ---- Memory regions ----------------------------------------------------- */

/*
 * Allocate len bytes (rounded up to mem-region-alignment) of memfd-backed,
 * suitably aligned memory.  Allowed once connected.
 * Returns 0, -EINVAL, -EBUSY (not connected yet), -ENOMEM.
 */
int vdisk_alloc_mem_region(struct vdisk *v, struct vdisk_mem_region *region, size_t len);
/* Free a region from vdisk_alloc_mem_region() (unmapping it first if mapped). */
void vdisk_free_mem_region(struct vdisk *v, struct vdisk_mem_region *region);
/*
 * Make a region known to the driver (e.g. io_uring registered buffers).
 * Call from the configuring thread only (not concurrently with another
 * map/unmap); must not race with I/O on that region.  Returns 0, -EINVAL (misaligned, or
 * overlapping a mapped region), -ENOSPC (max-mem-regions reached), -EBUSY.
 */
int vdisk_map_mem_region(struct vdisk *v, const struct vdisk_mem_region *region);
/* Forget a region mapped with vdisk_map_mem_region(); no I/O may use it. */
void vdisk_unmap_mem_region(struct vdisk *v, const struct vdisk_mem_region *region);

/* ---- Queues ------------------------------------------------------------ */

/* Queue index (0..num-queues-1), or NULL (not started / out of range). */
struct vdiskq *vdisk_get_queue(struct vdisk *v, int index);
/* Poll queue index (0..num-poll-queues-1), or NULL. */
struct vdiskq *vdisk_get_poll_queue(struct vdisk *v, int index);

/*
 * Enqueue a request.  Nothing is submitted until vdiskq_do_io(); any number of
 * requests may be enqueued (the driver bounds what is in flight, queue-size).
 * Buffers and iovec arrays must stay valid until the request completes.
 * Invalid requests (past capacity, misaligned with direct=true, write on a
 * read-only instance, unsupported flags) are accepted and complete with
 * -EINVAL / -EBADF / -ENOTSUP and an error message.
 * Returns 0 when the request was enqueued (it will produce exactly one
 * completion), -EINVAL for a NULL queue, -ENOMEM when no request could be
 * allocated (no completion will follow).
 */
int vdiskq_read(struct vdiskq *q, uint64_t offset, void *buf, size_t len, void *user_data, uint32_t flags);
int vdiskq_write(struct vdiskq *q, uint64_t offset, const void *buf, size_t len, void *user_data, uint32_t flags);
int vdiskq_readv(struct vdiskq *q, uint64_t offset, const struct iovec *iov, int iovcnt, void *user_data, uint32_t flags);
int vdiskq_writev(struct vdiskq *q, uint64_t offset, const struct iovec *iov, int iovcnt, void *user_data, uint32_t flags);
int vdiskq_flush(struct vdiskq *q, void *user_data, uint32_t flags);
int vdiskq_discard(struct vdiskq *q, uint64_t offset, uint64_t len, void *user_data, uint32_t flags);
int vdiskq_write_zeroes(struct vdiskq *q, uint64_t offset, uint64_t len, void *user_data, uint32_t flags);

/*
 * Submit enqueued requests and return up to max_completions finished ones.
 * Blocks until at least min_completions are available (min 0: never blocks)
 * or the timeout (NULL: none) expires; the remaining time is written back.
 * Returns the number of completions (0..max), -ETIME on timeout (completions
 * already reaped stay queued for the next call), -EINVAL if min_completions
 * exceeds max_completions or the requests outstanding.
 */
int vdiskq_do_io(struct vdiskq *q, struct vdisk_completion *completions, int min_completions,
		 int max_completions, struct timespec *timeout);

/*
 * An eventfd that becomes readable when completions may be available.
 * The application reads it (8 bytes) and then calls vdiskq_do_io(min=0).
 * Poll queues have none (-ENOTSUP).
 */
int vdiskq_get_completion_fd(struct vdiskq *q);
/* Turn signalling of the completion fd on or off (on by default). */
void vdiskq_set_completion_fd_enabled(struct vdiskq *q, bool enable);

#ifdef __cplusplus
}
#endif

#endif /* VDISK_H */
