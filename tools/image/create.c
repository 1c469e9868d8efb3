/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk create [-q] [-f FMT] [-b BACKING_FILE [-F BACKING_FMT]] [-u]
 *              [-o OPTIONS] FILE [SIZE]
 *
 * As qemu-img create: -o takes the format's creation options
 * (cluster_size, backing_file, backing_fmt, compression_type,
 * lazy_refcounts, extended_l2, preallocation, refcount_bits, compat for
 * qcow2; preallocation for raw).  SIZE takes k/M/G/T/P/E suffixes and
 * defaults to the backing file's virtual size.  Unlike qemu-img, a missing
 * backing format is probed (and recorded) rather than refused.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "create";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk create [-q] [-f FMT] [-b BACKING_FILE [-F BACKING_FMT]] [-u]\n"
		"                    [-o OPTIONS] FILE [SIZE]\n"
		"\n"
		"Create a new disk image FILE of format FMT (default raw) and virtual size SIZE.\n"
		"\n"
		"  -f, --format FMT          image format: raw or qcow2 (default: raw)\n"
		"  -o, --options OPTIONS     format options, comma separated key=value\n"
		"                            ('-o help' lists them; may be repeated)\n"
		"  -b, --backing BACKING_FILE\n"
		"                            create a copy-on-write overlay of BACKING_FILE\n"
		"                            (relative names are relative to FILE's directory)\n"
		"  -F, --backing-format BACKING_FMT\n"
		"                            format of BACKING_FILE (default: probed and recorded)\n"
		"  -u, --backing-unsafe      do not open the backing file (SIZE is then required)\n"
		"  -q, --quiet               do not print the 'Formatting ...' line\n"
		"  -h, --help                show this help\n"
		"\n"
		"SIZE is in bytes, with an optional suffix k, M, G, T, P or E (powers of 1024);\n"
		"without SIZE the backing file's virtual size is used.\n"
		"Exit status: 0 created, 1 error, 2 usage error.\n");
}

