/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * raw over file: data integrity, misaligned requests (read-modify-write under
 * O_DIRECT), serialisation of overlapping misaligned writes, raw windows,
 * validation, cache modes, block status on sparse files, resize.
 * Data-path tests run for each (aio, cache) configuration.
 */
#include <inttypes.h>
#include <sys/stat.h>

#include "test-block-util.h"

#define FILE_SIZE (4u << 20)

struct cfg {
	const char *aio;
	const char *cache;
};

static const struct cfg cfgs[] = {
	{ "io_uring", "writeback" },
	{ "io_uring", "none" },
	{ "threads", "writeback" },
	{ "threads", "none" },
};

struct fixture {
	const struct cfg *cfg;
	char dir[4096];
	char path[4200];
	struct vd_bnode *bs;
};

static struct vd_bnode *open_raw(const char *path, const char *aio, const char *cache, const char *extra, int flags)
{
	struct vd_cache_mode mode;
	char spec[8192];

	assert_int_equal(vd_cache_mode_parse(cache, &mode), 0);
	snprintf(spec, sizeof(spec), "driver=raw,file.driver=file,file.filename=%s,file.aio=%s%s%s", path, aio,
		 extra ? "," : "", extra ? extra : "");
	return vd_bnode_open(spec, NULL, &mode, flags);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));

	f->cfg = *state;
	make_tmpdir(f->dir, sizeof(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/disk.raw", f->dir);
	assert_int_equal(vd_create_file(f->path, FILE_SIZE, "off"), 0);
	f->bs = open_raw(f->path, f->cfg->aio, f->cfg->cache, NULL, VD_BO_RDWR);
	if (!f->bs)
		fail_msg("open: %s", vdisk_get_error_msg());
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	vd_bnode_unref(f->bs);
	rm_tmpdir(f->dir);
	free(f);
	return 0;
}

static void fill(uint8_t *buf, size_t len, uint32_t seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)((seed * 2654435761u + i * 40503u) >> 13);
}

static void write_then_read_back(void **state)
{
	struct fixture *f = *state;
	size_t len = 192 * 1024;
	uint8_t *w = malloc(len), *r = malloc(len);

	fill(w, len, 1);
	assert_int_equal(vd_bnode_pwrite(f->bs, 65536, w, len, 0), 0);
	assert_int_equal(vd_bnode_pread(f->bs, 65536, r, len), 0);
	assert_memory_equal(w, r, len);
	assert_int_equal(f->bs->wr_ops, 1);
	assert_int_equal(f->bs->rd_bytes, len);
	free(w);
	free(r);
}

/* cache=none: 100 bytes at 1000 is read-modify-write of an aligned block. */
static void misaligned_write_is_read_modify_write(void **state)
{
	struct fixture *f = *state;
	uint8_t *base = malloc(8192), *patch = malloc(100), *r = malloc(8193);

	if (!strcmp(f->cfg->cache, "none"))
		assert_true(f->bs->file->request_alignment > 1); /* O_DIRECT: the test means something */
	fill(base, 8192, 2);
	fill(patch, 100, 3);
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, base, 8192, 0), 0);
	assert_int_equal(vd_bnode_pwrite(f->bs, 1000, patch, 100, 0), 0);
	memcpy(base + 1000, patch, 100);
	/* Read back into a misaligned buffer, at a misaligned offset and length. */
	assert_int_equal(vd_bnode_pread(f->bs, 1, r + 1, 8191), 0);
	assert_memory_equal(base + 1, r + 1, 8191);
	assert_int_equal(vd_bnode_pread(f->bs, 1099, r, 3), 0);
	assert_memory_equal(base + 1099, r, 3);
	free(base);
	free(patch);
	free(r);
}

/* ---- 16 overlapping misaligned writes at once ---- */

#define N_WRITERS 16
#define REGION 16384

struct writer {
	struct vd_bnode *bs;
	uint64_t off, len;
	uint8_t byte;
	int ret;
};

static void write_range(void *opaque)
{
	struct writer *w = opaque;
	uint8_t *buf = malloc(w->len);

	memset(buf, w->byte, w->len);
	w->ret = vd_bnode_co_pwrite(w->bs, w->off, buf, w->len, 0);
	free(buf);
}

