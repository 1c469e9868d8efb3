/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * vu-hostile-client: event-driven I/O against a hostile back-end
 * (tests/vhost-user/test_hostile_backend.py), where vu-client's modes stop
 * at the first failure: here every completion is checked and counted.
 *
 *   vu-hostile-client --path SOCK MODE ROUNDS COUNT
 *
 * Modes (each round: COUNT 4 KiB reads of a FILL-byte (0x5a) disk in flight,
 * all collected):
 *   evloop   poll() on the completion fd, then do_io(min=0)
 *   spin     do_io(min=0) in a busy loop, completion fd enabled (so the
 *            driver re-enables notifications at the end of every call)
 * Every round creates a new instance.  Prints "ok=N failed=M msg=<first
 * error>" and exits 0; a successful read with wrong data exits 1, a hang
 * (no completion for 10 s) exits 3.
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vdisk.h"

#define BS 4096
#define FILL 0x5a
#define HANG_MS 10000

static void die(int code, const char *what)
{
	fprintf(stderr, "vu-hostile-client: %s: %s\n", what, vdisk_get_error_msg());
	exit(code);
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
	unsigned ok = 0, failed = 0;
	char first[256] = "";
	bool spin;
	int rounds, count;

	if (argc != 6 || strcmp(argv[1], "--path") || (strcmp(argv[3], "evloop") && strcmp(argv[3], "spin"))) {
		fprintf(stderr, "usage: vu-hostile-client --path SOCK evloop|spin ROUNDS COUNT\n");
		return 2;
	}
	spin = !strcmp(argv[3], "spin");
	rounds = (int)strtol(argv[4], NULL, 10);
	count = (int)strtol(argv[5], NULL, 10);
	if (rounds < 1 || count < 1 || count > 64)
		return 2;
	for (int round = 0; round < rounds; round++) {
		struct vdisk_completion c[64];
		struct vdisk_mem_region reg;
		struct vdisk *v = NULL;
		struct vdiskq *q;
		bool submitted = false;
		double last;
		int done = 0, fd;

		if (vdisk_create("virtio-blk-vhost-user", &v) < 0)
			die(1, "create");
		if (vdisk_set_str(v, "path", argv[2]) < 0 || vdisk_connect(v) < 0 || vdisk_start(v) < 0)
			die(1, "connect/start");
		q = vdisk_get_queue(v, 0);
		fd = vdiskq_get_completion_fd(q);
		if (fd < 0 || vdisk_alloc_mem_region(v, &reg, (size_t)count * BS) < 0 || vdisk_map_mem_region(v, &reg) < 0)
			die(1, "completion fd / memory");
		memset(reg.addr, 0, (size_t)count * BS);
		for (int i = 0; i < count; i++)
			if (vdiskq_read(q, (uint64_t)i * BS, (char *)reg.addr + i * BS, BS, (void *)(intptr_t)i, 0) < 0)
				die(1, "enqueue");
		last = now_ms();
		while (done < count) {
			int n;

			if (!spin && submitted) {
				struct pollfd p = { .fd = fd, .events = POLLIN };
				uint64_t cnt;

				if (poll(&p, 1, HANG_MS) == 0) {
					fprintf(stderr, "HANG: completion fd silent (%d of %d done)\n", done, count);
					return 3;
				}
				if (read(fd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
					die(1, "read completion fd");
			}
			n = vdiskq_do_io(q, c, 0, 64, NULL); /* the first call submits */
			submitted = true;
			if (n < 0)
				die(1, "do_io");
			if (n > 0)
				last = now_ms();
			else if (now_ms() - last > HANG_MS) {
				fprintf(stderr, "HANG: no completion for %d s (%d of %d done)\n", HANG_MS / 1000, done, count);
				return 3;
			}
			for (int i = 0; i < n; i++) {
				const unsigned char *b = (const unsigned char *)reg.addr + (intptr_t)c[i].user_data * BS;

				if (c[i].ret < 0) {
					if (!failed++)
						snprintf(first, sizeof(first), "%s", c[i].error_msg ? c[i].error_msg : "(none)");
					continue;
				}
				for (int k = 0; k < BS; k++) {
					if (b[k] != FILL) {
						fprintf(stderr, "read %ld succeeded with wrong data\n", (long)(intptr_t)c[i].user_data);
						return 1;
					}
				}
				ok++;
			}
			done += n;
		}
		vdisk_unmap_mem_region(v, &reg);
		vdisk_free_mem_region(v, &reg);
		vdisk_destroy(&v);
	}
	printf("ok=%u failed=%u msg=%s\n", ok, failed, first);
	return 0;
}
