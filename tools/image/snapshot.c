/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk snapshot [-f FMT | --image-opts] [-q] [-l | -c NAME | -a NAME | -d NAME] FILE
 *
 * As qemu-img snapshot: internal snapshots (qcow2).  -l (the default)
 * prints qemu-img's table; -c creates, -a reverts the image to a snapshot,
 * -d deletes one (by name or id).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static const char *const CMD = "snapshot";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk snapshot [-f FMT | --image-opts] [-q] [-l | -c NAME | -a NAME | -d NAME] FILE\n"
		"\n"
		"List, create, apply or delete internal snapshots of the disk image FILE.\n"
		"\n"
		"  -f, --format FMT      image format (default: probed)\n"
		"  --image-opts          FILE is an option string (driver=qcow2,file.filename=...)\n"
		"  -l, --list            list the snapshots (the default)\n"
		"  -c, --create NAME     create snapshot NAME\n"
		"  -a, --apply NAME      revert the image to snapshot NAME (name or id)\n"
		"  -d, --delete NAME     delete snapshot NAME (name or id)\n"
		"  -U, --force-share     accepted for qemu-img compatibility\n"
		"  -q, --quiet           print nothing but errors\n"
		"  -h, --help            show this help\n"
		"\n"
		"Exit status: 0 success, 1 error, 2 usage error.\n");
}

static void dump_snapshots(struct vd_bnode *bs)
{
	struct vd_snapshot_info *list = NULL;
	int count = 0;

	if (!bs->fmt->snapshot_list || bs->fmt->snapshot_list(bs, &list, &count) < 0 || count <= 0) {
		free(list);
		return;
	}
	printf("Snapshot list:\n");
	img_snapshot_dump(NULL);
	printf("\n");
	for (int i = 0; i < count; i++) {
		img_snapshot_dump(&list[i]);
		printf("\n");
	}
	free(list);
}

/* 1 if a snapshot with this id or name exists, 0 if not, -errno on error. */
static int snapshot_exists(struct vd_bnode *bs, const char *name_or_id)
{
	struct vd_snapshot_info *list = NULL;
	int count = 0, found = 0, r;

	if (!bs->fmt->snapshot_list)
		return -ENOTSUP;
	img_clear_err();
	r = bs->fmt->snapshot_list(bs, &list, &count);
	if (r < 0)
		return r;
	for (int i = 0; i < count; i++)
		if (strcmp(list[i].id, name_or_id) == 0 || strcmp(list[i].name, name_or_id) == 0)
			found = 1;
	free(list);
	return found;
}

enum { OPT_IMAGE_OPTS = 256 };

int vd_img_snapshot(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "list", no_argument, NULL, 'l' },
		{ "apply", required_argument, NULL, 'a' },
		{ "create", required_argument, NULL, 'c' },
		{ "delete", required_argument, NULL, 'd' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	struct vd_cache_mode cache = { .writeback = true };
	const char *fmt = NULL, *name = NULL;
	bool image_opts = false;
	int action = 0, c, r, ret = IMG_EXIT_ERR;
	struct vd_bnode *bs;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:la:c:d:Uq", longopts, NULL)) != -1) {
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
		case 'l':
		case 'a':
		case 'c':
		case 'd':
			if (action)
				return img_usage_err(CMD, "Cannot mix '-l', '-a', '-c', '-d'");
			action = c;
			name = optarg;
			break;
		case 'U':
		case 'q':
			break;
		default:
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (optind != argc - 1)
		return img_usage_err(CMD, "Expecting one image file name");
	if (!action)
		action = 'l';
	if (name && !*name)
		return img_usage_err(CMD, "The snapshot name must not be empty");

	bs = img_open(CMD, argv[optind], fmt, image_opts, &cache, action == 'l' ? 0 : VD_BO_RDWR);
	if (!bs)
		return IMG_EXIT_ERR;

	img_clear_err();
	switch (action) {
	case 'l':
		dump_snapshots(bs);
		ret = 0;
		break;
	case 'c':
		r = bs->fmt->snapshot_create ? bs->fmt->snapshot_create(bs, name) : -ENOTSUP;
		if (r < 0) {
			img_err(CMD, "Could not create snapshot '%s': %s", name,
				r == -ENOTSUP && !bs->fmt->snapshot_create ? "the format does not support snapshots"
									   : img_errmsg(r));
			break;
		}
		ret = 0;
		break;
	case 'a':
		r = bs->fmt->snapshot_goto ? snapshot_exists(bs, name) : -ENOTSUP;
		if (r == 0) {
			img_err(CMD, "Could not apply snapshot '%s': snapshot not found", name);
			break;
		}
		if (r > 0) {
			img_clear_err();
			r = bs->fmt->snapshot_goto(bs, name);
		}
		if (r < 0) {
			img_err(CMD, "Could not apply snapshot '%s': %s", name,
				!bs->fmt->snapshot_goto ? "the format does not support snapshots" : img_errmsg(r));
			break;
		}
		ret = 0;
		break;
	case 'd':
		r = bs->fmt->snapshot_delete ? snapshot_exists(bs, name) : -ENOTSUP;
		if (r == 0) {
			img_err(CMD, "Could not delete snapshot '%s': snapshot not found", name);
			break;
		}
		if (r > 0) {
			img_clear_err();
			r = bs->fmt->snapshot_delete(bs, name);
		}
		if (r < 0) {
			img_err(CMD, "Could not delete snapshot '%s': %s", name,
				!bs->fmt->snapshot_delete ? "the format does not support snapshots" : img_errmsg(r));
			break;
		}
		ret = 0;
		break;
	}
	if (ret == 0 && action != 'l') {
		img_clear_err();
		r = vd_bnode_flush(bs);
		if (r < 0) {
			img_err(CMD, "flush failed: %s", img_errmsg(r));
			ret = IMG_EXIT_ERR;
		}
	}
	vd_bnode_unref(bs);
	return ret;
}
