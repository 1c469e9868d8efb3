/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * vu-client: what the virtio-blk-vhost-user tests need beyond vdisk-io:
 * deep queues with a checkable data pattern, several queues in threads,
 * poll queues, the completion fd, timeouts, buffers outside mapped regions,
 * and I/O while the back-end dies.  Compiled by tests/vhost-user/conftest.py
 * against the build's libvdisk.
 *
 *   vu-client --path SOCK [--set NAME=VALUE]... [--queues N] [--poll-queues N]
 *             [--queue-size N] [--read-only] [--map-before-start] MODE [ARGS]
 *
 * The pattern: every 512-byte sector holds 32 copies of the pair
 * (u64 sector number, u64 seed), little-endian, so Python can check a file.
 *
 * Modes:
 *   pattern SEED OFF MB QD   write MB MiB at OFF MiB with QD requests in flight
 *                   (sizes 512 B..64 KiB, every 4th a 3-iovec writev, every
 *                   7th FUA), flush, read it all back (readv too) and check.
 *   check SEED OFF MB        read and check (data written by someone else).
 *   multiq MB                one thread per queue (normal and poll queues):
 *                   queue i writes its own MB at i*MB MiB, flushes; then every
 *                   thread reads and checks every queue's area.
 *   evloop COUNT             event-driven: COUNT writes + COUNT reads completed
 *                   by poll() on the completion fd and do_io(min=0); then a
 *                   disabled fd stays quiet and a re-enabled one fires.
 *   timeout                  one read on a slow back-end: do_io(min=1, 100 ms)
 *                   gives -ETIME, the request completes later.
 *   efault                   buffers outside mapped regions fail with -EFAULT.
 *   regions                  map max-mem-regions regions (one more: -ENOSPC),
 *                   do I/O through each, unmap them all, I/O fails, remap works.
 *   hammer SECS              32 requests in flight until SECS pass or one fails
 *                   (the test kills the back-end); every outstanding request
 *                   must then complete within 10 s, a new one must fail at once.
 *   idle                     one read, print "ready", wait for a stdin line,
 *                   one more read: prints "after ret=R ms=T msg=...".
 *   destroy-inflight         8 reads in flight, then vdisk_destroy(): prints
 *                   how long it took (it waits for the back-end to finish).
 *
 * Exit: 0 ok, 1 check failed, 2 usage, 3 hang (do_io watchdog).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vdisk.h"

#define MAX_SETS 32
#define MAX_QUEUES 64
#define WATCHDOG_S 20
#define MIB (1ull << 20)

static struct vdisk *v;
static int n_queues = 1, n_poll = 0, queue_size = 0;
static bool read_only, map_before_start;
static uint64_t capacity;
static struct vdisk_mem_region early;

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "vu-client: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(code);
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void fill(unsigned char *buf, uint64_t off, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i += 512) {
		uint64_t pair[2] = { (off + i) / 512, seed };

		for (int k = 0; k < 32; k++)
			memcpy(buf + i + (size_t)k * 16, pair, 16);
	}
}

static bool check(const unsigned char *buf, uint64_t off, size_t len, uint64_t seed, const char *who)
{
	for (size_t i = 0; i < len; i += 512) {
		uint64_t pair[2] = { (off + i) / 512, seed };

		for (int k = 0; k < 32; k++) {
			if (memcmp(buf + i + (size_t)k * 16, pair, 16) != 0) {
				uint64_t got[2];

				memcpy(got, buf + i + (size_t)k * 16, 16);
				fprintf(stderr, "%s: mismatch at offset %" PRIu64 ": sector %" PRIu64 " seed %" PRIu64
					" expected, got %" PRIu64 "/%" PRIu64 "\n",
					who, off + i + (size_t)k * 16, pair[0], seed, got[0], got[1]);
				return false;
			}
		}
	}
	return true;
}

/* do_io with a watchdog: a hang exits 3. */
static int do_io(struct vdiskq *q, struct vdisk_completion *c, int min, int max)
{
	struct timespec t = { WATCHDOG_S, 0 };
	int n = vdiskq_do_io(q, c, min, max, &t);

	if (n == -ETIME)
		die(3, "HANG: do_io(min=%d) timed out after %d s", min, WATCHDOG_S);
	if (n < 0)
		die(1, "do_io: %s (%s)", strerror(-n), vdisk_get_error_msg());
	return n;
}

