/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdiskd — the vdisk storage daemon: command line, startup, signals and
 * shutdown.  See docs/vdiskd.8.
 *
 * Startup runs in a coroutine on the main loop (nodes open in their home
 * threads, which the main thread waits for by yielding): objects
 * (iothreads, TLS credentials), nodes, the NBD server, exports, control
 * sockets, then the pidfile and, with --daemonize, the parent's exit.
 * Shutdown (quit, SIGTERM, SIGINT) runs in a coroutine too: it stops
 * taking commands and connections, removes the exports (their requests in
 * flight finish first), closes the nodes parents first (each close
 * flushes; qcow2 clears its dirty bit), then the loop ends.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"

bool vdd_verbose;

void vdd_log(const char *fmt, ...)
{
	va_list ap;

	if (!vdd_verbose)
		return;
	fprintf(stderr, "vdiskd: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdiskd [OPTIONS]\n"
		"\n"
		"vdisk storage daemon: opens a graph of block nodes and serves them over NBD,\n"
		"controlled over a JSON socket (qemu-storage-daemon's command line and commands).\n"
		"\n"
		"  --blockdev OPTIONS       open a node: driver=file,node-name=f0,filename=a.img\n"
		"                           driver=qcow2,node-name=q0,file=f0 (file=/backing= name a node)\n"
		"                           or JSON {\"driver\": ..., ...}; iothread=ID places it\n"
		"  --export OPTIONS         type=nbd,id=e0,node-name=q0[,name=NAME][,description=TEXT]\n"
		"                           [,writable=on|off][,iothread=ID][,multi-conn=on|off|auto]\n"
		"                           [,max-inflight=N]; iothread.0=ID,iothread.1=ID...: serve the\n"
		"                           connections from several iothreads (the node stays put)\n"
		"  --export OPTIONS         type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path=PATH\n"
		"                           [,writable=on|off][,iothread=ID][,num-queues=N][,queue-size=N]\n"
		"                           [,logical-block-size=N][,poll-us=N][,poll-max-us=N][,serial=STR];\n"
		"                           iothread.0=ID,iothread.1=ID...: virtqueue i served by iothread i mod n\n"
		"  --export OPTIONS         type=fuse,id=e0,node-name=q0,mountpoint=FILE (an existing regular\n"
		"                           file, shown as the image)[,writable=on|off][,growable=on|off]\n"
		"                           [,allow-other=on|off|auto][,iothread=ID]\n"
		"  --nbd-server OPTIONS     addr.type=unix,addr.path=PATH | addr.type=inet,addr.host=H,addr.port=P\n"
		"                           [,tls-creds=ID][,max-connections=N][,handshake-max-seconds=S]\n"
		"  --object iothread,id=ID  a thread with its own event loop\n"
		"  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]\n"
		"  --object tls-creds-psk,id=ID,dir=DIR,endpoint=server\n"
		"  --control unix:PATH      JSON control socket (QMP-like; repeatable)\n"
		"  --chardev socket,id=ID,path=PATH,server=on + --monitor chardev=ID\n"
		"                           the same, spelled as qemu-storage-daemon does\n"
		"  --pidfile PATH           write the daemon's pid to PATH (locked)\n"
		"  --daemonize              detach once everything above is set up\n"
		"  -v, --verbose            log connections and graph changes to stderr\n"
		"  -h, --help               show this help and exit\n"
		"  -V, --version            show the version and exit\n"
		"\n"
		"Exit status: 0 after a clean shutdown, 1 on errors, 2 on usage errors.\n");
}

/* ---- command line ------------------------------------------------------------------------- */

enum arg_kind { ARG_BLOCKDEV, ARG_EXPORT, ARG_NBD_SERVER, ARG_OBJECT, ARG_CONTROL };

struct arg {
	enum arg_kind kind;
	json_t *opts;     /* parsed options (ARG_CONTROL: NULL) */
	char *text;       /* ARG_CONTROL: the socket spec */
};

static struct arg *args;
static int n_args;
static const char *pidfile;
static bool daemonize;

