/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The node table: blockdev-add / blockdev-del and the node queries.
 *
 * A table node is a named top of a graph the block layer opened from
 * options.  "file" and "backing" strings that name a table node become
 * references (node-ref.c); the referenced node then counts a parent and
 * cannot be deleted before it.  A node is opened, used and closed in its
 * home thread: the thread its references live in, or the one named by the
 * vdiskd-specific "iothread" option, or the main thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "export.h"

static struct vdd_node *nodes; /* creation order */

struct vdd_node *vdd_node_find(const char *name)
{
	for (struct vdd_node *n = nodes; n; n = n->next)
		if (!strcmp(n->name, name))
			return n;
	return NULL;
}

struct vdd_node *vdd_node_find_by_bs(const struct vd_bnode *bs)
{
	for (struct vdd_node *n = nodes; n; n = n->next)
		if (n->bs == bs)
			return n;
	return NULL;
}

/* QEMU's rule: a letter, then up to 31 letters, digits, '-', '.', '_'. */
static bool valid_node_name(const char *s)
{
	size_t len = strlen(s);

	if (!len || len > 31 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z')))
		return false;
	for (const char *p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
		      *p == '.' || *p == '_'))
			return false;
	return true;
}

/* ---- references ------------------------------------------------------------------------- */

struct refs {
	struct vdd_node **v;
	int n;
};

static int refs_add(struct refs *r, struct vdd_node *n)
{
	void *p;

	for (int i = 0; i < r->n; i++)
		if (r->v[i] == n)
			return 0;
	p = realloc(r->v, sizeof(*r->v) * (size_t)(r->n + 1));
	if (!p)
		return -1;
	r->v = p;
	r->v[r->n++] = n;
	return 0;
}

/*
 * Replace "file"/"backing" strings naming table nodes, at any depth, with
 * node-reference options; collect the nodes.  Strings that name no node
 * stay filenames (the block layer's own meaning).
 */
static int resolve_refs(json_t *o, struct refs *r, char **errp)
{
	static const char *const keys[] = { "file", "backing" };
	const char *key;
	json_t *v;

	for (int i = 0; i < 2; i++) {
		struct vdd_node *n;

		v = json_object_get(o, keys[i]);
		if (!json_is_string(v) || !(n = vdd_node_find(json_string_value(v))))
			continue;
		if (!n->ready || n->closing)
			return vdd_error(errp, "node '%s' is not ready (being opened or closed)", n->name);
		if (refs_add(r, n) < 0)
			return vdd_error(errp, "out of memory");
		json_object_set_new(o, keys[i], json_pack("{s:s, s:s}", "driver", vdd_format_node_ref.name, "node",
							   n->name));
	}
	json_object_foreach(o, key, v) {
		if (json_is_object(v) && resolve_refs(v, r, errp) < 0)
			return -1;
	}
	return 0;
}

json_t *vdd_node_opts_refs(json_t *opts)
{
	json_t *copy = json_deep_copy(opts), *list = json_array();
	struct refs r = { 0 };
	char *err = NULL;

	if (copy && resolve_refs(copy, &r, &err) == 0)
		for (int i = 0; i < r.n; i++)
			json_array_append_new(list, json_string(r.v[i]->name));
	free(err);
	free(r.v);
	json_decref(copy);
	return list;
}

/* ---- blockdev-add ---------------------------------------------------------------------------- */

struct open_ctx {
	json_t *opts;
	struct refs *refs;
	struct vd_bnode *bs;
	char *err;
};

static void open_fn(void *arg)
{
	struct open_ctx *c = arg;

	vdd_node_ref_set_table(c->refs->v, c->refs->n);
	c->bs = vd_bnode_open_opts(c->opts, NULL, VD_BO_RDWR);
	vdd_node_ref_set_table(NULL, 0);
	if (!c->bs)
		c->err = strdup(vdisk_get_error_msg());
}

static void close_fn(void *arg)
{
	struct vdd_node *n = arg;

	vd_bnode_unref(n->bs);
	n->bs = NULL;
}

static void node_free(struct vdd_node *n)
{
	for (struct vdd_node **pp = &nodes; *pp; pp = &(*pp)->next) {
		if (*pp == n) {
			*pp = n->next;
			break;
		}
	}
	for (int i = 0; i < n->n_refs; i++) {
		struct vdd_node *ref = vdd_node_find(n->refs[i]);

		if (ref)
			ref->parents--;
		free(n->refs[i]);
	}
	free(n->refs);
	free(n->iostats);
	json_decref(n->opts);
	free(n->name);
	free(n);
}

