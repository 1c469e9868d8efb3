/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * nbd-queues: what the nbd driver tests need beyond vdisk-io (one blocking
 * queue): several queues in threads, event-driven completion through the
 * completion fd, do_io timeouts, and I/O while the server dies.
 * Compiled by tests/nbd/conftest.py against the build's libvdisk.
 *
 *   nbd-queues [--set NAME=VALUE]... [--queues N] [--queue-size N] MODE [ARG]
 *
 * Modes:
 *   multiq MB     N threads, one queue each: thread i writes its own MB-sized
 *                 region, flushes; then every thread reads and checks every
 *                 region through its own queue (connection).
 *   evloop COUNT [BS]  event-driven: COUNT writes and reads of BS bytes
 *                 (default 64 KiB) completed by polling the completion fd with
 *                 do_io(min=0); then checks that a disabled fd stays quiet
 *                 and an enabled one fires again.
 *   timeout       one read on a slow server: do_io(min=1, 200 ms) must give
 *                 -ETIME with the timeout written back as ~0, and the
 *                 request must complete afterwards.
 *   hammer SECS   32 requests in flight until SECS pass or a request fails
 *                 (the test kills the server); then every outstanding
 *                 request must complete within 10 s, and a new one must fail
 *                 at once.  Prints "errors=N ret=R msg=..." lines.
 *   idle          one read, print "ready", wait for a line on stdin, then one
 *                 more read: prints "after ret=R ms=T msg=..." (the test
 *                 kills the server while the connection is idle).
 *   abandon       print "ready", wait for a line on stdin (the test stalls
 *                 the server), put 8 reads in flight, then vdisk_destroy():
 *                 prints how long destroy took (it must not wait for ever).
 *   connect       only connect and start (the test's server may refuse):
 *                 prints "connected" and the limits.  A failure to connect
 *                 exits 1 with "message [strerror]" in every mode.
 *   stall         one read on a server that never answers it:
 *                 do_io(min=1, 300 ms) must give -ETIME, then prints how long
 *                 vdisk_destroy() took.
 *
 * Exit: 0 ok, 1 check failed, 2 usage, 3 hang (watchdog or do_io timeout).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vdisk.h"

#define BS 65536
#define MAX_SETS 32
#define MAX_QUEUES 64

static struct vdisk *v;
static int n_queues = 1;
static uint64_t capacity;

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "nbd-queues: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static void on_alarm(int sig)
{
	static const char msg[] = "nbd-queues: watchdog: HANG\n";

	(void)sig;
	if (write(2, msg, sizeof(msg) - 1) < 0)
		_exit(3);
	_exit(3);
}

static int num(const char *s)
{
	char *end;
	long n;

	errno = 0;
	n = strtol(s, &end, 0);
	if (errno || end == s || *end || n < 0 || n > INT_MAX)
		die(2, "not a number: '%s'", s);
	return (int)n;
}

static void set_prop(const char *arg)
{
	char name[128];
	const char *eq = strchr(arg, '=');
	const char *val;
	char *end;
	long n;
	int ret;

	if (!eq || (size_t)(eq - arg) >= sizeof(name))
		die(2, "--set needs NAME=VALUE");
	memcpy(name, arg, (size_t)(eq - arg));
	name[eq - arg] = '\0';
	val = eq + 1;
	ret = vdisk_set_str(v, name, val);
	if (ret == -ENOTTY) {
		if (!strcmp(val, "true") || !strcmp(val, "false")) {
			ret = vdisk_set_bool(v, name, !strcmp(val, "true"));
		} else {
			n = strtol(val, &end, 0);
			if (*end || n < INT_MIN || n > INT_MAX)
				die(2, "bad value for %s", name);
			ret = vdisk_set_int(v, name, (int)n);
		}
	}
	if (ret < 0)
		die(1, "set %s: %s", name, vdisk_get_error_msg());
}

static void fill(unsigned char *buf, size_t len, uint64_t off, unsigned seed)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t x = (off + i) * 0x9e3779b97f4a7c15ull ^ seed;

		memcpy(buf + i, &x, 8);
	}
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Blocking: wait for n completions, every one must succeed. */
static void wait_ok(struct vdiskq *q, int n, const char *what)
{
	struct vdisk_completion c[64];

	while (n > 0) {
		int got = vdiskq_do_io(q, c, 1, n < 64 ? n : 64, NULL);

		if (got < 0)
			die(1, "%s: do_io: %s", what, vdisk_get_error_msg());
		for (int i = 0; i < got; i++)
			if (c[i].ret < 0)
				die(1, "%s: request failed: %s", what, c[i].error_msg);
		n -= got;
	}
}