static void add_arg(enum arg_kind kind, json_t *opts, const char *text)
{
	struct arg *p = realloc(args, sizeof(*args) * (size_t)(n_args + 1));

	if (!p) {
		fprintf(stderr, "vdiskd: out of memory\n");
		exit(1);
	}
	args = p;
	args[n_args].kind = kind;
	args[n_args].opts = opts;
	args[n_args].text = text ? strdup(text) : NULL;
	n_args++;
}

/* "iothread,id=x": QEMU's implied first key (qom-type for --object, type for --export). */
static json_t *parse_implied(const char *str, const char *implied, char **errp)
{
	const char *comma = strchr(str, ','), *eq = strchr(str, '=');
	char *full;
	json_t *o;

	if (str[0] == '{' || (eq && (!comma || eq < comma)))
		return vdd_parse_cli_opts(str, errp);
	if (asprintf(&full, "%s=%s", implied, str) < 0) {
		vdd_error(errp, "out of memory");
		return NULL;
	}
	o = vdd_parse_cli_opts(full, errp);
	free(full);
	return o;
}

struct chardev {
	char *id;
	char *path;
};

static struct chardev *chardevs;
static int n_chardevs;

static int parse_chardev(const char *str, char **errp)
{
	json_t *o = parse_implied(str, "backend", errp);
	const char *backend, *id, *path;
	bool server;
	int ret = -1;
	struct chardev *p;

	if (!o)
		return -1;
	if (vdd_arg_str(o, "backend", true, NULL, &backend, errp) < 0 || vdd_arg_str(o, "id", true, NULL, &id, errp) < 0 ||
	    vdd_arg_str(o, "path", true, NULL, &path, errp) < 0 || vdd_arg_bool(o, "server", false, &server, errp) < 0)
		goto out;
	if (strcmp(backend, "socket") || !server) {
		vdd_error(errp, "--chardev: only socket,server=on chardevs are supported");
		goto out;
	}
	p = realloc(chardevs, sizeof(*chardevs) * (size_t)(n_chardevs + 1));
	if (!p)
		goto out;
	chardevs = p;
	chardevs[n_chardevs].id = strdup(id);
	chardevs[n_chardevs].path = strdup(path);
	n_chardevs++;
	ret = 0;
out:
	json_decref(o);
	return ret;
}

static int parse_monitor(const char *str, char **errp)
{
	json_t *o = parse_implied(str, "chardev", errp);
	const char *id;
	int ret = -1;

	if (!o)
		return -1;
	if (vdd_arg_str(o, "chardev", true, NULL, &id, errp) == 0) {
		for (int i = 0; i < n_chardevs; i++) {
			if (!strcmp(chardevs[i].id, id)) {
				add_arg(ARG_CONTROL, NULL, chardevs[i].path);
				ret = 0;
			}
		}
		if (ret < 0)
			vdd_error(errp, "--monitor: chardev '%s' not found (give --chardev first)", id);
	}
	json_decref(o);
	return ret;
}