int vdd_node_add(json_t *args, char **errp)
{
	struct open_ctx ctx = { 0 };
	struct refs refs = { 0 };
	const char *name, *iothread;
	struct vdd_thread *home;
	struct vdd_node *n, **pp;
	json_t *opts;

	if (!json_is_object(args))
		return vdd_error(errp, "blockdev-add: arguments must be an object");
	if (vdd_arg_str(args, "node-name", true, NULL, &name, errp) < 0 ||
	    vdd_arg_str(args, "iothread", false, NULL, &iothread, errp) < 0)
		goto fail_prefix;
	if (!json_is_string(json_object_get(args, "driver")))
		return vdd_error(errp, "blockdev-add: parameter 'driver' is missing or not a string");
	if (!valid_node_name(name))
		return vdd_error(errp, "blockdev-add: invalid node-name '%s' (a letter, then up to 31 letters, digits, "
				       "'-', '.', '_')", name);
	if (vdd_node_find(name))
		return vdd_error(errp, "blockdev-add: duplicate node name '%s'", name);
	if (!strcmp(json_string_value(json_object_get(args, "driver")), vdd_format_node_ref.name))
		return vdd_error(errp, "blockdev-add: driver '%s' is internal", vdd_format_node_ref.name);
	opts = json_deep_copy(args);
	if (!opts)
		return vdd_error(errp, "out of memory");
	json_object_del(opts, "iothread"); /* ours, not the block layer's */
	if (resolve_refs(opts, &refs, errp) < 0)
		goto fail_opts;

	/* Home: the references' thread; an explicit iothread must agree. */
	home = NULL;
	for (int i = 0; i < refs.n; i++) {
		if (home && refs.v[i]->home != home) {
			vdd_error(errp, "blockdev-add: nodes '%s' and '%s' live in different threads (%s, %s)",
				  refs.v[0]->name, refs.v[i]->name, vdd_thread_name(home),
				  vdd_thread_name(refs.v[i]->home));
			goto fail_opts;
		}
		home = refs.v[i]->home;
	}
	if (iothread) {
		struct vdd_thread *t;

		if (vdd_thread_lookup(iothread, &t, errp) < 0)
			goto fail_opts;
		if (home && t != home) {
			vdd_error(errp, "blockdev-add: iothread '%s' given, but the nodes it uses live in '%s'", iothread,
				  vdd_thread_name(home));
			goto fail_opts;
		}
		home = t;
	}
	if (!home)
		home = vdd_main_thread();

	/* Reserve the name (not ready) and pin the references while the open yields. */
	n = calloc(1, sizeof(*n));
	if (!n || !(n->name = strdup(name)) || !(n->iostats = calloc(1, sizeof(*n->iostats))) ||
	    (refs.n && !(n->refs = calloc((size_t)refs.n, sizeof(char *))))) {
		if (n) {
			free(n->name);
			free(n->iostats);
		}
		free(n);
		vdd_error(errp, "out of memory");
		goto fail_opts;
	}
	n->home = home;
	n->opts = json_deep_copy(args);
	for (int i = 0; i < refs.n; i++) {
		n->refs[i] = strdup(refs.v[i]->name);
		n->n_refs++;
		refs.v[i]->parents++;
	}
	for (pp = &nodes; *pp; pp = &(*pp)->next)
		;
	*pp = n;

	ctx.opts = opts;
	ctx.refs = &refs;
	vdd_thread_call(home, open_fn, &ctx);
	json_decref(opts);
	free(refs.v);
	if (!ctx.bs) {
		vdd_error(errp, "%s", ctx.err ? ctx.err : "cannot open the node");
		free(ctx.err);
		node_free(n);
		return -1;
	}
	n->bs = ctx.bs;
	n->ready = true;
	vdd_log("node '%s' (%s) opened in thread '%s'", name, ctx.bs->fmt->name, vdd_thread_name(home));
	return 0;

fail_opts:
	json_decref(opts);
	free(refs.v);
	return -1;
fail_prefix:
	vdd_error_prefix(errp, "blockdev-add: ");
	return -1;
}

/* ---- moving a graph to another thread ------------------------------------------------------- */

/*
 * A node cannot change threads while open (its libvdisk queue belongs to
 * the opening thread's loop), so moving closes the node and everything it
 * references, parents first, then opens them again from their options in
 * the new thread, children first.  Only a graph nothing else uses can
 * move: no exports, no parents outside it.  Closing flushes, so no data is
 * lost; if reopening fails the nodes are reopened where they were.
 */