/* ---- multiq ---- */

static pthread_barrier_t barrier;
static uint64_t region;

static void *multiq_thread(void *arg)
{
	int idx = (int)(intptr_t)arg;
	struct vdiskq *q = vdisk_get_queue(v, idx);
	unsigned char *buf, *exp;
	const int depth = 16;

	if (!q)
		die(1, "queue %d: %s", idx, vdisk_get_error_msg());
	buf = malloc((size_t)BS * depth);
	exp = malloc(BS);
	if (!buf || !exp)
		die(1, "out of memory");
	/* Write my region, depth requests at a time. */
	for (uint64_t off = 0; off < region; off += (uint64_t)BS * depth) {
		int n = 0;

		for (int i = 0; i < depth && off + (uint64_t)i * BS < region; i++, n++) {
			uint64_t o = (uint64_t)idx * region + off + (uint64_t)i * BS;

			fill(buf + (size_t)i * BS, BS, o, 0x51);
			vdiskq_write(q, o, buf + (size_t)i * BS, BS, NULL, 0);
		}
		wait_ok(q, n, "write");
	}
	vdiskq_flush(q, NULL, 0);
	wait_ok(q, 1, "flush");
	pthread_barrier_wait(&barrier);
	/* Read everyone's region through my connection. */
	for (int r = 0; r < n_queues; r++) {
		for (uint64_t off = 0; off < region; off += (uint64_t)BS * depth) {
			int n = 0;

			for (int i = 0; i < depth && off + (uint64_t)i * BS < region; i++, n++)
				vdiskq_read(q, (uint64_t)r * region + off + (uint64_t)i * BS, buf + (size_t)i * BS, BS,
					    NULL, 0);
			wait_ok(q, n, "read");
			for (int i = 0; i < n; i++) {
				uint64_t o = (uint64_t)r * region + off + (uint64_t)i * BS;

				fill(exp, BS, o, 0x51);
				if (memcmp(exp, buf + (size_t)i * BS, BS))
					die(1, "queue %d: data written by queue %d differs at offset %" PRIu64, idx, r, o);
			}
		}
	}
	free(buf);
	free(exp);
	return NULL;
}

static void mode_multiq(uint64_t mb)
{
	pthread_t th[MAX_QUEUES];

	region = mb << 20;
	if (region * (uint64_t)n_queues > capacity)
		die(2, "export too small");
	pthread_barrier_init(&barrier, NULL, (unsigned)n_queues);
	for (int i = 0; i < n_queues; i++)
		pthread_create(&th[i], NULL, multiq_thread, (void *)(intptr_t)i);
	for (int i = 0; i < n_queues; i++)
		pthread_join(th[i], NULL);
	printf("multiq: %d queues verified %" PRIu64 " MiB each\n", n_queues, mb);
}

/* ---- evloop ---- */

static void drain_fd(int fd)
{
	uint64_t cnt;

	while (read(fd, &cnt, sizeof(cnt)) == sizeof(cnt))
		;
}

