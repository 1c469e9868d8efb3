/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] FILE1 FILE2
 *
 * As qemu-img compare: compare the guest-visible contents of two images
 * (through their backing chains).  Ranges that read as zero in both are
 * skipped using block status; allocated ranges are read and compared.  A
 * size difference is fine if the extra part of the larger image reads as
 * zero, unless -s (strict) is given, which also fails on any difference in
 * allocation status.
 *
 * Exit status (qemu-img's): 0 identical, 1 different, 2 error (open, usage),
 * 3 block-status error, 4 read error.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "compare";

enum { CMP_SAME = 0, CMP_DIFFER = 1, CMP_ERROR = 2, CMP_STATUS_ERR = 3, CMP_READ_ERR = 4 };

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk compare [-f FMT] [-F FMT] [--image-opts] [-T CACHE] [-p] [-q] [-s]\n"
		"                     FILE1 FILE2\n"
		"\n"
		"Check whether two disk images have the same guest-visible content.\n"
		"\n"
		"  -f, --a-format FMT   format of FILE1 (default: probed)\n"
		"  -F, --b-format FMT   format of FILE2 (default: probed)\n"
		"  --image-opts         FILE1 and FILE2 are option strings\n"
		"  -T, --cache CACHE    cache mode (default: writeback)\n"
		"  -s, --strict         also fail on different sizes or allocation status\n"
		"  -p, --progress       show progress\n"
		"  -q, --quiet          print nothing but errors\n"
		"  -U, --force-share    accepted for qemu-img compatibility\n"
		"  -h, --help           show this help\n"
		"\n"
		"Prints \"Images are identical.\" or \"Content mismatch at offset N!\".\n"
		"Exit status: 0 identical, 1 different, 2 error (or usage error),\n"
		"3 allocation query failed, 4 read error.\n");
}

struct cmp_state {
	struct vd_bnode *bs1, *bs2;
	const char *name1, *name2;
	bool strict, quiet;
	uint8_t *buf1, *buf2;
};

static int check_empty(struct vd_bnode *bs, uint64_t off, uint64_t len, const char *name, uint8_t *buf, bool quiet)
{
	int64_t idx;
	int ret;

	ret = vd_bnode_co_pread(bs, off, buf, len);
	if (ret < 0) {
		img_err(CMD, "Error while reading offset %" PRIu64 " of %s: %s", off, name, img_errmsg(ret));
		return CMP_READ_ERR;
	}
	idx = img_find_nonzero(buf, len);
	if (idx >= 0) {
		if (!quiet)
			printf("Content mismatch at offset %" PRIu64 "!\n", off + (uint64_t)idx);
		return CMP_DIFFER;
	}
	return CMP_SAME;
}

#define STATUS_MASK (VD_BS_DATA | VD_BS_ZERO | VD_BS_ALLOCATED)

