/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2-io: drive an image through the block layer (qemu-io style) for the
 * qcow2 tests.
 *
 *   qcow2-io [options] IMAGE -c CMD [-c CMD ...]
 *   qcow2-io --create FILE SIZE [-o key=value,...]
 *
 * Options: -f FMT (default: probe), -r (read-only), -t CACHE (writeback),
 *          -U (no backing), -O key=value,... (node options, dotted),
 *          --check (open with VD_BO_CHECK).
 * Commands (offsets/lengths accept k/M/G suffixes):
 *   write [-P byte] [-c] [-F] OFF LEN   -c: compressed, -F: FUA
 *   read [-P byte] OFF LEN              verify every byte when -P is given
 *   dump OFF LEN FILE                   write the data read to FILE
 *   zero [-u] [-n] OFF LEN              -u: may unmap, -n: no fallback
 *   discard OFF LEN
 *   flush
 *   map                                 block status, one JSON object per line
 *   check [-r leaks|all]                JSON result
 *   info                                format-specific JSON
 *   snapshot -c NAME | -l | -a NAME | -d NAME
 *   truncate SIZE [PREALLOC]
 *   amend key=value,...
 *   backing FILE|- [FMT]                change the backing file name (- removes it)
 *   stats                               I/O counters of the protocol node
 *   parallel CMD; CMD; ...              run the commands concurrently
 * Exit status: 0 ok, 1 a command failed (message on stderr), 2 usage.
 *
 * Crash simulation: with VDISK_FAULT_DROP_WRITES_AFTER=N the image's file
 * is wrapped in the "blkdrop" filter (registered here only), which passes
 * the first N writes (write / write-zeroes / discard) and silently drops
 * every later one.  The program then _exits without closing, as a crash
 * would, and prints "durable-upto K" on stdout: the number of commands
 * whose effects a completed flush made durable before the first drop.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block.h"
#include "coroutine.h"
#include "loop.h"

/* ---- blkdrop filter ---------------------------------------------------------------- */

static long drop_after = -1; /* -1: off */
static long writes_seen;
static bool drop_started;

static bool drop_this(void)
{
	if (drop_after < 0)
		return false;
	if (writes_seen++ >= drop_after) {
		drop_started = true;
		return true;
	}
	return false;
}

static int drop_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	(void)opts;
	(void)flags;
	bs->size = bs->file->size;
	bs->request_alignment = bs->file->request_alignment;
	return 0;
}

static int drop_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags)
{
	return vd_bnode_co_preadv(bs->file, off, len, qiov, qoff, flags);
}

static int drop_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags)
{
	if (drop_this())
		return 0;
	return vd_bnode_co_pwritev(bs->file, off, len, qiov, qoff, flags);
}

static int drop_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	if (drop_this())
		return 0;
	return vd_bnode_co_pwrite_zeroes(bs->file, off, len, flags);
}

static int drop_discard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	if (drop_this())
		return 0;
	return vd_bnode_co_pdiscard(bs->file, off, len);
}

static int drop_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file)
{
	*pnum = len;
	*map = off;
	*file = bs->file;
	return VD_BS_RECURSE | VD_BS_OFFSET_VALID;
}

static int drop_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	int ret = vd_bnode_co_truncate(bs->file, size, exact, prealloc);

	bs->size = bs->file->size;
	return ret;
}

static int64_t drop_allocated(struct vd_bnode *bs)
{
	return vd_bnode_allocated_size(bs->file);
}

static const struct vd_format blkdrop = {
	.name = "blkdrop",
	.supports_fua = true,
	.open = drop_open,
	.co_preadv = drop_preadv,
	.co_pwritev = drop_pwritev,
	.co_pwrite_zeroes = drop_zeroes,
	.co_pdiscard = drop_discard,
	.co_block_status = drop_block_status,
	.co_truncate = drop_truncate,
	.get_allocated_size = drop_allocated,
};

/* ---- helpers ----------------------------------------------------------------------- */