static int collect_graph(struct vdd_node *n, struct refs *set, char **errp)
{
	if (refs_add(set, n) < 0)
		return vdd_error(errp, "out of memory");
	for (int i = 0; i < n->n_refs; i++) {
		struct vdd_node *child = vdd_node_find(n->refs[i]);

		if (!child)
			return vdd_error(errp, "node '%s' references the unknown node '%s'", n->name, n->refs[i]);
		if (collect_graph(child, set, errp) < 0)
			return -1;
	}
	return 0;
}

static bool in_set(const struct refs *set, const struct vdd_node *n)
{
	for (int i = 0; i < set->n; i++)
		if (set->v[i] == n)
			return true;
	return false;
}

/* Parents of n inside set. */
static int parents_in(const struct refs *set, const struct vdd_node *n)
{
	int count = 0;

	for (int i = 0; i < set->n; i++)
		for (int k = 0; k < set->v[i]->n_refs; k++)
			count += !strcmp(set->v[i]->refs[k], n->name);
	return count;
}

/* Open n (closed, in the table) in thread t from its options. */
static int reopen(struct vdd_node *n, struct vdd_thread *t, char **errp)
{
	struct open_ctx ctx = { 0 };
	struct refs refs = { 0 };
	json_t *opts = json_deep_copy(n->opts);

	if (!opts)
		return vdd_error(errp, "out of memory");
	json_object_del(opts, "iothread");
	if (resolve_refs(opts, &refs, errp) < 0) {
		json_decref(opts);
		free(refs.v);
		return -1;
	}
	ctx.opts = opts;
	ctx.refs = &refs;
	vdd_thread_call(t, open_fn, &ctx);
	json_decref(opts);
	free(refs.v);
	if (!ctx.bs) {
		vdd_error(errp, "reopening node '%s' in thread '%s': %s", n->name, vdd_thread_name(t),
			  ctx.err ? ctx.err : "failed");
		free(ctx.err);
		return -1;
	}
	n->bs = ctx.bs;
	n->home = t;
	n->closing = false;
	n->ready = true;
	return 0;
}

int vdd_node_move(struct vdd_node *top, struct vdd_thread *to, char **errp)
{
	struct vdd_thread *from = top->home;
	struct refs set = { 0 }, order = { 0 };
	int ret = -1, done;

	if (from == to)
		return 0;
	if (collect_graph(top, &set, errp) < 0)
		goto out;
	for (int i = 0; i < set.n; i++) {
		struct vdd_node *n = set.v[i];

		if (!n->ready || n->closing || n->pins || n->jobs) {
			vdd_error(errp, "node '%s' is busy%s", n->name, n->jobs ? " (a block job runs on it)" : "");
			goto out;
		}
		if (n->exports) {
			vdd_error(errp, "node '%s' is exported in thread '%s' and cannot move to '%s'", n->name,
				  vdd_thread_name(n->home), vdd_thread_name(to));
			goto out;
		}
		if (n->parents != parents_in(&set, n)) {
			vdd_error(errp, "node '%s' is also used by nodes outside '%s' and cannot move to '%s'", n->name,
				  top->name, vdd_thread_name(to));
			goto out;
		}
	}
	/* Close parents first: a node once every parent of it in the set is closed. */
	for (int i = 0; i < set.n; i++)
		set.v[i]->closing = true;
	while (order.n < set.n) {
		for (int i = 0; i < set.n; i++) {
			struct vdd_node *n = set.v[i];
			bool ready = !in_set(&order, n);

			for (int k = 0; ready && k < set.n; k++)
				for (int r = 0; ready && r < set.v[k]->n_refs; r++)
					if (!strcmp(set.v[k]->refs[r], n->name) && !in_set(&order, set.v[k]))
						ready = false;
			if (!ready)
				continue;
			vdd_thread_call(from, close_fn, n);
			n->ready = false;
			refs_add(&order, n);
		}
	}
	/* Open children first, in the new thread. */
	for (done = 0; done < order.n; done++)
		if (reopen(order.v[order.n - 1 - done], to, errp) < 0)
			break;
	if (done == order.n) {
		vdd_log("node '%s' and %d node(s) below it moved from thread '%s' to '%s'", top->name, set.n - 1,
			vdd_thread_name(from), vdd_thread_name(to));
		ret = 0;
		goto out;
	}
	/* Undo: close what moved, reopen everything where it was. */
	for (int i = order.n - done; i < order.n; i++) {
		struct vdd_node *n = order.v[i];

		vdd_thread_call(to, close_fn, n);
		n->ready = false;
		n->closing = true;
	}
	for (int i = order.n - 1; i >= 0; i--) {
		char *err = NULL;

		if (reopen(order.v[i], from, &err) < 0) {
			/* The file went away under us: the node (and its parents) cannot come back. */
			fprintf(stderr, "vdiskd: %s\n", err);
			free(err);
		}
	}
	/* Nodes that failed both ways leave the table, parents first. */
	for (int i = 0; i < order.n; i++)
		if (!order.v[i]->ready)
			node_free(order.v[i]);
out:
	free(set.v);
	free(order.v);
	return ret;
}