static bool covers(const struct writer *w, uint64_t b)
{
	return b >= w->off && b < w->off + w->len;
}

/* Kahn's algorithm: is the "must come before" graph free of cycles? */
static bool acyclic(bool before[N_WRITERS][N_WRITERS])
{
	int indeg[N_WRITERS] = { 0 }, done = 0;
	bool removed[N_WRITERS] = { false };

	for (int a = 0; a < N_WRITERS; a++)
		for (int b = 0; b < N_WRITERS; b++)
			indeg[b] += before[a][b];
	for (bool progress = true; progress;) {
		progress = false;
		for (int a = 0; a < N_WRITERS; a++) {
			if (removed[a] || indeg[a])
				continue;
			removed[a] = progress = true;
			done++;
			for (int b = 0; b < N_WRITERS; b++)
				indeg[b] -= before[a][b];
		}
	}
	return done == N_WRITERS;
}

/*
 * The result must be what SOME serial order of the writes produces.  Every
 * byte must come from a writer covering it (0xEE, the old contents, where a
 * writer covers it means a write was lost), and the last writer of a byte
 * comes after every other writer covering it; those "after" relations must
 * not contradict each other.  A torn read-modify-write breaks one or the
 * other: it writes back stale bytes of a neighbour's write.
 */
static void check_serialisable(const uint8_t *data, const struct writer *w)
{
	static bool before[N_WRITERS][N_WRITERS];

	memset(before, 0, sizeof(before));
	for (uint64_t b = 0; b < REGION; b++) {
		int last = data[b] == 0xEE ? -1 : data[b] - 1;

		if (last >= N_WRITERS || (last >= 0 && !covers(&w[last], b)))
			fail_msg("byte %" PRIu64 " = 0x%02x, from no writer covering it", b, data[b]);
		for (int i = 0; i < N_WRITERS; i++) {
			if (!covers(&w[i], b) || i == last)
				continue;
			if (last < 0)
				fail_msg("byte %" PRIu64 " still old, but writer %d covers it: a write was lost", b, i);
			before[i][last] = true;
		}
	}
	assert_true(acyclic(before));
}

static void overlapping_misaligned_writes_serialise(void **state)
{
	struct fixture *f = *state;
	struct writer w[N_WRITERS];
	void *args[N_WRITERS];
	uint8_t *data = malloc(REGION);

	memset(data, 0xEE, REGION);
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, data, REGION, 0), 0);
	for (int i = 0; i < N_WRITERS; i++) {
		/* Odd offsets and lengths, each overlapping several others and sharing blocks. */
		uint64_t off = 37 + (uint64_t)(i * 733) % 9000;
		uint64_t len = 211 + (uint64_t)(i * 1553) % 5000;

		w[i] = (struct writer){ .bs = f->bs, .off = off, .len = len, .byte = (uint8_t)(i + 1), .ret = 1 };
		assert_true(off + len <= REGION);
		args[i] = &w[i];
	}
	run_parallel(N_WRITERS, write_range, args);
	for (int i = 0; i < N_WRITERS; i++)
		assert_int_equal(w[i].ret, 0);
	assert_int_equal(vd_bnode_pread(f->bs, 0, data, REGION), 0);
	check_serialisable(data, w);
	assert_null(f->bs->file->tracked);
	assert_int_equal(f->bs->file->serialising_reqs, 0);
	free(data);
}

/* ---- block status ---- */

