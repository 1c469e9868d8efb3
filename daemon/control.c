/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The control socket: line-delimited JSON in QMP's shape.
 *
 *   -> {"execute": "blockdev-add", "arguments": {...}, "id": 1}
 *   <- {"return": {}, "id": 1}
 *   <- {"error": {"class": "GenericError", "desc": "..."}, "id": 1}
 *   <- {"event": "EXPORT_CLIENT_CONNECTED", "data": {...}, "timestamp": {"seconds": ..., "microseconds": ...}}
 *
 * A client is greeted with {"QMP": {...}} and may send qmp_capabilities
 * (accepted, not required).  Each client has a coroutine that reads one
 * line, runs the command (which may yield, e.g. while a node opens in an
 * iothread) and queues the reply; replies and events go through a
 * per-client output buffer flushed when the socket is writable.  A bad
 * line gets an error reply and the client goes on; a client that sends an
 * endless line or never reads its replies is dropped.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"

#define MAX_LINE (4u << 20)    /* longest command line */
#define MAX_OUTPUT (16u << 20) /* unsent replies and events before a client is dropped */

struct ctl_listener {
	struct ctl_listener *next;
	int fd;
	char *path;
};

struct ctl_client {
	struct ctl_client *next;
	int fd;
	char *in;
	size_t in_len, in_cap;
	char *out;
	size_t out_len, out_cap;
	struct vd_co *co;
	bool want_input; /* co waits for POLLIN */
	bool woken;
	bool dead;       /* drop the client (EOF, error, shutdown) */
	bool busy;       /* running a command */
	short events;
	uint64_t id;
};

static struct ctl_listener *listeners;
static struct ctl_client *clients;
static bool refusing; /* shutting down: no new commands */
static uint64_t next_id;

static struct vd_loop *main_loop(void)
{
	return vdd_thread_loop(vdd_main_thread());
}

/* ---- output -------------------------------------------------------------------------------- */

static void client_event(void *opaque, int fd, int revents);

static void update_events(struct ctl_client *c)
{
	short ev = c->dead ? 0 : (short)((c->want_input ? POLLIN : 0) | (c->out_len ? POLLOUT : 0));

	if (ev == c->events)
		return;
	if (ev)
		vd_loop_set_fd_handler(main_loop(), c->fd, ev, client_event, c);
	else
		vd_loop_del_fd_handler(main_loop(), c->fd);
	c->events = ev;
}

static void wake(struct ctl_client *c)
{
	if (c->want_input) {
		c->want_input = false;
		c->woken = true;
		update_events(c);
		vd_loop_schedule(main_loop(), c->co);
	}
}

static void flush_out(struct ctl_client *c)
{
	while (c->out_len && !c->dead) {
		ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0) {
			c->dead = true;
			wake(c);
			break;
		}
		memmove(c->out, c->out + n, c->out_len - (size_t)n);
		c->out_len -= (size_t)n;
	}
	update_events(c);
}

static void send_json(struct ctl_client *c, json_t *msg)
{
	char *text = json_dumps(msg, JSON_COMPACT | JSON_PRESERVE_ORDER);
	size_t len;

	json_decref(msg);
	if (!text || c->dead) {
		free(text);
		return;
	}
	len = strlen(text);
	if (c->out_len + len + 1 > MAX_OUTPUT) {
		/* It does not read what we send: drop it rather than grow without bound. */
		free(text);
		c->dead = true;
		shutdown(c->fd, SHUT_RDWR);
		wake(c);
		return;
	}
	if (c->out_len + len + 1 > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *p;

		while (cap < c->out_len + len + 1)
			cap *= 2;
		p = realloc(c->out, cap);
		if (!p) {
			free(text);
			return;
		}
		c->out = p;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, text, len);
	c->out[c->out_len + len] = '\n';
	c->out_len += len + 1;
	free(text);
	flush_out(c);
}

static void client_event(void *opaque, int fd, int revents)
{
	struct ctl_client *c = opaque;

	(void)fd;
	if (revents & (POLLOUT | POLLERR | POLLHUP))
		flush_out(c);
	if (revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL))
		wake(c);
}

/* ---- events -------------------------------------------------------------------------------- */

void vdd_event(const char *name, json_t *data)
{
	for (struct ctl_client *c = clients; c; c = c->next)
		if (!c->dead)
			send_json(c, json_pack("{s:s, s:O, s:o}", "event", name, "data", data, "timestamp",
					       vdd_timestamp()));
	json_decref(data);
}

struct posted_event {
	char *name;
	json_t *data;
};