/* Normalise size- and bool-typed option values so formats get plain strings. */
static int normalise_opts(json_t *opts)
{
	static const char *const size_keys[] = { "cluster_size", NULL };
	static const char *const bool_keys[] = { "lazy_refcounts", "extended_l2", NULL };

	for (const char *const *k = size_keys; *k; k++) {
		json_t *v = json_object_get(opts, *k);
		uint64_t n;
		char buf[32];

		if (v && json_is_string(v) && img_parse_size(json_string_value(v), &n) == 0) {
			snprintf(buf, sizeof(buf), "%" PRIu64, n);
			json_object_set_new(opts, *k, json_string(buf));
		}
	}
	for (const char *const *k = bool_keys; *k; k++) {
		json_t *v = json_object_get(opts, *k);
		const char *s;

		if (!v || !json_is_string(v))
			continue;
		s = json_string_value(v);
		if (!strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y"))
			json_object_set_new(opts, *k, json_string("on"));
		else if (!strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n"))
			json_object_set_new(opts, *k, json_string("off"));
	}
	return 0;
}

/* "Formatting 'f', fmt=qcow2 cluster_size=65536 ... size=N ..." in qemu-img's order. */
static void print_formatting(const char *filename, const char *fmt, uint64_t size, json_t *opts)
{
	struct kv {
		const char *key;
		const char *def; /* printed when not set; NULL: only when set */
	};
	static const struct kv qcow2_order[] = {
		{ "cluster_size", "65536" }, { "extended_l2", "off" }, { "preallocation", NULL },
		{ "compression_type", "zlib" }, { "size", NULL }, { "compat", NULL }, { "backing_file", NULL },
		{ "backing_fmt", NULL }, { "lazy_refcounts", "off" }, { "refcount_bits", "16" }, { NULL, NULL },
	};
	static const struct kv raw_order[] = { { "size", NULL }, { "preallocation", NULL }, { NULL, NULL } };
	static const struct kv other_order[] = { { "size", NULL }, { NULL, NULL } };
	const struct kv *order = !strcmp(fmt, "qcow2") ? qcow2_order : !strcmp(fmt, "raw") ? raw_order : other_order;
	const char *key;
	json_t *v;

	printf("Formatting '%s', fmt=%s", filename, fmt);
	for (const struct kv *k = order; k->key; k++) {
		if (!strcmp(k->key, "size")) {
			printf(" size=%" PRIu64, size);
			continue;
		}
		v = json_object_get(opts, k->key);
		if (v && json_is_string(v))
			printf(" %s=%s", k->key, json_string_value(v));
		else if (k->def)
			printf(" %s=%s", k->key, k->def);
	}
	/* anything not in the table (other formats) */
	json_object_foreach(opts, key, v) {
		bool listed = false;
		for (const struct kv *k = order; k->key; k++)
			listed |= !strcmp(k->key, key);
		if (!listed && json_is_string(v))
			printf(" %s=%s", key, json_string_value(v));
	}
	printf("\n");
	fflush(stdout);
}

int vd_img_create(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "options", required_argument, NULL, 'o' },
		{ "backing", required_argument, NULL, 'b' },
		{ "backing-format", required_argument, NULL, 'F' },
		{ "backing-unsafe", no_argument, NULL, 'u' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = "raw", *base = NULL, *base_fmt = NULL, *filename;
	const struct vd_format *drv;
	bool quiet = false, unsafe = false, have_size = false;
	uint64_t size = 0;
	json_t *opts = json_object();
	struct vd_create_opts co;
	char *base_full = NULL;
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:o:b:F:uq", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			json_decref(opts);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case 'o':
			if (!img_parse_opts(CMD, optarg, opts))
				goto out;
			break;
		case 'b':
			base = optarg;
			break;
		case 'F':
			base_fmt = optarg;
			break;
		case 'u':
			unsafe = true;
			break;
		case 'q':
			quiet = true;
			break;
		default:
			json_decref(opts);
			return img_bad_option(CMD, c, argc, argv);
		}
	}

	if (img_opts_want_help(opts)) {
		if (!img_format_has_opt_list(fmt)) {
			img_err(CMD, "Unknown file format '%s'", fmt);
			goto out;
		}
		img_print_format_opts(fmt, "create");
		ret = 0;
		goto out;
	}
	if (optind >= argc) {
		ret = img_usage_err(CMD, "Expecting image file name");
		goto out;
	}
	filename = argv[optind++];
	if (optind < argc) {
		int r = img_parse_size(argv[optind], &size);

		if (r == -ERANGE) {
			ret = img_usage_err(CMD, "Image size must be less than 8 EiB!");
			goto out;
		} else if (r < 0) {
			ret = img_usage_err(CMD, "Invalid image size specified: '%s'. You may use k, M, G, T, P or E "
					    "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
					    argv[optind]);
			goto out;
		}
		have_size = true;
		optind++;
	}
	if (optind < argc) {
		ret = img_usage_err(CMD, "Unexpected argument: %s", argv[optind]);
		goto out;
	}

	drv = vd_format_find(fmt);
	if (!drv || drv->is_protocol) {
		img_err(CMD, "%s: Unknown file format '%s'", filename, fmt);
		goto out;
	}
	if (!drv->create) {
		img_err(CMD, "%s: Format driver '%s' does not support image creation", filename, fmt);
		goto out;
	}

	/* -b/-F are shorthands for -o backing_file/backing_fmt */
	if (base)
		json_object_set_new(opts, "backing_file", json_string(base));
	if (base_fmt)
		json_object_set_new(opts, "backing_fmt", json_string(base_fmt));
	if (json_object_get(opts, "size")) {
		uint64_t osz;
		if (img_parse_size(json_string_value(json_object_get(opts, "size")), &osz) < 0) {
			img_err(CMD, "%s: Parameter 'size' expects a size", filename);
			goto out;
		}
		if (!have_size) {
			size = osz;
			have_size = true;
		}
		json_object_del(opts, "size");
	}
	base = json_string_value(json_object_get(opts, "backing_file"));
	base_fmt = json_string_value(json_object_get(opts, "backing_fmt"));
	if (base && !*base) {
		json_object_del(opts, "backing_file");
		base = NULL;
	}
	if ((base || base_fmt) && !drv->supports_backing) {
		img_err(CMD, "%s: Backing file not supported for file format '%s'", filename, fmt);
		goto out;
	}
	if (base_fmt && !base) {
		img_err(CMD, "%s: a backing format (-F/backing_fmt) needs a backing file (-b/backing_file)", filename);
		goto out;
	}
	if (img_check_format_opts(CMD, fmt, opts, "create") < 0)
		goto out;
	normalise_opts(opts);

	if (base) {
		base_full = img_path_combine(filename, base);
		if (!base_full) {
			img_err(CMD, "out of memory");
			goto out;
		}
		if (base_fmt && !vd_format_find(base_fmt)) {
			img_err(CMD, "%s: Unknown backing file format '%s'", filename, base_fmt);
			goto out;
		}
		if (!unsafe) {
			struct vd_cache_mode cache = { .writeback = true };
			const char *bfmt = img_resolve_fmt(CMD, base_full, base_fmt);
			struct vd_bnode *bbs;

			if (!bfmt)
				goto out;
			bbs = vd_bnode_open(base_full, bfmt, &cache, VD_BO_NO_BACKING | VD_BO_NO_IO);
			if (!bbs) {
				img_err(CMD, "%s: Could not open backing file '%s': %s", filename, base_full,
					img_errmsg(-EIO));
				goto out;
			}
			if (!have_size) {
				size = bbs->size;
				have_size = true;
			}
			if (!base_fmt)
				json_object_set_new(opts, "backing_fmt", json_string(img_fmt_name(bbs)));
			vd_bnode_unref(bbs);
		} else if (!base_fmt) {
			img_warn(CMD, "no backing format given with -u: '%s' will be probed each time the image is "
				 "opened (use -F)", base);
		}
	}
	if (!have_size) {
		img_err(CMD, "%s: Image creation needs a size parameter", filename);
		goto out;
	}

	if (!quiet)
		print_formatting(filename, fmt, size, opts);

	co.filename = filename;
	co.size = size;
	co.opts = opts;
	{
		int r;

		img_clear_err();
		r = vd_image_create(fmt, &co);
		if (r < 0) {
			img_err(CMD, "%s: %s", filename, img_errmsg(r));
			goto out;
		}
	}
	ret = 0;
out:
	free(base_full);
	json_decref(opts);
	return ret;
}
