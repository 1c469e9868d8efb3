/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The io_uring driver's buffered writes on a file system that refuses
 * RWF_NOWAIT buffered writes (ext4): with no read in the ring they are done
 * in the submitting call, so no io-wq worker is ever started; with a read in
 * the ring they go to io-wq, so a write that blocks cannot hold the read up.
 * Both keep the data.  Its own executable: io-wq workers outlive their work
 * by seconds, so another test in the same process could have started them.
 */
#include <dirent.h>
#include <sys/uio.h>

#include "test-util.h"

#define NWRITES 32
#define BS 4096u

static bool fs_punts_buffered_writes(const char *dir)
{
	struct iovec iov = { .iov_base = (char[1]){ 0 }, .iov_len = 1 };
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	bool punts;

	if (fd < 0)
		return false;
	punts = pwritev2(fd, &iov, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP;
	close(fd);
	return punts;
}

static int io_wq_workers(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	int n = 0;

	assert_non_null(d);
	while ((e = readdir(d))) {
		char path[PATH_MAX], comm[64] = "";
		FILE *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue; /* the thread just exited */
		if (fgets(comm, sizeof(comm), f) && strncmp(comm, "iou-wrk", 7) == 0)
			n++;
		fclose(f);
	}
	closedir(d);
	return n;
}

struct inline_fx {
	char path[PATH_MAX];
	struct vdisk *v;
	struct vdiskq *q;
	unsigned char *bufs[NWRITES + 1];
};

static int inline_setup(void **state)
{
	struct inline_fx *f = calloc(1, sizeof(*f));

	if (!f)
		return -1;
	*state = f;
	if (!fs_punts_buffered_writes(tmp_dir()))
		return 0; /* each test skips */
	make_temp_file(f->path, sizeof(f->path), 4 << 20);
	if (vdisk_create("io_uring", &f->v) < 0 || vdisk_set_str(f->v, "path", f->path) < 0 ||
	    vdisk_connect(f->v) < 0 || vdisk_start(f->v) < 0)
		return -1;
	f->q = vdisk_get_queue(f->v, 0);
	for (int i = 0; i <= NWRITES; i++) {
		void *b;

		if (posix_memalign(&b, 4096, BS))
			return -1;
		memset(b, 'a' + i % 26, BS);
		f->bufs[i] = b;
	}
	return f->q ? 0 : -1;
}

static int inline_teardown(void **state)
{
	struct inline_fx *f = *state;

	vdisk_destroy(&f->v);
	if (f->path[0])
		unlink(f->path);
	for (int i = 0; i <= NWRITES; i++)
		free(f->bufs[i]);
	free(f);
	return 0;
}

static void skip_unless_punting(const struct inline_fx *f)
{
	if (!f->q) {
		print_message("%s takes RWF_NOWAIT buffered writes: nothing is punted, skipped\n", tmp_dir());
		skip();
	}
}

/* Enqueue the NWRITES writes (write i at i * 8 KiB holds byte 'a' + i % 26). */
static void enqueue_writes(struct inline_fx *f)
{
	for (int i = 0; i < NWRITES; i++)
		assert_int_equal(vdiskq_write(f->q, (uint64_t)i * 2 * BS, f->bufs[i], BS, f->bufs[i], 0), 0);
}

static void assert_writes_in_file(const struct inline_fx *f)
{
	unsigned char *r = malloc(BS);

	assert_non_null(r);
	for (int i = 0; i < NWRITES; i++) {
		pread_file(f->path, r, BS, (uint64_t)i * 2 * BS);
		assert_memory_equal(r, f->bufs[i], BS);
	}
	free(r);
}

static void writes_without_reads_complete_in_the_submitting_call(void **state)
{
	struct inline_fx *f = *state;
	struct vdisk_completion c[NWRITES];

	skip_unless_punting(f);
	assert_int_equal(io_wq_workers(), 0);
	enqueue_writes(f);
	/* min 0: returns what finished while submitting -- all of them, if done inline. */
	assert_int_equal(vdiskq_do_io(f->q, c, 0, NWRITES, NULL), NWRITES);
	for (int i = 0; i < NWRITES; i++)
		assert_int_equal(c[i].ret, 0);
	assert_int_equal(io_wq_workers(), 0);
	assert_writes_in_file(f);
}

static void writes_behind_a_read_go_to_io_wq(void **state)
{
	struct inline_fx *f = *state;
	struct vdisk_completion c[NWRITES + 1];
	struct timespec timeout = { .tv_sec = FX_TIMEOUT_S };
	int done = 0, n;

	skip_unless_punting(f);
	assert_int_equal(vdiskq_read(f->q, 3 << 20, f->bufs[NWRITES], BS, f->bufs[NWRITES], 0), 0);
	enqueue_writes(f);
	while (done < NWRITES + 1) {
		n = vdiskq_do_io(f->q, c, 1, NWRITES + 1, &timeout);
		assert_true(n > 0);
		for (int i = 0; i < n; i++)
			assert_int_equal(c[i].ret, 0);
		done += n;
	}
	assert_true(io_wq_workers() > 0);
	assert_writes_in_file(f);
}

int main(void)
{
	/* In this order: the first must see no worker started by anything before it. */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(writes_without_reads_complete_in_the_submitting_call),
		cmocka_unit_test(writes_behind_a_read_go_to_io_wq),
	};

	return cmocka_run_group_tests_name("uring-inline-writes", tests, inline_setup, inline_teardown);
}