static bool readable(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

/* Complete n requests through the fd only (do_io never blocks). */
static int event_loop(struct vdiskq *q, int fd, int n, int *wakeups)
{
	struct vdisk_completion c[64];
	int64_t end = now_ms() + 20000;

	while (n > 0) {
		int got;
		uint64_t cnt;

		if (now_ms() > end)
			die(3, "evloop: %d requests never completed through the completion fd: HANG", n);
		if (!readable(fd, 1000))
			continue;
		(*wakeups)++;
		if (read(fd, &cnt, sizeof(cnt)) != sizeof(cnt))
			continue;
		got = vdiskq_do_io(q, c, 0, 64, NULL);
		if (got < 0)
			die(1, "evloop: do_io: %s", vdisk_get_error_msg());
		for (int i = 0; i < got; i++)
			if (c[i].ret < 0)
				die(1, "evloop: request failed: %s", c[i].error_msg);
		n -= got;
	}
	return 0;
}

static size_t ev_bs = BS;

static void mode_evloop(int count)
{
	const size_t BSZ = ev_bs;
	struct vdiskq *q = vdisk_get_queue(v, 0);
	unsigned char *buf, *rbuf;
	int fd, wakeups = 0;

	if (!q)
		die(1, "%s", vdisk_get_error_msg());
	fd = vdiskq_get_completion_fd(q);
	if (fd < 0)
		die(1, "completion fd: %s", vdisk_get_error_msg());
	buf = malloc(BSZ * count);
	rbuf = malloc(BSZ * count);
	if (!buf || !rbuf)
		die(1, "out of memory");
	for (int i = 0; i < count; i++) {
		fill(buf + (size_t)i * BSZ, BSZ, (uint64_t)i * BSZ, 0x77);
		vdiskq_write(q, (uint64_t)i * BSZ, buf + (size_t)i * BSZ, BSZ, NULL, 0);
	}
	if (vdiskq_do_io(q, NULL, 0, 0, NULL) != 0)
		die(1, "submit: %s", vdisk_get_error_msg());
	event_loop(q, fd, count, &wakeups);
	for (int i = 0; i < count; i++)
		vdiskq_read(q, (uint64_t)i * BSZ, rbuf + (size_t)i * BSZ, BSZ, NULL, 0);
	if (vdiskq_do_io(q, NULL, 0, 0, NULL) != 0)
		die(1, "submit: %s", vdisk_get_error_msg());
	event_loop(q, fd, count, &wakeups);
	if (memcmp(buf, rbuf, BSZ * count))
		die(1, "evloop: data read back differs");
	printf("evloop: %d writes + %d reads in %d wakeups\n", count, count, wakeups);

	/* Disabled: a completion must not make the fd readable. */
	drain_fd(fd);
	vdiskq_set_completion_fd_enabled(q, false);
	vdiskq_read(q, 0, rbuf, BSZ, NULL, 0);
	if (vdiskq_do_io(q, NULL, 0, 0, NULL) != 0)
		die(1, "submit: %s", vdisk_get_error_msg());
	if (readable(fd, 500))
		die(1, "evloop: completion fd fired while disabled");
	wait_ok(q, 1, "read (fd disabled)");
	printf("evloop: disabled fd stayed quiet\n");

	/* Enabled again: it fires. */
	drain_fd(fd);
	vdiskq_set_completion_fd_enabled(q, true);
	vdiskq_read(q, 0, rbuf, BSZ, NULL, 0);
	if (vdiskq_do_io(q, NULL, 0, 0, NULL) != 0)
		die(1, "submit: %s", vdisk_get_error_msg());
	wakeups = 0;
	event_loop(q, fd, 1, &wakeups);
	printf("evloop: re-enabled fd fired\n");
	free(buf);
	free(rbuf);
}

/* ---- timeout ---- */

/* Read BS bytes at 0 into buf on queue 0 and wait for it at most *to: do_io's result. */
static int read_within(unsigned char *buf, struct vdisk_completion *c, struct timespec *to)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);

	if (!q || !buf)
		die(1, "setup failed");
	vdiskq_read(q, 0, buf, BS, (void *)1, 0);
	return vdiskq_do_io(q, c, 1, 1, to);
}

static void mode_timeout(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_completion c[1];
	struct timespec to = { .tv_sec = 0, .tv_nsec = 200 * 1000000L };
	unsigned char *buf = malloc(BS);
	int64_t t0 = now_ms();
	int ret = read_within(buf, c, &to);

	if (ret != -ETIME)
		die(1, "timeout: do_io returned %d, expected -ETIME (%s)", ret, vdisk_get_error_msg());
	if (now_ms() - t0 < 150)
		die(1, "timeout: returned after %" PRId64 " ms, before the timeout", now_ms() - t0);
	if (to.tv_sec != 0 || to.tv_nsec > 50 * 1000000L)
		die(1, "timeout: remaining time not written back as ~0 (%ld.%09ld)", (long)to.tv_sec, to.tv_nsec);
	printf("timeout: -ETIME after %" PRId64 " ms: %s\n", now_ms() - t0, vdisk_get_error_msg());
	ret = vdiskq_do_io(q, c, 1, 1, NULL);
	if (ret != 1 || c[0].ret != 0 || c[0].user_data != (void *)1)
		die(1, "timeout: the request did not complete afterwards (%d, %d)", ret, ret == 1 ? c[0].ret : 0);
	printf("timeout: request completed after %" PRId64 " ms\n", now_ms() - t0);
	free(buf);
}