static struct vd_bnode *bs;
static int n_cmds_done;
static int durable_upto; /* commands made durable by a flush before the first drop */

static int parse_num(const char *s, uint64_t *out)
{
	if (vd_parse_size(s, out) < 0) {
		fprintf(stderr, "qcow2-io: bad number '%s'\n", s);
		return -EINVAL;
	}
	return 0;
}

static int split_args(char *line, char **argv, int max)
{
	int n = 0;
	char *save = NULL;

	for (char *t = strtok_r(line, " \t", &save); t && n < max - 1; t = strtok_r(NULL, " \t", &save))
		argv[n++] = t;
	argv[n] = NULL;
	return n;
}

static void *xalloc(size_t len)
{
	void *p = vd_blk_alloc(len ? len : 1);

	if (!p) {
		fprintf(stderr, "qcow2-io: out of memory\n");
		exit(1);
	}
	return p;
}

static int fail(const char *what, int ret)
{
	fprintf(stderr, "qcow2-io: %s: %s (%s)\n", what, vdisk_get_error_msg(), strerror(-ret));
	return ret;
}

/* ---- commands (run in a coroutine) -------------------------------------------------- */

static int cmd_write(int argc, char **argv)
{
	int pat = 0xcd, flags = 0, i;
	uint64_t off, len;
	struct vd_qiov q;
	uint8_t *buf;
	int ret;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "-P") && i + 1 < argc)
			pat = (int)strtol(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "-c"))
			flags |= VD_BREQ_COMPRESSED;
		else if (!strcmp(argv[i], "-F"))
			flags |= VD_BREQ_FUA;
		else
			return -EINVAL;
	}
	if (argc - i != 2 || parse_num(argv[i], &off) || parse_num(argv[i + 1], &len))
		return -EINVAL;
	buf = xalloc(len);
	memset(buf, pat, len);
	vd_qiov_init_buf(&q, buf, len);
	ret = vd_bnode_co_pwritev(bs, off, len, &q, 0, flags);
	vd_qiov_destroy(&q);
	vd_blk_free(buf);
	return ret < 0 ? fail("write", ret) : 0;
}

static int cmd_read(int argc, char **argv)
{
	int pat = -1, i;
	uint64_t off, len;
	uint8_t *buf;
	int ret;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "-P") && i + 1 < argc)
			pat = (int)strtol(argv[++i], NULL, 0);
		else
			return -EINVAL;
	}
	if (argc - i != 2 || parse_num(argv[i], &off) || parse_num(argv[i + 1], &len))
		return -EINVAL;
	buf = xalloc(len);
	ret = vd_bnode_co_pread(bs, off, buf, len);
	if (ret < 0) {
		vd_blk_free(buf);
		return fail("read", ret);
	}
	if (pat >= 0) {
		for (uint64_t k = 0; k < len; k++) {
			if (buf[k] != (uint8_t)pat) {
				fprintf(stderr, "qcow2-io: pattern mismatch at %" PRIu64 ": 0x%02x != 0x%02x\n", off + k,
					buf[k], pat & 0xff);
				vd_blk_free(buf);
				return -EILSEQ;
			}
		}
	}
	vd_blk_free(buf);
	return 0;
}

static int cmd_dump(int argc, char **argv)
{
	uint64_t off, len;
	uint8_t *buf;
	FILE *f;
	int ret;

	if (argc != 4 || parse_num(argv[1], &off) || parse_num(argv[2], &len))
		return -EINVAL;
	buf = xalloc(len);
	ret = vd_bnode_co_pread(bs, off, buf, len);
	if (ret < 0) {
		vd_blk_free(buf);
		return fail("read", ret);
	}
	f = fopen(argv[3], "wb");
	if (!f || fwrite(buf, 1, len, f) != len) {
		perror(argv[3]);
		ret = -EIO;
	}
	if (f)
		fclose(f);
	vd_blk_free(buf);
	return ret;
}

