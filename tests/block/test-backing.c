/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Backing chains, through a tiny format registered only here ("fakebk"):
 * a 512-byte header (magic, size, backing file, backing format) followed by
 * the data; an all-zero 512-byte block is "unallocated" and reads from the
 * backing node.  qcow2 gets its own chain tests; these pin down the
 * framework's part: relative names, read-only backing, `backing` options,
 * loop detection, the depth cap, allocation through the chain.
 */
#include <limits.h>
#include <sys/stat.h>

#include "test-block-util.h"

#define MAGIC "FAKEBK\0"
#define BLK 512

struct header {
	char magic[8];
	uint64_t size;
	char backing[256];
	char backing_fmt[32];
};

static int fake_probe(const uint8_t *buf, size_t len)
{
	return len >= 8 && !memcmp(buf, MAGIC, 8) ? 100 : 0;
}

static int fake_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct header h;
	int ret = vd_bnode_pread(bs->file, 0, &h, sizeof(h));

	(void)opts;
	(void)flags;
	if (ret < 0)
		return ret;
	bs->size = h.size;
	snprintf(bs->backing_file, sizeof(bs->backing_file), "%.*s", (int)sizeof(h.backing), h.backing);
	snprintf(bs->backing_format, sizeof(bs->backing_format), "%.*s", (int)sizeof(h.backing_fmt), h.backing_fmt);
	return 0;
}

/* Unallocated (all-zero) blocks read from the backing node. */
static int fake_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	int ret = vd_bnode_co_preadv(bs->file, BLK + off, len, qiov, qiov_off, flags);

	for (uint64_t pos = 0; ret == 0 && pos < len; pos += BLK) {
		if (!vd_qiov_is_zero(qiov, qiov_off + pos, BLK) || !bs->backing || off + pos >= bs->backing->size)
			continue;
		ret = vd_bnode_co_preadv(bs->backing, off + pos, BLK, qiov, qiov_off + pos, 0);
	}
	return ret;
}

static int fake_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
			int flags)
{
	return vd_bnode_co_pwritev(bs->file, BLK + off, len, qiov, qiov_off, flags);
}

static int fake_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file)
{
	uint8_t buf[BLK];
	int ret = vd_bnode_co_pread(bs->file, BLK + off, buf, BLK);

	(void)len;
	(void)map;
	(void)file;
	if (ret < 0)
		return ret;
	*pnum = BLK;
	for (int i = 0; i < BLK; i++)
		if (buf[i])
			return VD_BS_DATA;
	return 0;
}

static const struct vd_format fake_format = {
	.name = "fakebk",
	.supports_backing = true,
	.probe = fake_probe,
	.open = fake_open,
	.co_preadv = fake_preadv,
	.co_pwritev = fake_pwritev,
	.co_block_status = fake_block_status,
};

static char dir[PATH_MAX];

static void make_image(const char *name, const char *backing, uint8_t fill_byte, int fill_block)
{
	struct header h = { .size = 4 * BLK };
	uint8_t block[BLK];
	char path[PATH_MAX + 64];
	FILE *f;

	memcpy(h.magic, MAGIC, 8);
	if (backing)
		snprintf(h.backing, sizeof(h.backing), "%s", backing);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	assert_non_null(f);
	memset(block, 0, sizeof(block));
	memcpy(block, &h, sizeof(h));
	assert_int_equal(fwrite(block, BLK, 1, f), 1);
	for (int i = 0; i < 4; i++) {
		memset(block, i == fill_block ? fill_byte : 0, BLK);
		assert_int_equal(fwrite(block, BLK, 1, f), 1);
	}
	assert_int_equal(fclose(f), 0);
}

static struct vd_bnode *open_image(const char *name, int flags)
{
	char path[PATH_MAX + 64];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return vd_bnode_open(path, NULL, NULL, flags);
}

static int setup(void **state)
{
	(void)state;
	make_tmpdir(dir, sizeof(dir));
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	rm_tmpdir(dir);
	return 0;
}

static void chain_reads_through_read_only_backing(void **state)
{
	uint8_t buf[2 * BLK];
	uint64_t pnum;
	struct vd_bnode *top;

	(void)state;
	make_image("base.fk", NULL, 0xAA, 0);
	make_image("top.fk", "base.fk", 0xBB, 1); /* relative to top's directory, not the cwd */
	top = open_image("top.fk", VD_BO_RDWR);
	if (!top)
		fail_msg("open: %s", vdisk_get_error_msg());
	assert_string_equal(top->fmt->name, "fakebk");
	assert_non_null(top->backing);
	assert_false(top->read_only);
	assert_true(top->backing->read_only && top->backing->file->read_only);
	assert_int_equal(vd_bnode_pread(top, 0, buf, sizeof(buf)), 0);
	assert_int_equal(buf[0], 0xAA);
	assert_int_equal(buf[BLK], 0xBB);

	/* Allocation: block 0 only in base, block 1 in top, block 2 nowhere. */
	assert_int_equal(vd_bnode_block_status(top, 0, BLK, &pnum, NULL, NULL) & VD_BS_ALLOCATED, 0);
	assert_true(vd_bnode_block_status(top, BLK, BLK, &pnum, NULL, NULL) & VD_BS_ALLOCATED);
	assert_int_equal(vd_bnode_is_allocated_above(top, NULL, 0, BLK, &pnum), 1);
	assert_int_equal(vd_bnode_is_allocated_above(top, top->backing, 0, BLK, &pnum), 0);
	assert_int_equal(vd_bnode_is_allocated_above(top, NULL, 2 * BLK, BLK, &pnum), 0);
	assert_int_equal(pnum, BLK);
	vd_bnode_unref(top);
}

