/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The block layer: a graph of nodes.  Protocol leaves ("file") are libvdisk
 * instances; format nodes (raw, qcow2) sit on a `file` child and may have a
 * `backing` child.  Nodes are opened from QEMU-style options, either dotted
 * strings ("driver=qcow2,file.driver=file,file.filename=a.qcow2") or JSON,
 * both parsed into a jansson object.
 *
 * Request path: the vd_bnode_co_*() entry points run in a coroutine; they
 * check range and permissions, handle request alignment (read-modify-write
 * with bounce buffers, serialised against overlapping requests), apply the
 * cache mode (writethrough = flush after every write), and call the format.
 * Formats call the same entry points on their children.
 *
 * Errors: negative errno, with a message left by vd_error() (read with
 * vdisk_get_error_msg()).
 *
 * Threads (multiqueue through the graph).  A node has a home: the loop of
 * the thread that opened it (bs->home).  Opening, closing, reopening and
 * every control operation happen there.  Requests (the vd_bnode_co_*()
 * entry points) may come from any thread whose loop accepts cross-thread
 * calls (vd_loop_enable_remote):
 *   - on a node whose format sets `multiqueue` (file, raw, null-co, the
 *     daemon's node references) the request runs in the calling thread,
 *     concurrently with requests from other threads: the file protocol
 *     gives every thread its own libvdisk instance and queue, served by that
 *     thread's loop, so the fast path takes no lock;
 *   - on any other node (qcow2) the entry point forwards the request to the
 *     home thread (vd_loop_co_call) and waits; the format and its metadata
 *     only ever run at home.  Correct, not faster.
 * What the framework shares between threads on a multiqueue node is safe:
 * statistics are atomic counters, tracked requests (track.c) are under
 * bs->track_lock with cross-thread wake-ups.  Truncate always runs at home;
 * the file protocol drains every thread's requests around it.
 */
#ifndef VD_BLOCK_H
#define VD_BLOCK_H

#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "coroutine.h"
#include "vdisk.h"

struct vd_bnode;
struct vd_write_order;

/* ---- scatter/gather lists ------------------------------------------------ */

struct vd_qiov {
	struct iovec *iov;
	int niov;
	int nalloc;
	size_t size; /* sum of iov_len */
	struct iovec inline_iov[4];
};

void vd_qiov_init(struct vd_qiov *q);
void vd_qiov_init_buf(struct vd_qiov *q, void *buf, size_t len); /* one element */
void vd_qiov_reset(struct vd_qiov *q);                           /* empty, keep storage */
void vd_qiov_destroy(struct vd_qiov *q);
int vd_qiov_add(struct vd_qiov *q, void *base, size_t len);
/* Append the bytes [off, off+len) of src to dst (no copy of data). */
int vd_qiov_add_slice(struct vd_qiov *dst, const struct vd_qiov *src, size_t off, size_t len);
void vd_qiov_memset(struct vd_qiov *q, size_t off, int c, size_t len);
size_t vd_qiov_to_buf(const struct vd_qiov *q, size_t off, void *buf, size_t len);
size_t vd_qiov_from_buf(struct vd_qiov *q, size_t off, const void *buf, size_t len);
bool vd_qiov_is_zero(const struct vd_qiov *q, size_t off, size_t len);

/* ---- errors --------------------------------------------------------------- */

/*
 * The calling thread's error message, read with vdisk_get_error_msg()
 * (libvdisk's own, shared by the block layer, formats and tools).
 * vd_error() sets it from a printf format and returns -err.
 */
#define VD_ERROR_MSG_MAX 512 /* the message's size, NUL included (lib/error.c) */
int vd_error(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void vd_error_clear(void);

/* ---- request flags and block status -------------------------------------- */

enum {
	VD_BREQ_FUA = 1 << 0,         /* write: durable on completion */
	VD_BREQ_MAY_UNMAP = 1 << 1,   /* write-zeroes: may deallocate */
	VD_BREQ_NO_FALLBACK = 1 << 2, /* write-zeroes: -ENOTSUP rather than write zero buffers */
	VD_BREQ_COPY_ON_READ = 1 << 3,
	VD_BREQ_COMPRESSED = 1 << 4,  /* write: store whole clusters compressed (qcow2); others plain */
};

/* Block status answer flags (as QEMU's BDRV_BLOCK_*). */
enum {
	VD_BS_DATA = 1 << 0,         /* reads come from this layer's data (or a file below) */
	VD_BS_ZERO = 1 << 1,         /* reads return zeroes */
	VD_BS_OFFSET_VALID = 1 << 2, /* *map is the offset in *file */
	VD_BS_ALLOCATED = 1 << 3,    /* this layer answers for the range (not the backing) */
	VD_BS_EOF = 1 << 4,
	VD_BS_RECURSE = 1 << 5, /* ask *file for the real answer (raw over file) */
	VD_BS_PROBE_FILE = 1 << 6, /* DATA at *map: *file may know some of it reads as zeroes (QEMU's RECURSE) */
};

/* ---- cache modes ---------------------------------------------------------- */

struct vd_cache_mode {
	bool writeback; /* false: writethrough, flush after every write */
	bool direct;    /* O_DIRECT on the protocol leaves */
	bool no_flush;  /* flushes are dropped (unsafe) */
};
/* "none", "writeback", "writethrough", "directsync", "unsafe". */
int vd_cache_mode_parse(const char *name, struct vd_cache_mode *out);

/* ---- formats and protocols ------------------------------------------------ */

struct vd_check_result {
	int64_t corruptions;
	int64_t leaks;
	int64_t check_errors;
	int64_t corruptions_fixed;
	int64_t leaks_fixed;
	int64_t image_end_offset;
	int64_t total_clusters;
	int64_t allocated_clusters;
	int64_t fragmented_clusters;
	int64_t compressed_clusters;
};

enum { VD_CHECK_FIX_LEAKS = 1, VD_CHECK_FIX_ERRORS = 2 };

struct vd_snapshot_info {
	char id[64];
	char name[256];
	uint64_t vm_state_size;
	uint64_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t icount;
};

/* Options given to a format's create(). */
struct vd_create_opts {
	const char *filename;
	uint64_t size;
	json_t *opts; /* -o key=value pairs: cluster_size, backing_file, ... (strings) */
};

struct vd_format {
	const char *name;
	size_t state_size;  /* bs->opaque */
	/*
	 * The option keys this format reads besides the generic ones every node
	 * takes (driver, node-name, read-only, cache, file, backing, ...);
	 * NULL-terminated.  Opening with any other key is an error.  NULL: not
	 * checked.
	 */
	const char *const *options;
	bool is_protocol;   /* a leaf: opened on a filename, no file child */
	/*
	 * The co_ ops (except co_truncate, always called at home) may run in
	 * any thread, concurrently; otherwise the framework forwards requests
	 * from other threads to the node's home thread.
	 */
	bool multiqueue;
	bool supports_backing;
	/* co_pwritev honours VD_BREQ_FUA; otherwise the framework flushes the node after FUA writes. */
	bool supports_fua;

	/* Score 0..100 for this image header (probing); optional. */
	int (*probe)(const uint8_t *buf, size_t len);
	/* Open: format nodes find their `file` child already in bs->file. */
	int (*open)(struct vd_bnode *bs, json_t *opts, int flags);
	void (*close)(struct vd_bnode *bs);

	/* All co_ ops run in a coroutine; offsets/lengths are validated. */
	int (*co_preadv)(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off, int flags);
	int (*co_pwritev)(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off, int flags);
	/*
	 * Optional: co_pwritev that calls vd_write_order_release(ord) as soon as
	 * later writes may start without changing where this one's data goes
	 * (its clusters are allocated); see vd_bnode_co_pwritev_ordered().
	 */
	int (*co_pwritev_ordered)(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
				  int flags, struct vd_write_order *ord);
	int (*co_pwrite_zeroes)(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags);
	int (*co_pdiscard)(struct vd_bnode *bs, uint64_t off, uint64_t len);
	/* Write back the format's own caches to bs->file (the framework then flushes children). */
	int (*co_flush)(struct vd_bnode *bs);
	/*
	 * Status of [off, off+len): returns VD_BS_* flags and *pnum bytes (>0)
	 * with that status; *map and *file when VD_BS_OFFSET_VALID.  Return
	 * VD_BS_RECURSE|VD_BS_OFFSET_VALID to have the framework answer with
	 * *file's status at *map (raw).  The framework adds VD_BS_ALLOCATED when
	 * DATA or ZERO is set, ZERO for unallocated ranges with no backing, and
	 * VD_BS_EOF.  Optional: the default says DATA|OFFSET_VALID (map = off)
	 * for protocols and DATA for formats.
	 */
	int (*co_block_status)(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			       struct vd_bnode **file);
	int (*co_truncate)(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc);
	/*
	 * Optional, for zero-copy reads (see vd_bnode_map_to_fd): the open file
	 * whose page cache holds [off, off+len), and where.  Only for nodes
	 * whose mapping never moves under a reader (raw: a fixed shift) and
	 * buffered protocol leaves; -ENOTSUP otherwise.  Must not block.
	 */
	int (*map_to_fd)(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off);
	/* Bytes the node occupies on its host (actual-size), -errno if unknown. */
	int64_t (*get_allocated_size)(struct vd_bnode *bs);

	/* Image creation (format nodes create the protocol file through vd_create_file()). */
	int (*create)(const struct vd_create_opts *o);
	/* Extra keys for `info --output=json` ("format-specific" object). */
	int (*get_info)(struct vd_bnode *bs, json_t *info);
	int (*co_check)(struct vd_bnode *bs, struct vd_check_result *res, int fix);
	int (*co_amend)(struct vd_bnode *bs, json_t *opts);
	/*
	 * Make every cluster unallocated again so the backing file shows through,
	 * keeping the header, backing link and internal snapshots (what commit
	 * leaves in the committed overlay, as QEMU's bdrv_make_empty).  Optional.
	 */
	int (*co_make_empty)(struct vd_bnode *bs);
	/* Change the backing file name in the header (rebase, commit). */
	int (*co_change_backing)(struct vd_bnode *bs, const char *backing_file, const char *backing_fmt);
	/* Cluster size / granularity for map, convert and measure (0 = none). */
	uint32_t (*cluster_size)(struct vd_bnode *bs);

	/* Internal snapshots. */
	int (*snapshot_create)(struct vd_bnode *bs, const char *name);
	int (*snapshot_list)(struct vd_bnode *bs, struct vd_snapshot_info **list, int *count);
	int (*snapshot_goto)(struct vd_bnode *bs, const char *name_or_id);
	int (*snapshot_delete)(struct vd_bnode *bs, const char *name_or_id);
};

/* ---- nodes ----------------------------------------------------------------- */

enum {
	VD_BO_RDWR = 1 << 0,
	VD_BO_NO_BACKING = 1 << 1, /* do not open the backing chain */
	VD_BO_NO_IO = 1 << 2,      /* metadata only (info) */
	VD_BO_CHECK = 1 << 3,      /* opened for check: tolerate corruption */
};

struct vd_bnode {
	const struct vd_format *fmt;
	char *node_name;
	char *filename;     /* protocol: path; format: its file's filename */
	void *opaque;       /* fmt->state_size bytes */
	struct vd_bnode *file;
	struct vd_bnode *backing;
	char backing_file[1024]; /* as recorded in the image header ("" none) */
	char backing_format[32];
	uint64_t size;      /* virtual size in bytes */
	bool read_only;
	bool corrupt;       /* format found corruption: serve read-only */
	struct vd_cache_mode cache;
	uint32_t request_alignment; /* the framework aligns requests to this (RMW) */
	uint32_t max_transfer;      /* 0 = unlimited */
	int refcnt;
	int open_flags;
	struct vd_loop *home; /* the opening thread's loop: control operations, non-multiqueue requests */
	/* Overlapping-request serialisation (RMW and formats that ask for it), under track_lock. */
	pthread_mutex_t track_lock;
	struct vd_tracked *tracked;
	unsigned serialising_reqs; /* tracked requests with serialising set */
	/* Backing-chain walks in progress and a chain switch waiting for them (vd_bnode_chain_hold), under track_lock. */
	unsigned chain_readers;
	bool chain_switching;
	struct vd_co_queue chain_waiters;
	/* Statistics (write-zeroes count as writes); atomic (requests come from several threads). */
	uint64_t rd_ops, wr_ops, rd_bytes, wr_bytes, flush_ops;
	uint64_t discard_ops, discard_bytes;
};

/*
 * A request in flight on a node, for serialising overlapping requests.
 * Requests wait only for OLDER overlapping requests on the same node where
 * at least one of the two is serialising, so unrelated requests never wait
 * and waits cannot form a cycle.  The framework tracks writes on nodes with
 * request_alignment > 1 (misaligned ones serialising, for read-modify-write);
 * formats may track their own requests too (e.g. around copy-on-write).
 * Lives on the caller's stack; call from a coroutine.
 */
struct vd_tracked {
	struct vd_tracked *next, **pprev;
	uint64_t off, end; /* [off, end) */
	bool serialising;
	struct vd_co *owner; /* nested requests of one coroutine never wait for each other */
	struct vd_co_queue waiters; /* younger requests waiting for this one */
};
/*
 * Track [off, off+len) and wait for the older overlapping requests it
 * conflicts with (not those of the calling coroutine: a job holding a
 * serialising range may issue requests inside it).  Nodes with a backing
 * child track every request (non-serialising, nearly free while nothing
 * serialises) so a job can exclude them from a range (stream) or from the
 * whole node while it changes the backing chain.
 */
void vd_bnode_track_begin(struct vd_bnode *bs, struct vd_tracked *t, uint64_t off, uint64_t len, bool serialising);
void vd_bnode_track_end(struct vd_bnode *bs, struct vd_tracked *t);
/*
 * bs->size as requests read it: a resize (at home) may change it while
 * requests from other threads look at it, so both sides go through these.
 */
static inline uint64_t vd_bnode_size(const struct vd_bnode *bs)
{
	return __atomic_load_n(&bs->size, __ATOMIC_RELAXED);
}

static inline void vd_bnode_set_size(struct vd_bnode *bs, uint64_t size)
{
	__atomic_store_n(&bs->size, size, __ATOMIC_RELAXED);
}

/* Is the calling thread bs's home (or may bs's requests run in any thread)? */
bool vd_bnode_runs_here(const struct vd_bnode *bs);
/* For messages: the node-name, else the filename, else the format name. */
const char *vd_bnode_name(const struct vd_bnode *bs);

/*
 * Open a node.  spec: a filename, a dotted option string ("driver=...,...")
 * or JSON ("json:{...}" or "{...}").  fmt: force this format (NULL = from
 * spec or probing).  Returns NULL with the message in vdisk_get_error_msg().
 */
struct vd_bnode *vd_bnode_open(const char *spec, const char *fmt, const struct vd_cache_mode *cache, int flags);
/*
 * Open from an already parsed option object (borrowed).  Both open functions
 * set errno on failure.  The node opened gets `cache` (NULL: writeback);
 * its children run in writeback mode and inherit direct/no_flush
 * (writethrough flushes the top node, which flushes its children).
 */
struct vd_bnode *vd_bnode_open_opts(json_t *opts, const struct vd_cache_mode *cache, int flags);
void vd_bnode_ref(struct vd_bnode *bs);
/* Drop a reference; the last one flushes a writable node, closes it and drops its children. */
void vd_bnode_unref(struct vd_bnode *bs);
/*
 * Open bs->backing from bs->backing_file/backing_format (a relative name is
 * relative to the directory of bs's file).  The framework calls this after
 * fmt->open for formats with supports_backing (unless VD_BO_NO_BACKING), so
 * formats only fill bs->backing_file/backing_format; calling it again is a
 * no-op once bs->backing is set.  backing_opts: the node's "backing" option
 * (NULL: none given; JSON null or "": no backing; object: its options).
 * Returns 0 or -errno: -ELOOP when a file is already in the chain or the
 * chain is deeper than VD_MAX_BACKING_DEPTH.
 */
int vd_bnode_open_backing(struct vd_bnode *bs, json_t *backing_opts);
#define VD_MAX_BACKING_DEPTH 256

const struct vd_format *vd_format_find(const char *name);
/* Add a format to the registry (tests, plugins; before other threads open nodes); -EEXIST if the name is taken. */
int vd_format_register(const struct vd_format *fmt);
/* Probe the format of a file from its first bytes ("raw" if nothing matches; NULL + message if unreadable). */
const char *vd_format_probe(const char *filename);
/* Create a protocol file (truncated to size; prealloc "off"/"falloc"/"full"). */
int vd_create_file(const char *filename, uint64_t size, const char *prealloc);
/* Create an image of format fmt; o->opts values are strings. */
int vd_image_create(const char *fmt, const struct vd_create_opts *o);

/* Parse "a=1,b.c=x" (',,' escapes a comma) into nested JSON objects; NULL + vd_error on failure. */
json_t *vd_opts_parse(const char *str);
/*
 * Whether JSON text nests [ and { deeper than max (strings are skipped; nothing
 * else is checked).  jansson recurses per level, and coroutine stacks are
 * small: check text from untrusted sources before json_loads().
 */
bool vd_json_too_deep(const char *text, size_t len, unsigned max);
#define VD_JSON_MAX_NESTING 64 /* what specs and control commands may nest */
/* Parse spec as above: "json:{...}", "{...}", dotted, or a plain filename (-> {"filename": spec}). */
json_t *vd_opts_parse_spec(const char *spec);
/* Typed option getters on a JSON object (strings "on"/"off"/numbers accepted). */
const char *vd_opt_str(json_t *o, const char *key, const char *def);
int vd_opt_bool(json_t *o, const char *key, bool def, bool *out);
int vd_opt_u64(json_t *o, const char *key, uint64_t def, uint64_t *out); /* accepts k/M/G suffixes */
/* "4096", "0x1000", "64k", "1.5G" (binary suffixes k M G T P E, optional B/iB) -> bytes; -EINVAL/-ERANGE. */
int vd_parse_size(const char *s, uint64_t *out);

/* ---- I/O: coroutine entry points (call from a coroutine) ------------------ */

int vd_bnode_co_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off, int flags);
int vd_bnode_co_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off, int flags);
/*
 * A write that a sequence of writes may overlap with the next one: `release`
 * runs (once, in the writing coroutine, before the write returns) when a
 * write issued after that point cannot change where this write's data lands
 * - for a format that allocates (qcow2), once the last of its clusters is
 * allocated; for others, right before the data write is issued.  So writes
 * issued in order and released in order give the same image layout as
 * serial writes, while the target always has one queued.
 */