static int cmd_zero(int argc, char **argv)
{
	int flags = 0, i;
	uint64_t off, len;
	int ret;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "-u"))
			flags |= VD_BREQ_MAY_UNMAP;
		else if (!strcmp(argv[i], "-n"))
			flags |= VD_BREQ_NO_FALLBACK;
		else
			return -EINVAL;
	}
	if (argc - i != 2 || parse_num(argv[i], &off) || parse_num(argv[i + 1], &len))
		return -EINVAL;
	ret = vd_bnode_co_pwrite_zeroes(bs, off, len, flags);
	return ret < 0 ? fail("zero", ret) : 0;
}

static int cmd_discard(int argc, char **argv)
{
	uint64_t off, len;
	int ret;

	if (argc != 3 || parse_num(argv[1], &off) || parse_num(argv[2], &len))
		return -EINVAL;
	ret = vd_bnode_co_pdiscard(bs, off, len);
	return ret < 0 ? fail("discard", ret) : 0;
}

static int cmd_flush(int argc, char **argv)
{
	int ret = vd_bnode_co_flush(bs);

	(void)argc;
	(void)argv;
	if (ret < 0)
		return fail("flush", ret);
	if (!drop_started)
		durable_upto = n_cmds_done + 1;
	return 0;
}

static int cmd_map(int argc, char **argv)
{
	uint64_t off = 0;

	(void)argc;
	(void)argv;
	while (off < bs->size) {
		uint64_t pnum = 0, map = 0;
		struct vd_bnode *file = NULL;
		int ret = vd_bnode_co_block_status(bs, off, bs->size - off, &pnum, &map, &file);
		if (ret < 0)
			return fail("block status", ret);
		printf("{\"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"data\": %s, \"zero\": %s, \"allocated\": %s",
		       off, pnum, (ret & VD_BS_DATA) ? "true" : "false", (ret & VD_BS_ZERO) ? "true" : "false",
		       (ret & VD_BS_ALLOCATED) ? "true" : "false");
		if (ret & VD_BS_OFFSET_VALID)
			printf(", \"offset\": %" PRIu64, map);
		printf("}\n");
		off += pnum;
	}
	return 0;
}

static int cmd_check(int argc, char **argv)
{
	struct vd_check_result r;
	int fix = 0, ret;

	if (argc == 3 && !strcmp(argv[1], "-r")) {
		if (!strcmp(argv[2], "leaks"))
			fix = VD_CHECK_FIX_LEAKS;
		else if (!strcmp(argv[2], "all"))
			fix = VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS;
		else
			return -EINVAL;
	} else if (argc != 1) {
		return -EINVAL;
	}
	memset(&r, 0, sizeof(r));
	ret = bs->fmt->co_check ? bs->fmt->co_check(bs, &r, fix) : -ENOTSUP;
	printf("{\"corruptions\": %" PRId64 ", \"leaks\": %" PRId64 ", \"check-errors\": %" PRId64
	       ", \"corruptions-fixed\": %" PRId64 ", \"leaks-fixed\": %" PRId64 ", \"image-end-offset\": %" PRId64
	       ", \"total-clusters\": %" PRId64 ", \"allocated-clusters\": %" PRId64 ", \"fragmented-clusters\": %" PRId64
	       ", \"compressed-clusters\": %" PRId64 "}\n",
	       r.corruptions, r.leaks, r.check_errors, r.corruptions_fixed, r.leaks_fixed, r.image_end_offset,
	       r.total_clusters, r.allocated_clusters, r.fragmented_clusters, r.compressed_clusters);
	return ret < 0 ? fail("check", ret) : 0;
}

static int cmd_info(int argc, char **argv)
{
	json_t *o = json_object();
	char *s;
	int ret;

	(void)argc;
	(void)argv;
	json_object_set_new(o, "virtual-size", json_integer((json_int_t)bs->size));
	json_object_set_new(o, "backing-filename", json_string(bs->backing_file));
	json_object_set_new(o, "backing-format", json_string(bs->backing_format));
	json_object_set_new(o, "corrupt", json_boolean(bs->corrupt));
	ret = bs->fmt->get_info ? bs->fmt->get_info(bs, o) : 0;
	s = json_dumps(o, JSON_SORT_KEYS | JSON_COMPACT);
	printf("%s\n", s);
	free(s);
	json_decref(o);
	return ret < 0 ? fail("info", ret) : 0;
}

