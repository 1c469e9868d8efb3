/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdiskd threads: the main thread and N iothreads, each running its own
 * loop, and the mailboxes they use to hand each other work.
 *
 * The mailboxes are the loops' own (util/loop.h: vd_loop_post and
 * vd_loop_co_call), shared with the block layer, which forwards requests
 * to a node's home thread through them.  Every message posted here is a
 * function run in a fresh coroutine there, so it may do block I/O (yield)
 * like any request.  vdd_thread_call() is a synchronous call: the function
 * runs in the target thread, then a completion is posted back that resumes
 * the waiting coroutine.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "daemon.h"

struct vdd_thread {
	struct vdd_thread *next; /* iothread list (main thread owned) */
	char *id;
	pthread_t pthread;
	pid_t tid;
	struct vd_loop *loop; /* set by the thread itself before it is published */

	bool stop; /* only touched in the thread itself */
	bool started;
	pthread_mutex_t ready_lock;
	pthread_cond_t ready_cond;
	bool ready;
	int start_err;
};

static struct vdd_thread main_thread = { .id = (char *)"main" };
static struct vdd_thread *iothreads; /* main thread owned */
static _Thread_local struct vdd_thread *self;

struct vdd_thread *vdd_main_thread(void)
{
	return &main_thread;
}

struct vdd_thread *vdd_thread_self(void)
{
	return self;
}

const char *vdd_thread_name(const struct vdd_thread *t)
{
	return t->id;
}

struct vd_loop *vdd_thread_loop(const struct vdd_thread *t)
{
	return t->loop;
}

/* ---- mailboxes (util/loop.c) -------------------------------------------------------------- */

static int mailbox_init(struct vdd_thread *t)
{
	t->loop = vd_loop_get();
	return vd_loop_enable_remote(t->loop);
}

static void mailbox_fini(struct vdd_thread *t)
{
	vd_loop_disable_remote(t->loop);
}

void vdd_thread_post(struct vdd_thread *t, vdd_fn fn, void *arg)
{
	vd_loop_post(t->loop, fn, arg);
}

void vdd_thread_call(struct vdd_thread *t, vdd_fn fn, void *arg)
{
	if (t == self) {
		fn(arg);
		return;
	}
	if (!vd_co_self() || !self) {
		fprintf(stderr, "vdiskd: vdd_thread_call outside a coroutine of a vdiskd thread\n");
		abort();
	}
	vd_loop_co_call(t->loop, fn, arg);
}

/* ---- main thread ----------------------------------------------------------------------------- */

int vdd_threads_init(char **errp)
{
	int ret;

	main_thread.tid = (pid_t)syscall(SYS_gettid);
	main_thread.pthread = pthread_self();
	ret = mailbox_init(&main_thread);
	if (ret < 0)
		return vdd_error(errp, "cannot set up the main loop: %s", strerror(-ret));
	self = &main_thread;
	return 0;
}

void vdd_threads_fini(void)
{
	mailbox_fini(&main_thread);
}

/* ---- iothreads ------------------------------------------------------------------------------- */

static void *iothread_main(void *opaque)
{
	struct vdd_thread *t = opaque;
	int ret;

	self = t;
	t->tid = (pid_t)syscall(SYS_gettid);
	ret = mailbox_init(t);
	pthread_mutex_lock(&t->ready_lock);
	t->start_err = ret;
	t->ready = true;
	pthread_cond_signal(&t->ready_cond);
	pthread_mutex_unlock(&t->ready_lock);
	if (ret < 0)
		return NULL;
	while (!t->stop)
		vd_loop_run_once(t->loop, true);
	/* Whatever was still scheduled (completions posted back) runs before the loop goes. */
	while (vd_loop_run_once(t->loop, false))
		;
	mailbox_fini(t);
	vd_loop_free_current();
	return NULL;
}

struct vdd_thread *vdd_iothread_find(const char *id)
{
	for (struct vdd_thread *t = iothreads; t; t = t->next)
		if (!strcmp(t->id, id))
			return t;
	return NULL;
}

int vdd_thread_lookup(const char *id, struct vdd_thread **out, char **errp)
{
	*out = &main_thread;
	if (!id || !strcmp(id, "main"))
		return 0;
	*out = vdd_iothread_find(id);
	if (!*out)
		return vdd_error(errp, "iothread '%s' does not exist (add it with --object iothread,id=%s)", id, id);
	return 0;
}