struct vd_write_order {
	void (*release)(void *opaque);
	void *opaque;
	bool released;
};
void vd_write_order_release(struct vd_write_order *ord); /* NULL or already released: nothing */
int vd_bnode_co_pwritev_ordered(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov,
				size_t qiov_off, int flags, struct vd_write_order *ord);
int vd_bnode_co_pread(struct vd_bnode *bs, uint64_t off, void *buf, size_t len);
int vd_bnode_co_pwrite(struct vd_bnode *bs, uint64_t off, const void *buf, size_t len, int flags);
int vd_bnode_co_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags);
int vd_bnode_co_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len);
int vd_bnode_co_flush(struct vd_bnode *bs);
int vd_bnode_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file);
/*
 * Where a read of [off, off+len) would get its bytes, when that is the page
 * cache of an open file at *fd_off (raw over a buffered file, any depth):
 * the caller may splice or sendfile them instead of reading into a buffer,
 * and the read is counted in the nodes' statistics.  -ENOTSUP when the
 * graph cannot promise that (a format with its own mapping, O_DIRECT,
 * read-modify-write alignment, a resize in progress); -EAGAIN when part of
 * the range is not cached (a splice would wait for the disk).  Never
 * blocks; any thread.
 */
int vd_bnode_map_to_fd(struct vd_bnode *bs, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off);
/*
 * Hold top's backing chain for a walk (from any thread): a stream cannot
 * switch the chain, and free the nodes walked, until the release.  A walk
 * waits while a switch is in progress.  Not a tracked request, so requests
 * the walk makes (even forwarded to the home thread) never wait for it.
 */
