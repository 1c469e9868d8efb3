/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk rebase [-f FMT | --image-opts] [-t CACHE] [-T CACHE] [-p] [-q] [-u]
 *              -b BACKING [-F BACKING_FMT] FILE
 *
 * As qemu-img rebase.  Safe mode (the default): for every range FILE does
 * not have allocated, compare what the old backing chain and the new
 * backing file read there, and copy the old content into FILE where they
 * differ, so the guest-visible content does not change; then rewrite the
 * backing file name (and format) in FILE's header.  -u (unsafe) only
 * rewrites the header (to fix a moved or renamed backing file).
 * -b "" removes the backing file (FILE becomes standalone).
 *
 * Unlike qemu-img, a missing -F is not an error when the new backing file
 * can be opened: its format is probed and recorded.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static const char *const CMD = "rebase";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk rebase [-f FMT | --image-opts] [-t CACHE] [-T CACHE] [-p] [-q] [-u]\n"
		"                    -b BACKING_FILE [-F BACKING_FMT] FILE\n"
		"\n"
		"Change the backing file of the disk image FILE.\n"
		"\n"
		"  -f, --format FMT          format of FILE (default: probed)\n"
		"  --image-opts              FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -b, --backing BACKING_FILE\n"
		"                            the new backing file (\"\" for none); relative names are\n"
		"                            relative to FILE's directory\n"
		"  -F, --backing-format FMT  format of BACKING_FILE (default: probed and recorded)\n"
		"  -u, --backing-unsafe      only rewrite the header: the old and new backing files\n"
		"                            are assumed to have the same content\n"
		"  -t, --cache CACHE         cache mode of FILE (default: writeback)\n"
		"  -T, --backing-cache CACHE cache mode of the backing files (default: writeback)\n"
		"  -p, --progress            show progress\n"
		"  -q, --quiet               print nothing but errors\n"
		"  -U, --force-share         accepted for qemu-img compatibility\n"
		"  -h, --help                show this help\n"
		"\n"
		"Exit status: 0 rebased, 1 error, 2 usage error.\n");
}

struct rebase_state {
	struct vd_bnode *bs;          /* FILE, read-write, with its old chain */
	struct vd_bnode *new_backing; /* NULL: none */
	const char *backing_name;     /* as recorded in the header ("" = none) */
	const char *backing_fmt;
	bool unsafe;
	uint8_t *buf_old, *buf_new;
};

/* Copy into FILE whatever reads differently through the old and the new backing. */
static int rebase_copy(struct rebase_state *s)
{
	struct vd_bnode *old = s->bs->backing;
	uint64_t size = s->bs->size;
	uint64_t old_size = old ? old->size : 0;
	uint64_t new_size = s->new_backing ? s->new_backing->size : 0;
	uint64_t off, n;
	int ret;

	for (off = 0; off < size; off += n) {
		uint64_t n_old, n_new, written = 0;
		bool old_eof = false;

		n = size - off;
		if (n > IMG_IO_BUF_SIZE)
			n = IMG_IO_BUF_SIZE;
		/* allocated in FILE: the backing file does not show there */
		ret = img_co_block_status(s->bs, off, n, &n, NULL, NULL);
		if (ret < 0) {
			img_err(CMD, "error while reading image metadata: %s", img_errmsg(ret));
			return ret;
		}
		if (ret & VD_BS_ALLOCATED)
			continue;

		n_old = off < old_size ? (old_size - off < n ? old_size - off : n) : 0;
		n_new = off < new_size ? (new_size - off < n ? new_size - off : n) : 0;
		memset(s->buf_old + n_old, 0, n - n_old);
		if (!n_old) {
			old_eof = true;
		} else {
			ret = vd_bnode_co_pread(old, off, s->buf_old, n_old);
			if (ret < 0) {
				img_err(CMD, "error while reading from old backing file: %s", img_errmsg(ret));
				return ret;
			}
		}
		memset(s->buf_new + n_new, 0, n - n_new);
		if (n_new) {
			ret = vd_bnode_co_pread(s->new_backing, off, s->buf_new, n_new);
			if (ret < 0) {
				img_err(CMD, "error while reading from new backing file: %s", img_errmsg(ret));
				return ret;
			}
		}
		while (written < n) {
			uint64_t pnum;

			if (img_compare_buffers(s->buf_old + written, s->buf_new + written, n - written, 0, &pnum)) {
				if (old_eof)
					ret = vd_bnode_co_pwrite_zeroes(s->bs, off + written, pnum, 0);
				else
					ret = vd_bnode_co_pwrite(s->bs, off + written, s->buf_old + written, pnum, 0);
				if (ret < 0) {
					img_err(CMD, "Error while writing to COW image: %s", img_errmsg(ret));
					return ret;
				}
			}
			written += pnum;
			if (off + written >= old_size)
				old_eof = true;
		}
		img_progress_print(100.0 * (double)(off + n) / (double)size);
	}
	return 0;
}

