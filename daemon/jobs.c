/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Block jobs, in qemu-storage-daemon's model: block-stream, query-jobs,
 * query-block-jobs, job-pause/-resume/-cancel/-finalize/-dismiss (and the
 * block-job-* spellings that name the job by "device"), block-job-set-speed.
 *
 * Status (QEMU's names): created -> running <-> paused -> waiting ->
 * pending -> concluded -> null.  A cancelled or failed job goes through
 * aborting instead of waiting/pending.  auto-finalize=false stops in
 * pending until job-finalize; auto-dismiss=false stops in concluded until
 * job-dismiss.  Each change is a JOB_STATUS_CHANGE event; the end is a
 * BLOCK_JOB_COMPLETED (with "error" on failure) or BLOCK_JOB_CANCELLED.
 *
 * Threads: the main thread owns the job table, the status and the events.
 * The job's body runs as a coroutine in the node's home thread (where the
 * node is used) and talks to the main thread through atomics (requests
 * pause/cancel/finalize, progress) and posted messages (status changes).
 * While a job runs its node can be neither deleted nor moved; shutdown
 * cancels every job and waits for it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"

#define STREAM_CHUNK (1u << 20) /* bytes examined (and at most copied) per step */

struct vdd_job {
	struct vdd_job *next;
	char *id;
	struct vdd_node *node;
	/* Main thread. */
	const char *status;
	char *error;
	bool auto_finalize, auto_dismiss;
	bool body_done;
	/* Requests from the main thread, read by the body (atomics). */
	int want_cancel, want_pause, want_finalize;
	uint64_t speed; /* bytes per second, 0: unlimited */
	/* Progress, written by the body (atomics). */
	uint64_t offset, len;
	int paused; /* the body is parked at a pause point */
	/* Fixed before the body starts (home thread). */
	struct vd_bnode *top, *base;
	char *backing_file, *backing_fmt;
	char **dropped; /* table nodes the stream takes out of the chain */
	int n_dropped;
	char *gained; /* the table node that becomes top's backing, or NULL */
	/* Result of the body, read by the main thread after body_done. */
	int ret;
	char *body_error;
	bool cancelled;
};

static struct vdd_job *jobs; /* main thread */

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

static struct vdd_job *job_find(const char *id)
{
	for (struct vdd_job *j = jobs; j; j = j->next)
		if (!strcmp(j->id, id))
			return j;
	return NULL;
}

static void set_status(struct vdd_job *j, const char *status)
{
	j->status = status;
	vdd_event("JOB_STATUS_CHANGE", json_pack("{s:s, s:s}", "id", j->id, "status", status));
}

static void job_free(struct vdd_job *j)
{
	for (struct vdd_job **pp = &jobs; *pp; pp = &(*pp)->next) {
		if (*pp == j) {
			*pp = j->next;
			break;
		}
	}
	for (int i = 0; i < j->n_dropped; i++)
		free(j->dropped[i]);
	free(j->dropped);
	free(j->gained);
	free(j->backing_file);
	free(j->backing_fmt);
	free(j->body_error);
	free(j->error);
	free(j->id);
	free(j);
}

/* ---- the body (home thread) --------------------------------------------------------------- */

struct job_msg {
	struct vdd_job *job;
	const char *status;
};

static void status_fn(void *arg)
{
	struct job_msg *m = arg;

	set_status(m->job, m->status);
	free(m);
}

static void post_status(struct vdd_job *j, const char *status)
{
	struct job_msg *m = malloc(sizeof(*m));

	if (!m)
		return; /* an event lost to OOM; the final state still comes */
	m->job = j;
	m->status = status;
	vdd_thread_post(vdd_main_thread(), status_fn, m);
}

static void job_finished_fn(void *arg);

/* Park while paused; true when the job should stop. */
static bool pause_point(struct vdd_job *j)
{
	/* The main thread reports paused/running when asked; here the body only parks. */
	if (LOAD(j->want_pause) && !LOAD(j->want_cancel)) {
		STORE(j->paused, 1);
		while (LOAD(j->want_pause) && !LOAD(j->want_cancel))
			vdd_co_sleep_ns(5 * 1000 * 1000);
		STORE(j->paused, 0);
	}
	return LOAD(j->want_cancel) != 0;
}

/* Keep to `speed` bytes/s over what was copied since the job started. */
static void rate_limit(struct vdd_job *j, uint64_t copied, uint64_t start_ns)
{
	uint64_t speed = LOAD(j->speed), due, now = vdd_now_ns();

	if (!speed || !copied)
		return;
	due = start_ns + (uint64_t)((double)copied * 1e9 / (double)speed);
	while (due > now && !LOAD(j->want_cancel) && LOAD(j->speed) == speed) {
		uint64_t ns = due - now < 50 * 1000 * 1000 ? due - now : 50 * 1000 * 1000;

		vdd_co_sleep_ns(ns);
		now = vdd_now_ns();
	}
}

static int stream_copy(struct vdd_job *j)
{
	void *buf = vd_blk_alloc(STREAM_CHUNK);
	uint64_t off = 0, copied = 0, start_ns = vdd_now_ns();
	unsigned steps = 0;
	int ret = 0;

	if (!buf)
		return vd_error(ENOMEM, "stream: out of memory");
	STORE(j->len, j->top->size);
	while (off < j->top->size && !pause_point(j)) {
		uint64_t n;
		bool did_copy;

		ret = vd_bnode_co_stream_step(j->top, j->base, off, STREAM_CHUNK, buf, &n, &did_copy);
		if (ret < 0)
			break;
		off += n;
		STORE(j->offset, off);
		if (did_copy) {
			copied += n;
			rate_limit(j, copied, start_ns);
		}
		if (++steps % 64 == 0)
			vdd_co_sleep_ns(0); /* let the node's other requests run between cached answers */
	}
	vd_blk_free(buf);
	return ret;
}

static void job_body(void *arg)
{
	struct vdd_job *j = arg;
	int ret = stream_copy(j);

	if (ret == 0 && !LOAD(j->want_cancel)) {
		post_status(j, "waiting");
		post_status(j, "pending");
		while (!LOAD(j->want_finalize) && !LOAD(j->want_cancel))
			vdd_co_sleep_ns(5 * 1000 * 1000);
	}
	if (ret == 0 && LOAD(j->want_cancel))
		j->cancelled = true;
	else if (ret == 0)
		ret = vd_bnode_co_stream_finish(j->top, j->base, j->backing_file, j->backing_fmt);
	if (ret < 0)
		j->body_error = strdup(vdisk_get_error_msg());
	j->ret = ret;
	vdd_thread_post(vdd_main_thread(), job_finished_fn, j);
}

/* ---- completion (main thread) ------------------------------------------------------------- */

/*
 * The chain lost these table nodes: the streamed node no longer references
 * them; it references the base instead when that is a table node.
 */
static void update_refs(struct vdd_job *j)
{
	struct vdd_node *n = j->node, *g = j->gained ? vdd_node_find(j->gained) : NULL;
	char **v;

	for (int i = 0; g && i < n->n_refs; i++)
		if (!strcmp(n->refs[i], g->name))
			g = NULL; /* already referenced */
	if (g && (v = realloc(n->refs, sizeof(*v) * (size_t)(n->n_refs + 1))) != NULL) {
		n->refs = v;
		if ((v[n->n_refs] = strdup(g->name)) != NULL) {
			n->n_refs++;
			g->parents++;
		}
	}

	for (int d = 0; d < j->n_dropped; d++) {
		for (int i = 0; i < n->n_refs; i++) {
			struct vdd_node *ref;

			if (strcmp(n->refs[i], j->dropped[d]))
				continue;
			ref = vdd_node_find(n->refs[i]);
			if (ref)
				ref->parents--;
			free(n->refs[i]);
			n->refs[i] = n->refs[--n->n_refs];
			break;
		}
	}
}

static void job_conclude(struct vdd_job *j)
{
	set_status(j, "concluded");
	j->node->jobs--;
	if (j->auto_dismiss) {
		set_status(j, "null");
		job_free(j);
	}
}

static void job_finished_fn(void *arg)
{
	struct vdd_job *j = arg;
	json_t *info;

	j->body_done = true;
	if (j->ret < 0 || j->cancelled)
		set_status(j, "aborting");
	info = json_pack("{s:s, s:s, s:I, s:I, s:I}", "type", "stream", "device", j->id, "len",
			 (json_int_t)LOAD(j->len), "offset", (json_int_t)LOAD(j->offset), "speed",
			 (json_int_t)LOAD(j->speed));
	if (j->ret < 0) {
		j->error = strdup(j->body_error ? j->body_error : strerror(-j->ret));
		json_object_set_new(info, "error", json_string(j->error ? j->error : "error"));
		vdd_log("job '%s' failed: %s", j->id, j->error ? j->error : "");
	} else if (!j->cancelled) {
		update_refs(j);
		vdd_log("job '%s' completed", j->id);
	}
	vdd_event(j->cancelled ? "BLOCK_JOB_CANCELLED" : "BLOCK_JOB_COMPLETED", info);
	job_conclude(j);
}

/* ---- block-stream (main thread, then the home thread) ------------------------------------ */

#define MAX_DROPPED 256 /* VD_MAX_BACKING_DEPTH */

struct prepare_ctx {
	struct vdd_job *job;
	struct vdd_node *base_node; /* base-node=, or NULL */
	const char *base_name;      /* base= (a filename in the chain), or NULL */
	const char *backing_file;   /* backing-file= override, or NULL */
	struct vd_bnode *dropped[MAX_DROPPED]; /* nodes of other table nodes the chain loses */
	int n_dropped;
	struct vd_bnode *gained; /* base, when it is another table node (top then references it) */
	char *err;
};

static bool is_base(struct prepare_ctx *c, struct vd_bnode *p)
{
	struct vd_bnode *unwrapped = vdd_bnode_unwrap(p);

	if (c->base_node)
		return unwrapped == vdd_bnode_unwrap(c->base_node->bs);
	return (unwrapped->filename && !strcmp(unwrapped->filename, c->base_name)) ||
	       (p->filename && !strcmp(p->filename, c->base_name));
}

/* Main thread, after prepare: the table nodes behind the proxies the stream takes out of the chain. */
static int name_dropped(struct vdd_job *j, struct vd_bnode **bs, int n, struct vd_bnode *gained)
{
	struct vdd_node *g = gained ? vdd_node_find_by_bs(gained) : NULL;

	if (g && !(j->gained = strdup(g->name)))
		return -1;
	j->dropped = calloc((size_t)n + 1, sizeof(*j->dropped));
	if (!j->dropped)
		return -1;
	for (int i = 0; i < n; i++) {
		struct vdd_node *t = vdd_node_find_by_bs(bs[i]);

		if (t && !(j->dropped[j->n_dropped++] = strdup(t->name)))
			return -1;
	}
	return 0;
}

/* In the home thread: find top and base, and the names to write in top's header. */
static void prepare_fn(void *arg)
{
	struct prepare_ctx *c = arg;
	struct vdd_job *j = c->job;
	struct vd_bnode *top = c->job->node->bs, *above = NULL;
	bool want_base = c->base_node || c->base_name;

	top = vdd_bnode_unwrap(top);
	j->top = top;
	if (top->read_only) {
		vdd_error(&c->err, "node '%s' is read-only", j->node->name);
		return;
	}
	if (!top->fmt->co_change_backing) {
		vdd_error(&c->err, "node '%s' (format '%s') cannot have its backing chain streamed", j->node->name,
			  top->fmt->name);
		return;
	}
	/* Proxies of other table nodes are followed: the chain goes on in their graphs. */
	for (struct vd_bnode *p = top; p->backing; p = vdd_bnode_unwrap(p->backing)) {
		if (want_base && is_base(c, p->backing)) {
			above = p;
			break;
		}
		if (p->backing->fmt == &vdd_format_node_ref && c->n_dropped < MAX_DROPPED)
			c->dropped[c->n_dropped++] = vdd_bnode_unwrap(p->backing);
	}
	if (want_base && !above) {
		vdd_error(&c->err, "'%s' is not in the backing chain of node '%s'",
			  c->base_node ? c->base_node->name : c->base_name, j->node->name);
		return;
	}
	j->base = above ? above->backing : NULL;
	if (j->base && j->base->fmt == &vdd_format_node_ref)
		c->gained = vdd_bnode_unwrap(j->base);
	j->backing_file = strdup(c->backing_file ? c->backing_file : above ? above->backing_file : "");
	j->backing_fmt = strdup(above ? above->backing_format : "");
	if (!j->backing_file || !j->backing_fmt)
		vdd_error(&c->err, "out of memory");
}

static int valid_job_id(const char *s)
{
	if (!*s || strlen(s) > 127)
		return 0;
	for (const char *p = s; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
		      *p == '.' || *p == '_'))
			return 0;
	return (s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z');
}

int vdd_job_stream(json_t *args, char **errp)
{
	static const char *const known[] = { "job-id", "device", "base", "base-node", "backing-file", "speed",
					     "on-error", "auto-finalize", "auto-dismiss", "filter-node-name", NULL };
	const char *device, *id, *base = NULL, *base_node = NULL, *backing_file = NULL, *on_error;
	struct prepare_ctx c = { 0 };
	struct vdd_node *n;
	struct vdd_job *j;
	bool auto_finalize, auto_dismiss;
	uint64_t speed;

	if (vdd_args_check(args, known, "block-stream", errp) < 0 ||
	    vdd_arg_str(args, "device", true, NULL, &device, errp) < 0 ||
	    vdd_arg_str(args, "job-id", false, device, &id, errp) < 0 ||
	    vdd_arg_str(args, "base", false, NULL, &base, errp) < 0 ||
	    vdd_arg_str(args, "base-node", false, NULL, &base_node, errp) < 0 ||
	    vdd_arg_str(args, "backing-file", false, NULL, &backing_file, errp) < 0 ||
	    vdd_arg_str(args, "on-error", false, "report", &on_error, errp) < 0 ||
	    vdd_arg_u64(args, "speed", 0, &speed, errp) < 0 ||
	    vdd_arg_bool(args, "auto-finalize", true, &auto_finalize, errp) < 0 ||
	    vdd_arg_bool(args, "auto-dismiss", true, &auto_dismiss, errp) < 0)
		return -1;
	if (json_object_get(args, "filter-node-name"))
		return vdd_error(errp, "block-stream: filter-node-name is not supported");
	if (strcmp(on_error, "report"))
		return vdd_error(errp, "block-stream: on-error '%s' is not supported (only 'report')", on_error);
	if (base && base_node)
		return vdd_error(errp, "'base' and 'base-node' cannot be specified at the same time");
	if (!valid_job_id(id))
		return vdd_error(errp, "Invalid job ID '%s'", id);
	if (job_find(id))
		return vdd_error(errp, "Job ID '%s' already in use", id);
	n = vdd_node_find(device);
	if (!n)
		return vdd_error(errp, "Cannot find device='%s' nor node-name='%s'", device, device);
	if (!n->ready || n->closing)
		return vdd_error(errp, "node '%s' is being opened or closed", device);
	if (n->jobs)
		return vdd_error(errp, "Node '%s' is busy: block device is in use by another job", device);
	if (base_node) {
		c.base_node = vdd_node_find(base_node);
		if (!c.base_node)
			return vdd_error(errp, "Cannot find node '%s'", base_node);
		if (c.base_node == n)
			return vdd_error(errp, "base-node '%s' is the streamed node itself", base_node);
	}
	j = calloc(1, sizeof(*j));
	if (!j || !(j->id = strdup(id))) {
		free(j);
		return vdd_error(errp, "out of memory");
	}
	j->node = n;
	j->speed = speed;
	j->auto_finalize = auto_finalize;
	j->auto_dismiss = auto_dismiss;
	j->want_finalize = auto_finalize;
	c.job = j;
	c.base_name = base;
	c.backing_file = backing_file;
	n->jobs++; /* held across the call: the node cannot go away under it */
	vdd_thread_call(n->home, prepare_fn, &c);
	if (!c.err && name_dropped(j, c.dropped, c.n_dropped, c.gained) < 0)
		vdd_error(&c.err, "out of memory");
	if (c.err) {
		n->jobs--;
		vdd_error(errp, "%s", c.err);
		free(c.err);
		job_free(j);
		return -1;
	}
	j->next = jobs;
	jobs = j;
	set_status(j, "created");
	set_status(j, "running");
	vdd_log("job '%s': streaming node '%s'%s%s", id, device, j->base ? " down to " : "",
		j->base ? (base_node ? base_node : base) : "");
	vdd_thread_post(n->home, job_body, j);
	return 0;
}

/* ---- job commands (main thread) ------------------------------------------------------------ */

static struct vdd_job *lookup(json_t *args, const char *key, const char *cmd, char **errp)
{
	static const char *const known_id[] = { "id", NULL };
	static const char *const known_dev[] = { "device", "force", NULL };
	const char *id;
	struct vdd_job *j;

	if (vdd_args_check(args, !strcmp(key, "id") ? known_id : known_dev, cmd, errp) < 0 ||
	    vdd_arg_str(args, key, true, NULL, &id, errp) < 0)
		return NULL;
	j = job_find(id);
	if (!j)
		vdd_error(errp, "Job '%s' not found", id);
	return j;
}

static bool finished(const struct vdd_job *j)
{
	return j->body_done;
}

int vdd_job_cancel(json_t *args, const char *key, char **errp)
{
	struct vdd_job *j = lookup(args, key, "job-cancel", errp);

	if (!j)
		return -1;
	if (finished(j))
		return vdd_error(errp, "Job '%s' in state '%s' cannot accept command verb 'cancel'", j->id, j->status);
	STORE(j->want_cancel, 1);
	return 0;
}

int vdd_job_pause(json_t *args, const char *key, bool pause, char **errp)
{
	struct vdd_job *j = lookup(args, key, pause ? "job-pause" : "job-resume", errp);

	if (!j)
		return -1;
	if (finished(j) || strcmp(j->status, pause ? "running" : "paused") || (!pause && !LOAD(j->want_pause)))
		return vdd_error(errp, "Job '%s' in state '%s' cannot accept command verb '%s'", j->id, j->status,
				 pause ? "pause" : "resume");
	STORE(j->want_pause, pause ? 1 : 0);
	if (pause)
		set_status(j, "paused"); /* QEMU reports the pause at once; the body parks at its next step */
	return 0;
}

int vdd_job_finalize(json_t *args, char **errp)
{
	struct vdd_job *j = lookup(args, "id", "job-finalize", errp);

	if (!j)
		return -1;
	if (strcmp(j->status, "pending"))
		return vdd_error(errp, "Job '%s' in state '%s' cannot accept command verb 'finalize'", j->id, j->status);
	STORE(j->want_finalize, 1);
	return 0;
}

int vdd_job_dismiss(json_t *args, char **errp)
{
	struct vdd_job *j = lookup(args, "id", "job-dismiss", errp);

	if (!j)
		return -1;
	if (strcmp(j->status, "concluded"))
		return vdd_error(errp, "Job '%s' in state '%s' cannot accept command verb 'dismiss'", j->id, j->status);
	set_status(j, "null");
	job_free(j);
	return 0;
}

int vdd_job_set_speed(json_t *args, char **errp)
{
	static const char *const known[] = { "device", "speed", NULL };
	const char *id;
	uint64_t speed;
	struct vdd_job *j;

	if (vdd_args_check(args, known, "block-job-set-speed", errp) < 0 ||
	    vdd_arg_str(args, "device", true, NULL, &id, errp) < 0 ||
	    vdd_arg_u64(args, "speed", 0, &speed, errp) < 0)
		return -1;
	if (!json_object_get(args, "speed"))
		return vdd_error(errp, "Parameter 'speed' is missing");
	j = job_find(id);
	if (!j)
		return vdd_error(errp, "Job '%s' not found", id);
	STORE(j->speed, speed);
	return 0;
}

json_t *vdd_query_jobs(bool block_style)
{
	json_t *list = json_array();

	for (struct vdd_job *j = jobs; j; j = j->next) {
		json_t *o;

		if (block_style) {
			o = json_pack("{s:s, s:s, s:I, s:I, s:b, s:b, s:I, s:s, s:b, s:s, s:b, s:b}", "type", "stream",
				      "device", j->id, "len", (json_int_t)LOAD(j->len), "offset",
				      (json_int_t)LOAD(j->offset), "busy", !LOAD(j->paused) && !finished(j), "paused",
				      !strcmp(j->status, "paused"), "speed", (json_int_t)LOAD(j->speed), "io-status",
				      "ok", "ready", false, "status", j->status, "auto-finalize", j->auto_finalize,
				      "auto-dismiss", j->auto_dismiss);
		} else {
			o = json_pack("{s:s, s:s, s:s, s:I, s:I}", "id", j->id, "type", "stream", "status", j->status,
				      "current-progress", (json_int_t)LOAD(j->offset), "total-progress",
				      (json_int_t)LOAD(j->len));
		}
		if (o && j->error)
			json_object_set_new(o, "error", json_string(j->error));
		json_array_append_new(list, o);
	}
	return list;
}

/* Shutdown: cancel every job, let each reach concluded, drop them all. */
void vdd_jobs_cancel_all(void)
{
	for (struct vdd_job *j = jobs; j; j = j->next)
		if (!finished(j))
			STORE(j->want_cancel, 1);
	for (;;) {
		bool running = false;

		for (struct vdd_job *j = jobs; j; j = j->next)
			running |= !finished(j);
		if (!running)
			break;
		vdd_co_sleep_ns(5 * 1000 * 1000);
	}
	while (jobs)
		job_free(jobs);
}
