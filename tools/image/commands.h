/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The `vdisk` image subcommands (create, info, check, convert, map, compare,
 * resize, snapshot, commit, rebase, measure, amend), one file each under
 * tools/image/.  tools/vdisk.c dispatches to them through this table.
 *
 * Each fn gets argv[0] = the subcommand's name and returns the process exit
 * status: 0 success, 1 runtime error, 2 usage error; `check` and `compare`
 * use qemu-img's documented statuses (see docs/vdisk-image.md).
 */
#ifndef VD_IMAGE_COMMANDS_H
#define VD_IMAGE_COMMANDS_H

struct vd_image_cmd {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
};

/* NULL-terminated (an entry whose name is NULL ends the table). */
extern const struct vd_image_cmd vd_image_cmds[];

#endif