/* ---- blockdev-del ---------------------------------------------------------------------------- */

static void close_node(struct vdd_node *n)
{
	n->closing = true;
	while (n->pins) /* a query is looking at it */
		vdd_co_sleep_ns(1000 * 1000);
	if (n->bs)
		vdd_thread_call(n->home, close_fn, n);
	vdd_log("node '%s' closed", n->name);
	node_free(n);
}

int vdd_node_del(const char *name, char **errp)
{
	struct vdd_node *n = vdd_node_find(name);

	if (!n)
		return vdd_error(errp, "Failed to find node with node-name='%s'", name);
	if (!n->ready || n->closing)
		return vdd_error(errp, "node '%s' is being opened or closed", name);
	if (n->jobs)
		return vdd_error(errp, "Node '%s' is busy: a block job is running on it (job-cancel it first)", name);
	if (n->exports)
		return vdd_error(errp, "Node '%s' is in use by %d export%s (remove %s with block-export-del first)", name,
				 n->exports, n->exports == 1 ? "" : "s", n->exports == 1 ? "it" : "them");
	if (n->parents) {
		for (struct vdd_node *p = nodes; p; p = p->next)
			for (int i = 0; i < p->n_refs; i++)
				if (!strcmp(p->refs[i], name))
					return vdd_error(errp, "Node '%s' is in use by node '%s' (delete '%s' first)", name,
							 p->name, p->name);
		return vdd_error(errp, "Node '%s' is in use", name);
	}
	close_node(n);
	return 0;
}

struct resize_ctx {
	struct vdd_node *n;
	uint64_t size;
	int ret;
	char msg[512];
};

static void resize_fn(void *arg)
{
	struct resize_ctx *c = arg;
	struct vd_bnode *bs = c->n->bs;

	c->ret = vd_bnode_co_truncate(bs, c->size, true, "off"); /* refuses read-only and corrupt nodes */
	if (c->ret < 0)
		snprintf(c->msg, sizeof(c->msg), "%s", vdisk_get_error_msg());
	c->size = bs->size; /* a format may round up */
}

int vdd_node_resize(const char *name, uint64_t size, char **errp)
{
	struct vdd_node *n = vdd_node_find(name);
	struct resize_ctx c = { .n = n, .size = size };

	if (!n)
		return vdd_error(errp, "Cannot find device='%s' nor node-name='%s'", name, name);
	if (!n->ready || n->closing)
		return vdd_error(errp, "node '%s' is being opened or closed", name);
	if (n->jobs)
		return vdd_error(errp, "Node '%s' is busy: a block job is running on it", name);
	n->pins++; /* blockdev-del waits */
	vdd_thread_call(n->home, resize_fn, &c);
	n->pins--;
	if (c.ret < 0)
		return vdd_error(errp, "Cannot resize node '%s': %s", name, c.msg);
	vdd_exports_node_resized(name, c.size);
	vdd_log("node '%s' resized to %" PRIu64 " bytes", name, c.size);
	return 0;
}

void vdd_nodes_close_all(void)
{
	/* Parents before children: a node without parents, the newest first. */
	while (nodes) {
		struct vdd_node *victim = NULL;

		for (struct vdd_node *n = nodes; n; n = n->next)
			if (!n->parents && !n->closing && n->ready)
				victim = n;
		if (!victim) {
			/* Only nodes being opened or closed by someone else: let them finish. */
			vdd_co_sleep_ns(10 * 1000 * 1000);
			continue;
		}
		close_node(victim);
	}
}

/* ---- queries ---------------------------------------------------------------------------------- */

static json_t *child_desc(const char *role, struct vd_bnode *child)
{
	struct vd_bnode *real = vdd_bnode_unwrap(child);

	return json_pack("{s:s, s:s?, s:s, s:b}", "child", role, "node-name", real->node_name, "driver",
			 real->fmt->name, "reference", real != child);
}

struct info_ctx {
	struct vdd_node *n;
	json_t *out;
};

