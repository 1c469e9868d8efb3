/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Shared helpers of the `vdisk` image subcommands: messages, option and size
 * parsing, opening images, block status through a backing chain, coroutine
 * plumbing, JSON and human-readable output, progress.
 *
 * Conventions (as qemu-img's, so its users feel at home):
 *  - errors go to stderr as "vdisk <cmd>: <message>", the message coming
 *    from vdisk_get_error_msg() when the block layer failed;
 *  - exit status 0 success, 1 runtime error, 2 usage error (check and
 *    compare have their own statuses, documented in docs/vdisk-image.md);
 *  - JSON is printed with 4-space indentation and qemu-img's key names.
 *
 * I/O-heavy bodies run in one coroutine (img_run_co) and use the
 * vd_bnode_co_*() entry points; opening and closing nodes happens outside.
 * Coroutine stacks are small (64 KiB): data buffers come from vd_blk_alloc().
 */
#ifndef VD_IMAGE_COMMON_H
#define VD_IMAGE_COMMON_H

#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "block.h"
#include "commands.h"
#include "vdisk.h"

enum { IMG_EXIT_OK = 0, IMG_EXIT_ERR = 1, IMG_EXIT_USAGE = 2 };

/* Buffer size of one copy/compare step (as qemu-img's IO_BUF_SIZE). */
#define IMG_IO_BUF_SIZE (2u * 1024 * 1024)
#define IMG_SECTOR 512u

#define IMG_PRINTF(a, b) __attribute__((format(printf, a, b)))

/* ---- messages ---------------------------------------------------------------- */

/* "vdisk <cmd>: <message>\n" on stderr. */
void img_err(const char *cmd, const char *fmt, ...) IMG_PRINTF(2, 3);
void img_warn(const char *cmd, const char *fmt, ...) IMG_PRINTF(2, 3);
/* Forget the last block-layer message (call before an operation whose failure we report). */
void img_clear_err(void);
/* The block layer's message for a failed call that returned ret (-errno). */
const char *img_errmsg(int ret);
/* Print a usage error plus "Try 'vdisk <cmd> --help'."; returns IMG_EXIT_USAGE. */
int img_usage_err(const char *cmd, const char *fmt, ...) IMG_PRINTF(2, 3);
/* For getopt's '?' and ':' results c (opterr is 0): returns IMG_EXIT_USAGE. */
int img_bad_option(const char *cmd, int c, int argc, char **argv);
/* Reset getopt for a new parse (every subcommand calls this first). */
void img_getopt_reset(void);

/* ---- parsing ------------------------------------------------------------------ */

/*
 * Sizes as qemu-img: a number (decimal fraction allowed) with an optional
 * suffix b/B (bytes), k/K, M, G, T, P, E (powers of 1024).  0 or -EINVAL/-ERANGE.
 */
int img_parse_size(const char *s, uint64_t *out);
/* --output human|json */
int img_parse_output(const char *cmd, const char *s, bool *json);
/* -t/-T cache mode; what names it in the message ("cache", "source cache"). */
int img_parse_cache(const char *cmd, const char *name, const char *what, struct vd_cache_mode *out);

/*
 * -o "key=value,key2=value2" (",," is a literal comma): a flat JSON object of
 * strings, merged into `into` (created when NULL).  A bare key means "on",
 * except "help" and "?" which ask for the option list.  NULL + message on error.
 */
json_t *img_parse_opts(const char *cmd, const char *str, json_t *into);
bool img_opts_want_help(json_t *opts);
/*
 * Check -o options of format fmt for `what` ("create" or "amend") against the
 * known option table (raw, qcow2; other formats are passed through).  Prints
 * "Invalid parameter 'x'" and the like; 0 or -EINVAL.
 */
int img_check_format_opts(const char *cmd, const char *fmt, json_t *opts, const char *what);
/* Whether `-o help` can answer for fmt (a known option table, or a registered format). */
bool img_format_has_opt_list(const char *fmt);
/* Print the option list of fmt ("Supported options:" ...). */
void img_print_format_opts(const char *fmt, const char *what);

/* ---- opening -------------------------------------------------------------------- */

/*
 * Open an image: spec is a filename (or, with image_opts, an option string
 * "driver=qcow2,file.filename=..."), fmt forces a format (NULL probes).
 * Prints "Could not open 'spec': ..." on failure.
 */
struct vd_bnode *img_open(const char *cmd, const char *spec, const char *fmt, bool image_opts,
			  const struct vd_cache_mode *cache, int flags);
/* The format name of a node ("raw", "qcow2"). */
const char *img_fmt_name(const struct vd_bnode *bs);
/* Cluster size of a format node, 0 if it has none. */
uint32_t img_cluster_size(struct vd_bnode *bs);

/* qemu's path_combine(): filename relative to the directory of base_path.  malloc'd. */
char *img_path_combine(const char *base_path, const char *filename);
/* Format of the image at path: fmt if given (validated), else probed.  NULL + message on error. */
const char *img_resolve_fmt(const char *cmd, const char *path, const char *fmt);

/* ---- block status (call from a coroutine) ---------------------------------------- */

/*
 * One layer's status, as QEMU's bdrv_block_status() (the framework adds
 * ALLOCATED for DATA/ZERO answers, ZERO for unallocated ranges with no
 * backing or past the backing's end, and answers RECURSE).  len is clamped
 * to the node's size; *pnum > 0 on success.
 */
int img_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			struct vd_bnode **file);
/*
 * Status through the chain from top down to base (exclusive; NULL = whole
 * chain), as QEMU's bdrv_block_status_above(): the answer of the first layer
 * that has the range allocated, ZERO|ALLOCATED past the end of a short
 * backing file, else the bottom layer's (unallocated) answer.
 */