static void block_status_sees_holes_and_data(void **state)
{
	struct fixture *f = *state;
	uint8_t *buf = malloc(65536);
	struct vd_bnode *file = NULL;
	uint64_t pnum, map;
	int ret;

	fill(buf, 65536, 4);
	assert_int_equal(vd_bnode_pwrite(f->bs, 1 << 20, buf, 65536, 0), 0);
	ret = vd_bnode_block_status(f->bs, 0, FILE_SIZE, &pnum, &map, &file);
	assert_true(ret & VD_BS_ZERO);
	assert_false(ret & VD_BS_DATA);
	assert_int_equal(pnum, 1 << 20);
	ret = vd_bnode_block_status(f->bs, 1 << 20, FILE_SIZE, &pnum, &map, &file);
	assert_true(ret & VD_BS_DATA);
	assert_true(ret & VD_BS_ALLOCATED);
	assert_true(ret & VD_BS_OFFSET_VALID);
	assert_int_equal(pnum, 65536);
	assert_int_equal(map, 1 << 20);
	assert_ptr_equal(file, f->bs->file);
	ret = vd_bnode_block_status(f->bs, (1 << 20) + 65536, FILE_SIZE, &pnum, &map, &file);
	assert_true(ret & VD_BS_ZERO);
	assert_true(ret & VD_BS_EOF);
	assert_int_equal(pnum, FILE_SIZE - (1 << 20) - 65536);
	assert_int_equal(vd_bnode_block_status(f->bs, FILE_SIZE, 512, &pnum, NULL, NULL), VD_BS_EOF);
	assert_int_equal(pnum, 0);
	free(buf);
}

static void write_zeroes_and_discard(void **state)
{
	struct fixture *f = *state;
	uint8_t *buf = malloc(131072), *zero = calloc(1, 131072);
	int ret;

	fill(buf, 131072, 5);
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, buf, 131072, 0), 0);
	assert_int_equal(vd_bnode_pwrite_zeroes(f->bs, 1000, 65536, VD_BREQ_MAY_UNMAP), 0);
	memset(buf + 1000, 0, 65536);
	assert_int_equal(vd_bnode_pread(f->bs, 0, zero, 131072), 0);
	assert_memory_equal(buf, zero, 131072);
	ret = vd_bnode_pdiscard(f->bs, 0, 131072);
	assert_true(ret == 0 || ret == -ENOTSUP);
	assert_int_equal(vd_bnode_pwrite_zeroes(f->bs, 0, 131072, 0), 0);
	assert_int_equal(vd_bnode_pread(f->bs, 0, buf, 131072), 0);
	memset(zero, 0, 131072);
	assert_memory_equal(buf, zero, 131072);
	free(buf);
	free(zero);
}

static void truncate_grows_the_node(void **state)
{
	struct fixture *f = *state;
	uint8_t w[4096], r[4096];

	fill(w, sizeof(w), 6);
	assert_int_equal(vd_bnode_truncate(f->bs, 2 * FILE_SIZE, true, "off"), 0);
	assert_int_equal(f->bs->size, 2 * FILE_SIZE);
	assert_int_equal(f->bs->file->size, 2 * FILE_SIZE);
	assert_int_equal(vd_bnode_pwrite(f->bs, 2 * FILE_SIZE - 4096, w, 4096, 0), 0);
	assert_int_equal(vd_bnode_pread(f->bs, 2 * FILE_SIZE - 4096, r, 4096), 0);
	assert_memory_equal(w, r, 4096);
	assert_int_equal(vd_bnode_pread(f->bs, 2 * FILE_SIZE - 1, r, 2), -EINVAL);
}

struct co_op {
	struct vd_bnode *bs;
	uint64_t off;
	uint8_t *buf;
	int ret;
	bool done;
};

static void co_read(void *opaque)
{
	struct co_op *o = opaque;

	o->ret = vd_bnode_co_pread(o->bs, o->off, o->buf, 4096);
	o->done = true;
}

static void co_grow(void *opaque)
{
	struct co_op *o = opaque;

	o->ret = vd_bnode_co_truncate(o->bs, o->off, false, "off");
	o->done = true;
}

/* Growing the file neither drains the node nor waits for a request in flight. */
static void growth_does_not_wait_for_requests_in_flight(void **state)
{
	struct fixture *f = *state;
	uint8_t *buf = vd_blk_alloc(4096), w[4096];
	struct co_op rd = { .bs = f->bs, .off = 4096, .buf = buf }, gr = { .bs = f->bs, .off = 3 * FILE_SIZE };

	assert_non_null(buf);
	vd_co_enter(vd_co_create(co_read, &rd));
	assert_false(rd.done); /* waits for its completion */
	vd_co_enter(vd_co_create(co_grow, &gr));
	assert_true(gr.done); /* did not yield */
	assert_int_equal(gr.ret, 0);
	assert_false(rd.done);
	while (!rd.done)
		vd_loop_run_once(vd_loop_get(), true);
	assert_int_equal(rd.ret, 0);
	assert_int_equal(f->bs->size, 3 * FILE_SIZE);
	fill(w, sizeof(w), 7);
	assert_int_equal(vd_bnode_pwrite(f->bs, 3 * FILE_SIZE - 4096, w, 4096, 0), 0);
	assert_int_equal(vd_bnode_pread(f->bs, 3 * FILE_SIZE - 4096, buf, 4096), 0);
	assert_memory_equal(w, buf, 4096);
	vd_blk_free(buf);
}

