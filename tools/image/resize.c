/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk resize [-f FMT | --image-opts] [--preallocation MODE] [--shrink] [-q]
 *              FILE [+|-]SIZE
 *
 * As qemu-img resize: SIZE is absolute, or relative with + / -; shrinking
 * needs --shrink (data past the new end is lost).  "-1G" right after FILE
 * is a size, not an option, as in qemu-img.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "resize";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk resize [-f FMT | --image-opts] [--preallocation MODE] [--shrink] [-q]\n"
		"                    FILE [+|-]SIZE\n"
		"\n"
		"Change the virtual size of the disk image FILE.\n"
		"\n"
		"  -f, --format FMT          image format (default: probed)\n"
		"  --image-opts              FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  --preallocation MODE      off (default), metadata, falloc or full, for the new area\n"
		"  --shrink                  allow making the image smaller (data past the new end is lost)\n"
		"  -q, --quiet               print nothing but errors\n"
		"  -h, --help                show this help\n"
		"\n"
		"SIZE is in bytes with an optional suffix k, M, G, T, P or E; +SIZE grows by\n"
		"SIZE, -SIZE shrinks by SIZE (use -- before a negative size, or put it right\n"
		"after FILE).\n"
		"Exit status: 0 resized, 1 error, 2 usage error.\n");
}

enum { OPT_IMAGE_OPTS = 256, OPT_PREALLOC, OPT_SHRINK };

int vd_img_resize(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "preallocation", required_argument, NULL, OPT_PREALLOC },
		{ "shrink", no_argument, NULL, OPT_SHRINK },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	struct vd_cache_mode cache = { .writeback = true };
	const char *fmt = NULL, *filename = NULL, *size_arg = NULL, *prealloc = "off";
	bool quiet = false, shrink = false, image_opts = false;
	int relative = 0, c, ret;
	uint64_t n, cur, total;
	struct vd_bnode *bs;

	img_getopt_reset();
	/* "-" first: non-options come back as 1, so "-1G" after FILE can be taken as a size */
	while ((c = getopt_long(argc, argv, "-:hf:q", longopts, NULL)) != -1) {
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
		case OPT_PREALLOC:
			if (strcmp(optarg, "off") && strcmp(optarg, "metadata") && strcmp(optarg, "falloc") &&
			    strcmp(optarg, "full"))
				return img_usage_err(CMD, "Invalid preallocation mode '%s'", optarg);
			prealloc = optarg;
			break;
		case OPT_SHRINK:
			shrink = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 1:
			if (!filename) {
				filename = optarg;
				if (optind < argc && argv[optind][0] == '-' && argv[optind][1] >= '0' &&
				    argv[optind][1] <= '9')
					size_arg = argv[optind++];
			} else if (!size_arg) {
				size_arg = optarg;
			} else {
				return img_usage_err(CMD, "Extra argument(s) in command line");
			}
			break;
		default:
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (!filename && optind < argc)
		filename = argv[optind++];
	if (!size_arg && optind < argc)
		size_arg = argv[optind++];
	if (!filename || !size_arg || optind < argc)
		return img_usage_err(CMD, "Expecting image file name and size");

	if (size_arg[0] == '+') {
		relative = 1;
		size_arg++;
	} else if (size_arg[0] == '-') {
		relative = -1;
		size_arg++;
	}
	if (img_parse_size(size_arg, &n) < 0)
		return img_usage_err(CMD, "Invalid image size specified: '%s'", size_arg);

	bs = img_open(CMD, filename, fmt, image_opts, &cache, VD_BO_RDWR);
	if (!bs)
		return IMG_EXIT_ERR;
	cur = bs->size;
	if (relative > 0) {
		total = cur + n;
	} else if (relative < 0) {
		total = n >= cur ? 0 : cur - n;
	} else {
		total = n;
	}
	ret = IMG_EXIT_ERR;
	if (total == 0) {
		img_err(CMD, "New image size must be positive");
		goto out;
	}
	if (total <= cur && strcmp(prealloc, "off") != 0) {
		img_err(CMD, "Preallocation can only be used for growing images");
		goto out;
	}
	if (total < cur && !shrink) {
		img_err(CMD, "Use the --shrink option to perform a shrink operation.");
		img_warn(CMD, "Shrinking an image will delete all data beyond the shrunken image's end. Before "
			 "performing such an operation, make sure there is no important data there.");
		goto out;
	}
	img_clear_err();
	c = vd_bnode_truncate(bs, total, true, prealloc);
	if (c == 0)
		c = vd_bnode_flush(bs);
	if (c < 0) {
		img_err(CMD, "%s", img_errmsg(c));
		goto out;
	}
	if (!quiet)
		printf("Image resized.\n");
	ret = 0;
out:
	vd_bnode_unref(bs);
	return ret;
}