static void alloc_map(struct vdisk_mem_region *r, size_t len)
{
	int ret = vdisk_alloc_mem_region(v, r, len);

	if (ret < 0)
		die(1, "alloc_mem_region(%zu): %s", len, vdisk_get_error_msg());
	ret = vdisk_map_mem_region(v, r);
	if (ret < 0)
		die(1, "map_mem_region: %s", vdisk_get_error_msg());
}

static void unmap_free(struct vdisk_mem_region *r)
{
	vdisk_unmap_mem_region(v, r);
	vdisk_free_mem_region(v, r);
}

/* ---- pattern I/O on one queue ---- */

struct slot {
	bool busy;
	uint64_t off;
	size_t len;
	struct iovec iov[3];
	unsigned char *buf;
};

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/*
 * Write (or read and check) [off, off+len) with up to qd requests in flight
 * on q; buffers come from one mapped region.
 */
#define MAXBS (64 * 1024)

static bool pattern_pass_in(struct vdiskq *q, bool write, uint64_t seed, uint64_t off, uint64_t len, unsigned qd,
			    struct vdisk_mem_region *buffers)
{
	const size_t maxbs = MAXBS;
	struct vdisk_mem_region own, *reg = buffers ? buffers : &own;
	struct slot *slots = calloc(qd, sizeof(*slots));
	struct vdisk_completion *comps = calloc(qd, sizeof(*comps));
	uint64_t next = off, end = off + len;
	unsigned inflight = 0, issued = 0;
	bool ok = true;

	if (!slots || !comps)
		die(1, "out of memory");
	if (!buffers)
		alloc_map(&own, maxbs * qd); /* the configuring thread only: see multiq */
	for (unsigned i = 0; i < qd; i++)
		slots[i].buf = (unsigned char *)reg->addr + i * maxbs;
	while (next < end || inflight > 0) {
		for (unsigned i = 0; i < qd && next < end; i++) {
			struct slot *s = &slots[i];
			size_t l = (size_t)(1 + rnd() % (maxbs / 512)) * 512;
			int ret;

			if (s->busy)
				continue;
			if (l > end - next)
				l = (size_t)(end - next);
			s->off = next;
			s->len = l;
			next += l;
			if (write)
				fill(s->buf, s->off, l, seed);
			else
				memset(s->buf, 0xee, l);
			issued++;
			if (issued % 4 == 0 && l >= 1536) {
				/* Three unequal pieces, scattered inside the slot's buffer. */
				size_t a = 512, b = (l - 512) / 1024 * 512, c = l - a - b;

				s->iov[0] = (struct iovec){ s->buf, a };
				s->iov[1] = (struct iovec){ s->buf + a, b };
				s->iov[2] = (struct iovec){ s->buf + a + b, c };
				ret = write ? vdiskq_writev(q, s->off, s->iov, 3, s, 0) : vdiskq_readv(q, s->off, s->iov, 3, s, 0);
			} else {
				ret = write ? vdiskq_write(q, s->off, s->buf, l, s, issued % 7 == 0 ? VDISK_REQ_FUA : 0)
					    : vdiskq_read(q, s->off, s->buf, l, s, 0);
			}
			if (ret < 0)
				die(1, "enqueue: %s", vdisk_get_error_msg());
			s->busy = true;
			inflight++;
		}
		int n = do_io(q, comps, 1, (int)qd);

		for (int i = 0; i < n; i++) {
			struct slot *s = comps[i].user_data;

			if (comps[i].ret < 0) {
				fprintf(stderr, "%s at %" PRIu64 "+%zu: %s (%s)\n", write ? "write" : "read", s->off, s->len,
					strerror(-comps[i].ret), comps[i].error_msg ? comps[i].error_msg : "");
				ok = false;
			} else if (!write && !check(s->buf, s->off, s->len, seed, "read")) {
				ok = false;
			}
			s->busy = false;
			inflight--;
		}
	}
	if (write) {
		vdiskq_flush(q, NULL, 0);
		if (do_io(q, comps, 1, 1) == 1 && comps[0].ret < 0) {
			fprintf(stderr, "flush: %s\n", comps[0].error_msg);
			ok = false;
		}
	}
	if (!buffers)
		unmap_free(&own);
	free(slots);
	free(comps);
	return ok;
}

