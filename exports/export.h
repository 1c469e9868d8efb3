/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Exports: how vdiskd serves a block node to a consumer.  An export type
 * (NBD; later FUSE, vhost-user-blk, VDUSE, ublk) is one file in exports/
 * defining one `const struct vd_export_type` and one line in the table in
 * daemon/exports.c.
 *
 * The daemon owns the generic part (struct vd_export: id, node, writable,
 * thread, statistics, reference count) and calls the type's ops:
 *
 *   create    main thread, from block-export-add / --export: check the
 *             type's own options, set up the type's state (no I/O).
 *   start     the export's thread: begin serving.
 *   shutdown  the export's thread: refuse new clients, let requests in
 *             flight finish, disconnect clients.  Every client holds a
 *             reference (vd_export_ref); the export is destroyed when the
 *             last one is dropped.
 *   destroy   main thread, after the last reference: free the type state.
 *   query     main thread: add type-specific fields to query-block-exports.
 *
 * Threads: an export runs in its node's home thread (see daemon/daemon.h),
 * or, for types with multi_thread given a list of iothreads, serves its
 * clients from those threads (exp->threads), calling the node's request
 * entry points there.  Control (start, shutdown, queries) stays in
 * exp->thread.  Statistics may be accounted from any thread.
 * vd_export_post() runs a function in exp->thread.
 */
#ifndef VD_EXPORT_H
#define VD_EXPORT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "block.h"

/* ---- statistics ------------------------------------------------------------------- */

enum vd_io_op {
	VD_IO_READ,
	VD_IO_WRITE,
	VD_IO_FLUSH,
	VD_IO_DISCARD,
	VD_IO_WRITE_ZEROES,
	VD_IO_BLOCK_STATUS,
	VD_IO_CACHE,
	VD_IO__MAX,
};

/* Latency histogram: bin 0 is < 1 us, bin i (i >= 1) is [2^(i-1), 2^i) us; the last bin is open-ended. */
#define VD_LAT_BINS 28

struct vd_io_op_stats {
	uint64_t ops, bytes, errors;
	uint64_t total_ns, max_ns;
	uint64_t hist[VD_LAT_BINS];
};

struct vd_io_stats {
	struct vd_io_op_stats op[VD_IO__MAX];
};

void vd_io_stats_account(struct vd_io_stats *s, enum vd_io_op op, uint64_t bytes, uint64_t ns, bool failed);
json_t *vd_io_stats_json(const struct vd_io_stats *s);
const char *vd_io_op_name(enum vd_io_op op);

/* ---- exports ------------------------------------------------------------------------- */

struct vd_export;
struct vdd_thread;

struct vd_export_type {
	const char *name;  /* "nbd": the `type` of block-export-add */
	size_t state_size; /* exp->opaque, zeroed */
	/* Argument names the type accepts besides the generic ones (NULL-terminated). */
	const char *const *options;
	int (*create)(struct vd_export *exp, json_t *opts, char **errp);
	int (*start)(struct vd_export *exp, char **errp);
	void (*shutdown)(struct vd_export *exp);
	void (*destroy)(struct vd_export *exp);
	void (*query)(struct vd_export *exp, json_t *info);
	/* Statistics beyond vd_io_stats (the export's thread). */
	void (*query_stats)(struct vd_export *exp, json_t *stats);
	/*
	 * block_resize changed the node's size (main thread, any serving thread
	 * may be reading the size: store it atomically).  Optional.
	 */
	void (*resize)(struct vd_export *exp, uint64_t size);
	/*
	 * Accepts a list of iothreads (exp->threads): the node stays in its
	 * home and the type spreads its work over the threads (requests reach
	 * the node from there: see "Threads" in block/block.h).
	 */
	bool multi_thread;
};

struct vd_export {
	const struct vd_export_type *type;
	char *id;
	char *node_name;
	struct vd_bnode *bs;          /* the node: its home thread only */
	struct vdd_thread *thread;    /* the node's home thread: start, shutdown, queries run here */
	/*
	 * The threads serving the export's clients: the `iothread` list given
	 * (multi_thread types), else just `thread`.  Set at creation, then
	 * read-only.
	 */
	struct vdd_thread **threads;
	int n_threads;
	bool writable;
	/*
	 * Flushes and FUA on any connection cover writes of every connection:
	 * all connections share one node graph, but the daemon promises it
	 * only for graphs made of nodes known to have no per-connection state
	 * (file, raw, null-co) or when read-only, unless forced with multi-conn=on.
	 */
	bool multi_conn;
	void *opaque;                 /* type state */
	struct vd_io_stats stats;     /* vd_io_stats_account: any thread (atomic) */
	struct vd_io_stats *node_stats; /* the node's, shared by its exports (atomic) */
	uint64_t connections_total;   /* atomic with several threads */
	unsigned connections;         /* atomic with several threads */

	/* Daemon private. */
	int refcnt;                   /* atomic */
	bool shutting_down;           /* atomic: no new clients */
	bool ready;                   /* main thread: started, clients may pick it */
	bool released;                /* main thread: the last reference is gone */
	struct vd_co *del_waiter;     /* main thread */
	struct vd_export *next;
};

/* The export's type, by name (daemon/exports.c: the table). */
const struct vd_export_type *vd_export_type_find(const char *name);

/* Any thread. */
void vd_export_ref(struct vd_export *exp);
void vd_export_unref(struct vd_export *exp);
bool vd_export_is_shutting_down(struct vd_export *exp);
/* Run fn(arg) in a new coroutine in the export's thread. */
void vd_export_post(struct vd_export *exp, void (*fn)(void *), void *arg);
/* Client events on the control socket (any thread). */
void vd_export_client_event(struct vd_export *exp, bool connected, uint64_t client_id, const char *peer);
/* The backing node of bs, looking through the daemon's node-reference proxies. */
struct vd_bnode *vd_export_backing(struct vd_bnode *bs);
struct vd_bnode *vd_export_unwrap(struct vd_bnode *bs);

extern const struct vd_export_type vd_export_type_nbd;
extern const struct vd_export_type vd_export_type_fuse;
extern const struct vd_export_type vd_export_type_vhost_user_blk;

#endif