void vd_bnode_chain_hold(struct vd_bnode *top);
void vd_bnode_chain_release(struct vd_bnode *top);
/* The switch side (stream): wait until no walk holds the chain and keep new ones out; then end it. */
void vd_bnode_chain_switch_begin(struct vd_bnode *top);
void vd_bnode_chain_switch_end(struct vd_bnode *top);
/* Status through the backing chain down to base (exclusive; NULL = whole chain): allocated anywhere above base? */
int vd_bnode_co_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
				   uint64_t *pnum);
/* The format's co_truncate sets bs->size (it may round up when !exact). */
int vd_bnode_co_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc);

/* ---- streaming (block-stream): copy a backing chain's data into the top ------ */

/*
 * One step of streaming [off, off+max) of top from its backing chain above
 * base (NULL: the whole chain): the first run of bytes with one answer is
 * either skipped (top has it, or only base and below have it) or read
 * through top and written into top (zero runs as write-zeroes), all
 * serialised against the guest's requests on that run.  *pnum: bytes done
 * (> 0); *copied: whether they were written.  buf holds at least max bytes.
 */
int vd_bnode_co_stream_step(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t max, void *buf,
			    uint64_t *pnum, bool *copied);
/*
 * Finish a stream: with no request on top in flight, flush what was copied,
 * record backing_file/backing_fmt ("" / NULL: none) in top's header, flush
 * again and make base (NULL: none) top's backing node, dropping the nodes in
 * between.  On error nothing changes in the graph.
 */
int vd_bnode_co_stream_finish(struct vd_bnode *top, struct vd_bnode *base, const char *backing_file,
			      const char *backing_fmt);

/* ---- I/O: synchronous wrappers (from plain threads; run the loop) -------- */

int vd_bnode_pread(struct vd_bnode *bs, uint64_t off, void *buf, size_t len);
int vd_bnode_pwrite(struct vd_bnode *bs, uint64_t off, const void *buf, size_t len, int flags);
int vd_bnode_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags);
int vd_bnode_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len);
int vd_bnode_flush(struct vd_bnode *bs);
int vd_bnode_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			  struct vd_bnode **file);
int vd_bnode_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc);
int vd_bnode_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
				uint64_t *pnum);
int vd_bnode_check(struct vd_bnode *bs, struct vd_check_result *res, int fix);
int64_t vd_bnode_allocated_size(struct vd_bnode *bs);

/* Aligned buffer helpers (page aligned, suitable for O_DIRECT). */
void *vd_blk_alloc(size_t len);
void vd_blk_free(void *p);

#endif