static int cmd_snapshot(int argc, char **argv)
{
	int ret;

	/* A damaged magic probes as raw, which has no snapshot operations. */
	if (!bs->fmt->snapshot_list || !bs->fmt->snapshot_create || !bs->fmt->snapshot_goto ||
	    !bs->fmt->snapshot_delete)
		return fail("snapshot", -ENOTSUP);
	if (argc == 2 && !strcmp(argv[1], "-l")) {
		struct vd_snapshot_info *l = NULL;
		int n = 0;
		ret = bs->fmt->snapshot_list(bs, &l, &n);
		if (ret < 0)
			return fail("snapshot list", ret);
		for (int i = 0; i < n; i++)
			printf("{\"id\": \"%s\", \"name\": \"%s\", \"vm-state-size\": %" PRIu64 ", \"date-sec\": %" PRIu64
			       ", \"icount\": %" PRIu64 "}\n",
			       l[i].id, l[i].name, l[i].vm_state_size, l[i].date_sec, l[i].icount);
		free(l);
		return 0;
	}
	if (argc != 3)
		return -EINVAL;
	if (!strcmp(argv[1], "-c"))
		ret = bs->fmt->snapshot_create(bs, argv[2]);
	else if (!strcmp(argv[1], "-a"))
		ret = bs->fmt->snapshot_goto(bs, argv[2]);
	else if (!strcmp(argv[1], "-d"))
		ret = bs->fmt->snapshot_delete(bs, argv[2]);
	else
		return -EINVAL;
	return ret < 0 ? fail("snapshot", ret) : 0;
}

static int cmd_truncate(int argc, char **argv)
{
	uint64_t size;
	int ret;

	if ((argc != 2 && argc != 3) || parse_num(argv[1], &size))
		return -EINVAL;
	ret = vd_bnode_co_truncate(bs, size, true, argc == 3 ? argv[2] : "off");
	return ret < 0 ? fail("truncate", ret) : 0;
}

static int cmd_amend(int argc, char **argv)
{
	json_t *o;
	int ret;

	if (argc != 2)
		return -EINVAL;
	o = vd_opts_parse(argv[1]);
	if (!o)
		return fail("amend options", -EINVAL);
	ret = bs->fmt->co_amend ? bs->fmt->co_amend(bs, o) : -ENOTSUP;
	json_decref(o);
	return ret < 0 ? fail("amend", ret) : 0;
}

static int cmd_backing(int argc, char **argv)
{
	int ret;

	if (argc != 2 && argc != 3)
		return -EINVAL;
	if (!bs->fmt->co_change_backing)
		return fail("backing", -ENOTSUP);
	ret = bs->fmt->co_change_backing(bs, strcmp(argv[1], "-") ? argv[1] : NULL, argc == 3 ? argv[2] : NULL);
	return ret < 0 ? fail("backing", ret) : 0;
}

static int cmd_stats(int argc, char **argv)
{
	struct vd_bnode *f = bs->file;

	(void)argc;
	(void)argv;
	while (f && f->file)
		f = f->file;
	if (f)
		printf("{\"file-reads\": %" PRIu64 ", \"file-writes\": %" PRIu64 ", \"file-flushes\": %" PRIu64
		       ", \"file-discards\": %" PRIu64 "}\n",
		       f->rd_ops, f->wr_ops, f->flush_ops, f->discard_ops);
	return 0;
}

static int run_line(char *line);

struct par_group {
	int pending;
	struct vd_co_queue wq;
};

struct par {
	char *line;
	int ret;
	struct par_group *g;
};

static void par_entry(void *arg)
{
	struct par *p = arg;

	p->ret = run_line(p->line);
	if (--p->g->pending == 0)
		vd_co_queue_wake_all(&p->g->wq);
}

