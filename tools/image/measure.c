/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk measure [--output human|json] [-O FMT] [-o OPTIONS]
 *               (--size SIZE | [-f FMT | --image-opts] FILE)
 *
 * As qemu-img measure (7.2): how large a file of format FMT must be to hold
 * a new image of SIZE, or a copy of FILE ("required"), and how large it is
 * fully allocated ("fully-allocated").  For qcow2 the numbers follow
 * QEMU's qcow2_measure()/qcow2_calc_prealloc_size() exactly, so they match
 * qemu-img's byte for byte; "bitmaps" (persistent dirty bitmaps, which vdisk
 * does not create) is reported as 0 when both sides could hold them, as
 * qemu-img does.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "measure";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk measure [--output human|json] [-O FMT] [-o OPTIONS]\n"
		"                     (--size SIZE | [-f FMT | --image-opts] FILE)\n"
		"\n"
		"Compute the file size needed for a new image of SIZE, or for a copy of FILE,\n"
		"in format FMT.\n"
		"\n"
		"  -O, --target-format FMT   target format: raw (default) or qcow2\n"
		"  -o, --target-format-options OPTIONS\n"
		"                            target creation options (cluster_size, refcount_bits,\n"
		"                            extended_l2, preallocation, compat, backing_file, ...)\n"
		"  -s, --size SIZE           measure a new, empty image of SIZE bytes (k/M/G/T/P/E)\n"
		"  -f, --format FMT          format of FILE (default: probed)\n"
		"  --image-opts              FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  --output FMT              human (default) or json (keys required, fully-allocated,\n"
		"                            bitmaps)\n"
		"  -h, --help                show this help\n"
		"\n"
		"Exit status: 0 success, 1 error, 2 usage error.\n");
}

#define ROUND_UP(x, a) ((((x) + (a) - 1) / (a)) * (a))
#define DIV_ROUND_UP(x, a) (((x) + (a) - 1) / (a))

/* QEMU's qcow2_refcount_metadata_size(): refcount table + blocks for `clusters`, a fixed point. */
static uint64_t refcount_metadata_size(uint64_t clusters, uint64_t cluster_size, int refcount_order)
{
	uint64_t blocks_per_table_cluster = cluster_size / 8;
	uint64_t refcounts_per_block = cluster_size * 8 / (1u << refcount_order);
	uint64_t table = 0, blocks = 0, last, n = 0;

	do {
		last = n;
		blocks = DIV_ROUND_UP(clusters + table + blocks, refcounts_per_block);
		table = DIV_ROUND_UP(blocks, blocks_per_table_cluster);
		n = clusters + blocks + table;
	} while (n != last);
	return (blocks + table) * cluster_size;
}

/* QEMU's qcow2_calc_prealloc_size(): file size of a fully allocated qcow2 image. */
static uint64_t qcow2_prealloc_size(uint64_t total_size, uint64_t cluster_size, int refcount_order, bool extended_l2)
{
	uint64_t meta = 0, nl1e, nl2e;
	uint64_t aligned = ROUND_UP(total_size, cluster_size);
	uint64_t l2e_size = extended_l2 ? 16 : 8;

	meta += cluster_size; /* header */
	nl2e = aligned / cluster_size;
	nl2e = ROUND_UP(nl2e, cluster_size / l2e_size);
	meta += nl2e * l2e_size;
	nl1e = nl2e * l2e_size / cluster_size;
	nl1e = ROUND_UP(nl1e, cluster_size / 8);
	meta += nl1e * 8;
	meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
	return meta + aligned;
}

struct measure_in {
	struct vd_bnode *bs;
	uint64_t cluster_size;
	uint64_t required;
	int ret;
};

/* Bytes of whole clusters holding data, through the whole chain (qcow2_measure's loop). */
static int measure_co(void *opaque)
{
	struct measure_in *m = opaque;
	uint64_t ssize = m->bs->size, off, pnum = 0;

	for (off = 0; off < ssize; off += pnum) {
		int ret = img_co_block_status_above(m->bs, NULL, off, ssize - off, &pnum, NULL, NULL);

		if (ret < 0) {
			img_err(CMD, "Unable to get block status: %s", img_errmsg(ret));
			return ret;
		}
		if (ret & VD_BS_ZERO) {
			/* zeroes need no data clusters (no backing file on the target) */
		} else if ((ret & (VD_BS_DATA | VD_BS_ALLOCATED)) == (VD_BS_DATA | VD_BS_ALLOCATED)) {
			pnum = ROUND_UP(off + pnum, m->cluster_size) - off; /* to the end of the cluster */
			m->required += off % m->cluster_size + pnum;
		}
	}
	return 0;
}

static bool opt_bool(json_t *opts, const char *key)
{
	const char *v = json_string_value(json_object_get(opts, key));

	return v && (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "y"));
}

enum { OPT_OUTPUT = 256, OPT_SIZE, OPT_IMAGE_OPTS };

