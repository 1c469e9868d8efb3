/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk check [-f FMT | --image-opts] [-T CACHE] [-r leaks|all] [-q]
 *             [--output human|json] FILE
 *
 * As qemu-img check, including its exit status:
 *   0  the image is consistent
 *   1  the check could not be completed (open failure, internal error)
 *   2  the image is corrupted
 *   3  only leaked clusters were found (no corruption)
 *   63 the format does not support checks (raw)
 * JSON keys as qemu-img's: image-end-offset, total-clusters,
 * allocated-clusters, fragmented-clusters, compressed-clusters,
 * check-errors, leaks, corruptions, leaks-fixed, corruptions-fixed,
 * filename, format (zero counters other than check-errors are left out,
 * as qemu-img does).
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "check";

enum { CHECK_EXIT_CORRUPT = 2, CHECK_EXIT_LEAKS = 3, CHECK_EXIT_NOTSUP = 63 };

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk check [-f FMT | --image-opts] [-T CACHE] [-r leaks|all] [-q]\n"
		"                   [--output human|json] FILE\n"
		"\n"
		"Check the consistency of the disk image FILE (and repair it with -r).\n"
		"\n"
		"  -f, --format FMT        image format (default: probed)\n"
		"  --image-opts            FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -T, --cache CACHE       cache mode (default: writeback)\n"
		"  -r, --repair leaks|all  repair leaked clusters only, or all errors (opens FILE\n"
		"                          read-write)\n"
		"  -U, --force-share       accepted for qemu-img compatibility\n"
		"  --output FMT            human (default) or json (qemu-img's keys)\n"
		"  -q, --quiet             print nothing but errors\n"
		"  -h, --help              show this help\n"
		"\n"
		"Exit status (as qemu-img check): 0 no errors, 1 check not completed,\n"
		"2 corruptions found, 3 leaked clusters only, 63 format does not support checks.\n");
}

static void dump_human(const struct vd_check_result *r)
{
	if (!(r->corruptions || r->leaks || r->check_errors)) {
		printf("No errors were found on the image.\n");
	} else {
		if (r->corruptions)
			printf("\n%" PRId64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       r->corruptions);
		if (r->leaks)
			printf("\n%" PRId64 " leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       r->leaks);
		if (r->check_errors)
			printf("\n%" PRId64 " internal errors have occurred during the check.\n", r->check_errors);
	}
	if (r->total_clusters != 0 && r->allocated_clusters != 0)
		printf("%" PRId64 "/%" PRId64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
		       r->allocated_clusters, r->total_clusters, r->allocated_clusters * 100.0 / r->total_clusters,
		       r->fragmented_clusters * 100.0 / r->allocated_clusters,
		       r->compressed_clusters * 100.0 / r->allocated_clusters);
	if (r->image_end_offset)
		printf("Image end offset: %" PRId64 "\n", r->image_end_offset);
}

static void dump_json(const struct vd_check_result *r, const char *filename, const char *format)
{
	json_t *o = json_object();

#define PUT_NONZERO(key, v) \
	do { \
		if (v) \
			json_object_set_new(o, key, json_integer(v)); \
	} while (0)
	PUT_NONZERO("image-end-offset", r->image_end_offset);
	PUT_NONZERO("total-clusters", r->total_clusters);
	json_object_set_new(o, "check-errors", json_integer(r->check_errors));
	PUT_NONZERO("allocated-clusters", r->allocated_clusters);
	PUT_NONZERO("fragmented-clusters", r->fragmented_clusters);
	PUT_NONZERO("compressed-clusters", r->compressed_clusters);
	PUT_NONZERO("corruptions", r->corruptions);
	PUT_NONZERO("leaks", r->leaks);
	PUT_NONZERO("corruptions-fixed", r->corruptions_fixed);
	PUT_NONZERO("leaks-fixed", r->leaks_fixed);
#undef PUT_NONZERO
	json_object_set_new(o, "filename", json_string(filename));
	json_object_set_new(o, "format", json_string(format));
	img_json_print(o);
	json_decref(o);
}

enum { OPT_OUTPUT = 256, OPT_IMAGE_OPTS };

int vd_img_check(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "cache", required_argument, NULL, 'T' },
		{ "repair", required_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *cache_name = "writeback", *filename;
	bool json = false, quiet = false, image_opts = false;
	int flags = VD_BO_CHECK, fix = 0, c, ret;
	struct vd_cache_mode cache;
	struct vd_check_result res = { 0 };
	struct vd_bnode *bs;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:T:r:Uq", longopts, NULL)) != -1) {
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
		case 'T':
			cache_name = optarg;
			break;
		case 'r':
			flags |= VD_BO_RDWR;
			if (strcmp(optarg, "leaks") == 0)
				fix = VD_CHECK_FIX_LEAKS;
			else if (strcmp(optarg, "all") == 0)
				fix = VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS;
			else
				return img_usage_err(CMD, "--repair (-r) expects 'leaks' or 'all', not '%s'", optarg);
			break;
		case 'U':
			break;
		case OPT_OUTPUT:
			if (img_parse_output(CMD, optarg, &json) < 0)
				return IMG_EXIT_USAGE;
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
	if (img_parse_cache(CMD, cache_name, "source cache", &cache) < 0)
		return IMG_EXIT_USAGE;

	bs = img_open(CMD, filename, fmt, image_opts, &cache, flags);
	if (!bs)
		return IMG_EXIT_ERR;

	if (!bs->fmt->co_check) {
		img_err(CMD, "This image format does not support checks");
		vd_bnode_unref(bs);
		return CHECK_EXIT_NOTSUP;
	}
	img_clear_err();
	ret = vd_bnode_check(bs, &res, fix);
	if (ret == -ENOTSUP) {
		img_err(CMD, "This image format does not support checks");
		vd_bnode_unref(bs);
		return CHECK_EXIT_NOTSUP;
	}
	if (ret == 0 && (res.corruptions_fixed || res.leaks_fixed)) {
		struct vd_check_result again = { 0 };

		if (!json && !quiet)
			printf("The following inconsistencies were found and repaired:\n\n"
			       "    %" PRId64 " leaked clusters\n"
			       "    %" PRId64 " corruptions\n\n"
			       "Double checking the fixed image now...\n",
			       res.leaks_fixed, res.corruptions_fixed);
		img_clear_err();
		ret = vd_bnode_check(bs, &again, 0);
		again.leaks_fixed = res.leaks_fixed;
		again.corruptions_fixed = res.corruptions_fixed;
		res = again;
	}
	if (ret == 0 && !quiet) {
		if (json)
			dump_json(&res, filename, img_fmt_name(bs));
		else
			dump_human(&res);
	}
	if (ret < 0 || res.check_errors) {
		if (ret < 0)
			img_err(CMD, "Check failed: %s", img_errmsg(ret));
		else
			img_err(CMD, "Check failed");
		vd_bnode_unref(bs);
		return IMG_EXIT_ERR;
	}
	vd_bnode_unref(bs);
	if (res.corruptions)
		return CHECK_EXIT_CORRUPT;
	if (res.leaks)
		return CHECK_EXIT_LEAKS;
	return 0;
}