static int cmd_parallel(char *rest)
{
	struct par ps[64];
	struct par_group g;
	int n = 0, ret = 0;
	char *save = NULL;

	for (char *t = strtok_r(rest, ";", &save); t && n < 64; t = strtok_r(NULL, ";", &save))
		ps[n++].line = t;
	g.pending = n;
	vd_co_queue_init(&g.wq);
	for (int i = 0; i < n; i++) {
		struct vd_co *co;
		ps[i].g = &g;
		ps[i].ret = 0;
		co = vd_co_create(par_entry, &ps[i]);
		if (!co)
			return -ENOMEM;
		vd_co_enter(co);
	}
	while (g.pending)
		vd_co_queue_wait(&g.wq, NULL);
	for (int i = 0; i < n; i++)
		if (ps[i].ret < 0 && !ret)
			ret = ps[i].ret;
	return ret;
}

static int run_line(char *line)
{
	char copy[4096], *argv[32];
	int argc;

	while (*line == ' ' || *line == '\t')
		line++;
	if (!strncmp(line, "parallel ", 9)) {
		snprintf(copy, sizeof(copy), "%s", line + 9);
		return cmd_parallel(copy);
	}
	snprintf(copy, sizeof(copy), "%s", line);
	argc = split_args(copy, argv, 32);
	if (argc == 0)
		return 0;
	if (!strcmp(argv[0], "write"))
		return cmd_write(argc, argv);
	if (!strcmp(argv[0], "read"))
		return cmd_read(argc, argv);
	if (!strcmp(argv[0], "dump"))
		return cmd_dump(argc, argv);
	if (!strcmp(argv[0], "zero"))
		return cmd_zero(argc, argv);
	if (!strcmp(argv[0], "discard"))
		return cmd_discard(argc, argv);
	if (!strcmp(argv[0], "flush"))
		return cmd_flush(argc, argv);
	if (!strcmp(argv[0], "map"))
		return cmd_map(argc, argv);
	if (!strcmp(argv[0], "check"))
		return cmd_check(argc, argv);
	if (!strcmp(argv[0], "info"))
		return cmd_info(argc, argv);
	if (!strcmp(argv[0], "snapshot"))
		return cmd_snapshot(argc, argv);
	if (!strcmp(argv[0], "truncate"))
		return cmd_truncate(argc, argv);
	if (!strcmp(argv[0], "amend"))
		return cmd_amend(argc, argv);
	if (!strcmp(argv[0], "backing"))
		return cmd_backing(argc, argv);
	if (!strcmp(argv[0], "stats"))
		return cmd_stats(argc, argv);
	fprintf(stderr, "qcow2-io: unknown command '%s'\n", argv[0]);
	return -EINVAL;
}

struct run_all {
	char **cmds;
	int n;
	int ret;
};

static void run_all_entry(void *arg)
{
	struct run_all *r = arg;

	for (int i = 0; i < r->n; i++) {
		char buf[4096];
		snprintf(buf, sizeof(buf), "%s", r->cmds[i]);
		r->ret = run_line(buf);
		if (r->ret < 0) {
			if (r->ret == -EINVAL)
				fprintf(stderr, "qcow2-io: command failed: %s\n", r->cmds[i]);
			return;
		}
		n_cmds_done = i + 1;
	}
}

/* ---- main ------------------------------------------------------------------------------ */