static void parse_command_line(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "blockdev", required_argument, NULL, 'b' },
		{ "export", required_argument, NULL, 'e' },
		{ "nbd-server", required_argument, NULL, 'n' },
		{ "object", required_argument, NULL, 'o' },
		{ "control", required_argument, NULL, 'c' },
		{ "chardev", required_argument, NULL, 'C' },
		{ "monitor", required_argument, NULL, 'm' },
		{ "pidfile", required_argument, NULL, 'p' },
		{ "daemonize", no_argument, NULL, 'd' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	int opt;

	while ((opt = getopt_long(argc, argv, "hVv", longopts, NULL)) != -1) {
		char *err = NULL;
		json_t *o = NULL;

		switch (opt) {
		case 'b':
			o = vdd_parse_cli_opts(optarg, &err);
			if (o)
				add_arg(ARG_BLOCKDEV, o, NULL);
			break;
		case 'e':
			o = parse_implied(optarg, "type", &err);
			if (o)
				add_arg(ARG_EXPORT, o, NULL);
			break;
		case 'n':
			o = vdd_parse_cli_opts(optarg, &err);
			if (o)
				add_arg(ARG_NBD_SERVER, o, NULL);
			break;
		case 'o':
			o = parse_implied(optarg, "qom-type", &err);
			if (o)
				add_arg(ARG_OBJECT, o, NULL);
			break;
		case 'c':
			add_arg(ARG_CONTROL, NULL, optarg);
			break;
		case 'C':
			parse_chardev(optarg, &err);
			break;
		case 'm':
			parse_monitor(optarg, &err);
			break;
		case 'p':
			pidfile = optarg;
			break;
		case 'd':
			daemonize = true;
			break;
		case 'v':
			vdd_verbose = true;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf("vdiskd %s\n", VDISK_VERSION);
			exit(0);
		default:
			usage(stderr);
			exit(2);
		}
		if (err) {
			fprintf(stderr, "vdiskd: %s\n", err);
			free(err);
			exit(2);
		}
	}
	if (optind < argc) {
		fprintf(stderr, "vdiskd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		exit(2);
	}
	if (!n_args) {
		fprintf(stderr, "vdiskd: nothing to do: give --blockdev/--export/--control (see --help)\n");
		exit(2);
	}
}

/* ---- node placement for the command line ------------------------------------------------------ */

/*
 * Nodes named by --export ...,iothread=T open in T, and so do the nodes
 * they reference (file=NAME, backing=NAME); a node referencing a placed
 * node goes with it.  Explicit iothread= on --blockdev wins (and must agree).
 */
static const char *node_name_of(json_t *o)
{
	return json_string_value(json_object_get(o, "node-name"));
}

static json_t *find_blockdev(const char *name)
{
	for (int i = 0; name && i < n_args; i++)
		if (args[i].kind == ARG_BLOCKDEV && node_name_of(args[i].opts) &&
		    !strcmp(node_name_of(args[i].opts), name))
			return args[i].opts;
	return NULL;
}

/* Names the options of o reference among the command line's nodes. */
static void collect_refs(json_t *o, json_t *out)
{
	static const char *const keys[] = { "file", "backing" };
	const char *key;
	json_t *v;

	for (int i = 0; i < 2; i++) {
		v = json_object_get(o, keys[i]);
		if (json_is_string(v) && find_blockdev(json_string_value(v)))
			json_array_append(out, v);
	}
	json_object_foreach(o, key, v)
		if (json_is_object(v))
			collect_refs(v, out);
}

static int place(json_t *node, const char *thread, int depth, char **errp)
{
	json_t *cur = json_object_get(node, "iothread"), *refs;
	size_t i;
	json_t *v;
	int ret = 0;

	if (depth > 64)
		return vdd_error(errp, "node references nest too deeply (a loop?)");
	if (json_is_string(cur)) {
		if (strcmp(json_string_value(cur), thread))
			return vdd_error(errp, "node '%s' is wanted in both iothread '%s' and '%s'", node_name_of(node),
					 json_string_value(cur), thread);
	} else {
		json_object_set_new(node, "iothread", json_string(thread));
	}
	refs = json_array();
	collect_refs(node, refs);
	json_array_foreach(refs, i, v) {
		ret = place(find_blockdev(json_string_value(v)), thread, depth + 1, errp);
		if (ret < 0)
			break;
	}
	json_decref(refs);
	return ret;
}

static int place_nodes(char **errp)
{
	for (int i = 0; i < n_args; i++) {
		const char *node, *thread;
		json_t *o = args[i].opts, *bd;

		if (args[i].kind != ARG_EXPORT)
			continue;
		node = json_string_value(json_object_get(o, "node-name"));
		thread = json_string_value(json_object_get(o, "iothread"));
		if (!thread || !(bd = find_blockdev(node)))
			continue;
		if (place(bd, thread, 0, errp) < 0)
			return -1;
	}
	/* A node using placed nodes goes where they are. */
	for (int i = 0; i < n_args; i++) {
		json_t *o = args[i].opts, *refs;

		if (args[i].kind != ARG_BLOCKDEV || json_object_get(o, "iothread"))
			continue;
		refs = json_array();
		collect_refs(o, refs);
		for (size_t k = 0; k < json_array_size(refs); k++) {
			json_t *t = json_object_get(find_blockdev(json_string_value(json_array_get(refs, k))), "iothread");

			if (json_is_string(t)) {
				json_object_set(o, "iothread", t);
				break;
			}
		}
		json_decref(refs);
	}
	return 0;
}

/* ---- startup and shutdown ------------------------------------------------------------------------ */

static bool main_done;
static bool shutting_down;
static int exit_status;
static int ready_pipe = -1;
static int pidfile_fd = -1;

static int run_object(json_t *o, char **errp)
{
	const char *type;

	if (vdd_arg_str(o, "qom-type", true, NULL, &type, errp) < 0)
		return -1;
	if (!strcmp(type, "iothread"))
		return vdd_iothread_add(o, errp);
	if (!strcmp(type, "tls-creds-x509") || !strcmp(type, "tls-creds-psk"))
		return vdd_tls_creds_add(type, o, errp);
	return vdd_error(errp, "--object: unknown type '%s' (iothread, tls-creds-x509, tls-creds-psk)", type);
}

static int startup(char **errp)
{
	bool nbd_seen = false;

	for (int i = 0; i < n_args; i++)
		if (args[i].kind == ARG_OBJECT && run_object(args[i].opts, errp) < 0)
			return -1;
	if (place_nodes(errp) < 0)
		return -1;
	for (int i = 0; i < n_args; i++) {
		if (args[i].kind == ARG_BLOCKDEV && vdd_node_add(args[i].opts, errp) < 0) {
			vdd_error_prefix(errp, "--blockdev: ");
			return -1;
		}
	}
	for (int i = 0; i < n_args; i++) {
		if (args[i].kind != ARG_NBD_SERVER)
			continue;
		if (nbd_seen)
			return vdd_error(errp, "--nbd-server may be given only once");
		nbd_seen = true;
		if (vdd_nbd_server_start(args[i].opts, errp) < 0)
			return -1;
	}
	for (int i = 0; i < n_args; i++) {
		if (args[i].kind == ARG_EXPORT && vdd_export_add(args[i].opts, errp) < 0) {
			vdd_error_prefix(errp, "--export: ");
			return -1;
		}
	}
	for (int i = 0; i < n_args; i++)
		if (args[i].kind == ARG_CONTROL && vdd_control_add(args[i].text, errp) < 0)
			return -1;
	return 0;
}

static void shutdown_co(void *opaque)
{
	const char *reason = opaque;

	vdd_log("shutting down (%s)", reason);
	vdd_event("SHUTDOWN", json_pack("{s:b, s:s}", "guest", 0, "reason", reason));
	vdd_control_refuse_commands();
	if (vdd_nbd_server_running())
		vdd_nbd_server_stop(NULL);
	vdd_jobs_cancel_all();
	vdd_exports_del_all();
	vdd_nodes_close_all();
	vdd_control_close_all();
	main_done = true;
}

void vdd_request_shutdown(const char *reason)
{
	struct vd_co *co;

	if (shutting_down) {
		vdd_log("already shutting down (%s)", reason);
		return;
	}
	shutting_down = true;
	co = vd_co_create(shutdown_co, (void *)reason);
	if (!co) {
		fprintf(stderr, "vdiskd: cannot start the shutdown\n");
		exit(1);
	}
	vd_loop_schedule(vdd_thread_loop(vdd_main_thread()), co);
}

static void signal_event(void *opaque, int fd, int revents)
{
	struct signalfd_siginfo si;

	(void)opaque, (void)revents;
	while (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGINT)
			vdd_request_shutdown("SIGINT");
		else if (si.ssi_signo == SIGTERM)
			vdd_request_shutdown("SIGTERM");
		else if (si.ssi_signo == SIGHUP)
			vdd_request_shutdown("SIGHUP");
	}
}

