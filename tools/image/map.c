/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk map [-f FMT | --image-opts] [-s OFFSET] [-l LENGTH]
 *           [--output human|json] FILE
 *
 * As qemu-img map (7.2): walk the image, ask each layer of the backing
 * chain for its block status until one answers DATA or ZERO, and print one
 * entry per run of equal answers, merged exactly like qemu-img does:
 *   JSON  { "start", "length", "depth", "present", "zero", "data"[, "offset"] }
 *   human  Offset / Length / Mapped to / File, for data ranges only.
 * depth counts the backing layers descended; present means some layer has
 * the range allocated.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "map";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk map [-f FMT | --image-opts] [-s OFFSET] [-l LENGTH]\n"
		"                 [--output human|json] FILE\n"
		"\n"
		"Dump the allocation map of the disk image FILE and its backing chain.\n"
		"\n"
		"  -f, --format FMT          image format (default: probed)\n"
		"  --image-opts              FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -s, --start-offset OFFSET start at OFFSET (default 0)\n"
		"  -l, --max-length LENGTH   map at most LENGTH bytes\n"
		"  -U, --force-share         accepted for qemu-img compatibility\n"
		"  --output FMT              human (default) or json, as qemu-img map\n"
		"  -h, --help                show this help\n"
		"\n"
		"Exit status: 0 success, 1 error, 2 usage error.\n");
}

struct map_entry {
	uint64_t start, length, offset;
	int64_t depth;
	bool data, zero, present, has_offset;
	const char *filename; /* borrowed from a node */
};

struct map_state {
	struct vd_bnode *bs;
	uint64_t start, end;
	bool json;
	int ret;
};

static int get_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, struct map_entry *e)
{
	struct vd_bnode *file = NULL;
	uint64_t pnum = 0, map = 0;
	int64_t depth = 0;
	int ret;

	for (;;) {
		ret = img_co_block_status(bs, off, len, &pnum, &map, &file);
		if (ret < 0)
			return ret;
		len = pnum;
		if (ret & (VD_BS_ZERO | VD_BS_DATA))
			break;
		bs = bs->backing;
		if (!bs) {
			ret = 0;
			break;
		}
		depth++;
	}
	*e = (struct map_entry){
		.start = off,
		.length = pnum,
		.data = !!(ret & VD_BS_DATA),
		.zero = !!(ret & VD_BS_ZERO),
		.offset = map,
		.has_offset = !!(ret & VD_BS_OFFSET_VALID),
		.depth = depth,
		.present = !!(ret & VD_BS_ALLOCATED),
		.filename = (file && (ret & VD_BS_OFFSET_VALID)) ? file->filename : NULL,
	};
	return 0;
}

static bool mergeable(const struct map_entry *curr, const struct map_entry *next)
{
	if (curr->length == 0)
		return false;
	if (curr->zero != next->zero || curr->data != next->data || curr->depth != next->depth ||
	    curr->present != next->present || !curr->filename != !next->filename ||
	    curr->has_offset != next->has_offset)
		return false;
	if (curr->filename && strcmp(curr->filename, next->filename) != 0)
		return false;
	if (curr->has_offset && curr->offset + curr->length != next->offset)
		return false;
	return true;
}

static int dump_entry(bool json, struct map_entry *e, struct map_entry *next)
{
	if (!json) {
		if (e->data && !e->has_offset) {
			img_err(CMD, "File contains external, encrypted or compressed clusters.");
			return -ENOTSUP;
		}
		if (e->data && !e->zero)
			printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
			       e->has_offset ? e->offset : 0, e->filename ? e->filename : "");
		/* human output does not tell 0, ZERO and ZERO|DATA apart: coalesce more */
		if (next && (!next->data || next->zero)) {
			next->data = false;
			next->zero = true;
		}
		return 0;
	}
	printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %" PRId64
	       ", \"present\": %s, \"zero\": %s, \"data\": %s",
	       e->start, e->length, e->depth, e->present ? "true" : "false", e->zero ? "true" : "false",
	       e->data ? "true" : "false");
	if (e->has_offset)
		printf(", \"offset\": %" PRIu64, e->offset);
	putchar('}');
	if (next)
		puts(",");
	return 0;
}

static int map_co(void *opaque)
{
	struct map_state *s = opaque;
	struct map_entry curr = { .start = s->start, .length = 0 }, next;
	int ret;

	while (curr.start + curr.length < s->end) {
		uint64_t off = curr.start + curr.length;
		uint64_t n = s->end - off;

		if (n > (1ull << 30)) /* probe up to 1 GiB at a time, as qemu-img */
			n = 1ull << 30;
		ret = get_block_status(s->bs, off, n, &next);
		if (ret < 0) {
			img_err(CMD, "Could not read file metadata: %s", img_errmsg(ret));
			return ret;
		}
		if (mergeable(&curr, &next)) {
			curr.length += next.length;
			continue;
		}
		if (curr.length > 0) {
			ret = dump_entry(s->json, &curr, &next);
			if (ret < 0)
				return ret;
		}
		curr = next;
	}
	/* the last entry, even an empty one (as qemu-img: start past the end, empty image) */
	return dump_entry(s->json, &curr, NULL) < 0 ? -EIO : 0;
}

enum { OPT_OUTPUT = 256, OPT_IMAGE_OPTS };

int vd_img_map(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "start-offset", required_argument, NULL, 's' },
		{ "max-length", required_argument, NULL, 'l' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ NULL, 0, NULL, 0 },
	};
	struct vd_cache_mode cache = { .writeback = true };
	const char *fmt = NULL;
	bool json = false, image_opts = false, have_max = false;
	uint64_t start = 0, max_len = 0;
	struct map_state s;
	int c, ret;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:s:l:U", longopts, NULL)) != -1) {
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
		case 's':
			if (img_parse_size(optarg, &start) < 0)
				return img_usage_err(CMD, "Invalid start offset specified: '%s'", optarg);
			break;
		case 'l':
			if (img_parse_size(optarg, &max_len) < 0)
				return img_usage_err(CMD, "Invalid max length specified: '%s'", optarg);
			have_max = true;
			break;
		case 'U':
			break;
		case OPT_OUTPUT:
			if (img_parse_output(CMD, optarg, &json) < 0)
				return IMG_EXIT_USAGE;
			break;
		default:
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (optind != argc - 1)
		return img_usage_err(CMD, "Expecting one image file name");

	s.bs = img_open(CMD, argv[optind], fmt, image_opts, &cache, 0);
	if (!s.bs)
		return IMG_EXIT_ERR;
	s.json = json;
	s.start = start;
	s.end = s.bs->size;
	if (have_max && start + max_len < s.end)
		s.end = start + max_len;
	if (json)
		putchar('[');
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
	ret = img_run_co(map_co, &s);
	if (json)
		puts("]");
	fflush(stdout);
	vd_bnode_unref(s.bs);
	return ret < 0 ? IMG_EXIT_ERR : 0;
}