/* ---- hammer ---- */

static void mode_hammer(int secs)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_completion c[64];
	const int depth = 32;
	unsigned char *buf = malloc((size_t)BS * depth);
	uint64_t blocks = capacity / BS, seq = 0, done = 0;
	int outstanding = 0, errors = 0, ret;
	int64_t end = now_ms() + (int64_t)secs * 1000;
	bool failed = false;

	if (!q || !buf || blocks == 0)
		die(1, "setup failed");
	memset(buf, 0x5a, (size_t)BS * depth);
	while (!failed && now_ms() < end) {
		while (outstanding < depth) {
			uint64_t off = (seq * 7919 % blocks) * BS;
			unsigned char *b = buf + (size_t)(seq % depth) * BS;

			if (seq & 1)
				vdiskq_read(q, off, b, BS, NULL, 0);
			else
				vdiskq_write(q, off, b, BS, NULL, 0);
			seq++;
			outstanding++;
		}
		ret = vdiskq_do_io(q, c, 1, 64, NULL);
		if (ret < 0)
			die(1, "hammer: do_io: %s", vdisk_get_error_msg());
		for (int i = 0; i < ret; i++) {
			outstanding--;
			if (c[i].ret < 0) {
				if (!errors++)
					printf("first-error ret=%d msg=%s\n", c[i].ret, c[i].error_msg ? c[i].error_msg : "(null)");
				failed = true;
			} else {
				done++;
			}
		}
	}
	printf("ok-before-error=%" PRIu64 "\n", done);
	/* Everything outstanding must come back, quickly. */
	while (outstanding > 0) {
		struct timespec to = { .tv_sec = 10, .tv_nsec = 0 };

		ret = vdiskq_do_io(q, c, 1, 64, &to);
		if (ret == -ETIME)
			die(3, "hammer: %d requests still outstanding after 10 s: HANG", outstanding);
		if (ret < 0)
			die(1, "hammer: do_io: %s", vdisk_get_error_msg());
		for (int i = 0; i < ret; i++) {
			outstanding--;
			if (c[i].ret < 0)
				errors++;
			if (c[i].ret < 0 && !c[i].error_msg)
				die(1, "hammer: failed request without a message");
		}
	}
	printf("errors=%d\n", errors);
	if (failed) {
		struct timespec to = { .tv_sec = 5, .tv_nsec = 0 };
		int64_t t0 = now_ms();

		vdiskq_read(q, 0, buf, BS, NULL, 0);
		ret = vdiskq_do_io(q, c, 1, 1, &to);
		if (ret != 1)
			die(3, "hammer: a request after the failure did not complete (%d): HANG", ret);
		printf("after ret=%d ms=%" PRId64 " msg=%s\n", c[0].ret, now_ms() - t0,
		       c[0].error_msg ? c[0].error_msg : "(null)");
	}
	free(buf);
}

static void mode_idle(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_completion c[1];
	struct timespec to = { .tv_sec = 10, .tv_nsec = 0 };
	unsigned char *buf = malloc(BS);
	char line[16];
	int64_t t0;
	int ret;

	if (!q || !buf)
		die(1, "setup failed");
	vdiskq_read(q, 0, buf, BS, NULL, 0);
	wait_ok(q, 1, "first read");
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		die(2, "idle: no line on stdin");
	t0 = now_ms();
	vdiskq_read(q, 0, buf, BS, NULL, 0);
	ret = vdiskq_do_io(q, c, 1, 1, &to);
	if (ret != 1)
		die(3, "idle: the read after the server died did not complete (%d): HANG", ret);
	printf("after ret=%d ms=%" PRId64 " msg=%s\n", c[0].ret, now_ms() - t0, c[0].error_msg ? c[0].error_msg : "(null)");
	free(buf);
}