static int do_create(int argc, char **argv)
{
	struct vd_create_opts o = { 0 };
	const char *fmt = "qcow2";
	json_t *opts = NULL;
	uint64_t size;
	int ret;

	if (argc < 2)
		return 2;
	o.filename = argv[0];
	if (parse_num(argv[1], &size))
		return 2;
	o.size = size;
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "-o") && i + 1 < argc) {
			opts = vd_opts_parse(argv[++i]);
			if (!opts) {
				fprintf(stderr, "qcow2-io: bad options: %s\n", vdisk_get_error_msg());
				return 2;
			}
		} else if (!strcmp(argv[i], "-f") && i + 1 < argc) {
			fmt = argv[++i];
		} else {
			return 2;
		}
	}
	o.opts = opts ? opts : json_object();
	ret = vd_image_create(fmt, &o);
	json_decref(o.opts);
	if (ret < 0) {
		fprintf(stderr, "qcow2-io: create: %s\n", vdisk_get_error_msg());
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *fmt = NULL, *cache = "writeback", *extra = NULL, *env;
	int flags = VD_BO_RDWR, ncmds = 0;
	char **cmds;
	struct vd_cache_mode mode;
	struct run_all ra;
	char spec[8192];
	int i;

	if (argc >= 2 && !strcmp(argv[1], "--create"))
		return do_create(argc - 2, argv + 2);
	cmds = calloc((size_t)argc + 1, sizeof(*cmds));
	if (!cmds)
		return 1;
	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "-f") && i + 1 < argc)
			fmt = argv[++i];
		else if (!strcmp(argv[i], "-r"))
			flags &= ~VD_BO_RDWR;
		else if (!strcmp(argv[i], "-U"))
			flags |= VD_BO_NO_BACKING;
		else if (!strcmp(argv[i], "--check"))
			flags |= VD_BO_CHECK;
		else if (!strcmp(argv[i], "-t") && i + 1 < argc)
			cache = argv[++i];
		else if (!strcmp(argv[i], "-O") && i + 1 < argc)
			extra = argv[++i];
		else {
			fprintf(stderr, "usage: qcow2-io [-f FMT] [-r] [-U] [-t CACHE] [-O opts] IMAGE -c CMD...\n");
			return free(cmds), 2;
		}
	}
	if (i >= argc)
		return free(cmds), 2;
	const char *image = argv[i++];
	for (; i < argc; i++) {
		if (!strcmp(argv[i], "-c") && i + 1 < argc) {
			cmds[ncmds++] = argv[++i];
		} else {
			fprintf(stderr, "qcow2-io: unexpected argument '%s'\n", argv[i]);
			return free(cmds), 2;
		}
	}
	if (vd_cache_mode_parse(cache, &mode) < 0) {
		fprintf(stderr, "qcow2-io: bad cache mode %s\n", cache);
		return free(cmds), 2;
	}
	env = getenv("VDISK_FAULT_DROP_WRITES_AFTER");
	if (env) {
		drop_after = strtol(env, NULL, 0);
		if (vd_format_register(&blkdrop) < 0) {
			fprintf(stderr, "qcow2-io: %s\n", vdisk_get_error_msg());
			return free(cmds), 1;
		}
		snprintf(spec, sizeof(spec), "driver=%s,file.driver=blkdrop,file.file.driver=file,file.file.filename=%s%s%s",
			 fmt ? fmt : "qcow2", image, extra ? "," : "", extra ? extra : "");
	} else if (extra || fmt) {
		snprintf(spec, sizeof(spec), "driver=%s,file.driver=file,file.filename=%s%s%s", fmt ? fmt : "qcow2", image,
			 extra ? "," : "", extra ? extra : "");
	} else {
		snprintf(spec, sizeof(spec), "%s", image);
	}
	bs = vd_bnode_open(spec, NULL, &mode, flags);
	if (!bs) {
		fprintf(stderr, "qcow2-io: cannot open %s: %s\n", image, vdisk_get_error_msg());
		free(cmds);
		return 1;
	}
	ra.cmds = cmds;
	ra.n = ncmds;
	ra.ret = 0;
	vd_co_run_sync(run_all_entry, &ra);
	if (drop_after >= 0) {
		printf("durable-upto %d\n", durable_upto);
		printf("writes-seen %ld\n", writes_seen);
		fflush(stdout);
		_exit(ra.ret < 0 ? 1 : 0); /* a crash: nothing more reaches the disk */
	}
	vd_bnode_unref(bs);
	free(cmds);
	return ra.ret < 0 ? 1 : 0;
}