/* A file whose size is not a multiple of the O_DIRECT alignment still reads (and probes). */
static void odd_sized_file_reads_under_o_direct(void **state)
{
	struct fixture *f = *state;
	char path[4300];
	uint8_t w[1000], r[1000];
	struct vd_cache_mode none;
	struct vd_bnode *bs;
	FILE *fp;

	snprintf(path, sizeof(path), "%s/odd.raw", f->dir);
	fill(w, sizeof(w), 8);
	fp = fopen(path, "wb");
	assert_non_null(fp);
	assert_int_equal(fwrite(w, sizeof(w), 1, fp), 1);
	assert_int_equal(fclose(fp), 0);
	assert_int_equal(vd_cache_mode_parse(f->cfg->cache, &none), 0);
	bs = vd_bnode_open(path, NULL, &none, 0); /* probing reads the first 512 bytes */
	if (!bs)
		fail_msg("open: %s", vdisk_get_error_msg());
	assert_int_equal(bs->size, 1000);
	assert_int_equal(vd_bnode_pread(bs, 0, r, sizeof(r)), 0);
	assert_memory_equal(w, r, sizeof(r));
	vd_bnode_unref(bs);
}

/* ---- configuration-independent tests ---- */

static int plain_setup(void **state)
{
	static const struct cfg plain = { "io_uring", "writeback" };

	*state = (void *)&plain;
	return setup(state);
}

static void raw_window_shifts_and_bounds(void **state)
{
	struct fixture *f = *state;
	struct vd_bnode *win = open_raw(f->path, "io_uring", "writeback", "offset=4096,size=8k", VD_BO_RDWR);
	uint8_t w[512], r[512];

	assert_non_null(win);
	assert_int_equal(win->size, 8192);
	fill(w, sizeof(w), 7);
	assert_int_equal(vd_bnode_pwrite(win, 0, w, sizeof(w), 0), 0);
	assert_int_equal(vd_bnode_pread(f->bs, 4096, r, sizeof(r)), 0); /* seen through the full node */
	assert_memory_equal(w, r, sizeof(r));
	assert_int_equal(vd_bnode_pread(win, 8192 - 256, r, 512), -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "past the end"));
	assert_int_equal(vd_bnode_truncate(win, 1 << 20, true, NULL), -ENOTSUP);
	vd_bnode_unref(win);

	assert_null(open_raw(f->path, "io_uring", "writeback", "offset=4M,size=1", VD_BO_RDWR));
	assert_non_null(strstr(vdisk_get_error_msg(), "exceeds the file size"));
	assert_null(open_raw(f->path, "io_uring", "writeback", "offset=5M", VD_BO_RDWR));
	assert_non_null(strstr(vdisk_get_error_msg(), "past the end"));
	win = open_raw(f->path, "io_uring", "writeback", "offset=1M", 0);
	assert_non_null(win);
	assert_int_equal(win->size, FILE_SIZE - (1 << 20));
	vd_bnode_unref(win);
}

static void invalid_requests_fail_with_a_message(void **state)
{
	struct fixture *f = *state;
	uint8_t buf[16];

	assert_int_equal(vd_bnode_pread(f->bs, FILE_SIZE - 8, buf, 16), -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "past the end"));
	assert_int_equal(vd_bnode_pwrite(f->bs, UINT64_MAX - 4, buf, 16, 0), -EINVAL);
	assert_int_equal(vd_bnode_pwrite_zeroes(f->bs, FILE_SIZE, 1, 0), -EINVAL);
	f->bs->corrupt = true;
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, buf, 16, 0), -EIO);
	assert_non_null(strstr(vdisk_get_error_msg(), "corrupt"));
	f->bs->corrupt = false;
}