static void event_fn(void *arg)
{
	struct posted_event *e = arg;

	vdd_event(e->name, e->data);
	free(e->name);
	free(e);
}

void vdd_event_post(const char *name, json_t *data)
{
	struct posted_event *e = malloc(sizeof(*e));

	if (!e || !(e->name = strdup(name))) {
		free(e);
		json_decref(data);
		return;
	}
	e->data = data;
	vdd_thread_post(vdd_main_thread(), event_fn, e);
}

/* ---- commands ------------------------------------------------------------------------------ */

typedef json_t *(*cmd_fn)(json_t *args, char **errp);

static json_t *ok(int ret)
{
	return ret < 0 ? NULL : json_object();
}

static json_t *cmd_qmp_capabilities(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return json_object();
}

static json_t *cmd_query_version(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return json_pack("{s:{s:i, s:i, s:i}, s:s, s:s}", "qemu", "major", 0, "minor", 1, "micro", 0, "package",
			 "vdiskd " VDISK_VERSION, "vdiskd", VDISK_VERSION);
}

static json_t *cmd_blockdev_add(json_t *args, char **errp)
{
	return ok(vdd_node_add(args, errp));
}

static json_t *cmd_blockdev_del(json_t *args, char **errp)
{
	static const char *const known[] = { "node-name", NULL };
	const char *name;

	if (vdd_args_check(args, known, "blockdev-del", errp) < 0 ||
	    vdd_arg_str(args, "node-name", true, NULL, &name, errp) < 0)
		return NULL;
	return ok(vdd_node_del(name, errp));
}

static json_t *cmd_block_export_add(json_t *args, char **errp)
{
	return ok(vdd_export_add(args, errp));
}

static json_t *cmd_block_export_del(json_t *args, char **errp)
{
	static const char *const known[] = { "id", "mode", NULL };
	const char *id, *mode;

	if (vdd_args_check(args, known, "block-export-del", errp) < 0 ||
	    vdd_arg_str(args, "id", true, NULL, &id, errp) < 0 ||
	    vdd_arg_str(args, "mode", false, "safe", &mode, errp) < 0)
		return NULL;
	if (strcmp(mode, "safe") && strcmp(mode, "hard")) {
		vdd_error(errp, "block-export-del: mode must be safe or hard");
		return NULL;
	}
	return ok(vdd_export_del(id, !strcmp(mode, "hard"), errp));
}

static json_t *cmd_query_block_exports(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return vdd_query_block_exports();
}

static json_t *cmd_query_named_block_nodes(json_t *args, char **errp)
{
	static const char *const known[] = { "flat", NULL };

	if (vdd_args_check(args, known, "query-named-block-nodes", errp) < 0)
		return NULL;
	return vdd_query_named_block_nodes();
}

static json_t *cmd_query_iothreads(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return vdd_query_iothreads();
}

static json_t *cmd_query_stats(json_t *args, char **errp)
{
	static const char *const known[] = { "target", NULL };
	const char *target;
	json_t *out = json_object();

	if (vdd_args_check(args, known, "query-stats", errp) < 0 ||
	    vdd_arg_str(args, "target", false, NULL, &target, errp) < 0) {
		json_decref(out);
		return NULL;
	}
	if (target && strcmp(target, "export") && strcmp(target, "node")) {
		json_decref(out);
		vdd_error(errp, "query-stats: target must be export or node");
		return NULL;
	}
	if (!target || !strcmp(target, "export"))
		json_object_set_new(out, "exports", vdd_query_export_stats());
	if (!target || !strcmp(target, "node"))
		json_object_set_new(out, "nodes", vdd_query_node_stats());
	return out;
}

static json_t *cmd_nbd_server_start(json_t *args, char **errp)
{
	return ok(vdd_nbd_server_start(args, errp));
}

static json_t *cmd_nbd_server_stop(json_t *args, char **errp)
{
	(void)args;
	return ok(vdd_nbd_server_stop(errp));
}

static json_t *cmd_query_nbd_server(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return vdd_nbd_server_query();
}

static json_t *cmd_object_add(json_t *args, char **errp)
{
	const char *type;

	if (vdd_arg_str(args, "qom-type", true, NULL, &type, errp) < 0)
		return NULL;
	if (!strcmp(type, "iothread"))
		return ok(vdd_iothread_add(args, errp));
	if (!strcmp(type, "tls-creds-x509") || !strcmp(type, "tls-creds-psk"))
		return ok(vdd_tls_creds_add(type, args, errp));
	vdd_error(errp, "object-add: unknown object type '%s' (iothread, tls-creds-x509, tls-creds-psk)", type);
	return NULL;
}