static bool pattern_pass(struct vdiskq *q, bool write, uint64_t seed, uint64_t off, uint64_t len, unsigned qd)
{
	return pattern_pass_in(q, write, seed, off, len, qd, NULL);
}

/* ---- modes ---- */

static int mode_pattern(uint64_t seed, uint64_t off_mb, uint64_t mb, unsigned qd)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);

	if (!pattern_pass(q, true, seed, off_mb * MIB, mb * MIB, qd))
		return 1;
	if (!pattern_pass(q, false, seed, off_mb * MIB, mb * MIB, qd))
		return 1;
	printf("pattern %" PRIu64 " MiB at QD%u verified\n", mb, qd);
	return 0;
}

static int mode_check(uint64_t seed, uint64_t off_mb, uint64_t mb)
{
	if (!pattern_pass(vdisk_get_queue(v, 0), false, seed, off_mb * MIB, mb * MIB, 16))
		return 1;
	printf("checked %" PRIu64 " MiB\n", mb);
	return 0;
}

struct thread_arg {
	struct vdiskq *q;
	int index, total;
	uint64_t mb;
	pthread_barrier_t *barrier;
	struct vdisk_mem_region reg; /* mapped by main: map/unmap are not for queue threads */
	bool ok;
};

static void *multiq_thread(void *p)
{
	struct thread_arg *a = p;

	a->ok = pattern_pass_in(a->q, true, (uint64_t)a->index + 100, (uint64_t)a->index * a->mb * MIB, a->mb * MIB, 16,
				&a->reg);
	pthread_barrier_wait(a->barrier);
	for (int i = 0; a->ok && i < a->total; i++)
		a->ok = pattern_pass_in(a->q, false, (uint64_t)i + 100, (uint64_t)i * a->mb * MIB, a->mb * MIB, 16,
					&a->reg);
	return NULL;
}

static int mode_multiq(uint64_t mb)
{
	int total = n_queues + n_poll;
	struct thread_arg args[MAX_QUEUES];
	pthread_t th[MAX_QUEUES];
	pthread_barrier_t barrier;
	bool ok = true;

	if ((uint64_t)total * mb * MIB > capacity)
		die(2, "multiq: %d x %" PRIu64 " MiB does not fit", total, mb);
	pthread_barrier_init(&barrier, NULL, (unsigned)total);
	for (int i = 0; i < total; i++) {
		args[i] = (struct thread_arg){ .q = i < n_queues ? vdisk_get_queue(v, i) : vdisk_get_poll_queue(v, i - n_queues),
					       .index = i, .total = total, .mb = mb, .barrier = &barrier };
		if (!args[i].q)
			die(1, "queue %d: %s", i, vdisk_get_error_msg());
		alloc_map(&args[i].reg, MAXBS * 16);
	}
	for (int i = 0; i < total; i++) {
		pthread_create(&th[i], NULL, multiq_thread, &args[i]);
	}
	for (int i = 0; i < total; i++) {
		pthread_join(th[i], NULL);
		ok &= args[i].ok;
	}
	/*
	 * Unmap only once every queue is idle: with mem-slots=false each unmap
	 * re-sends the whole table, and qemu-storage-daemon (7.2) remaps every
	 * region on SET_MEM_TABLE, failing requests still in flight on other
	 * queues with IOERR.
	 */
	for (int i = 0; i < total; i++)
		unmap_free(&args[i].reg);
	pthread_barrier_destroy(&barrier);
	if (!ok)
		return 1;
	printf("%d queues verified\n", total);
	return 0;
}

static bool fd_ready(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, ms) > 0;
}

static void drain_fd(int fd)
{
	uint64_t x;
	ssize_t n = read(fd, &x, sizeof(x));

	(void)n;
}