static bool valid_id(const char *id)
{
	if (!id[0] || strlen(id) > 128)
		return false;
	for (const char *p = id; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
		      *p == '_' || *p == '.'))
			return false;
	return (id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z');
}

int vdd_iothread_add(json_t *opts, char **errp)
{
	static const char *const known[] = { "qom-type", "id", "poll-max-ns", "poll-grow", "poll-shrink",
					     "aio-max-batch", NULL };
	struct vdd_thread *t;
	sigset_t all, old;
	const char *id;
	int ret;

	if (vdd_args_check(opts, known, "iothread", errp) < 0 ||
	    vdd_arg_str(opts, "id", true, NULL, &id, errp) < 0)
		return -1;
	/* QEMU's tuning knobs are taken (polling here is each export's poll-us), but garbage is not. */
	for (int i = 2; known[i]; i++) {
		uint64_t ignored;

		if (vdd_arg_u64(opts, known[i], 0, &ignored, errp) < 0)
			return -1;
	}
	if (!valid_id(id))
		return vdd_error(errp, "iothread: invalid id '%s' (a letter, then letters, digits, '-', '_', '.')", id);
	if (!strcmp(id, "main") || vdd_iothread_find(id))
		return vdd_error(errp, "iothread '%s' already exists", id);
	t = calloc(1, sizeof(*t));
	if (!t || !(t->id = strdup(id))) {
		free(t);
		return vdd_error(errp, "out of memory");
	}
	pthread_mutex_init(&t->ready_lock, NULL);
	pthread_cond_init(&t->ready_cond, NULL);
	/*
	 * Signals go to the main thread's signalfd only, except the faults a
	 * thread raises itself: a blocked SIGBUS is fatal whatever its handler
	 * (the vhost-user-blk export's guard for shrunk guest memory needs it).
	 */
	sigfillset(&all);
	sigdelset(&all, SIGBUS);
	sigdelset(&all, SIGSEGV);
	sigdelset(&all, SIGFPE);
	sigdelset(&all, SIGILL);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	ret = pthread_create(&t->pthread, NULL, iothread_main, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret) {
		free(t->id);
		free(t);
		return vdd_error(errp, "iothread '%s': cannot create the thread: %s", id, strerror(ret));
	}
	pthread_mutex_lock(&t->ready_lock);
	while (!t->ready)
		pthread_cond_wait(&t->ready_cond, &t->ready_lock);
	pthread_mutex_unlock(&t->ready_lock);
	if (t->start_err < 0) {
		pthread_join(t->pthread, NULL);
		vdd_error(errp, "iothread '%s': cannot set up its loop: %s", id, strerror(-t->start_err));
		free(t->id);
		free(t);
		return -1;
	}
	t->started = true;
	{
		char name[16];

		snprintf(name, sizeof(name), "vdd-%s", id);
		pthread_setname_np(t->pthread, name);
	}
	t->next = NULL;
	{
		struct vdd_thread **pp = &iothreads;

		while (*pp)
			pp = &(*pp)->next;
		*pp = t;
	}
	return 0;
}

static void stop_fn(void *arg)
{
	struct vdd_thread *t = arg;

	t->stop = true;
}

void vdd_iothreads_stop(void)
{
	while (iothreads) {
		struct vdd_thread *t = iothreads;

		iothreads = t->next;
		vdd_thread_post(t, stop_fn, t);
		pthread_join(t->pthread, NULL);
		pthread_mutex_destroy(&t->ready_lock);
		pthread_cond_destroy(&t->ready_cond);
		free(t->id);
		free(t);
	}
}

json_t *vdd_query_iothreads(void)
{
	json_t *list = json_array();

	for (struct vdd_thread *t = &main_thread; t; t = t == &main_thread ? iothreads : t->next) {
		json_t *o = json_pack("{s:s, s:i, s:b, s:o, s:o}", "id", t->id, "thread-id", (int)t->tid, "main",
				      t == &main_thread, "exports", vdd_exports_in_thread(t), "nodes",
				      vdd_nodes_in_thread(t));

		json_array_append_new(list, o);
	}
	return list;
}