static json_t *cmd_query_objects(json_t *args, char **errp)
{
	(void)args, (void)errp;
	return json_pack("{s:o, s:o}", "iothreads", vdd_query_iothreads(), "tls-creds", vdd_query_tls_creds());
}

static json_t *cmd_quit(json_t *args, char **errp)
{
	(void)args, (void)errp;
	vdd_request_shutdown("quit");
	return json_object();
}

static json_t *cmd_query_commands(json_t *args, char **errp);

/* QEMU's block_resize: the node by device= or node-name=. */
static json_t *cmd_block_resize(json_t *args, char **errp)
{
	static const char *const known[] = { "device", "node-name", "size", NULL };
	const char *device, *node;
	uint64_t size;

	if (vdd_args_check(args, known, "block_resize", errp) < 0 ||
	    vdd_arg_str(args, "device", false, NULL, &device, errp) < 0 ||
	    vdd_arg_str(args, "node-name", false, NULL, &node, errp) < 0 ||
	    vdd_arg_u64(args, "size", 0, &size, errp) < 0)
		return NULL;
	if (!json_object_get(args, "size")) {
		vdd_error(errp, "Parameter 'size' is missing");
		return NULL;
	}
	if (!device == !node) {
		vdd_error(errp, "block_resize: give exactly one of 'device' and 'node-name'");
		return NULL;
	}
	return ok(vdd_node_resize(node ? node : device, size, errp));
}

static json_t *cmd_block_stream(json_t *args, char **errp)
{
	return ok(vdd_job_stream(args, errp));
}

static json_t *cmd_job_cancel(json_t *args, char **errp)
{
	return ok(vdd_job_cancel(args, "id", errp));
}

static json_t *cmd_block_job_cancel(json_t *args, char **errp)
{
	return ok(vdd_job_cancel(args, "device", errp));
}

static json_t *cmd_job_pause(json_t *args, char **errp)
{
	return ok(vdd_job_pause(args, "id", true, errp));
}

static json_t *cmd_job_resume(json_t *args, char **errp)
{
	return ok(vdd_job_pause(args, "id", false, errp));
}

static json_t *cmd_block_job_pause(json_t *args, char **errp)
{
	return ok(vdd_job_pause(args, "device", true, errp));
}

static json_t *cmd_block_job_resume(json_t *args, char **errp)
{
	return ok(vdd_job_pause(args, "device", false, errp));
}

static json_t *cmd_job_finalize(json_t *args, char **errp)
{
	return ok(vdd_job_finalize(args, errp));
}

static json_t *cmd_job_dismiss(json_t *args, char **errp)
{
	return ok(vdd_job_dismiss(args, errp));
}

static json_t *cmd_block_job_set_speed(json_t *args, char **errp)
{
	return ok(vdd_job_set_speed(args, errp));
}

static const char *const no_args[] = { NULL };

static json_t *cmd_query_jobs(json_t *args, char **errp)
{
	return vdd_args_check(args, no_args, "query-jobs", errp) < 0 ? NULL : vdd_query_jobs(false);
}

static json_t *cmd_query_block_jobs(json_t *args, char **errp)
{
	return vdd_args_check(args, no_args, "query-block-jobs", errp) < 0 ? NULL : vdd_query_jobs(true);
}

static const struct command {
	const char *name;
	cmd_fn fn;
} commands[] = {
	{ "qmp_capabilities", cmd_qmp_capabilities },
	{ "query-version", cmd_query_version },
	{ "query-commands", cmd_query_commands },
	{ "blockdev-add", cmd_blockdev_add },
	{ "blockdev-del", cmd_blockdev_del },
	{ "block-export-add", cmd_block_export_add },
	{ "block-export-del", cmd_block_export_del },
	{ "query-block-exports", cmd_query_block_exports },
	{ "query-named-block-nodes", cmd_query_named_block_nodes },
	{ "query-iothreads", cmd_query_iothreads },
	{ "query-stats", cmd_query_stats },
	{ "nbd-server-start", cmd_nbd_server_start },
	{ "nbd-server-stop", cmd_nbd_server_stop },
	{ "query-nbd-server", cmd_query_nbd_server },
	{ "object-add", cmd_object_add },
	{ "query-objects", cmd_query_objects },
	{ "block_resize", cmd_block_resize },
	{ "block-stream", cmd_block_stream },
	{ "query-jobs", cmd_query_jobs },
	{ "query-block-jobs", cmd_query_block_jobs },
	{ "job-cancel", cmd_job_cancel },
	{ "job-pause", cmd_job_pause },
	{ "job-resume", cmd_job_resume },
	{ "job-finalize", cmd_job_finalize },
	{ "job-dismiss", cmd_job_dismiss },
	{ "block-job-cancel", cmd_block_job_cancel },
	{ "block-job-pause", cmd_block_job_pause },
	{ "block-job-resume", cmd_block_job_resume },
	{ "block-job-set-speed", cmd_block_job_set_speed },
	{ "quit", cmd_quit },
};