static int mode_evloop(unsigned count)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	int fd = vdiskq_get_completion_fd(q);
	struct vdisk_mem_region reg;
	struct vdisk_completion comps[64];
	const size_t bs = 4096;

	if (fd < 0)
		die(1, "completion fd: %s", vdisk_get_error_msg());
	alloc_map(&reg, bs * count);
	for (int pass = 0; pass < 2; pass++) {
		unsigned done = 0;

		for (unsigned i = 0; i < count; i++) {
			unsigned char *b = (unsigned char *)reg.addr + i * bs;

			if (pass == 0)
				fill(b, i * bs, bs, 7);
			else
				memset(b, 0, bs);
			if ((pass == 0 ? vdiskq_write(q, i * bs, b, bs, NULL, 0) : vdiskq_read(q, i * bs, b, bs, NULL, 0)) < 0)
				die(1, "enqueue: %s", vdisk_get_error_msg());
		}
		/* Submit without waiting, then only the fd tells us when to come back. */
		done += (unsigned)do_io(q, comps, 0, 64);
		while (done < count) {
			if (!fd_ready(fd, WATCHDOG_S * 1000))
				die(3, "HANG: completion fd never fired (%u of %u done)", done, count);
			drain_fd(fd);
			for (;;) {
				int n = do_io(q, comps, 0, 64);

				for (int i = 0; i < n; i++)
					if (comps[i].ret < 0)
						die(1, "request failed: %s", comps[i].error_msg);
				done += (unsigned)n;
				if (n < 64)
					break;
			}
		}
		if (pass == 1)
			for (unsigned i = 0; i < count; i++)
				if (!check((unsigned char *)reg.addr + i * bs, i * bs, bs, 7, "evloop"))
					return 1;
	}
	printf("%u writes + %u reads via the completion fd\n", count, count);

	/* Disabled: blocking do_io works and the fd stays quiet afterwards. */
	vdiskq_set_completion_fd_enabled(q, false);
	drain_fd(fd);
	for (int i = 0; i < 16; i++) {
		vdiskq_read(q, 0, reg.addr, bs, NULL, 0);
		do_io(q, comps, 1, 1);
	}
	if (fd_ready(fd, 200))
		die(1, "disabled completion fd fired");
	printf("disabled fd stayed quiet\n");
	vdiskq_set_completion_fd_enabled(q, true);
	drain_fd(fd);
	vdiskq_read(q, 0, reg.addr, bs, NULL, 0);
	if (do_io(q, comps, 0, 1) == 0) {
		if (!fd_ready(fd, WATCHDOG_S * 1000))
			die(3, "HANG: re-enabled completion fd never fired");
		while (do_io(q, comps, 0, 1) == 0) {
			if (!fd_ready(fd, WATCHDOG_S * 1000))
				die(3, "HANG: no completion");
			drain_fd(fd);
		}
	}
	printf("re-enabled fd fired\n");
	unmap_free(&reg);
	return 0;
}

static int mode_timeout(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_mem_region reg;
	struct vdisk_completion c;
	struct timespec t = { 0, 100 * 1000 * 1000 };
	double t0;
	int n;

	alloc_map(&reg, 4096);
	vdiskq_read(q, 0, reg.addr, 4096, NULL, 0);
	t0 = now_ms();
	n = vdiskq_do_io(q, &c, 1, 1, &t);
	if (n != -ETIME)
		die(1, "do_io on a slow back-end: expected -ETIME, got %d", n);
	if (t.tv_sec != 0 || t.tv_nsec > 20 * 1000 * 1000)
		die(1, "remaining timeout not written back as ~0: %ld.%09ld", (long)t.tv_sec, t.tv_nsec);
	printf("timed out after %.0f ms\n", now_ms() - t0);
	if (do_io(q, &c, 1, 1) != 1 || c.ret != 0)
		die(1, "the read did not complete afterwards");
	printf("completed later\n");
	unmap_free(&reg);
	return 0;
}

static int expect_efault(struct vdiskq *q, void *buf, size_t len, const char *what)
{
	struct vdisk_completion c;

	vdiskq_read(q, 0, buf, len, NULL, 0);
	do_io(q, &c, 1, 1);
	if (c.ret != -EFAULT || !c.error_msg || !strstr(c.error_msg, "mapped memory region"))
		die(1, "%s: expected -EFAULT with a message, got %d (%s)", what, c.ret, c.error_msg ? c.error_msg : "");
	printf("%s: %s\n", what, c.error_msg);
	return 0;
}