int img_co_block_status_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
			      uint64_t *pnum, uint64_t *map, struct vd_bnode **file);
/*
 * As QEMU's bdrv_is_allocated_above(): 1 if some layer from top down to base
 * (exclusive) has the range allocated, 0 if none, with *pnum bytes alike.
 */
int img_co_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
			      uint64_t *pnum);

/* ---- coroutines ------------------------------------------------------------------- */

/* Run fn(arg) in a coroutine, driving this thread's loop until it returns; its result. */
int img_run_co(int (*fn)(void *arg), void *arg);

/* ---- output ----------------------------------------------------------------------- */

/* qemu's size_to_str(): "64 MiB", "1.26 MiB", "0 B". */
void img_size_to_str(uint64_t v, char *buf, size_t len);
/* Pretty JSON (4-space indent, insertion order) and a newline on stdout. */
void img_json_print(json_t *o);
/* Dump a JSON object as qemu's "Format specific information" (keys with '-' -> ' '). */
void img_dump_human_object(json_t *o, int indent);

/* Snapshot table (qemu's bdrv_snapshot_dump): header when sn is NULL, no newline. */
void img_snapshot_dump(const struct vd_snapshot_info *sn);

/* ---- progress (-p) ------------------------------------------------------------------ */

void img_progress_init(bool enabled);
void img_progress_print(double percent); /* absolute 0..100 */
void img_progress_end(void);

/* ---- misc --------------------------------------------------------------------------- */

bool img_is_zero(const void *buf, size_t len);
/* Index of the first 512-byte sector of buf with a non-zero byte, or -1 (qemu's find_nonzero). */
int64_t img_find_nonzero(const uint8_t *buf, size_t len);
/* qemu's compare_buffers(): status of the first chunk (0 same, 1 differ) and *pnum alike. */
int img_compare_buffers(const uint8_t *a, const uint8_t *b, uint64_t len, uint64_t chunk, uint64_t *pnum);

/* The subcommands. */
int vd_img_create(int argc, char **argv);
int vd_img_info(int argc, char **argv);
int vd_img_check(int argc, char **argv);
int vd_img_convert(int argc, char **argv);
int vd_img_map(int argc, char **argv);
int vd_img_compare(int argc, char **argv);
int vd_img_resize(int argc, char **argv);
int vd_img_snapshot(int argc, char **argv);
int vd_img_commit(int argc, char **argv);
int vd_img_rebase(int argc, char **argv);
int vd_img_measure(int argc, char **argv);
int vd_img_amend(int argc, char **argv);

#endif