static json_t *cmd_query_commands(json_t *args, char **errp)
{
	json_t *list = json_array();

	(void)args, (void)errp;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		json_array_append_new(list, json_pack("{s:s}", "name", commands[i].name));
	return list;
}

static json_t *error_reply(const char *cls, const char *desc, json_t *id)
{
	json_t *r = json_pack("{s:{s:s, s:s}}", "error", "class", cls, "desc", desc);

	if (id)
		json_object_set(r, "id", id);
	return r;
}

static void execute(struct ctl_client *c, const char *line, size_t len)
{
	json_error_t jerr;
	json_t *req, *id, *args, *exec, *ret;
	const char *key;
	json_t *v;
	char *err = NULL;
	const char *name;

	/*
	 * Commands run on a coroutine's small stack, where jansson's recursive
	 * parse, dump and free overflow long before its own depth limit (2048).
	 */
	if (vd_json_too_deep(line, len, VD_JSON_MAX_NESTING)) {
		send_json(c, error_reply("GenericError", "JSON parse error: nesting too deep", NULL));
		return;
	}
	req = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!req) {
		char desc[300];

		snprintf(desc, sizeof(desc), "JSON parse error: %s", jerr.text);
		send_json(c, error_reply("GenericError", desc, NULL));
		return;
	}
	if (!json_is_object(req)) {
		send_json(c, error_reply("GenericError", "QMP input must be a JSON object", NULL));
		json_decref(req);
		return;
	}
	id = json_object_get(req, "id");
	exec = json_object_get(req, "execute");
	args = json_object_get(req, "arguments");
	json_object_foreach(req, key, v) {
		if (strcmp(key, "execute") && strcmp(key, "arguments") && strcmp(key, "id")) {
			char desc[300];

			snprintf(desc, sizeof(desc), "QMP input member '%.200s' is unexpected", key);
			send_json(c, error_reply("GenericError", desc, id));
			json_decref(req);
			return;
		}
	}
	if (!exec) {
		send_json(c, error_reply("GenericError", "QMP input lacks member 'execute'", id));
		json_decref(req);
		return;
	}
	if (!json_is_string(exec)) {
		send_json(c, error_reply("GenericError", "QMP input member 'execute' must be a string", id));
		json_decref(req);
		return;
	}
	if (args && !json_is_object(args)) {
		send_json(c, error_reply("GenericError", "QMP input member 'arguments' must be an object", id));
		json_decref(req);
		return;
	}
	name = json_string_value(exec);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		json_t *empty = NULL;

		if (strcmp(commands[i].name, name))
			continue;
		if (refusing && strcmp(name, "query-version")) {
			send_json(c, error_reply("GenericError", "vdiskd is shutting down", id));
			json_decref(req);
			return;
		}
		if (!args)
			args = empty = json_object();
		c->busy = true;
		ret = commands[i].fn(args, &err);
		c->busy = false;
		json_decref(empty);
		if (ret) {
			json_t *reply = json_pack("{s:o}", "return", ret);

			if (id)
				json_object_set(reply, "id", id);
			send_json(c, reply);
		} else {
			send_json(c, error_reply("GenericError", err ? err : "command failed", id));
		}
		free(err);
		json_decref(req);
		return;
	}
	{
		char desc[300];

		snprintf(desc, sizeof(desc), "The command %.200s has not been found", name);
		send_json(c, error_reply("CommandNotFound", desc, id));
	}
	json_decref(req);
}

/* ---- clients ------------------------------------------------------------------------------- */

/* Read more input; false at end of file, on errors, or once the client is to go. */
static bool read_more(struct ctl_client *c)
{
	for (;;) {
		ssize_t n;

		if (c->dead)
			return false;
		if (c->in_cap - c->in_len < 4096) {
			size_t cap = c->in_cap ? c->in_cap * 2 : 8192;
			char *p = realloc(c->in, cap);

			if (!p)
				return false;
			c->in = p;
			c->in_cap = cap;
		}
		n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
		if (n > 0) {
			c->in_len += (size_t)n;
			return true;
		}
		if (n == 0)
			return false;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return false;
		c->want_input = true;
		c->woken = false;
		update_events(c);
		while (!c->woken)
			vd_co_yield();
	}
}