static int compare_co(void *opaque)
{
	struct cmp_state *s = opaque;
	uint64_t size1 = s->bs1->size, size2 = s->bs2->size;
	uint64_t total = size1 < size2 ? size1 : size2;
	uint64_t progress_base = size1 > size2 ? size1 : size2;
	uint64_t off = 0, chunk;
	int ret;

	if (s->strict && size1 != size2) {
		if (!s->quiet)
			printf("Strict mode: Image size mismatch!\n");
		return CMP_DIFFER;
	}
	while (off < total) {
		uint64_t pnum1 = 0, pnum2 = 0;
		int st1, st2;
		bool alloc1, alloc2;

		st1 = img_co_block_status_above(s->bs1, NULL, off, size1 - off, &pnum1, NULL, NULL);
		if (st1 < 0) {
			img_err(CMD, "Sector allocation test failed for %s: %s", s->name1, img_errmsg(st1));
			return CMP_STATUS_ERR;
		}
		st2 = img_co_block_status_above(s->bs2, NULL, off, size2 - off, &pnum2, NULL, NULL);
		if (st2 < 0) {
			img_err(CMD, "Sector allocation test failed for %s: %s", s->name2, img_errmsg(st2));
			return CMP_STATUS_ERR;
		}
		alloc1 = st1 & VD_BS_ALLOCATED;
		alloc2 = st2 & VD_BS_ALLOCATED;
		chunk = pnum1 < pnum2 ? pnum1 : pnum2;
		if (chunk > total - off)
			chunk = total - off;

		if (s->strict && (st1 & STATUS_MASK) != (st2 & STATUS_MASK)) {
			if (!s->quiet)
				printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n", off);
			return CMP_DIFFER;
		}
		if ((st1 & VD_BS_ZERO) && (st2 & VD_BS_ZERO)) {
			/* both read as zeroes */
		} else if (alloc1 == alloc2) {
			if (alloc1) {
				uint64_t pnum;

				if (chunk > IMG_IO_BUF_SIZE)
					chunk = IMG_IO_BUF_SIZE;
				ret = vd_bnode_co_pread(s->bs1, off, s->buf1, chunk);
				if (ret < 0) {
					img_err(CMD, "Error while reading offset %" PRIu64 " of %s: %s", off, s->name1,
						img_errmsg(ret));
					return CMP_READ_ERR;
				}
				ret = vd_bnode_co_pread(s->bs2, off, s->buf2, chunk);
				if (ret < 0) {
					img_err(CMD, "Error while reading offset %" PRIu64 " of %s: %s", off, s->name2,
						img_errmsg(ret));
					return CMP_READ_ERR;
				}
				ret = img_compare_buffers(s->buf1, s->buf2, chunk, 0, &pnum);
				if (ret || pnum != chunk) {
					if (!s->quiet)
						printf("Content mismatch at offset %" PRIu64 "!\n", off + (ret ? 0 : pnum));
					return CMP_DIFFER;
				}
			}
		} else {
			if (chunk > IMG_IO_BUF_SIZE)
				chunk = IMG_IO_BUF_SIZE;
			ret = alloc1 ? check_empty(s->bs1, off, chunk, s->name1, s->buf1, s->quiet)
				     : check_empty(s->bs2, off, chunk, s->name2, s->buf1, s->quiet);
			if (ret)
				return ret;
		}
		off += chunk;
		img_progress_print(100.0 * (double)off / (double)progress_base);
	}

	if (size1 != size2) {
		struct vd_bnode *over = size1 > size2 ? s->bs1 : s->bs2;
		const char *over_name = size1 > size2 ? s->name1 : s->name2;

		if (!s->quiet)
			printf("Warning: Image size mismatch!\n");
		while (off < progress_base) {
			ret = img_co_block_status_above(over, NULL, off, progress_base - off, &chunk, NULL, NULL);
			if (ret < 0) {
				img_err(CMD, "Sector allocation test failed for %s: %s", over_name, img_errmsg(ret));
				return CMP_STATUS_ERR;
			}
			if ((ret & VD_BS_ALLOCATED) && !(ret & VD_BS_ZERO)) {
				if (chunk > IMG_IO_BUF_SIZE)
					chunk = IMG_IO_BUF_SIZE;
				ret = check_empty(over, off, chunk, over_name, s->buf1, s->quiet);
				if (ret)
					return ret;
			}
			off += chunk;
			img_progress_print(100.0 * (double)off / (double)progress_base);
		}
	}
	if (!s->quiet)
		printf("Images are identical.\n");
	return CMP_SAME;
}

enum { OPT_IMAGE_OPTS = 256 };

int vd_img_compare(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "a-format", required_argument, NULL, 'f' },
		{ "b-format", required_argument, NULL, 'F' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "strict", no_argument, NULL, 's' },
		{ "cache", required_argument, NULL, 'T' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "progress", no_argument, NULL, 'p' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt1 = NULL, *fmt2 = NULL, *cache_name = "writeback";
	bool progress = false, image_opts = false;
	struct vd_cache_mode cache;
	struct cmp_state s = { 0 };
	int c, ret = CMP_ERROR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:F:sT:Upq", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			return 0;
		case 'f':
			fmt1 = optarg;
			break;
		case 'F':
			fmt2 = optarg;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		case 's':
			s.strict = true;
			break;
		case 'T':
			cache_name = optarg;
			break;
		case 'U':
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			s.quiet = true;
			break;
		default:
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (optind != argc - 2)
		return img_usage_err(CMD, "Expecting two image file names");
	s.name1 = argv[optind];
	s.name2 = argv[optind + 1];
	if (s.quiet)
		progress = false;
	if (img_parse_cache(CMD, cache_name, "source cache", &cache) < 0)
		return CMP_ERROR;

	s.bs1 = img_open(CMD, s.name1, fmt1, image_opts, &cache, 0);
	if (!s.bs1)
		return CMP_ERROR;
	s.bs2 = img_open(CMD, s.name2, fmt2, image_opts, &cache, 0);
	if (!s.bs2)
		goto out;
	s.buf1 = vd_blk_alloc(IMG_IO_BUF_SIZE);
	s.buf2 = vd_blk_alloc(IMG_IO_BUF_SIZE);
	if (!s.buf1 || !s.buf2) {
		img_err(CMD, "out of memory");
		goto out;
	}
	img_progress_init(progress);
	ret = img_run_co(compare_co, &s);
	if (ret < 0) {
		img_err(CMD, "%s", img_errmsg(ret));
		ret = CMP_ERROR;
	}
	if (ret == CMP_SAME)
		img_progress_print(100);
	img_progress_end();
out:
	if (s.buf1)
		vd_blk_free(s.buf1);
	if (s.buf2)
		vd_blk_free(s.buf2);
	if (s.bs2)
		vd_bnode_unref(s.bs2);
	vd_bnode_unref(s.bs1);
	return ret;
}
