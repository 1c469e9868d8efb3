/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk commit [-f FMT | --image-opts] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE
 *
 * As qemu-img commit: copy everything allocated in FILE (and in the images
 * between FILE and BASE) into BASE, which defaults to FILE's immediate
 * backing file; grow BASE if FILE is larger.  Then FILE is emptied (all of
 * its clusters dropped, so it shows BASE again; see empty_overlay()) unless
 * -d is given; -b implies -d, as in qemu-img.  Zero ranges are committed as write-zeroes,
 * not as buffers of zeroes.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "commit";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk commit [-f FMT | --image-opts] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE\n"
		"\n"
		"Commit the changes recorded in the overlay FILE into its backing file.\n"
		"\n"
		"  -f, --format FMT     format of FILE (default: probed)\n"
		"  --image-opts         FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -t, --cache CACHE    cache mode (default: writeback)\n"
		"  -b, --base BASE      commit into BASE, an image further down the backing chain\n"
		"                       (default: the immediate backing file; implies -d)\n"
		"  -d, --drop           do not empty FILE afterwards\n"
		"  -p, --progress       show progress\n"
		"  -q, --quiet          print nothing but errors\n"
		"  -h, --help           show this help\n"
		"\n"
		"Exit status: 0 committed, 1 error, 2 usage error.\n");
}

struct commit_state {
	struct vd_bnode *top;      /* opened read-write, with its chain */
	struct vd_bnode *base;     /* the base node inside top's chain (read-only) */
	struct vd_bnode *base_rw;  /* the same image, opened read-write */
	uint8_t *buf;
	bool drop;
};

static int commit_co(void *opaque)
{
	struct commit_state *s = opaque;
	uint64_t size = s->top->size, off = 0;
	int ret;

	if (s->base_rw->size < size) {
		ret = vd_bnode_co_truncate(s->base_rw, size, false, "off");
		if (ret < 0) {
			img_err(CMD, "Could not grow the base image to %" PRIu64 " bytes: %s", size, img_errmsg(ret));
			return ret;
		}
	}
	while (off < size) {
		uint64_t n = size - off, pnum = 0;
		int alloc;

		if (n > IMG_IO_BUF_SIZE)
			n = IMG_IO_BUF_SIZE;
		alloc = img_co_is_allocated_above(s->top, s->base, off, n, &pnum);
		if (alloc < 0) {
			img_err(CMD, "error while reading image metadata at offset %" PRIu64 ": %s", off, img_errmsg(alloc));
			return alloc;
		}
		if (pnum == 0)
			return -EIO;
		if (alloc) {
			uint64_t zn = 0;
			int st = img_co_block_status_above(s->top, s->base, off, pnum, &zn, NULL, NULL);

			if (st < 0)
				return st;
			if (zn < pnum)
				pnum = zn;
			if (st & VD_BS_ZERO) {
				ret = vd_bnode_co_pwrite_zeroes(s->base_rw, off, pnum, 0);
			} else {
				ret = vd_bnode_co_pread(s->top, off, s->buf, pnum);
				if (ret < 0) {
					img_err(CMD, "error while reading at offset %" PRIu64 ": %s", off, img_errmsg(ret));
					return ret;
				}
				ret = vd_bnode_co_pwrite(s->base_rw, off, s->buf, pnum, 0);
			}
			if (ret < 0) {
				img_err(CMD, "error while writing to the base image at offset %" PRIu64 ": %s", off,
					img_errmsg(ret));
				return ret;
			}
		}
		off += pnum;
		img_progress_print(100.0 * (double)off / (double)size);
	}
	ret = vd_bnode_co_flush(s->base_rw);
	if (ret < 0) {
		img_err(CMD, "error while flushing the base image: %s", img_errmsg(ret));
		return ret;
	}
	return 0;
}

struct empty_state {
	struct vd_bnode *bs;
	uint64_t size;
};

/*
 * Empty an overlay as qemu-img does: every cluster unallocated again, so its
 * backing file shows through, with the image's header, backing link and
 * internal snapshots kept (the format's make_empty: a full discard; a plain
 * discard would not do, with a backing file qcow2 turns discarded clusters
 * into zero clusters, which hide the backing data).
 */
static int empty_co(void *opaque)
{
	struct empty_state *e = opaque;
	int ret = e->bs->fmt->co_make_empty(e->bs);

	if (ret == 0)
		ret = vd_bnode_co_flush(e->bs);
	return ret;
}