static void read_only_node_refuses_writes(void **state)
{
	struct fixture *f = *state;
	struct vd_bnode *ro = open_raw(f->path, "io_uring", "writeback", NULL, 0);
	uint8_t buf[512] = { 0 };

	assert_non_null(ro);
	assert_true(ro->read_only && ro->file->read_only);
	assert_int_equal(vd_bnode_pread(ro, 0, buf, sizeof(buf)), 0);
	assert_int_equal(vd_bnode_pwrite(ro, 0, buf, sizeof(buf), 0), -EACCES);
	assert_non_null(strstr(vdisk_get_error_msg(), "read-only"));
	assert_int_equal(vd_bnode_pdiscard(ro, 0, 4096), -EACCES);
	assert_int_equal(vd_bnode_flush(ro), 0);
	vd_bnode_unref(ro);
	ro = open_raw(f->path, "io_uring", "writeback", "read-only=on", VD_BO_RDWR);
	assert_non_null(ro);
	assert_true(ro->read_only && ro->file->read_only);
	vd_bnode_unref(ro);
}

static void writethrough_flushes_after_every_write(void **state)
{
	struct fixture *f = *state;
	struct vd_bnode *wt = open_raw(f->path, "io_uring", "writethrough", NULL, VD_BO_RDWR);
	uint8_t buf[4096] = { 1 };

	assert_non_null(wt);
	assert_false(wt->cache.writeback);
	assert_true(wt->file->cache.writeback); /* children are writeback; the top flushes them */
	for (int i = 0; i < 5; i++)
		assert_int_equal(vd_bnode_pwrite(wt, (uint64_t)i * 4096, buf, sizeof(buf), 0), 0);
	assert_int_equal(vd_bnode_pwrite_zeroes(wt, 0, 4096, 0), 0);
	assert_int_equal(wt->flush_ops, 6);
	assert_int_equal(wt->file->flush_ops, 6);
	vd_bnode_unref(wt);

	/* writeback: no flushes; FUA passes down (raw and file support it). */
	f->bs->flush_ops = f->bs->file->flush_ops = 0;
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, buf, sizeof(buf), 0), 0);
	assert_int_equal(vd_bnode_pwrite(f->bs, 0, buf, sizeof(buf), VD_BREQ_FUA), 0);
	assert_int_equal(f->bs->flush_ops, 0);
	assert_int_equal(vd_bnode_flush(f->bs), 0);
	assert_int_equal(f->bs->flush_ops, 1);
	assert_int_equal(f->bs->file->flush_ops, 1);
}

static void unsafe_drops_flushes(void **state)
{
	struct fixture *f = *state;
	struct vd_bnode *u = open_raw(f->path, "io_uring", "unsafe", NULL, VD_BO_RDWR);

	assert_non_null(u);
	assert_int_equal(vd_bnode_flush(u), 0);
	assert_int_equal(u->flush_ops, 0);
	assert_int_equal(u->file->flush_ops, 0);
	vd_bnode_unref(u);
}

static void probing_finds_raw(void **state)
{
	struct fixture *f = *state;
	struct vd_bnode *bs;

	assert_string_equal(vd_format_probe(f->path), "raw");
	bs = vd_bnode_open(f->path, NULL, NULL, 0);
	assert_non_null(bs);
	assert_string_equal(bs->fmt->name, "raw");
	assert_string_equal(bs->file->fmt->name, "file");
	assert_string_equal(bs->filename, f->path);
	assert_int_equal(bs->size, FILE_SIZE);
	vd_bnode_unref(bs);
	assert_null(vd_format_probe("/nonexistent/x"));
	assert_null(vd_bnode_open("/nonexistent/x", NULL, NULL, 0));
	assert_int_equal(errno, ENOENT);
}