struct startup_ctx {
	char *err;
	int ret;
};

static void startup_fn(void *arg)
{
	struct startup_ctx *c = arg;

	c->ret = startup(&c->err);
}

static int write_pidfile(void)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	char buf[32];
	int n;

	pidfile_fd = open(pidfile, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (pidfile_fd < 0) {
		fprintf(stderr, "vdiskd: cannot open pidfile '%s': %s\n", pidfile, strerror(errno));
		return -1;
	}
	if (fcntl(pidfile_fd, F_SETLK, &fl) < 0) {
		fprintf(stderr, "vdiskd: pidfile '%s' is locked: another vdiskd is running\n", pidfile);
		close(pidfile_fd);
		pidfile_fd = -1;
		return -1;
	}
	n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	if (ftruncate(pidfile_fd, 0) < 0 || write(pidfile_fd, buf, (size_t)n) != n) {
		fprintf(stderr, "vdiskd: cannot write pidfile '%s': %s\n", pidfile, strerror(errno));
		return -1;
	}
	return 0;
}

/* Fork; the parent waits for the child's "ready" byte and exits with its status. */
static void do_daemonize(void)
{
	int fds[2];
	pid_t pid;

	if (pipe2(fds, O_CLOEXEC) < 0) {
		perror("vdiskd: pipe");
		exit(1);
	}
	pid = fork();
	if (pid < 0) {
		perror("vdiskd: fork");
		exit(1);
	}
	if (pid > 0) {
		char status = 1;

		close(fds[1]);
		if (read(fds[0], &status, 1) != 1)
			status = 1;
		_exit(status);
	}
	close(fds[0]);
	ready_pipe = fds[1];
	setsid();
}

