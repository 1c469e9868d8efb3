/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk info [-f FMT | --image-opts] [--backing-chain] [--output human|json] FILE
 *
 * As qemu-img info: the JSON object has qemu-img's keys (virtual-size,
 * filename, format, actual-size, dirty-flag, cluster-size,
 * backing-filename, full-backing-filename, backing-filename-format,
 * format-specific {type, data}, snapshots[]); with --backing-chain it is an
 * array, one object per image from the top down.  Images are opened
 * metadata-only and without their backing files.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "info";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk info [-f FMT | --image-opts] [--backing-chain] [-U]\n"
		"                  [--output human|json] FILE\n"
		"\n"
		"Show information about the disk image FILE.\n"
		"\n"
		"  -f, --format FMT     image format (default: probed)\n"
		"  --image-opts         FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  --backing-chain      also show every image of the backing chain\n"
		"  -U, --force-share    accepted for qemu-img compatibility (no locking in vdisk)\n"
		"  --output FMT         human (default) or json (qemu-img's keys)\n"
		"  -h, --help           show this help\n"
		"\n"
		"Exit status: 0 success, 1 error, 2 usage error.\n");
}

/* Merge what the format's get_info() left into info (see block.h: "format-specific"). */
static void add_format_specific(struct vd_bnode *bs, json_t *info)
{
	json_t *x, *v;
	int r;

	if (!bs->fmt->get_info)
		return;
	x = json_object();
	img_clear_err();
	r = bs->fmt->get_info(bs, x);
	if (r < 0) {
		img_warn(CMD, "could not read format-specific information: %s", img_errmsg(r));
		json_decref(x);
		return;
	}
	if (json_object_size(x) == 0) {
		json_decref(x);
		return;
	}
	if (json_object_get(x, "format-specific")) {
		/* the format filled top-level keys itself */
		json_object_update(info, x);
	} else if (json_object_get(x, "type") && json_object_get(x, "data")) {
		json_object_set(info, "format-specific", x);
	} else {
		json_t *fs = json_object();

		/* a dirty flag belongs at the top level, as in qemu-img */
		v = json_object_get(x, "dirty-flag");
		if (v) {
			json_object_set(info, "dirty-flag", v);
			json_object_del(x, "dirty-flag");
		}
		json_object_set_new(fs, "type", json_string(img_fmt_name(bs)));
		json_object_set(fs, "data", x);
		json_object_set_new(info, "format-specific", fs);
	}
	json_decref(x);
}

static json_t *snapshot_json(const struct vd_snapshot_info *sn)
{
	json_t *o = json_object();

	json_object_set_new(o, "id", json_string(sn->id));
	json_object_set_new(o, "name", json_string(sn->name));
	json_object_set_new(o, "vm-state-size", json_integer((json_int_t)sn->vm_state_size));
	json_object_set_new(o, "date-sec", json_integer((json_int_t)sn->date_sec));
	json_object_set_new(o, "date-nsec", json_integer((json_int_t)sn->date_nsec));
	json_object_set_new(o, "vm-clock-sec", json_integer((json_int_t)(sn->vm_clock_nsec / 1000000000ull)));
	json_object_set_new(o, "vm-clock-nsec", json_integer((json_int_t)(sn->vm_clock_nsec % 1000000000ull)));
	if (sn->icount != UINT64_MAX)
		json_object_set_new(o, "icount", json_integer((json_int_t)sn->icount));
	return o;
}

/* Info of one image, opened metadata-only and without backing; NULL on error (printed). */
static json_t *collect_info(const char *filename, const char *fmt, bool image_opts)
{
	struct vd_cache_mode cache = { .writeback = true };
	struct vd_bnode *bs;
	json_t *info;
	uint32_t cs;
	int64_t actual;

	bs = img_open(CMD, filename, fmt, image_opts, &cache, VD_BO_NO_BACKING | VD_BO_NO_IO);
	if (!bs)
		return NULL;
	info = json_object();
	json_object_set_new(info, "virtual-size", json_integer((json_int_t)bs->size));
	json_object_set_new(info, "filename", json_string(image_opts && bs->filename ? bs->filename : filename));
	cs = img_cluster_size(bs);
	if (cs)
		json_object_set_new(info, "cluster-size", json_integer(cs));
	json_object_set_new(info, "format", json_string(img_fmt_name(bs)));
	actual = vd_bnode_allocated_size(bs);
	if (actual >= 0)
		json_object_set_new(info, "actual-size", json_integer(actual));
	json_object_set_new(info, "dirty-flag", json_false());

	if (bs->backing_file[0]) {
		char *full = img_path_combine(image_opts && bs->filename ? bs->filename : filename, bs->backing_file);

		json_object_set_new(info, "backing-filename", json_string(bs->backing_file));
		if (full)
			json_object_set_new(info, "full-backing-filename", json_string(full));
		if (bs->backing_format[0])
			json_object_set_new(info, "backing-filename-format", json_string(bs->backing_format));
		free(full);
	}

	if (bs->fmt->snapshot_list) {
		struct vd_snapshot_info *list = NULL;
		int count = 0, r;

		img_clear_err();
		r = bs->fmt->snapshot_list(bs, &list, &count);
		if (r < 0) {
			img_warn(CMD, "could not list snapshots: %s", img_errmsg(r));
		} else if (count > 0) {
			json_t *arr = json_array();
			for (int i = 0; i < count; i++)
				json_array_append_new(arr, snapshot_json(&list[i]));
			json_object_set_new(info, "snapshots", arr);
		}
		free(list);
	}

	add_format_specific(bs, info);
	vd_bnode_unref(bs);
	return info;
}