static void bad_options_are_refused(void **state)
{
	struct fixture *f = *state;
	char spec[8192];

	assert_null(open_raw(f->path, "native", "writeback", NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "cache.direct"));
	assert_null(open_raw(f->path, "posix", "writeback", NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "invalid aio"));
	assert_null(vd_bnode_open("driver=nosuch,filename=x", NULL, NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "nosuch"));
	assert_null(vd_bnode_open("driver=raw", NULL, NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "needs a file"));
	snprintf(spec, sizeof(spec), "driver=raw,filename=%s", f->path);
	assert_null(vd_bnode_open(spec, "file", NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "was asked for"));
	snprintf(spec, sizeof(spec), "driver=raw,file.driver=file,file.filename=%s,file.aio-threads=2", f->path);
	assert_null(vd_bnode_open(spec, NULL, NULL, 0)); /* io_uring has no worker threads */
	assert_non_null(strstr(vdisk_get_error_msg(), "needs aio=threads"));
	snprintf(spec, sizeof(spec), "driver=raw,file.driver=file,file.filename=%s,file.aio=threads,file.aio-threads=0",
		 f->path);
	assert_null(vd_bnode_open(spec, NULL, NULL, 0));
	assert_non_null(strstr(vdisk_get_error_msg(), "aio-threads must be"));
}

static void aio_threads_sets_the_pool(void **state)
{
	struct fixture *f = *state;
	char spec[8192], w[4096], r[4096];
	struct vd_bnode *bs;

	snprintf(spec, sizeof(spec), "driver=raw,file.driver=file,file.filename=%s,file.aio=threads,file.aio-threads=1",
		 f->path);
	bs = vd_bnode_open(spec, NULL, NULL, VD_BO_RDWR);
	assert_non_null(bs);
	memset(w, 0x5a, sizeof(w));
	assert_int_equal(vd_bnode_pwrite(bs, 8192, w, sizeof(w), 0), 0);
	assert_int_equal(vd_bnode_pread(bs, 8192, r, sizeof(r)), 0);
	assert_memory_equal(w, r, sizeof(w));
	vd_bnode_unref(bs);
}

static void create_preallocates(void **state)
{
	struct fixture *f = *state;
	struct vd_create_opts o = { .size = 1 << 20 };
	char path[4300];
	struct stat st;

	snprintf(path, sizeof(path), "%s/full.raw", f->dir);
	o.filename = path;
	o.opts = json_pack("{s:s}", "preallocation", "full");
	assert_int_equal(vd_image_create("raw", &o), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_size, 1 << 20);
	assert_true(st.st_blocks * 512 >= 1 << 20);
	json_decref(o.opts);
	assert_int_equal(vd_create_file(path, 4096, "bogus"), -EINVAL);
	assert_int_equal(vd_image_create("nosuch", &o), -EINVAL);
}

#define PER_CFG(fn)                                                                                        \
	cmocka_unit_test_prestate_setup_teardown(fn, setup, teardown, (void *)&cfgs[0]),                   \
		cmocka_unit_test_prestate_setup_teardown(fn, setup, teardown, (void *)&cfgs[1]),           \
		cmocka_unit_test_prestate_setup_teardown(fn, setup, teardown, (void *)&cfgs[2]),           \
		cmocka_unit_test_prestate_setup_teardown(fn, setup, teardown, (void *)&cfgs[3])

#define PLAIN(fn) cmocka_unit_test_setup_teardown(fn, plain_setup, teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		PER_CFG(write_then_read_back),
		PER_CFG(misaligned_write_is_read_modify_write),
		PER_CFG(overlapping_misaligned_writes_serialise),
		PER_CFG(block_status_sees_holes_and_data),
		PER_CFG(write_zeroes_and_discard),
		PER_CFG(truncate_grows_the_node),
		PER_CFG(growth_does_not_wait_for_requests_in_flight),
		PER_CFG(odd_sized_file_reads_under_o_direct),
		PLAIN(raw_window_shifts_and_bounds),
		PLAIN(invalid_requests_fail_with_a_message),
		PLAIN(read_only_node_refuses_writes),
		PLAIN(writethrough_flushes_after_every_write),
		PLAIN(unsafe_drops_flushes),
		PLAIN(probing_finds_raw),
		PLAIN(bad_options_are_refused),
		PLAIN(aio_threads_sets_the_pool),
		PLAIN(create_preallocates),
	};
	int ret = cmocka_run_group_tests(tests, NULL, NULL);

	vd_loop_free_current();
	return ret;
}