static int mode_efault(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_mem_region reg, unmapped;
	struct vdisk_completion c;
	struct iovec iov[2];
	void *heap = aligned_alloc(4096, 8192);

	expect_efault(q, heap, 4096, "heap buffer");
	alloc_map(&reg, 8192);
	expect_efault(q, (char *)reg.addr + 4096, 8192, "buffer running past its region");
	if (vdisk_alloc_mem_region(v, &unmapped, 4096) < 0)
		die(1, "alloc: %s", vdisk_get_error_msg());
	expect_efault(q, unmapped.addr, 4096, "allocated but never mapped");
	iov[0] = (struct iovec){ reg.addr, 4096 };
	iov[1] = (struct iovec){ heap, 4096 };
	vdiskq_readv(q, 0, iov, 2, NULL, 0);
	do_io(q, &c, 1, 1);
	if (c.ret != -EFAULT)
		die(1, "readv with one bad iovec: %d", c.ret);
	printf("readv with one bad iovec: %s\n", c.error_msg);
	vdiskq_read(q, 0, reg.addr, 8192, NULL, 0);
	do_io(q, &c, 1, 1);
	if (c.ret != 0)
		die(1, "read into the mapped region: %s", c.error_msg);
	vdisk_unmap_mem_region(v, &reg);
	expect_efault(q, reg.addr, 4096, "region unmapped again");
	vdisk_free_mem_region(v, &reg);
	vdisk_free_mem_region(v, &unmapped);
	free(heap);
	return 0;
}

static int mode_regions(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_completion c;
	struct vdisk_mem_region *regs, extra;
	uint64_t max;
	int ret;

	if (vdisk_get_uint64(v, "max-mem-regions", &max) < 0)
		die(1, "max-mem-regions: %s", vdisk_get_error_msg());
	regs = calloc(max, sizeof(*regs));
	/* Regions mapped before start are counted too (--map-before-start). */
	if (map_before_start)
		max--;
	for (uint64_t i = 0; i < max; i++)
		alloc_map(&regs[i], 4096);
	if (vdisk_alloc_mem_region(v, &extra, 4096) < 0)
		die(1, "alloc: %s", vdisk_get_error_msg());
	ret = vdisk_map_mem_region(v, &extra);
	if (ret != -ENOSPC)
		die(1, "mapping region %" PRIu64 ": expected -ENOSPC, got %d", max + 1, ret);
	printf("region %" PRIu64 ": %s\n", max + 1, vdisk_get_error_msg());
	for (uint64_t i = 0; i < max; i++) {
		fill(regs[i].addr, i * 4096, 4096, 5);
		vdiskq_write(q, i * 4096, regs[i].addr, 4096, NULL, 0);
	}
	for (uint64_t i = 0; i < max; i++)
		if (do_io(q, &c, 1, 1) != 1 || c.ret < 0)
			die(1, "write: %s", c.error_msg);
	for (uint64_t i = 0; i < max; i++) {
		memset(regs[i].addr, 0, 4096);
		vdiskq_read(q, i * 4096, regs[i].addr, 4096, NULL, 0);
		do_io(q, &c, 1, 1);
		if (c.ret < 0 || !check(regs[i].addr, i * 4096, 4096, 5, "regions"))
			die(1, "read through region %" PRIu64 " failed", i);
	}
	printf("%" PRIu64 " regions used\n", max);
	for (uint64_t i = 0; i < max; i++)
		vdisk_unmap_mem_region(v, &regs[i]);
	expect_efault(q, regs[0].addr, 4096, "after unmapping all");
	if (vdisk_map_mem_region(v, &extra) < 0)
		die(1, "mapping after unmapping: %s", vdisk_get_error_msg());
	vdiskq_read(q, 0, extra.addr, 4096, NULL, 0);
	do_io(q, &c, 1, 1);
	if (c.ret < 0 || !check(extra.addr, 0, 4096, 5, "remapped"))
		die(1, "read through a remapped region failed");
	printf("remapped after unmapping all\n");
	for (uint64_t i = 0; i < max; i++)
		vdisk_free_mem_region(v, &regs[i]);
	unmap_free(&extra);
	free(regs);
	return 0;
}

