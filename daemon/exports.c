/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The export registry: block-export-add/-del, queries, statistics, and the
 * services export types use (references, events, running in the export's
 * thread).  The registry is main-thread data; an export's node and counters
 * live in its thread and are read through vdd_thread_call().
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "export.h"

/* The export types: adding one is one file in exports/ and one line here. */
static const struct vd_export_type *const export_types[] = {
	&vd_export_type_nbd,
	&vd_export_type_fuse,
	&vd_export_type_vhost_user_blk,
};

static struct vd_export *exports; /* creation order */

const struct vd_export_type *vd_export_type_find(const char *name)
{
	for (size_t i = 0; name && i < sizeof(export_types) / sizeof(export_types[0]); i++)
		if (!strcmp(export_types[i]->name, name))
			return export_types[i];
	return NULL;
}

/* ---- statistics ---------------------------------------------------------------------------- */

static const char *const op_names[VD_IO__MAX] = {
	[VD_IO_READ] = "read",
	[VD_IO_WRITE] = "write",
	[VD_IO_FLUSH] = "flush",
	[VD_IO_DISCARD] = "discard",
	[VD_IO_WRITE_ZEROES] = "write-zeroes",
	[VD_IO_BLOCK_STATUS] = "block-status",
	[VD_IO_CACHE] = "cache",
};

const char *vd_io_op_name(enum vd_io_op op)
{
	return op < VD_IO__MAX ? op_names[op] : "?";
}

static unsigned lat_bin(uint64_t ns)
{
	uint64_t us = ns / 1000;
	unsigned bin = 0;

	while (us && bin < VD_LAT_BINS - 1) {
		us >>= 1;
		bin++;
	}
	return bin;
}

#define STAT_ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)
#define STAT_GET(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