int vd_img_measure(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "size", required_argument, NULL, OPT_SIZE },
		{ "format", required_argument, NULL, 'f' },
		{ "target-format", required_argument, NULL, 'O' },
		{ "target-format-options", required_argument, NULL, 'o' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct vd_cache_mode cache = { .writeback = true };
	const char *fmt = NULL, *out_fmt = "raw", *filename = NULL, *v;
	bool json = false, image_opts = false, have_size = false, has_bitmaps = false;
	uint64_t img_size = 0, required = 0, fully = 0;
	struct vd_bnode *in = NULL;
	json_t *opts = json_object();
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:O:o:s:U", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			json_decref(opts);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		case 'O':
			out_fmt = optarg;
			break;
		case 'o':
			if (!img_parse_opts(CMD, optarg, opts)) {
				json_decref(opts);
				return IMG_EXIT_USAGE;
			}
			break;
		case 's':
		case OPT_SIZE:
			if (img_parse_size(optarg, &img_size) < 0) {
				json_decref(opts);
				return img_usage_err(CMD, "Invalid image size specified: '%s'", optarg);
			}
			have_size = true;
			break;
		case 'U':
			break;
		case OPT_OUTPUT:
			if (img_parse_output(CMD, optarg, &json) < 0) {
				json_decref(opts);
				return IMG_EXIT_USAGE;
			}
			break;
		default:
			json_decref(opts);
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (optind < argc - 1) {
		ret = img_usage_err(CMD, "Expecting at most one image file name");
		goto out;
	}
	if (optind == argc - 1)
		filename = argv[optind];
	/* the numbers are computed here: raw and qcow2 need no driver */
	if (strcmp(out_fmt, "raw") != 0 && strcmp(out_fmt, "qcow2") != 0 && !vd_format_find(out_fmt)) {
		img_err(CMD, "Unknown file format '%s'", out_fmt);
		goto out;
	}
	if (img_opts_want_help(opts)) {
		img_print_format_opts(out_fmt, "create");
		ret = 0;
		goto out;
	}
	if (filename && have_size) {
		ret = img_usage_err(CMD, "--size N cannot be used together with a filename.");
		goto out;
	}
	if (!filename && !have_size) {
		ret = img_usage_err(CMD, "Either --size N or one filename must be specified.");
		goto out;
	}
	if (strcmp(out_fmt, "raw") != 0 && strcmp(out_fmt, "qcow2") != 0) {
		img_err(CMD, "Format driver '%s' does not support size measurement", out_fmt);
		goto out;
	}
	if (json_object_get(opts, "size")) {
		img_err(CMD, "Invalid parameter 'size': use --size");
		goto out;
	}
	if (img_check_format_opts(CMD, out_fmt, opts, "create") < 0)
		goto out;

	if (filename) {
		in = img_open(CMD, filename, fmt, image_opts, &cache, 0);
		if (!in)
			goto out;
	}

	if (strcmp(out_fmt, "raw") == 0) {
		/* unallocated sectors count towards the file size in raw images */
		required = in ? in->size : ROUND_UP(img_size, 512);
		fully = required;
	} else {
		uint64_t cluster_size = 65536, refcount_bits = 16, virtual_size, l2_tables, l2e;
		bool extended_l2 = opt_bool(opts, "extended_l2");
		bool v3 = true, has_backing = json_object_get(opts, "backing_file") != NULL;
		const char *prealloc = json_string_value(json_object_get(opts, "preallocation"));
		int order = 0;

		if ((v = json_string_value(json_object_get(opts, "cluster_size"))))
			img_parse_size(v, &cluster_size);
		if ((v = json_string_value(json_object_get(opts, "compat"))))
			v3 = !(strcmp(v, "0.10") == 0 || strcmp(v, "v2") == 0);
		if ((v = json_string_value(json_object_get(opts, "refcount_bits"))))
			refcount_bits = strtoull(v, NULL, 10);
		if (extended_l2 && cluster_size < 16384) {
			img_err(CMD, "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
			goto out;
		}
		if (extended_l2 && !v3) {
			img_err(CMD, "Extended L2 entries are only supported with compatibility level 1.1 and above "
				"(use compat=1.1 or greater)");
			goto out;
		}
		if (!v3 && refcount_bits != 16) {
			img_err(CMD, "Different refcount widths than 16 bits require compatibility level 1.1 or above "
				"(use compat=1.1 or greater)");
			goto out;
		}
		if (prealloc && strcmp(prealloc, "off") != 0 && has_backing && !extended_l2) {
			img_err(CMD, "Backing file and preallocation can only be used at the same time if "
				"extended_l2 is on");
			goto out;
		}
		while ((1ull << order) < refcount_bits)
			order++;
		virtual_size = ROUND_UP(in ? in->size : img_size, cluster_size);
		l2e = extended_l2 ? 16 : 8;
		l2_tables = DIV_ROUND_UP(virtual_size / cluster_size, cluster_size / l2e);
		if (l2_tables * 8 > 32ull * 1024 * 1024) {
			img_err(CMD, "The image size is too large (try using a larger cluster size)");
			goto out;
		}
		if (in) {
			if (has_backing) {
				/* the target's backing file may share nothing with the input: all of it */
				required = virtual_size;
			} else {
				struct measure_in m = { .bs = in, .cluster_size = cluster_size };

				if (img_run_co(measure_co, &m) < 0)
					goto out;
				required = m.required;
			}
		}
		if (prealloc && (strcmp(prealloc, "full") == 0 || strcmp(prealloc, "falloc") == 0))
			required = virtual_size;
		fully = qcow2_prealloc_size(virtual_size, cluster_size, order, extended_l2);
		required = fully - virtual_size + required;
		/* bitmaps: shown when both sides could hold persistent bitmaps (qcow2 v3) */
		has_bitmaps = v3 && in && strcmp(img_fmt_name(in), "qcow2") == 0;
	}

	if (json) {
		json_t *o = json_object();

		json_object_set_new(o, "required", json_integer((json_int_t)required));
		json_object_set_new(o, "fully-allocated", json_integer((json_int_t)fully));
		if (has_bitmaps)
			json_object_set_new(o, "bitmaps", json_integer(0));
		img_json_print(o);
		json_decref(o);
	} else {
		printf("required size: %" PRIu64 "\n", required);
		printf("fully allocated size: %" PRIu64 "\n", fully);
		if (has_bitmaps)
			printf("bitmaps size: 0\n");
	}
	ret = 0;
out:
	if (in)
		vd_bnode_unref(in);
	json_decref(opts);
	return ret;
}
