/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdiskd internals shared by the daemon's files.
 *
 * Threads.  The main thread runs the control sockets, the NBD listeners and
 * handshakes, and owns every table (nodes, exports, iothreads, TLS
 * credentials): tables are only read and changed there.  Each iothread runs
 * its own loop (util/loop.h).  A node lives in one thread, its "home",
 * chosen when it is opened: it is opened, moved, queried and closed there.
 * Requests may be issued from any vdiskd thread (block/block.h, "Threads":
 * multiqueue formats run them in the caller's thread, others are forwarded
 * home).  An export runs in its node's home thread; a multi_thread export
 * type may serve clients from a list of iothreads (exp->threads).
 *
 * Threads talk through mailboxes: vdd_thread_post() runs a function in a
 * fresh coroutine in another thread; vdd_thread_call() does that from a
 * coroutine and waits (yielding, so the caller's loop keeps running) until
 * it returned.
 *
 * Errors on the control path are strings: functions take `char **errp` and
 * leave a malloc'd message there (vdd_error()); the control socket turns it
 * into {"error": {"class": "GenericError", "desc": ...}}.
 */
#ifndef VDD_DAEMON_H
#define VDD_DAEMON_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "block.h"
#include "coroutine.h"
#include "loop.h"

struct vd_io_stats;

#define VDD_PRINTF(a, b) __attribute__((format(printf, a, b)))

/* ---- errors and JSON arguments (util.c) ------------------------------------------ */

/* Set *errp to a new message (if errp and *errp is still NULL); returns -1. */
int vdd_error(char **errp, const char *fmt, ...) VDD_PRINTF(2, 3);
/* Prefix an existing *errp message. */
void vdd_error_prefix(char **errp, const char *fmt, ...) VDD_PRINTF(2, 3);

/*
 * Typed argument getters for command arguments and --option strings (the
 * latter hold strings only: "on", "64k").  A missing key gives def (or an
 * error when required); a wrong type is an error naming the key.
 */
int vdd_arg_str(json_t *args, const char *key, bool required, const char *def, const char **out, char **errp);
int vdd_arg_bool(json_t *args, const char *key, bool def, bool *out, char **errp);
int vdd_arg_u64(json_t *args, const char *key, uint64_t def, uint64_t *out, char **errp);
/* Refuse keys not in the NULL-terminated list (QMP is strict about unknown arguments). */
int vdd_args_check(json_t *args, const char *const *known, const char *what, char **errp);
/* Parse a --option value: JSON object ("{...}") or dotted "a=b,c.d=e". */
json_t *vdd_parse_cli_opts(const char *str, char **errp);

uint64_t vdd_now_ns(void);
/*
 * sched_yield(); true if another thread ran meanwhile (the yield took more
 * than a few microseconds).  Busy pollers call it while idle: they give the
 * CPU to whoever wants it and stop polling when someone did.
 */
bool vdd_yield_was_contended(void);
/*
 * Adaptive polling (QEMU's scheme), the window after a sleep of slept ns
 * that polling did not catch: a sleep within max would have been caught by
 * a longer window, so grow it (4 us, then doubling, up to max); a longer
 * one means polling only burns CPU, so close it.
 */
uint64_t vdd_poll_window_after_sleep(uint64_t window, uint64_t slept, uint64_t max);
/* {"seconds": s, "microseconds": us} of the wall clock, for events. */
json_t *vdd_timestamp(void);

/* ---- threads (iothread.c) ------------------------------------------------------------ */

struct vdd_thread;

/* Set up the main thread's mailbox (call first, in the main thread). */
int vdd_threads_init(char **errp);
struct vdd_thread *vdd_main_thread(void);
/* The calling thread's vdd_thread (NULL in threads vdiskd did not start). */
struct vdd_thread *vdd_thread_self(void);
const char *vdd_thread_name(const struct vdd_thread *t); /* "main" or the iothread id */
struct vd_loop *vdd_thread_loop(const struct vdd_thread *t);

/* --object iothread,id=X / object-add: start a thread running its own loop. */
int vdd_iothread_add(json_t *opts, char **errp);
struct vdd_thread *vdd_iothread_find(const char *id);
/* Thread for an "iothread" argument: NULL/absent = main; unknown id = error. */
int vdd_thread_lookup(const char *id, struct vdd_thread **out, char **errp);
json_t *vdd_query_iothreads(void);
/* Stop and join every iothread (their loops must have nothing left to run). */
void vdd_iothreads_stop(void);
/* Tear down the main thread's mailbox (after the main loop ended). */
void vdd_threads_fini(void);

typedef void (*vdd_fn)(void *arg);
/* Run fn(arg) in a new coroutine in thread t (any thread may post). */
void vdd_thread_post(struct vdd_thread *t, vdd_fn fn, void *arg);
/* From a coroutine: run fn(arg) in thread t and wait for it (inline if t is this thread). */
void vdd_thread_call(struct vdd_thread *t, vdd_fn fn, void *arg);

/* ---- coroutine fd waits (cofd.c) ----------------------------------------------------- */

/*
 * One fd driven by the current thread's loop: coroutines park until it is
 * readable (one reader) or writable (one writer).  The fd handler is only
 * registered while someone waits, so an idle fd costs nothing in poll().
 */
struct vdd_cofd {
	int fd;
	struct vd_loop *loop;
	struct vd_co *rd_co, *wr_co;
	short events; /* registered with the loop */
	bool rd_woken, wr_woken;
};
void vdd_cofd_init(struct vdd_cofd *c, int fd); /* bound to the calling thread's loop */
/* Park until fd is readable (POLLIN) or writable (POLLOUT), or vdd_cofd_wake(). */
void vdd_cofd_wait(struct vdd_cofd *c, short event);
/* Wake both waiters (they re-check their state: used to cancel). */
void vdd_cofd_wake(struct vdd_cofd *c);
/* Unregister from the loop (nobody may be waiting). */
void vdd_cofd_detach(struct vdd_cofd *c);

/* ---- timers (timer.c) ---------------------------------------------------------------- */

/* A one-shot timer on the calling thread's loop (timerfd). */
struct vdd_timer;
struct vdd_timer *vdd_timer_new(void (*cb)(void *opaque), void *opaque);
void vdd_timer_arm(struct vdd_timer *t, uint64_t ns); /* 0 disarms */
void vdd_timer_free(struct vdd_timer *t);
/* From a coroutine: sleep. */
void vdd_co_sleep_ns(uint64_t ns);

/* ---- shared memory a peer may truncate (memguard.c) ----------------------------------- */

/*
 * Guard [addr, addr+len), a MAP_SHARED mapping of a peer's file: a SIGBUS
 * there (the file shrank) replaces the whole range with anonymous memory,
 * marks the slot faulted and writes 1 to notify_fd (an eventfd), so the
 * access succeeds and the owner can fail the device from its loop.  Returns
 * a slot >= 0, or -errno (-ENOSPC: table full).  Remove the slot before
 * unmapping the range or closing notify_fd.
 */
int vdd_memguard_add(void *addr, size_t len, int notify_fd);
bool vdd_memguard_faulted(int slot);
void vdd_memguard_remove(int slot);

/* ---- block nodes (nodes.c, node-ref.c, null-node.c) ---------------------------------- */

struct vdd_node {
	struct vdd_node *next;
	char *name;
	struct vd_bnode *bs;     /* touched only in home */
	struct vdd_thread *home;
	json_t *opts;            /* the options given (for queries) */
	char **refs;             /* nodes this one's graph references (file=NAME) */
	int n_refs;
	int parents;             /* table nodes referencing this one */
	int exports;             /* exports serving it */
	int jobs;                /* block jobs running on it (jobs.c) */
	struct vd_io_stats *iostats; /* request statistics of its exports (home thread) */
	int pins;                /* queries in progress (close waits) */
	bool ready;              /* false while opening */
	bool closing;
};

/* The daemon's formats: "null-co" and the internal node-reference proxy. */
int vdd_formats_register(char **errp);
extern const struct vd_format vdd_format_null;
extern const struct vd_format vdd_format_node_ref;
/*
 * In the opening thread, the nodes "file"/"backing" strings may name while
 * vd_bnode_open_opts() runs (node-ref.c looks them up here).
 */
void vdd_node_ref_set_table(struct vdd_node **nodes, int n);
/* A node-reference proxy's target (bs itself if it is not a proxy). */
struct vd_bnode *vdd_bnode_unwrap(struct vd_bnode *bs);

struct vdd_node *vdd_node_find(const char *name);
/* block_resize: grow or shrink a node (its exports learn the new size). */
int vdd_node_resize(const char *name, uint64_t size, char **errp);
/* The table node whose graph top is bs (NULL if none). */
struct vdd_node *vdd_node_find_by_bs(const struct vd_bnode *bs);

/* ---- block jobs (jobs.c) ------------------------------------------------------------------ */

int vdd_job_stream(json_t *args, char **errp);
/* key: "id" (job-*) or "device" (block-job-*). */
int vdd_job_cancel(json_t *args, const char *key, char **errp);
int vdd_job_pause(json_t *args, const char *key, bool pause, char **errp);
int vdd_job_finalize(json_t *args, char **errp);
int vdd_job_dismiss(json_t *args, char **errp);
int vdd_job_set_speed(json_t *args, char **errp);
/* query-jobs, or query-block-jobs' shape when block_style. */
json_t *vdd_query_jobs(bool block_style);
/* Shutdown: cancel every job and wait until all have stopped. */
void vdd_jobs_cancel_all(void);
/* blockdev-add: coroutine in the main thread.  iothread: vdiskd extension (NULL: from references, else main). */
int vdd_node_add(json_t *opts, char **errp);
int vdd_node_del(const char *name, char **errp);
/* Close n's graph (n and what it references) and reopen it in thread `to` (nothing else may use it). */
int vdd_node_move(struct vdd_node *n, struct vdd_thread *to, char **errp);
json_t *vdd_query_named_block_nodes(void);
json_t *vdd_query_node_stats(void);
/* Close every node, parents first (shutdown). */
void vdd_nodes_close_all(void);
/* Thread names of the nodes a set of options references, for CLI placement. */
json_t *vdd_node_opts_refs(json_t *opts);

/* ---- exports (exports.c; types in ../exports/) --------------------------------------- */

struct vd_export;
int vdd_export_add(json_t *opts, char **errp);
int vdd_export_del(const char *id, bool hard, char **errp);
json_t *vdd_query_block_exports(void);
json_t *vdd_query_export_stats(void);
/* Shut every export down and wait for their clients to go (shutdown). */
void vdd_exports_del_all(void);
/* Tell the exports of node `name` its new size. */
void vdd_exports_node_resized(const char *name, uint64_t size);
/* Number of exports running in thread t (query-iothreads). */
json_t *vdd_exports_in_thread(const struct vdd_thread *t);
json_t *vdd_nodes_in_thread(const struct vdd_thread *t);

/* ---- NBD server (../exports/nbd.c) ---------------------------------------------------- */

int vdd_nbd_server_start(json_t *opts, char **errp);
int vdd_nbd_server_stop(char **errp);
bool vdd_nbd_server_running(void);
json_t *vdd_nbd_server_query(void);

/* ---- TLS credentials (tls.c) ---------------------------------------------------------- */

struct vdd_tls_creds;
int vdd_tls_creds_add(const char *type, json_t *opts, char **errp);
struct vdd_tls_creds *vdd_tls_creds_find(const char *id);
void vdd_tls_creds_free_all(void);
json_t *vdd_query_tls_creds(void);

/* ---- control socket (control.c) and events --------------------------------------------- */

int vdd_control_add(const char *spec, char **errp); /* "unix:PATH" or a path */
/* Shutdown: close the listeners; commands from here on get an error. */
void vdd_control_refuse_commands(void);
/* Wait for commands in progress, flush replies, drop every client (coroutine). */
void vdd_control_close_all(void);
/* Broadcast an event to every control client (main thread; data is stolen). */
void vdd_event(const char *name, json_t *data);
/* Same, from any thread (posted to the main thread). */
void vdd_event_post(const char *name, json_t *data);

/* ---- lifecycle (main.c) ---------------------------------------------------------------- */

/* Begin an orderly shutdown (quit, SIGTERM, SIGINT): idempotent, main thread. */
void vdd_request_shutdown(const char *reason);
extern bool vdd_verbose;
void vdd_log(const char *fmt, ...) VDD_PRINTF(1, 2);

#endif