static void expect_loop(const char *name, const char *culprit)
{
	struct vd_bnode *bs = open_image(name, 0);

	if (bs)
		fail_msg("%s opened despite a backing loop", name);
	assert_int_equal(errno, ELOOP);
	if (!strstr(vdisk_get_error_msg(), culprit) || !strstr(vdisk_get_error_msg(), "already in the backing chain"))
		fail_msg("message '%s' does not name '%s'", vdisk_get_error_msg(), culprit);
}

static void backing_loops_are_refused(void **state)
{
	char target[PATH_MAX + 64], link[PATH_MAX + 64];

	(void)state;
	make_image("self.fk", "self.fk", 1, 0);
	expect_loop("self.fk", "self.fk");
	make_image("a.fk", "b.fk", 1, 0);
	make_image("b.fk", "a.fk", 2, 0);
	expect_loop("a.fk", "a.fk");
	/* The same file under another name is still the same file. */
	snprintf(target, sizeof(target), "%s/c.fk", dir);
	snprintf(link, sizeof(link), "%s/c-alias.fk", dir);
	assert_int_equal(symlink(target, link), 0);
	make_image("c.fk", "c-alias.fk", 3, 0);
	expect_loop("c.fk", "c-alias.fk");
}

/* 300 images in a chain: deeper than VD_MAX_BACKING_DEPTH. */
static void deep_chains_are_capped(void **state)
{
	char name[32], backing[32];
	struct vd_bnode *bs;

	(void)state;
	make_image("d0.fk", NULL, 1, 0);
	for (int i = 1; i < VD_MAX_BACKING_DEPTH + 10; i++) {
		snprintf(name, sizeof(name), "d%d.fk", i);
		snprintf(backing, sizeof(backing), "d%d.fk", i - 1);
		make_image(name, backing, 1, 0);
	}
	snprintf(name, sizeof(name), "d%d.fk", VD_MAX_BACKING_DEPTH + 9);
	bs = open_image(name, 0);
	assert_null(bs);
	assert_int_equal(errno, ELOOP);
	assert_non_null(strstr(vdisk_get_error_msg(), "deeper than"));
	/* Within the cap it opens. */
	snprintf(name, sizeof(name), "d%d.fk", VD_MAX_BACKING_DEPTH - 2);
	bs = open_image(name, 0);
	if (!bs)
		fail_msg("open: %s", vdisk_get_error_msg());
	vd_bnode_unref(bs);
}

static void backing_option_controls_the_backing(void **state)
{
	char spec[3 * PATH_MAX];
	uint8_t buf[BLK];
	struct vd_bnode *bs;

	(void)state;
	make_image("base.fk", NULL, 0xAA, 0);
	make_image("other.fk", NULL, 0xCC, 0);
	make_image("top.fk", "base.fk", 0xBB, 1);

	snprintf(spec, sizeof(spec), "driver=fakebk,file.filename=%s/top.fk,backing=", dir);
	bs = vd_bnode_open(spec, NULL, NULL, 0);
	assert_non_null(bs);
	assert_null(bs->backing); /* backing="" (or JSON null): none */
	vd_bnode_unref(bs);

	snprintf(spec, sizeof(spec), "json:{\"driver\": \"fakebk\", \"file\": {\"filename\": \"%s/top.fk\"}, \"backing\": null}", dir);
	bs = vd_bnode_open(spec, NULL, NULL, 0);
	assert_non_null(bs);
	assert_null(bs->backing);
	vd_bnode_unref(bs);

	snprintf(spec, sizeof(spec), "driver=fakebk,file.filename=%s/top.fk,backing.file.filename=%s/other.fk", dir, dir);
	bs = vd_bnode_open(spec, NULL, NULL, 0);
	if (!bs)
		fail_msg("open: %s", vdisk_get_error_msg());
	assert_non_null(bs->backing);
	assert_int_equal(vd_bnode_pread(bs, 0, buf, BLK), 0);
	assert_int_equal(buf[0], 0xCC);
	vd_bnode_unref(bs);

	bs = open_image("top.fk", VD_BO_NO_BACKING);
	assert_non_null(bs);
	assert_null(bs->backing);
	vd_bnode_unref(bs);
}

static void missing_backing_file_is_an_error(void **state)
{
	(void)state;
	make_image("orphan.fk", "gone.fk", 1, 0);
	assert_null(open_image("orphan.fk", 0));
	assert_int_equal(errno, ENOENT);
	assert_non_null(strstr(vdisk_get_error_msg(), "cannot open backing file"));
	assert_non_null(strstr(vdisk_get_error_msg(), "gone.fk"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(chain_reads_through_read_only_backing, setup, teardown),
		cmocka_unit_test_setup_teardown(backing_loops_are_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(deep_chains_are_capped, setup, teardown),
		cmocka_unit_test_setup_teardown(backing_option_controls_the_backing, setup, teardown),
		cmocka_unit_test_setup_teardown(missing_backing_file_is_an_error, setup, teardown),
	};
	int ret;

	assert_int_equal(vd_format_register(&fake_format), 0);
	ret = cmocka_run_group_tests(tests, NULL, NULL);
	vd_loop_free_current();
	return ret;
}
