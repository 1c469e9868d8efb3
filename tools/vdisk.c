/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk — the command-line tool.  main() only dispatches: each subcommand
 * lives in its own tools/<name>.c and is one line in the table below
 * (the image commands in tools/image/, plus bench).
 *
 * Exit status, for every subcommand: 0 success, 1 runtime failure,
 * 2 usage error.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "image/commands.h"

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

static const struct subcommand tool_commands[] = {
	{ "bench", "measure libvdisk drivers or block nodes with a fio-like workload", vd_bench_main },
};
#define N_TOOL_COMMANDS (sizeof(tool_commands) / sizeof(tool_commands[0]))

/* The image commands (tools/image/) first, then the tool's own. */
static size_t n_subcommands(void)
{
	size_t n = 0;

	while (vd_image_cmds[n].name)
		n++;
	return n + N_TOOL_COMMANDS;
}

static struct subcommand subcommand_at(size_t i)
{
	size_t n_image = n_subcommands() - N_TOOL_COMMANDS;

	if (i < n_image)
		return (struct subcommand){ vd_image_cmds[i].name, vd_image_cmds[i].summary, vd_image_cmds[i].fn };
	return tool_commands[i - n_image];
}

enum { EXIT_USAGE = 2 };

static const struct subcommand *find_subcommand(const char *name)
{
	static struct subcommand found;

	for (size_t i = 0; i < n_subcommands(); i++) {
		found = subcommand_at(i);
		if (strcmp(found.name, name) == 0)
			return &found;
	}
	return NULL;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk COMMAND [OPTIONS]\n"
		"       vdisk help COMMAND\n"
		"\n"
		"vdisk command-line tool: disk images (qemu-img's jobs, same option names)\n"
		"and benchmarks of libvdisk drivers and block nodes.\n"
		"\n"
		"Commands:\n");
	for (size_t i = 0; i < n_subcommands(); i++)
		fprintf(out, "  %-10s %s\n", subcommand_at(i).name, subcommand_at(i).summary);
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
	for (size_t i = 0; i < n_subcommands(); i++)
		fprintf(stderr, "%s %s", i ? "," : "", subcommand_at(i).name);
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
