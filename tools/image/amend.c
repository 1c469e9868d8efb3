/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk amend [-f FMT | --image-opts] [-t CACHE] [-p] [-q] -o OPTIONS FILE
 *
 * As qemu-img amend: change format options of an existing image in place
 * (qcow2: compat, lazy_refcounts, refcount_bits, backing_file, backing_fmt,
 * size).  Options that only make sense at creation (cluster_size,
 * preallocation, extended_l2, compression_type) are refused.
 */
#include <errno.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "amend";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk amend [-f FMT | --image-opts] [-t CACHE] [-p] [-q] -o OPTIONS FILE\n"
		"\n"
		"Change format-specific options of the disk image FILE.\n"
		"\n"
		"  -o, --options OPTIONS  options to change, key=value,... ('-o help' lists them)\n"
		"  -f, --format FMT       format of FILE (default: probed)\n"
		"  --image-opts           FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -t, --cache CACHE      cache mode (default: writeback)\n"
		"  -p, --progress         accepted for qemu-img compatibility\n"
		"  -q, --quiet            print nothing but errors\n"
		"  -h, --help             show this help\n"
		"\n"
		"Exit status: 0 amended, 1 error, 2 usage error.\n");
}

struct amend_call {
	struct vd_bnode *bs;
	json_t *opts;
};

static int amend_co(void *opaque)
{
	struct amend_call *a = opaque;
	int ret;

	ret = a->bs->fmt->co_amend(a->bs, a->opts);
	if (ret == 0)
		ret = vd_bnode_co_flush(a->bs);
	return ret;
}

enum { OPT_IMAGE_OPTS = 256, OPT_FORCE };

int vd_img_amend(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "options", required_argument, NULL, 'o' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "cache", required_argument, NULL, 't' },
		{ "force", no_argument, NULL, OPT_FORCE },
		{ "progress", no_argument, NULL, 'p' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *cache_name = "writeback";
	bool image_opts = false, have_opts = false;
	struct vd_cache_mode cache;
	struct amend_call a = { 0 };
	json_t *opts = json_object();
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":ho:f:t:pq", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			json_decref(opts);
			return 0;
		case 'o':
			if (!img_parse_opts(CMD, optarg, opts)) {
				json_decref(opts);
				return IMG_EXIT_USAGE;
			}
			have_opts = true;
			break;
		case 'f':
			fmt = optarg;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		case 't':
			cache_name = optarg;
			break;
		case OPT_FORCE:
		case 'p':
		case 'q':
			break;
		default:
			json_decref(opts);
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (!have_opts) {
		json_decref(opts);
		return img_usage_err(CMD, "Must specify options (-o)");
	}
	if (fmt && img_opts_want_help(opts)) {
		if (!img_format_has_opt_list(fmt)) {
			img_err(CMD, "Unknown file format '%s'", fmt);
			goto out;
		}
		img_print_format_opts(fmt, "amend");
		ret = 0;
		goto out;
	}
	if (optind != argc - 1) {
		ret = img_usage_err(CMD, "Expecting one image file name");
		goto out;
	}
	if (img_parse_cache(CMD, cache_name, "cache", &cache) < 0) {
		ret = IMG_EXIT_USAGE;
		goto out;
	}
	a.bs = img_open(CMD, argv[optind], fmt, image_opts, &cache, VD_BO_RDWR);
	if (!a.bs)
		goto out;
	if (img_opts_want_help(opts)) {
		img_print_format_opts(img_fmt_name(a.bs), "amend");
		ret = 0;
		goto out;
	}
	if (!a.bs->fmt->co_amend) {
		img_err(CMD, "Format driver '%s' does not support option amendment", img_fmt_name(a.bs));
		goto out;
	}
	if (img_check_format_opts(CMD, img_fmt_name(a.bs), opts, "amend") < 0)
		goto out;
	a.opts = opts;
	img_clear_err();
	c = img_run_co(amend_co, &a);
	if (c < 0) {
		img_err(CMD, "%s", img_errmsg(c));
		goto out;
	}
	ret = 0;
out:
	if (a.bs)
		vd_bnode_unref(a.bs);
	json_decref(opts);
	return ret;
}
