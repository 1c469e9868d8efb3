/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk — the command-line tool.  main() only dispatches: each subcommand
 * lives in its own tools/<name>.c and is one line in the table below
 * (bench today; create, info, check, convert, map, ... later).
 *
 * Exit status, for every subcommand: 0 success, 1 runtime failure,
 * 2 usage error.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "config.h"

/*
 * Each subcommand is a main (argv[0] is the subcommand's name) returning the
 * exit status, and prints its own usage for --help, which is also how
 * `vdisk help CMD` works.  These prototypes belong in a shared tools header
 * once more subcommands exist.
 */
int vd_bench_main(int argc, char **argv);

struct subcommand {
	const char *name;
	const char *summary;
	int (*main)(int argc, char **argv);
};

static const struct subcommand subcommands[] = {
	{ "bench", "measure libvdisk drivers with a fio-like workload", vd_bench_main },
};
#define N_SUBCOMMANDS (sizeof(subcommands) / sizeof(subcommands[0]))

enum { EXIT_USAGE = 2 };

static const struct subcommand *find_subcommand(const char *name)
{
	for (size_t i = 0; i < N_SUBCOMMANDS; i++)
		if (strcmp(subcommands[i].name, name) == 0)
			return &subcommands[i];
	return NULL;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk COMMAND [OPTIONS]\n"
		"       vdisk help COMMAND\n"
		"\n"
		"vdisk command-line tool: benchmarks libvdisk drivers (image commands such\n"
		"as create, info, check, convert and map will follow).\n"
		"\n"
		"Commands:\n");
	for (size_t i = 0; i < N_SUBCOMMANDS; i++)
		fprintf(out, "  %-10s %s\n", subcommands[i].name, subcommands[i].summary);
	fprintf(out,
		"\n"
		"Options:\n"
		"  -h, --help      show this help and exit\n"
		"  -V, --version   show the version and exit\n"
		"\n"
		"Run 'vdisk help COMMAND' or 'vdisk COMMAND --help' for a command's options.\n"
		"Exit status: 0 success, 1 runtime failure, 2 usage error.\n");
}

static int unknown_command(const char *name)
{
	fprintf(stderr, "vdisk: unknown command '%s' (known:", name);
	for (size_t i = 0; i < N_SUBCOMMANDS; i++)
		fprintf(stderr, "%s %s", i ? "," : "", subcommands[i].name);
	fprintf(stderr, ")\nTry 'vdisk --help'.\n");
	return EXIT_USAGE;
}

/* `vdisk help CMD` is `vdisk CMD --help`. */
static int run_help(const struct subcommand *cmd)
{
	char name[64], help[] = "--help";
	char *argv[] = { name, help, NULL };

	snprintf(name, sizeof(name), "%s", cmd->name);
	return cmd->main(2, argv);
}

/* vdisk help [COMMAND] */
static int help_main(int argc, char **argv)
{
	const struct subcommand *cmd;

	if (argc == 1) {
		usage(stdout);
		return 0;
	}
	if (argc > 2) {
		fprintf(stderr, "vdisk help: expected one command name, got %d arguments\n", argc - 1);
		return EXIT_USAGE;
	}
	cmd = find_subcommand(argv[1]);
	if (!cmd)
		return unknown_command(argv[1]);
	return run_help(cmd);
}

static bool is_option(const char *arg, const char *short_name, const char *long_name)
{
	return strcmp(arg, short_name) == 0 || strcmp(arg, long_name) == 0;
}

int main(int argc, char **argv)
{
	const struct subcommand *cmd;

	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (is_option(argv[1], "-h", "--help")) {
		usage(stdout);
		return 0;
	}
	if (is_option(argv[1], "-V", "--version")) {
		printf("vdisk %s\n", VDISK_VERSION);
		return 0;
	}
	if (argv[1][0] == '-') {
		fprintf(stderr, "vdisk: unknown option '%s' (a command comes first; try 'vdisk --help')\n", argv[1]);
		return EXIT_USAGE;
	}
	if (strcmp(argv[1], "help") == 0)
		return help_main(argc - 1, argv + 1);
	cmd = find_subcommand(argv[1]);
	if (!cmd)
		return unknown_command(argv[1]);
	return cmd->main(argc - 1, argv + 1);
}
