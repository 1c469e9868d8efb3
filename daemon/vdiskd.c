/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdiskd — the vdisk storage daemon.  Only --help and --version exist yet;
 * the daemon (block nodes, exports, control socket) is a later issue.
 */
#include <stdio.h>
#include <string.h>

#include "config.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdiskd [OPTIONS]\n"
		"\n"
		"vdisk storage daemon: serves block nodes over NBD, FUSE, vhost-user-blk,\n"
		"VDUSE and ublk.  Not implemented yet in this version: only the options\n"
		"below work.\n"
		"\n"
		"  -h, --help      show this help and exit\n"
		"  -V, --version   show the version and exit\n");
}

int main(int argc, char **argv)
{
	if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		usage(stdout);
		return 0;
	}
	if (argc == 2 && (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V"))) {
		printf("vdiskd %s\n", VDISK_VERSION);
		return 0;
	}
	fprintf(stderr, "vdiskd: the daemon is not implemented yet (try --help)\n");
	usage(stderr);
	return 2;
}