/* 0, or 1 when the image could not be emptied (a warning was printed; the commit itself is complete). */
static int empty_overlay(const char *path, const char *fmt, uint64_t size, const struct vd_cache_mode *cache)
{
	struct empty_state e = { .size = size };
	int ret;

	img_clear_err();
	e.bs = vd_bnode_open(path, fmt, cache, VD_BO_RDWR | VD_BO_NO_BACKING);
	if (!e.bs) {
		img_warn(CMD, "could not reopen '%s' to empty it: %s", path, img_errmsg(-EIO));
		return 1;
	}
	if (!e.bs->fmt->co_make_empty) {
		img_warn(CMD, "format '%s' cannot empty '%s' (its data is committed)", e.bs->fmt->name, path);
		vd_bnode_unref(e.bs);
		return 1;
	}
	ret = img_run_co(empty_co, &e);
	if (ret < 0) {
		img_err(CMD, "Could not empty '%s': %s", path, img_errmsg(ret));
		vd_bnode_unref(e.bs);
		return -1;
	}
	vd_bnode_unref(e.bs);
	return 0;
}

/* The node of top's chain (below top) that is the image `name`. */
static struct vd_bnode *find_backing_image(struct vd_bnode *top, const char *top_name, const char *name)
{
	char want[PATH_MAX], have[PATH_MAX];
	bool want_ok = realpath(name, want) != NULL;
	const char *parent_name = top_name;

	for (struct vd_bnode *p = top; p->backing; p = p->backing) {
		struct vd_bnode *b = p->backing;
		char *full = p->backing_file[0] ? img_path_combine(parent_name, p->backing_file) : NULL;
		bool match = strcmp(p->backing_file, name) == 0 || (full && strcmp(full, name) == 0) ||
			     (b->filename && strcmp(b->filename, name) == 0);

		if (!match && want_ok) {
			if (full && realpath(full, have) && strcmp(have, want) == 0)
				match = true;
			else if (b->filename && realpath(b->filename, have) && strcmp(have, want) == 0)
				match = true;
		}
		free(full);
		if (match)
			return b;
		parent_name = b->filename ? b->filename : parent_name;
	}
	return NULL;
}

enum { OPT_IMAGE_OPTS = 256 };

int vd_img_commit(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "cache", required_argument, NULL, 't' },
		{ "drop", no_argument, NULL, 'd' },
		{ "base", required_argument, NULL, 'b' },
		{ "progress", no_argument, NULL, 'p' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *cache_name = "writeback", *base_name = NULL, *filename;
	bool image_opts = false, progress = false, quiet = false;
	struct vd_cache_mode cache;
	struct commit_state s = { 0 };
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:t:db:pq", longopts, NULL)) != -1) {
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
		case 'd':
			s.drop = true;
			break;
		case 'b':
			base_name = optarg;
			s.drop = true; /* -b implies -d, as in qemu-img */
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
	filename = argv[optind];
	if (quiet)
		progress = false;
	if (img_parse_cache(CMD, cache_name, "cache", &cache) < 0)
		return IMG_EXIT_USAGE;

	s.top = img_open(CMD, filename, fmt, image_opts, &cache, VD_BO_RDWR);
	if (!s.top)
		return IMG_EXIT_ERR;
	if (base_name) {
		s.base = find_backing_image(s.top, image_opts ? s.top->filename : filename, base_name);
		if (!s.base) {
			img_err(CMD, "Did not find '%s' in the backing chain of '%s'", base_name, filename);
			goto out;
		}
	} else {
		s.base = s.top->backing;
		if (!s.base) {
			img_err(CMD, "Image does not have a backing file");
			goto out;
		}
	}
	if (!s.base->filename) {
		img_err(CMD, "Cannot reopen the backing file read-write: its file name is unknown");
		goto out;
	}
	s.base_rw = vd_bnode_open(s.base->filename, img_fmt_name(s.base), &cache, VD_BO_RDWR | VD_BO_NO_BACKING);
	if (!s.base_rw) {
		img_err(CMD, "Could not open '%s' read-write: %s", s.base->filename, img_errmsg(-EIO));
		goto out;
	}
	s.buf = vd_blk_alloc(IMG_IO_BUF_SIZE);
	if (!s.buf) {
		img_err(CMD, "out of memory");
		goto out;
	}
	img_progress_init(progress);
	c = img_run_co(commit_co, &s);
	if (c == 0 && !s.drop) {
		/* reopen the overlay alone (see empty_overlay) */
		char *path = s.top->filename ? strdup(s.top->filename) : NULL;
		char tfmt[32];
		uint64_t size = s.top->size;

		snprintf(tfmt, sizeof(tfmt), "%s", img_fmt_name(s.top));
		vd_bnode_unref(s.top);
		s.top = NULL;
		c = path ? empty_overlay(path, tfmt, size, &cache) : -ENOMEM;
		if (c > 0)
			c = 0; /* as qemu-img: an image that cannot be emptied is not an error */
		free(path);
	}
	if (c == 0)
		img_progress_print(100);
	img_progress_end();
	if (c < 0)
		goto out;
	if (!quiet)
		printf("Image committed.\n");
	ret = 0;
out:
	if (s.buf)
		vd_blk_free(s.buf);
	if (s.base_rw)
		vd_bnode_unref(s.base_rw);
	if (s.top)
		vd_bnode_unref(s.top);
	return ret;
}