static void client_free(struct ctl_client *c)
{
	for (struct ctl_client **pp = &clients; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	c->dead = true;
	update_events(c);
	close(c->fd);
	free(c->in);
	free(c->out);
	free(c);
}

static void client_co(void *opaque)
{
	struct ctl_client *c = opaque;
	size_t scanned = 0;
	bool discarding = false;

	send_json(c, json_pack("{s:{s:{s:{s:i, s:i, s:i}, s:s}, s:[]}}", "QMP", "version", "qemu", "major", 0,
			       "minor", 1, "micro", 0, "package", "vdiskd " VDISK_VERSION, "capabilities"));
	for (;;) {
		char *nl = c->in_len > scanned ? memchr(c->in + scanned, '\n', c->in_len - scanned) : NULL;

		if (!nl) {
			scanned = c->in_len;
			if (c->in_len > MAX_LINE) {
				/* Too long to be a command: answer once, skip to the next newline. */
				if (!discarding)
					send_json(c, error_reply("GenericError", "command line too long", NULL));
				discarding = true;
				c->in_len = scanned = 0;
			}
			if (!read_more(c))
				break;
			continue;
		}
		{
			size_t len = (size_t)(nl - c->in);
			bool blank = true;

			for (size_t i = 0; i < len && blank; i++)
				blank = c->in[i] == ' ' || c->in[i] == '\t' || c->in[i] == '\r';
			if (!discarding && len > MAX_LINE)
				send_json(c, error_reply("GenericError", "command line too long", NULL));
			else if (!discarding && !blank)
				execute(c, c->in, len);
			discarding = false;
			memmove(c->in, nl + 1, c->in_len - len - 1);
			c->in_len -= len + 1;
			scanned = 0;
		}
		if (c->dead)
			break;
	}
	/* Best effort: what is still queued (the reply to quit, say) goes out now. */
	c->dead = false;
	flush_out(c);
	client_free(c);
}

static void accept_event(void *opaque, int fd, int revents)
{
	struct ctl_client *c;
	int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	(void)opaque, (void)revents;
	if (cfd < 0)
		return;
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(cfd);
		return;
	}
	c->fd = cfd;
	c->id = ++next_id;
	c->co = vd_co_create(client_co, c);
	if (!c->co) {
		close(cfd);
		free(c);
		return;
	}
	c->next = clients;
	clients = c;
	vd_co_enter(c->co);
}

int vdd_control_add(const char *spec, char **errp)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *path = !strncmp(spec, "unix:", 5) ? spec + 5 : spec;
	struct ctl_listener *l;
	struct stat st;
	int fd;

	if (!path[0])
		return vdd_error(errp, "control socket: empty path");
	if (strlen(path) >= sizeof(sa.sun_path))
		return vdd_error(errp, "control socket path '%s' is too long", path);
	memcpy(sa.sun_path, path, strlen(path) + 1); /* length checked */
	if (stat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return vdd_error(errp, "control socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 16) < 0) {
		vdd_error(errp, "cannot listen on control socket '%s': %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	l = calloc(1, sizeof(*l));
	if (!l || !(l->path = strdup(path))) {
		free(l);
		close(fd);
		return vdd_error(errp, "out of memory");
	}
	l->fd = fd;
	l->next = listeners;
	listeners = l;
	vd_loop_set_fd_handler(main_loop(), fd, POLLIN, accept_event, l);
	vdd_log("control socket on %s", path);
	return 0;
}

void vdd_control_refuse_commands(void)
{
	refusing = true;
	while (listeners) {
		struct ctl_listener *l = listeners;

		listeners = l->next;
		vd_loop_del_fd_handler(main_loop(), l->fd);
		close(l->fd);
		unlink(l->path);
		free(l->path);
		free(l);
	}
}

bool vdd_control_busy(void)
{
	for (struct ctl_client *c = clients; c; c = c->next)
		if (c->busy)
			return true;
	return false;
}

void vdd_control_close_all(void)
{
	vdd_control_refuse_commands();
	/* Let commands in progress finish and their replies go out. */
	while (vdd_control_busy())
		vdd_co_sleep_ns(1000 * 1000);
	for (struct ctl_client *c = clients; c; c = c->next) {
		c->dead = true;
		if (c->want_input) {
			c->want_input = false;
			c->woken = true;
			update_events(c);
			vd_loop_schedule(main_loop(), c->co);
		}
	}
	/* Their coroutines flush and free them. */
	while (clients)
		vdd_co_sleep_ns(1000 * 1000);
}