static int mode_hammer(int secs)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_mem_region reg;
	struct vdisk_completion comps[32];
	uint64_t blocks = capacity / 4096;
	double end = now_ms() + secs * 1000.0, t_fail = 0;
	unsigned inflight = 0, errors = 0, ok = 0;
	char *msg = NULL;
	int last_ret = 0;

	alloc_map(&reg, 32 * 4096);
	for (int i = 0; i < 32; i++) {
		vdiskq_read(q, (rnd() % blocks) * 4096, (char *)reg.addr + i * 4096, 4096, (void *)(intptr_t)i, 0);
		inflight++;
	}
	printf("ready\n");
	fflush(stdout);
	while (inflight > 0) {
		int n = do_io(q, comps, 1, 32);

		for (int i = 0; i < n; i++) {
			inflight--;
			if (comps[i].ret < 0) {
				if (!errors) {
					t_fail = now_ms();
					msg = strdup(comps[i].error_msg ? comps[i].error_msg : "");
					last_ret = comps[i].ret;
				}
				errors++;
				continue;
			}
			ok++;
			if (!errors && now_ms() < end) {
				int slot = (int)(intptr_t)comps[i].user_data;

				vdiskq_read(q, (rnd() % blocks) * 4096, (char *)reg.addr + slot * 4096, 4096,
					    comps[i].user_data, 0);
				inflight++;
			}
		}
		if (errors && now_ms() - t_fail > 10000)
			die(3, "HANG: requests still in flight 10 s after the first error");
	}
	printf("ok=%u errors=%u ret=%d msg=%s\n", ok, errors, last_ret, msg ? msg : "");
	if (errors) {
		double t0 = now_ms();

		vdiskq_read(q, 0, reg.addr, 4096, NULL, 0);
		do_io(q, comps, 1, 1);
		printf("after ret=%d ms=%.0f msg=%s\n", comps[0].ret, now_ms() - t0,
		       comps[0].error_msg ? comps[0].error_msg : "");
	}
	free(msg);
	vdisk_unmap_mem_region(v, &reg);
	vdisk_free_mem_region(v, &reg);
	return 0;
}

static int mode_idle(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_mem_region reg;
	struct vdisk_completion c;
	char line[16];
	double t0;

	alloc_map(&reg, 4096);
	vdiskq_read(q, 0, reg.addr, 4096, NULL, 0);
	do_io(q, &c, 1, 1);
	if (c.ret < 0)
		die(1, "first read: %s", c.error_msg);
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		die(2, "idle: no line on stdin");
	usleep(100 * 1000);
	t0 = now_ms();
	vdiskq_read(q, 0, reg.addr, 4096, NULL, 0);
	do_io(q, &c, 1, 1);
	printf("after ret=%d ms=%.0f msg=%s\n", c.ret, now_ms() - t0, c.error_msg ? c.error_msg : "");
	/* Control calls on a dead back-end fail cleanly too. */
	vdisk_unmap_mem_region(v, &reg);
	vdisk_free_mem_region(v, &reg);
	return 0;
}

static int mode_destroy_inflight(void)
{
	struct vdiskq *q = vdisk_get_queue(v, 0);
	struct vdisk_mem_region reg;
	struct vdisk_completion c[8];
	double t0;

	alloc_map(&reg, 8 * 4096);
	for (int i = 0; i < 8; i++)
		vdiskq_read(q, (uint64_t)i * 4096, (char *)reg.addr + i * 4096, 4096, NULL, 0);
	vdiskq_do_io(q, c, 0, 8, NULL);
	t0 = now_ms();
	vdisk_destroy(&v);
	printf("destroy took %.0f ms\n", now_ms() - t0);
	/* The back-end no longer writes into these buffers: safe to free. */
	vdisk_free_mem_region(NULL, &reg);
	return 0;
}

/* ---- main ---- */

static void set_prop(const char *kv)
{
	char name[64];
	const char *eq = strchr(kv, '=');
	const char *val;
	char *end;
	long long n;

	if (!eq || (size_t)(eq - kv) >= sizeof(name))
		die(2, "--set needs NAME=VALUE");
	memcpy(name, kv, (size_t)(eq - kv));
	name[eq - kv] = '\0';
	val = eq + 1;
	if (!strcmp(val, "true") || !strcmp(val, "false")) {
		if (vdisk_set_bool(v, name, !strcmp(val, "true")) == 0)
			return;
	}
	n = strtoll(val, &end, 0);
	if (*val && !*end && vdisk_set_int(v, name, (int)n) == 0)
		return;
	if (vdisk_set_str(v, name, val) < 0)
		die(1, "set %s: %s", name, vdisk_get_error_msg());
}

/* A whole non-negative decimal or 0x number that fits an int, or exit 2. */
static int arg_int(const char *s)
{
	char *end;
	long n;

	errno = 0;
	n = strtol(s, &end, 0);
	if (errno || end == s || *end || n < 0 || n > INT_MAX)
		die(2, "not a valid number: %s", s);
	return (int)n;
}