static void report_ready(int status)
{
	char s = (char)status;
	int fd;

	if (ready_pipe < 0)
		return;
	if (write(ready_pipe, &s, 1) != 1)
		status = 1;
	close(ready_pipe);
	ready_pipe = -1;
	if (status == 0 && (fd = open("/dev/null", O_RDWR)) >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		if (!vdd_verbose)
			dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
}

int main(int argc, char **argv)
{
	struct startup_ctx ctx = { 0 };
	struct vd_loop *loop;
	sigset_t mask;
	char *err = NULL;
	int sfd;

	parse_command_line(argc, argv);
	if (daemonize)
		do_daemonize();

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0 || vdd_threads_init(&err) < 0 || vdd_formats_register(&err) < 0) {
		fprintf(stderr, "vdiskd: %s\n", err ? err : strerror(errno));
		report_ready(1);
		return 1;
	}
	loop = vdd_thread_loop(vdd_main_thread());
	vd_loop_set_fd_handler(loop, sfd, POLLIN, signal_event, NULL);

	vd_co_run_sync(startup_fn, &ctx);
	if (ctx.ret < 0) {
		fprintf(stderr, "vdiskd: %s\n", ctx.err ? ctx.err : "startup failed");
		free(ctx.err);
		exit_status = 1;
		vdd_request_shutdown("startup failed");
	} else if (pidfile && write_pidfile() < 0) {
		exit_status = 1;
		vdd_request_shutdown("pidfile");
	} else {
		vdd_log("ready");
		report_ready(0);
	}

	while (!main_done)
		vd_loop_run_once(loop, true);
	/* Let completions and frees posted during shutdown run. */
	while (vd_loop_run_once(loop, false))
		;

	vdd_iothreads_stop();
	while (vd_loop_run_once(loop, false))
		;
	vd_loop_del_fd_handler(loop, sfd);
	close(sfd);
	vdd_threads_fini();
	vdd_tls_creds_free_all();
	if (pidfile_fd >= 0) {
		unlink(pidfile);
		close(pidfile_fd);
	}
	report_ready(exit_status ? exit_status : 0);
	for (int i = 0; i < n_args; i++) {
		json_decref(args[i].opts);
		free(args[i].text);
	}
	free(args);
	for (int i = 0; i < n_chardevs; i++) {
		free(chardevs[i].id);
		free(chardevs[i].path);
	}
	free(chardevs);
	vd_loop_free_current();
	vdd_log("exiting with status %d", exit_status);
	return exit_status;
}