static void dump_human(json_t *info)
{
	char vsize[32], dsize[32];
	json_t *v;
	const char *bf, *fbf;

	img_size_to_str((uint64_t)json_integer_value(json_object_get(info, "virtual-size")), vsize, sizeof(vsize));
	v = json_object_get(info, "actual-size");
	if (v)
		img_size_to_str((uint64_t)json_integer_value(v), dsize, sizeof(dsize));
	else
		snprintf(dsize, sizeof(dsize), "unavailable");
	printf("image: %s\n"
	       "file format: %s\n"
	       "virtual size: %s (%" JSON_INTEGER_FORMAT " bytes)\n"
	       "disk size: %s\n",
	       json_string_value(json_object_get(info, "filename")), json_string_value(json_object_get(info, "format")),
	       vsize, json_integer_value(json_object_get(info, "virtual-size")), dsize);
	v = json_object_get(info, "cluster-size");
	if (v)
		printf("cluster_size: %" JSON_INTEGER_FORMAT "\n", json_integer_value(v));
	if (json_is_true(json_object_get(info, "dirty-flag")))
		printf("cleanly shut down: no\n");
	bf = json_string_value(json_object_get(info, "backing-filename"));
	if (bf) {
		fbf = json_string_value(json_object_get(info, "full-backing-filename"));
		printf("backing file: %s", bf);
		if (!fbf)
			printf(" (cannot determine actual path)");
		else if (strcmp(bf, fbf) != 0)
			printf(" (actual path: %s)", fbf);
		printf("\n");
		v = json_object_get(info, "backing-filename-format");
		if (v)
			printf("backing file format: %s\n", json_string_value(v));
	}
	v = json_object_get(info, "snapshots");
	if (v && json_array_size(v) > 0) {
		size_t i;
		json_t *s;

		printf("Snapshot list:\n");
		img_snapshot_dump(NULL);
		printf("\n");
		json_array_foreach(v, i, s) {
			struct vd_snapshot_info sn = { 0 };
			json_t *ic = json_object_get(s, "icount");

			snprintf(sn.id, sizeof(sn.id), "%s", json_string_value(json_object_get(s, "id")));
			snprintf(sn.name, sizeof(sn.name), "%s", json_string_value(json_object_get(s, "name")));
			sn.vm_state_size = (uint64_t)json_integer_value(json_object_get(s, "vm-state-size"));
			sn.date_sec = (uint64_t)json_integer_value(json_object_get(s, "date-sec"));
			sn.date_nsec = (uint32_t)json_integer_value(json_object_get(s, "date-nsec"));
			sn.vm_clock_nsec = (uint64_t)json_integer_value(json_object_get(s, "vm-clock-sec")) * 1000000000ull +
					   (uint64_t)json_integer_value(json_object_get(s, "vm-clock-nsec"));
			sn.icount = ic ? (uint64_t)json_integer_value(ic) : UINT64_MAX;
			img_snapshot_dump(&sn);
			printf("\n");
		}
	}
	v = json_object_get(info, "format-specific");
	if (v && json_is_object(json_object_get(v, "data"))) {
		printf("Format specific information:\n");
		img_dump_human_object(json_object_get(v, "data"), 1);
	}
}

enum { OPT_OUTPUT = 256, OPT_BACKING_CHAIN, OPT_IMAGE_OPTS };

int vd_img_info(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
		{ "force-share", no_argument, NULL, 'U' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL;
	bool json = false, chain = false, image_opts = false;
	json_t *list;
	char *filename = NULL, *fmt_buf = NULL;
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:U", longopts, NULL)) != -1) {
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
		case OPT_BACKING_CHAIN:
			chain = true;
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

	list = json_array();
	filename = strdup(argv[optind]);
	while (filename) {
		json_t *info;
		const char *next, *next_fmt;
		size_t i;
		json_t *prev;

		/* a chain that comes back to an image already seen would never end */
		json_array_foreach(list, i, prev) {
			if (strcmp(json_string_value(json_object_get(prev, "filename")), filename) == 0) {
				img_err(CMD, "Backing file '%s' creates an infinite loop.", filename);
				goto out;
			}
		}
		info = collect_info(filename, fmt, image_opts);
		if (!info)
			goto out;
		json_array_append_new(list, info);
		free(filename);
		filename = NULL;
		free(fmt_buf);
		fmt_buf = NULL;
		fmt = NULL;
		image_opts = false;
		if (!chain)
			break;
		next = json_string_value(json_object_get(info, "full-backing-filename"));
		next_fmt = json_string_value(json_object_get(info, "backing-filename-format"));
		if (next)
			filename = strdup(next);
		if (next_fmt)
			fmt = fmt_buf = strdup(next_fmt);
	}

	if (json) {
		img_json_print(chain ? list : json_array_get(list, 0));
	} else {
		size_t i;
		json_t *info;

		json_array_foreach(list, i, info) {
			if (i)
				printf("\n");
			dump_human(info);
		}
	}
	ret = 0;
out:
	free(filename);
	free(fmt_buf);
	json_decref(list);
	return ret;
}