static void mode_abandon(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	unsigned char *buf = malloc((size_t)BS * 8);
	char line[16];
	int64_t t0;

	if (!q || !buf)
		die(1, "setup failed");
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		die(2, "abandon: no line on stdin");
	for (int i = 0; i < 8; i++)
		vdiskq_read(q, (uint64_t)i * BS, buf + (size_t)i * BS, BS, NULL, 0);
	if (vdiskq_do_io(q, NULL, 0, 0, NULL) != 0)
		die(1, "submit: %s", vdisk_get_error_msg());
	t0 = now_ms();
	vdisk_destroy(&v);
	printf("abandon: destroy took %" PRId64 " ms\n", now_ms() - t0);
	free(buf);
}

/* ---- connect / stall ---- */

static void mode_connect(void)
{
	int align = 0, opt = 0, maxt = 0;

	if (vdisk_get_int(v, "request-alignment", &align) < 0 || vdisk_get_int(v, "optimal-io-size", &opt) < 0 ||
	    vdisk_get_int(v, "max-transfer", &maxt) < 0)
		die(1, "%s", vdisk_get_error_msg());
	printf("connected capacity=%" PRIu64 " request-alignment=%d optimal-io-size=%d max-transfer=%d\n", capacity,
	       align, opt, maxt);
}

static void mode_stall(void)
{
	struct vdisk_completion c[1];
	struct timespec to = { .tv_sec = 0, .tv_nsec = 300 * 1000000L };
	unsigned char *buf = malloc(BS);
	int64_t t0;
	int ret = read_within(buf, c, &to);

	if (ret != -ETIME)
		die(1, "stall: do_io returned %d, expected -ETIME (%s)", ret, ret == 1 ? c[0].error_msg : "");
	t0 = now_ms();
	vdisk_destroy(&v);
	printf("stall: -ETIME; destroy took %" PRId64 " ms\n", now_ms() - t0);
	free(buf);
}

int main(int argc, char **argv)
{
	const char *sets[MAX_SETS];
	int n_sets = 0, queue_size = 0, i, ret;

	signal(SIGALRM, on_alarm);
	alarm(90);
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--set") && i + 1 < argc && n_sets < MAX_SETS)
			sets[n_sets++] = argv[++i];
		else if (!strcmp(argv[i], "--queues") && i + 1 < argc)
			n_queues = num(argv[++i]);
		else if (!strcmp(argv[i], "--queue-size") && i + 1 < argc)
			queue_size = num(argv[++i]);
		else
			break;
	}
	if (i >= argc || n_queues < 1 || n_queues > MAX_QUEUES)
		die(2, "usage: nbd-queues [--set N=V]... [--queues N] [--queue-size N] MODE [ARG]");
	if (vdisk_create("nbd", &v) < 0)
		die(1, "%s", vdisk_get_error_msg());
	for (int s = 0; s < n_sets; s++)
		set_prop(sets[s]);
	ret = vdisk_connect(v);
	if (ret >= 0 && (ret = vdisk_set_int(v, "num-queues", n_queues)) >= 0 && queue_size)
		ret = vdisk_set_int(v, "queue-size", queue_size);
	if (ret >= 0)
		ret = vdisk_start(v);
	if (ret < 0) {
		char msg[512];

		snprintf(msg, sizeof(msg), "%s [%s]", vdisk_get_error_msg(), strerror(-ret));
		vdisk_destroy(&v);
		die(1, "%s", msg);
	}
	if (vdisk_get_uint64(v, "capacity", &capacity) < 0)
		die(1, "%s", vdisk_get_error_msg());

	ret = 0;
	if (!strcmp(argv[i], "multiq") && i + 1 < argc)
		mode_multiq((uint64_t)num(argv[i + 1]));
	else if (!strcmp(argv[i], "evloop") && i + 1 < argc) {
		if (i + 2 < argc)
			ev_bs = (size_t)num(argv[i + 2]);
		mode_evloop(num(argv[i + 1]));
	} else if (!strcmp(argv[i], "idle")) {
		mode_idle();
	} else if (!strcmp(argv[i], "abandon")) {
		mode_abandon();
		return 0;
	}
	else if (!strcmp(argv[i], "timeout"))
		mode_timeout();
	else if (!strcmp(argv[i], "connect"))
		mode_connect();
	else if (!strcmp(argv[i], "stall")) {
		mode_stall();
		return 0;
	}
	else if (!strcmp(argv[i], "hammer") && i + 1 < argc)
		mode_hammer(num(argv[i + 1]));
	else
		die(2, "unknown mode '%s'", argv[i]);
	vdisk_destroy(&v);
	fflush(stdout);
	return ret;
}