static int rebase_co(void *opaque)
{
	struct rebase_state *s = opaque;
	int ret;

	if (!s->unsafe) {
		ret = rebase_copy(s);
		if (ret < 0)
			return ret;
		ret = vd_bnode_co_flush(s->bs);
		if (ret < 0) {
			img_err(CMD, "error while flushing: %s", img_errmsg(ret));
			return ret;
		}
	}
	img_clear_err();
	ret = s->bs->fmt->co_change_backing(s->bs, s->backing_name[0] ? s->backing_name : NULL,
					    s->backing_name[0] ? s->backing_fmt : NULL);
	if (ret == -ENOSPC)
		img_err(CMD, "Could not change the backing file to '%s': No space left in the file header",
			s->backing_name);
	else if (ret < 0)
		img_err(CMD, "Could not change the backing file to '%s': %s", s->backing_name, img_errmsg(ret));
	if (ret == 0) {
		ret = vd_bnode_co_flush(s->bs);
		if (ret < 0)
			img_err(CMD, "error while flushing: %s", img_errmsg(ret));
	}
	return ret;
}

enum { OPT_IMAGE_OPTS = 256 };

int vd_img_rebase(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "cache", required_argument, NULL, 't' },
		{ "backing", required_argument, NULL, 'b' },
		{ "backing-format", required_argument, NULL, 'F' },
		{ "backing-cache", required_argument, NULL, 'T' },
		{ "backing-unsafe", no_argument, NULL, 'u' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "progress", no_argument, NULL, 'p' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *cache_name = "writeback", *src_cache_name = "writeback", *filename;
	const char *out_base = NULL, *out_base_fmt = NULL;
	bool image_opts = false, progress = false, quiet = false;
	struct vd_cache_mode cache, src_cache;
	struct rebase_state s = { 0 };
	char *full = NULL;
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:t:b:F:B:T:uUpq", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		case 't':
			cache_name = optarg;
			break;
		case 'b':
			out_base = optarg;
			break;
		case 'F':
		case 'B':
			out_base_fmt = optarg;
			break;
		case 'T':
			src_cache_name = optarg;
			break;
		case 'u':
			s.unsafe = true;
			break;
		case 'U':
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		default:
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (optind != argc - 1)
		return img_usage_err(CMD, "Expecting one image file name");
	if (!out_base)
		return img_usage_err(CMD, "Must specify backing file (-b) (use -b \"\" to remove the backing file)");
	filename = argv[optind];
	if (quiet)
		progress = false;
	if (img_parse_cache(CMD, cache_name, "cache", &cache) < 0 ||
	    img_parse_cache(CMD, src_cache_name, "source cache", &src_cache) < 0)
		return IMG_EXIT_USAGE;
	if (out_base_fmt && !vd_format_find(out_base_fmt)) {
		img_err(CMD, "Invalid format name: '%s'", out_base_fmt);
		return IMG_EXIT_ERR;
	}

	s.bs = img_open(CMD, filename, fmt, image_opts, &cache, VD_BO_RDWR | (s.unsafe ? VD_BO_NO_BACKING : 0));
	if (!s.bs)
		return IMG_EXIT_ERR;
	if (!s.bs->fmt->supports_backing || !s.bs->fmt->co_change_backing) {
		img_err(CMD, "Format '%s' does not support backing files", img_fmt_name(s.bs));
		goto out;
	}
	s.backing_name = out_base;
	s.backing_fmt = out_base_fmt;

	if (out_base[0]) {
		full = img_path_combine(image_opts && s.bs->filename ? s.bs->filename : filename, out_base);
		if (!full) {
			img_err(CMD, "out of memory");
			goto out;
		}
		if (!s.unsafe) {
			const char *bfmt = img_resolve_fmt(CMD, full, out_base_fmt);

			if (!bfmt)
				goto out;
			s.new_backing = vd_bnode_open(full, bfmt, &src_cache, 0);
			if (!s.new_backing) {
				img_err(CMD, "Could not open new backing file '%s': %s", out_base, img_errmsg(-EIO));
				goto out;
			}
			if (!s.backing_fmt)
				s.backing_fmt = img_fmt_name(s.new_backing);
		} else if (!s.backing_fmt) {
			/* the header needs a format: probe the file if it is there */
			const char *probed = access(full, R_OK) == 0 ? vd_format_probe(full) : NULL;

			if (!probed) {
				img_err(CMD, "Could not change the backing file to '%s': backing format must be specified "
					"(-F) when the file cannot be opened", out_base);
				goto out;
			}
			s.backing_fmt = probed;
		}
	}

	if (!s.unsafe) {
		s.buf_old = vd_blk_alloc(IMG_IO_BUF_SIZE);
		s.buf_new = vd_blk_alloc(IMG_IO_BUF_SIZE);
		if (!s.buf_old || !s.buf_new) {
			img_err(CMD, "out of memory");
			goto out;
		}
	}
	img_progress_init(progress && !s.unsafe);
	c = img_run_co(rebase_co, &s);
	if (c == 0)
		img_progress_print(100);
	img_progress_end();
	ret = c == 0 ? 0 : IMG_EXIT_ERR;
out:
	if (s.buf_old)
		vd_blk_free(s.buf_old);
	if (s.buf_new)
		vd_blk_free(s.buf_new);
	if (s.new_backing)
		vd_bnode_unref(s.new_backing);
	free(full);
	vd_bnode_unref(s.bs);
	return ret;
}