int main(int argc, char **argv)
{
	const char *sets[MAX_SETS];
	int n_sets = 0, i, ret;
	const char *path = NULL, *mode;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--path") && i + 1 < argc)
			path = argv[++i];
		else if (!strcmp(argv[i], "--set") && i + 1 < argc && n_sets < MAX_SETS)
			sets[n_sets++] = argv[++i];
		else if (!strcmp(argv[i], "--queues") && i + 1 < argc)
			n_queues = arg_int(argv[++i]);
		else if (!strcmp(argv[i], "--poll-queues") && i + 1 < argc)
			n_poll = arg_int(argv[++i]);
		else if (!strcmp(argv[i], "--queue-size") && i + 1 < argc)
			queue_size = arg_int(argv[++i]);
		else if (!strcmp(argv[i], "--read-only"))
			read_only = true;
		else if (!strcmp(argv[i], "--map-before-start"))
			map_before_start = true;
		else
			die(2, "unknown option %s", argv[i]);
	}
	if (i >= argc || n_queues < 0 || n_poll < 0 || n_queues + n_poll > MAX_QUEUES)
		die(2, "usage: vu-client --path SOCK [options] MODE [ARGS]");
	mode = argv[i++];

	if (vdisk_create("virtio-blk-vhost-user", &v) < 0)
		die(1, "create: %s", vdisk_get_error_msg());
	if (path && vdisk_set_str(v, "path", path) < 0)
		die(1, "path: %s", vdisk_get_error_msg());
	if (read_only && vdisk_set_bool(v, "read-only", true) < 0)
		die(1, "read-only: %s", vdisk_get_error_msg());
	for (int k = 0; k < n_sets; k++)
		set_prop(sets[k]);
	if (vdisk_connect(v) < 0)
		die(1, "connect: %s", vdisk_get_error_msg());
	vdisk_get_uint64(v, "capacity", &capacity);
	if (vdisk_set_int(v, "num-queues", n_queues) < 0 || vdisk_set_int(v, "num-poll-queues", n_poll) < 0)
		die(1, "queues: %s", vdisk_get_error_msg());
	if (queue_size && vdisk_set_int(v, "queue-size", queue_size) < 0)
		die(1, "queue-size: %s", vdisk_get_error_msg());
	if (map_before_start) {
		alloc_map(&early, 4096);
		printf("mapped a region before start\n");
	}
	if (vdisk_start(v) < 0)
		die(1, "start: %s", vdisk_get_error_msg());

	if (!strcmp(mode, "pattern") && argc - i == 4)
		ret = mode_pattern(strtoull(argv[i], NULL, 0), strtoull(argv[i + 1], NULL, 0),
				   strtoull(argv[i + 2], NULL, 0), (unsigned)arg_int(argv[i + 3]));
	else if (!strcmp(mode, "check") && argc - i == 3)
		ret = mode_check(strtoull(argv[i], NULL, 0), strtoull(argv[i + 1], NULL, 0), strtoull(argv[i + 2], NULL, 0));
	else if (!strcmp(mode, "multiq") && argc - i == 1)
		ret = mode_multiq(strtoull(argv[i], NULL, 0));
	else if (!strcmp(mode, "evloop") && argc - i == 1)
		ret = mode_evloop((unsigned)arg_int(argv[i]));
	else if (!strcmp(mode, "timeout") && argc == i)
		ret = mode_timeout();
	else if (!strcmp(mode, "efault") && argc == i)
		ret = mode_efault();
	else if (!strcmp(mode, "regions") && argc == i)
		ret = mode_regions();
	else if (!strcmp(mode, "hammer") && argc - i == 1)
		ret = mode_hammer(arg_int(argv[i]));
	else if (!strcmp(mode, "idle") && argc == i)
		ret = mode_idle();
	else if (!strcmp(mode, "destroy-inflight") && argc == i)
		ret = mode_destroy_inflight();
	else
		die(2, "unknown mode or wrong arguments: %s", mode);
	if (map_before_start && v) {
		vdisk_unmap_mem_region(v, &early);
		vdisk_free_mem_region(v, &early);
	}
	vdisk_destroy(&v);
	return ret;
}