/* Any thread: an export may serve from several iothreads, and a node's exports share its counters. */
void vd_io_stats_account(struct vd_io_stats *s, enum vd_io_op op, uint64_t bytes, uint64_t ns, bool failed)
{
	struct vd_io_op_stats *o = &s->op[op];
	uint64_t max = STAT_GET(o->max_ns);

	STAT_ADD(o->ops, 1);
	STAT_ADD(o->bytes, bytes);
	if (failed)
		STAT_ADD(o->errors, 1);
	STAT_ADD(o->total_ns, ns);
	while (ns > max && !__atomic_compare_exchange_n(&o->max_ns, &max, ns, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
	STAT_ADD(o->hist[lat_bin(ns)], 1);
}

json_t *vd_io_stats_json(const struct vd_io_stats *s)
{
	json_t *out = json_object();

	for (int op = 0; op < VD_IO__MAX; op++) {
		const struct vd_io_op_stats *o = &s->op[op];
		json_t *bins = json_array(), *bounds = json_array();
		uint64_t hist[VD_LAT_BINS], ops = STAT_GET(o->ops), total = STAT_GET(o->total_ns);
		int last = -1;

		for (int i = 0; i < VD_LAT_BINS; i++)
			if ((hist[i] = STAT_GET(o->hist[i])))
				last = i;
		/* Bins up to the last non-empty one; boundaries between them, in microseconds. */
		for (int i = 0; i <= last; i++) {
			json_array_append_new(bins, json_integer((json_int_t)hist[i]));
			if (i < last)
				json_array_append_new(bounds, json_integer(i == 0 ? 1 : (json_int_t)1 << i));
		}
		json_object_set_new(out, op_names[op],
				    json_pack("{s:I, s:I, s:I, s:I, s:I, s:{s:o, s:o}}", "ops", (json_int_t)ops, "bytes",
					      (json_int_t)STAT_GET(o->bytes), "errors", (json_int_t)STAT_GET(o->errors),
					      "mean-latency-ns", (json_int_t)(ops ? total / ops : 0), "max-latency-ns",
					      (json_int_t)STAT_GET(o->max_ns), "latency-histogram", "boundaries-us", bounds,
					      "bins", bins));
	}
	return out;
}

/* ---- references and services ------------------------------------------------------------ */

void vd_export_ref(struct vd_export *exp)
{
	__atomic_add_fetch(&exp->refcnt, 1, __ATOMIC_RELAXED);
}

static void export_released(void *arg)
{
	struct vd_export *exp = arg;

	/* block-export-del (or shutdown) waits for this in the main thread. */
	exp->released = true;
	if (exp->del_waiter)
		vd_loop_schedule(vdd_thread_loop(vdd_main_thread()), exp->del_waiter);
}

void vd_export_unref(struct vd_export *exp)
{
	if (__atomic_sub_fetch(&exp->refcnt, 1, __ATOMIC_ACQ_REL) == 0)
		vdd_thread_post(vdd_main_thread(), export_released, exp);
}

bool vd_export_is_shutting_down(struct vd_export *exp)
{
	return __atomic_load_n(&exp->shutting_down, __ATOMIC_ACQUIRE);
}

void vd_export_post(struct vd_export *exp, void (*fn)(void *), void *arg)
{
	vdd_thread_post(exp->thread, fn, arg);
}

void vd_export_client_event(struct vd_export *exp, bool connected, uint64_t client_id, const char *peer)
{
	vdd_event_post(connected ? "EXPORT_CLIENT_CONNECTED" : "EXPORT_CLIENT_DISCONNECTED",
		       json_pack("{s:s, s:s, s:s, s:I, s:s}", "id", exp->id, "type", exp->type->name, "node-name",
				 exp->node_name, "client-id", (json_int_t)client_id, "peer", peer ? peer : ""));
}

struct vd_bnode *vd_export_unwrap(struct vd_bnode *bs)
{
	return vdd_bnode_unwrap(bs);
}

struct vd_bnode *vd_export_backing(struct vd_bnode *bs)
{
	bs = vdd_bnode_unwrap(bs);
	return bs ? vdd_bnode_unwrap(bs->backing) : NULL;
}

/* ---- block-export-add ------------------------------------------------------------------------ */

static struct vd_export *find(const char *id)
{
	for (struct vd_export *e = exports; e; e = e->next)
		if (!strcmp(e->id, id))
			return e;
	return NULL;
}

/*
 * Formats whose flush covers every connection's writes: they keep no
 * per-connection state, and a flush is node-wide (qcow2 writes back all its
 * dirty metadata, then flushes its file, whichever connection asked).
 */
static bool multi_conn_safe(struct vd_bnode *bs)
{
	static const char *const safe[] = { "file", "raw", "qcow2", "null-co", "vdd-node-ref", NULL };
	bool ok = false;

	if (!bs)
		return true;
	for (int i = 0; safe[i] && !ok; i++)
		ok = !strcmp(bs->fmt->name, safe[i]);
	if (bs->fmt == &vdd_format_node_ref)
		return multi_conn_safe(vdd_bnode_unwrap(bs));
	return ok && multi_conn_safe(bs->file) && multi_conn_safe(bs->backing);
}

struct start_ctx {
	struct vd_export *exp;
	struct vdd_node *node;
	const char *multi_conn; /* on / off / auto */
	char *err;
	int ret;
};

static void start_fn(void *arg)
{
	struct start_ctx *c = arg;
	struct vd_export *exp = c->exp;

	exp->bs = c->node->bs;
	if (exp->writable && exp->bs->read_only) {
		c->ret = vdd_error(&c->err, "node '%s' is read-only: cannot export it writable", exp->node_name);
		return;
	}
	if (!strcmp(c->multi_conn, "on"))
		exp->multi_conn = true;
	else if (!strcmp(c->multi_conn, "off"))
		exp->multi_conn = false;
	else
		exp->multi_conn = !exp->writable || multi_conn_safe(exp->bs);
	c->ret = exp->type->start ? exp->type->start(exp, &c->err) : 0;
}

static void free_export(struct vd_export *exp)
{
	free(exp->threads);
	free(exp->id);
	free(exp->node_name);
	free(exp);
}

static const char *const generic_args[] = { "type", "id", "node-name", "writable", "iothread", "fixed-iothread",
					    "multi-conn", "writethrough", NULL };

/*
 * "iothread" as QEMU spells it (BlockExportOptions, QEMU 10): one thread
 * name, or a list of them -- a JSON array, or from the command line the
 * dotted form iothread.0=a,iothread.1=b (an object with keys 0, 1, ...).
 * A list leaves the node where it is; the export spreads its work over the
 * threads.  Returns the number of threads (0: none given) in *out (malloc'd).
 */
static int parse_iothreads(json_t *opts, struct vdd_thread ***out, int *n, char **errp)
{
	json_t *v = json_object_get(opts, "iothread");
	size_t count;

	*out = NULL;
	*n = 0;
	if (!v || json_is_string(v))
		return 0;
	if (json_is_object(v)) {
		/* Dotted keys: "0", "1", ... in order, nothing else. */
		json_t *list = json_array();
		char key[24];

		for (size_t i = 0; i < json_object_size(v); i++) {
			json_t *e;

			snprintf(key, sizeof(key), "%zu", i);
			e = json_object_get(v, key);
			if (!e) {
				json_decref(list);
				return vdd_error(errp, "block-export-add: 'iothread' list: keys must be 0, 1, ... (missing %s)",
						 key);
			}
			json_array_append(list, e);
		}
		json_object_set_new(opts, "iothread", list);
		v = list;
	}
	if (!json_is_array(v))
		return vdd_error(errp, "block-export-add: 'iothread' must be a thread name or a list of them");
	count = json_array_size(v);
	if (count == 0 || count > 64)
		return vdd_error(errp, "block-export-add: the 'iothread' list must name 1 to 64 threads");
	*out = calloc(count, sizeof(**out));
	if (!*out)
		return vdd_error(errp, "out of memory");
	for (size_t i = 0; i < count; i++) {
		json_t *e = json_array_get(v, i);

		if (!json_is_string(e))
			vdd_error(errp, "block-export-add: 'iothread' list: element %zu is not a string", i);
		else if (vdd_thread_lookup(json_string_value(e), &(*out)[i], errp) < 0)
			vdd_error_prefix(errp, "block-export-add: 'iothread' list: ");
		if (!(*out)[i]) {
			free(*out);
			*out = NULL;
			return -1;
		}
		for (size_t j = 0; j < i; j++)
			if ((*out)[j] == (*out)[i]) {
				vdd_error(errp, "block-export-add: 'iothread' list names '%s' twice", json_string_value(e));
				free(*out);
				*out = NULL;
				return -1;
			}
	}
	*n = (int)count;
	return 0;
}

static int check_args(json_t *opts, const struct vd_export_type *type, char **errp)
{
	const char *key;
	json_t *v;

	json_object_foreach(opts, key, v) {
		bool ok = false;

		for (int i = 0; generic_args[i] && !ok; i++)
			ok = !strcmp(key, generic_args[i]);
		for (int i = 0; type->options && type->options[i] && !ok; i++)
			ok = !strcmp(key, type->options[i]);
		if (!ok)
			return vdd_error(errp, "block-export-add: invalid parameter '%s' for type '%s'", key, type->name);
	}
	return 0;
}

static int add_export(json_t *opts, const struct vd_export_type *type, const char *id, const char *node_name,
		      bool writable, const char *multi_conn, const char *iothread, bool fixed,
		      struct vdd_thread **threads, int n_threads, char **errp);

int vdd_export_add(json_t *opts, char **errp)
{
	const char *type_name, *id, *node_name, *iothread, *multi_conn;
	const struct vd_export_type *type;
	struct vdd_thread **threads;
	int n_threads;
	bool writable, fixed;

	if (!json_is_object(opts))
		return vdd_error(errp, "block-export-add: arguments must be an object");
	if (vdd_arg_str(opts, "type", true, NULL, &type_name, errp) < 0)
		return -1;
	type = vd_export_type_find(type_name);
	if (!type)
		return vdd_error(errp, "block-export-add: unknown export type '%s' (nbd, fuse, vhost-user-blk)", type_name);
	if (check_args(opts, type, errp) < 0 || vdd_arg_str(opts, "id", true, NULL, &id, errp) < 0 ||
	    vdd_arg_str(opts, "node-name", true, NULL, &node_name, errp) < 0 ||
	    vdd_arg_bool(opts, "writable", false, &writable, errp) < 0 ||
	    vdd_arg_str(opts, "multi-conn", false, "auto", &multi_conn, errp) < 0 ||
	    vdd_arg_bool(opts, "fixed-iothread", false, &fixed, errp) < 0 ||
	    parse_iothreads(opts, &threads, &n_threads, errp) < 0)
		return -1;
	if (n_threads) {
		int ret = 0;

		if (!type->multi_thread)
			ret = vdd_error(errp, "block-export-add: export type '%s' does not support a list of iothreads",
					type->name);
		else if (fixed)
			ret = vdd_error(errp, "block-export-add: fixed-iothread cannot be used with a list of iothreads");
		if (ret == 0)
			ret = add_export(opts, type, id, node_name, writable, multi_conn, NULL, false, threads, n_threads,
					 errp);
		free(threads);
		return ret;
	}
	if (vdd_arg_str(opts, "iothread", false, NULL, &iothread, errp) < 0)
		return -1;
	return add_export(opts, type, id, node_name, writable, multi_conn, iothread, fixed, NULL, 0, errp);
}

static int add_export(json_t *opts, const struct vd_export_type *type, const char *id, const char *node_name,
		      bool writable, const char *multi_conn, const char *iothread, bool fixed,
		      struct vdd_thread **threads, int n_threads, char **errp)
{
	struct vdd_thread *thread;
	struct start_ctx ctx = { 0 };
	struct vdd_node *node;
	struct vd_export *exp;

	if (strcmp(multi_conn, "on") && strcmp(multi_conn, "off") && strcmp(multi_conn, "auto"))
		return vdd_error(errp, "block-export-add: multi-conn must be on, off or auto");
	if (!id[0])
		return vdd_error(errp, "block-export-add: 'id' must not be empty");
	if (find(id))
		return vdd_error(errp, "block-export-add: export '%s' already exists", id);
	node = vdd_node_find(node_name);
	if (!node || !node->ready || node->closing)
		return vdd_error(errp, "block-export-add: node '%s' not found", node_name);
	if (vdd_thread_lookup(iothread, &thread, errp) < 0)
		return -1;
	if (iothread && thread != node->home) {
		/* As QEMU: the node moves to the export's iothread, unless fixed-iothread forbids it. */
		if (fixed)
			return vdd_error(errp, "block-export-add: node '%s' lives in thread '%s', not '%s' (fixed-iothread)",
					 node_name, vdd_thread_name(node->home), iothread);
		if (vdd_node_move(node, thread, errp) < 0) {
			vdd_error_prefix(errp, "block-export-add: ");
			return -1;
		}
		if (!(node = vdd_node_find(node_name)) || !node->ready)
			return vdd_error(errp, "block-export-add: node '%s' was lost while moving", node_name);
	}
	exp = calloc(1, sizeof(*exp));
	if (!exp || !(exp->id = strdup(id)) || !(exp->node_name = strdup(node_name)) ||
	    (type->state_size && !(exp->opaque = calloc(1, type->state_size)))) {
		if (exp)
			free(exp->opaque);
		free(exp ? exp->id : NULL);
		free(exp);
		return vdd_error(errp, "out of memory");
	}
	exp->type = type;
	exp->thread = node->home;
	/* The threads serving clients: the list given, else the node's home. */
	exp->n_threads = n_threads ? n_threads : 1;
	exp->threads = calloc((size_t)exp->n_threads, sizeof(*exp->threads));
	if (!exp->threads) {
		free(exp->opaque);
		free_export(exp);
		return vdd_error(errp, "out of memory");
	}
	for (int i = 0; i < exp->n_threads; i++)
		exp->threads[i] = n_threads ? threads[i] : node->home;
	exp->writable = writable;
	exp->refcnt = 1;
	exp->node_stats = node->iostats;
	if (type->create(exp, opts, errp) < 0) {
		free(exp->opaque);
		free_export(exp);
		return -1;
	}
	node->exports++;
	/* Published before it starts so a concurrent add of the same id fails; clients need `ready`. */
	exp->next = exports;
	exports = exp;
	ctx.exp = exp;
	ctx.node = node;
	ctx.multi_conn = multi_conn;
	vdd_thread_call(exp->thread, start_fn, &ctx);
	if (ctx.ret < 0) {
		vdd_error(errp, "%s", ctx.err ? ctx.err : "cannot start the export");
		free(ctx.err);
		for (struct vd_export **pp = &exports; *pp; pp = &(*pp)->next) {
			if (*pp == exp) {
				*pp = exp->next;
				break;
			}
		}
		node->exports--;
		type->destroy(exp);
		free(exp->opaque);
		free_export(exp);
		return -1;
	}
	exp->ready = true;
	vdd_log("export '%s' (%s) of node '%s' started in thread '%s'%s", id, type->name, node_name,
		vdd_thread_name(exp->thread), exp->writable ? ", writable" : "");
	return 0;
}

/* ---- block-export-del ------------------------------------------------------------------------ */

static void shutdown_fn(void *arg)
{
	struct vd_export *exp = arg;

	exp->type->shutdown(exp);
}

/* Shut exp down and wait until its last client is gone; then free it.  Main thread, coroutine. */
static void remove_export(struct vd_export *exp)
{
	struct vdd_node *node = vdd_node_find(exp->node_name);

	__atomic_store_n(&exp->shutting_down, true, __ATOMIC_RELEASE);
	exp->ready = false;
	vdd_thread_call(exp->thread, shutdown_fn, exp);
	exp->del_waiter = vd_co_self();
	vd_export_unref(exp); /* the registry's reference */
	/* The last reference posts export_released here, which wakes us. */
	while (!exp->released)
		vd_co_yield();
	for (struct vd_export **pp = &exports; *pp; pp = &(*pp)->next) {
		if (*pp == exp) {
			*pp = exp->next;
			break;
		}
	}
	if (node)
		node->exports--;
	exp->type->destroy(exp);
	vdd_event("BLOCK_EXPORT_DELETED", json_pack("{s:s}", "id", exp->id));
	vdd_log("export '%s' removed", exp->id);
	free(exp->opaque);
	free_export(exp);
}

int vdd_export_del(const char *id, bool hard, char **errp)
{
	struct vd_export *exp = find(id);
	int clients;

	if (!exp)
		return vdd_error(errp, "Export '%s' is not found", id);
	if (vd_export_is_shutting_down(exp))
		return vdd_error(errp, "Export '%s' is already shutting down", id);
	clients = __atomic_load_n(&exp->refcnt, __ATOMIC_ACQUIRE) - 1;
	if (!hard && clients > 0)
		return vdd_error(errp, "export '%s' still has %d connection%s (use \"mode\": \"hard\" to drop them)", id,
				 clients, clients == 1 ? "" : "s");
	remove_export(exp);
	return 0;
}

void vdd_exports_node_resized(const char *name, uint64_t size)
{
	for (struct vd_export *e = exports; e; e = e->next)
		if (!strcmp(e->node_name, name) && e->type->resize)
			e->type->resize(e, size);
}

void vdd_exports_del_all(void)
{
	while (exports) {
		struct vd_export *exp = exports;

		if (vd_export_is_shutting_down(exp)) {
			/* Another coroutine is removing it: wait for that. */
			vdd_co_sleep_ns(10 * 1000 * 1000);
			continue;
		}
		remove_export(exp);
	}
}

/* ---- queries --------------------------------------------------------------------------------- */

struct snap_ctx {
	struct vd_export *exp;
	json_t *out;
};

static void snap_fn(void *arg)
{
	struct snap_ctx *c = arg;
	struct vd_export *exp = c->exp;

	c->out = json_pack("{s:s, s:s, s:s, s:i, s:I, s:o}", "id", exp->id, "type", exp->type->name, "node-name",
			   exp->node_name, "connections", (int)STAT_GET(exp->connections),
			   "connections-total", (json_int_t)STAT_GET(exp->connections_total), "ops", vd_io_stats_json(&exp->stats));
	if (c->out && exp->type->query_stats)
		exp->type->query_stats(exp, c->out);
}

static json_t *snapshot(struct vd_export *exp)
{
	struct snap_ctx c = { .exp = exp };

	vdd_thread_call(exp->thread, snap_fn, &c);
	return c.out ? c.out : json_object();
}

/* The exports, referenced, so queries may yield between them. */
static struct vd_export **ref_all(int *count)
{
	struct vd_export **v;
	int n = 0;

	for (struct vd_export *e = exports; e; e = e->next)
		n++;
	v = calloc((size_t)n + 1, sizeof(*v));
	n = 0;
	for (struct vd_export *e = exports; v && e; e = e->next) {
		if (!e->ready || vd_export_is_shutting_down(e))
			continue;
		vd_export_ref(e);
		v[n++] = e;
	}
	*count = n;
	return v;
}

static void unref_all(struct vd_export **v, int count)
{
	for (int i = 0; i < count; i++)
		vd_export_unref(v[i]);
	free(v);
}

json_t *vdd_query_block_exports(void)
{
	json_t *list = json_array();
	int count;
	struct vd_export **v = ref_all(&count);

	for (int i = 0; i < count; i++) {
		struct vd_export *exp = v[i];
		json_t *stats = snapshot(exp);
		json_t *o = json_pack("{s:s, s:s, s:s, s:b, s:s, s:b, s:b, s:O?}", "id", exp->id, "type",
				      exp->type->name, "node-name", exp->node_name, "writable", exp->writable,
				      "iothread", vdd_thread_name(exp->thread), "multi-conn", exp->multi_conn,
				      "shutting-down", vd_export_is_shutting_down(exp), "connections",
				      json_object_get(stats, "connections"));

		json_t *threads = json_array();

		for (int t = 0; t < exp->n_threads; t++)
			json_array_append_new(threads, json_string(vdd_thread_name(exp->threads[t])));
		/* "iothread": the node's thread (control); "iothreads": the threads serving clients. */
		json_object_set_new(o, "iothreads", threads);
		if (exp->type->query)
			exp->type->query(exp, o);
		json_decref(stats);
		json_array_append_new(list, o);
	}
	unref_all(v, count);
	return list;
}

json_t *vdd_query_export_stats(void)
{
	json_t *list = json_array();
	int count;
	struct vd_export **v = ref_all(&count);

	for (int i = 0; i < count; i++)
		json_array_append_new(list, snapshot(v[i]));
	unref_all(v, count);
	return list;
}

json_t *vdd_exports_in_thread(const struct vdd_thread *t)
{
	json_t *list = json_array();

	for (struct vd_export *exp = exports; exp; exp = exp->next) {
		bool here = exp->thread == t;

		for (int i = 0; i < exp->n_threads && !here; i++)
			here = exp->threads[i] == t;
		if (here)
			json_array_append_new(list, json_string(exp->id));
	}
	return list;
}