static void info_fn(void *arg)
{
	struct info_ctx *c = arg;
	struct vd_bnode *bs = c->n->bs;
	int64_t actual = vd_bnode_allocated_size(bs);
	json_t *children = json_array(), *image;

	if (bs->file)
		json_array_append_new(children, child_desc("file", bs->file));
	if (bs->backing)
		json_array_append_new(children, child_desc("backing", bs->backing));
	image = json_pack("{s:I, s:s?, s:s}", "virtual-size", (json_int_t)bs->size, "filename", bs->filename,
			  "format", bs->fmt->name);
	if (actual >= 0)
		json_object_set_new(image, "actual-size", json_integer(actual));
	if (bs->backing_file[0])
		json_object_set_new(image, "backing-filename", json_string(bs->backing_file));
	if (bs->fmt->get_info)
		bs->fmt->get_info(bs, image); /* "format-specific", "dirty-flag", ... */
	c->out = json_pack("{s:s, s:s, s:s?, s:b, s:b, s:{s:b, s:b, s:b}, s:o, s:o}", "node-name", c->n->name, "drv",
			   bs->fmt->name, "file", bs->filename, "ro", bs->read_only, "corrupt", bs->corrupt, "cache",
			   "writeback", bs->cache.writeback, "direct", bs->cache.direct, "no-flush",
			   bs->cache.no_flush, "image", image, "children", children);
}

/* The ready nodes, pinned (blockdev-del waits for pins), so queries may yield between them. */
static struct vdd_node **pin_all(int *count)
{
	struct vdd_node **v;
	int n = 0;

	for (struct vdd_node *p = nodes; p; p = p->next)
		n++;
	v = calloc((size_t)n + 1, sizeof(*v));
	n = 0;
	for (struct vdd_node *p = nodes; v && p; p = p->next) {
		if (!p->ready || p->closing)
			continue;
		p->pins++;
		v[n++] = p;
	}
	*count = n;
	return v;
}

static void unpin_all(struct vdd_node **v, int count)
{
	for (int i = 0; i < count; i++)
		v[i]->pins--;
	free(v);
}

json_t *vdd_query_named_block_nodes(void)
{
	json_t *list = json_array();
	int count;
	struct vdd_node **v = pin_all(&count);

	for (int i = 0; i < count; i++) {
		struct vdd_node *n = v[i];
		struct info_ctx c = { .n = n };

		vdd_thread_call(n->home, info_fn, &c);
		if (!c.out)
			continue;
		json_object_set_new(c.out, "iothread", json_string(vdd_thread_name(n->home)));
		json_object_set_new(c.out, "parents", json_integer(n->parents));
		json_object_set_new(c.out, "exports", json_integer(n->exports));
		json_object_set(c.out, "options", n->opts);
		json_array_append_new(list, c.out);
	}
	unpin_all(v, count);
	return list;
}

static void stats_fn(void *arg)
{
	struct info_ctx *c = arg;
	struct vd_bnode *bs = c->n->bs;

	c->out = json_pack("{s:s, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I}, s:o}", "node-name", c->n->name,
			   "iothread", vdd_thread_name(c->n->home), "block-layer", "rd_operations",
			   (json_int_t)__atomic_load_n(&bs->rd_ops, __ATOMIC_RELAXED), "wr_operations", (json_int_t)__atomic_load_n(&bs->wr_ops, __ATOMIC_RELAXED), "flush_operations",
			   (json_int_t)__atomic_load_n(&bs->flush_ops, __ATOMIC_RELAXED), "discard_operations", (json_int_t)__atomic_load_n(&bs->discard_ops, __ATOMIC_RELAXED), "rd_bytes",
			   (json_int_t)__atomic_load_n(&bs->rd_bytes, __ATOMIC_RELAXED), "wr_bytes", (json_int_t)__atomic_load_n(&bs->wr_bytes, __ATOMIC_RELAXED), "discard_bytes",
			   (json_int_t)__atomic_load_n(&bs->discard_bytes, __ATOMIC_RELAXED), "ops", vd_io_stats_json(c->n->iostats));
}

json_t *vdd_query_node_stats(void)
{
	json_t *list = json_array();
	int count;
	struct vdd_node **v = pin_all(&count);

	for (int i = 0; i < count; i++) {
		struct info_ctx c = { .n = v[i] };

		vdd_thread_call(v[i]->home, stats_fn, &c);
		if (c.out)
			json_array_append_new(list, c.out);
	}
	unpin_all(v, count);
	return list;
}

json_t *vdd_nodes_in_thread(const struct vdd_thread *t)
{
	json_t *list = json_array();

	for (struct vdd_node *n = nodes; n; n = n->next)
		if (n->home == t)
			json_array_append_new(list, json_string(n->name));
	return list;
}
