/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Shared helpers of the `vdisk` image subcommands (see common.h), and the
 * subcommand table that tools/vdisk.c dispatches through.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "coroutine.h"

const struct vd_image_cmd vd_image_cmds[] = {
	{ "create", vd_img_create, "create a new disk image" },
	{ "info", vd_img_info, "show information about a disk image (and its backing chain)" },
	{ "check", vd_img_check, "check (and repair) the consistency of a disk image" },
	{ "convert", vd_img_convert, "convert/copy an image to another format or file" },
	{ "map", vd_img_map, "dump the allocation map of an image" },
	{ "compare", vd_img_compare, "check whether two images have the same content" },
	{ "resize", vd_img_resize, "change the virtual size of an image" },
	{ "snapshot", vd_img_snapshot, "list, create, apply or delete internal snapshots" },
	{ "commit", vd_img_commit, "commit an overlay's changes into its backing file" },
	{ "rebase", vd_img_rebase, "change the backing file of an image" },
	{ "measure", vd_img_measure, "compute the file size needed for a new image" },
	{ "amend", vd_img_amend, "change format-specific options of an image" },
	{ NULL, NULL, NULL },
};

/* ---- messages ------------------------------------------------------------------ */

static void vmsg(const char *cmd, const char *prefix, const char *fmt, va_list ap)
{
	fflush(stdout);
	fprintf(stderr, "vdisk %s: %s", cmd, prefix);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

void img_err(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(cmd, "", fmt, ap);
	va_end(ap);
}

void img_warn(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(cmd, "warning: ", fmt, ap);
	va_end(ap);
}

void img_clear_err(void)
{
	vd_error_clear();
}

const char *img_errmsg(int ret)
{
	const char *m = vdisk_get_error_msg();

	if (m && *m)
		return m;
	return strerror(ret < 0 ? -ret : (ret ? ret : EIO));
}

int img_usage_err(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmsg(cmd, "", fmt, ap);
	va_end(ap);
	fprintf(stderr, "Try 'vdisk %s --help' for more information.\n", cmd);
	return IMG_EXIT_USAGE;
}

int img_bad_option(const char *cmd, int c, int argc, char **argv)
{
	const char *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "?";
	bool is_long = arg[0] == '-' && arg[1] == '-';

	if (c == ':') {
		if (is_long)
			return img_usage_err(cmd, "option '%s' requires an argument", arg);
		return img_usage_err(cmd, "option requires an argument -- '%c'", optopt);
	}
	if (!is_long && optopt > 0 && optopt < 256)
		return img_usage_err(cmd, "invalid option -- '%c'", optopt);
	return img_usage_err(cmd, "unrecognized option '%s'", arg);
}

void img_getopt_reset(void)
{
	optind = 0; /* glibc: full reinitialisation */
	opterr = 0;
	optopt = 0;
}

/* ---- parsing ---------------------------------------------------------------------- */

int img_parse_size(const char *s, uint64_t *out)
{
	char *end;
	long double v;
	uint64_t mult = 1;

	if (!s || !*s)
		return -EINVAL;
	while (isspace((unsigned char)*s))
		s++;
	if (*s == '-')
		return -EINVAL;
	errno = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		unsigned long long h = strtoull(s, &end, 16);
		if (errno)
			return -ERANGE;
		v = (long double)h;
	} else {
		if (!isdigit((unsigned char)*s) && *s != '.')
			return -EINVAL;
		v = strtold(s, &end);
		if (errno == ERANGE)
			return -ERANGE;
	}
	if (end == s)
		return -EINVAL;
	switch (*end) {
	case '\0':
		break;
	case 'b': case 'B': mult = 1; end++; break;
	case 'k': case 'K': mult = 1ull << 10; end++; break;
	case 'm': case 'M': mult = 1ull << 20; end++; break;
	case 'g': case 'G': mult = 1ull << 30; end++; break;
	case 't': case 'T': mult = 1ull << 40; end++; break;
	case 'p': case 'P': mult = 1ull << 50; end++; break;
	case 'e': case 'E': mult = 1ull << 60; end++; break;
	default:
		return -EINVAL;
	}
	if (*end)
		return -EINVAL;
	v *= mult;
	if (v >= 9223372036854775808.0L) /* qemu's limit: less than 8 EiB */
		return -ERANGE;
	*out = (uint64_t)v;
	return 0;
}

int img_parse_output(const char *cmd, const char *s, bool *json)
{
	if (strcmp(s, "json") == 0) {
		*json = true;
		return 0;
	}
	if (strcmp(s, "human") == 0) {
		*json = false;
		return 0;
	}
	img_usage_err(cmd, "--output must be used with human or json as argument.");
	return -EINVAL;
}

int img_parse_cache(const char *cmd, const char *name, const char *what, struct vd_cache_mode *out)
{
	if (vd_cache_mode_parse(name, out) < 0) {
		img_err(cmd, "Invalid %s option: %s (expected none, writeback, writethrough, directsync or unsafe)",
			what, name);
		return -EINVAL;
	}
	return 0;
}

json_t *img_parse_opts(const char *cmd, const char *str, json_t *into)
{
	json_t *o = into ? into : json_object();
	size_t n = strlen(str);
	char *key = malloc(n + 8), *val = malloc(n + 8);
	const char *p = str;

	if (!o || !key || !val)
		goto oom;
	while (*p) {
		size_t k = 0, v = 0;
		bool has_val = false;

		while (*p && *p != '=' && *p != ',')
			key[k++] = *p++;
		key[k] = '\0';
		if (*p == '=') {
			has_val = true;
			p++;
			while (*p) {
				if (*p == ',') {
					if (p[1] == ',') { /* ",," is a literal comma */
						val[v++] = ',';
						p += 2;
						continue;
					}
					break;
				}
				val[v++] = *p++;
			}
		}
		val[v] = '\0';
		if (*p == ',')
			p++;
		if (k == 0) {
			if (!has_val && v == 0 && *p == '\0' && p > str && p[-1] == ',')
				break; /* trailing comma */
			img_err(cmd, "Invalid option list: %s (empty option name)", str);
			goto fail;
		}
		if (!has_val && (strcmp(key, "help") == 0 || strcmp(key, "?") == 0)) {
			memcpy(key, "help", 5);
			memcpy(val, "help", 5);
		} else if (!has_val) {
			memcpy(val, "on", 3);
		}
		if (json_object_set_new(o, key, json_string(val)) < 0)
			goto oom;
	}
	free(key);
	free(val);
	return o;
oom:
	img_err(cmd, "out of memory");
fail:
	free(key);
	free(val);
	if (!into)
		json_decref(o);
	return NULL;
}

bool img_opts_want_help(json_t *opts)
{
	return opts && json_object_get(opts, "help") != NULL;
}

/* The -o options vdisk knows per format (QEMU's names and meanings). */
enum opt_type { OT_STR, OT_SIZE, OT_BOOL, OT_NUM, OT_CHOICE };

struct fmt_opt {
	const char *name;
	enum opt_type type;
	const char *choices; /* OT_CHOICE: "a|b|c" */
	const char *help;
	bool amend;          /* may be changed by amend */
};

static const struct fmt_opt qcow2_opts[] = {
	{ "size", OT_SIZE, NULL, "Virtual disk size", true },
	{ "compat", OT_CHOICE, "0.10|1.1|v2|v3", "Compatibility level (v2 [0.10] or v3 [1.1])", true },
	{ "backing_file", OT_STR, NULL, "File name of a base image", true },
	{ "backing_fmt", OT_STR, NULL, "Image format of the base image", true },
	{ "cluster_size", OT_SIZE, NULL, "qcow2 cluster size", false },
	{ "preallocation", OT_CHOICE, "off|metadata|falloc|full",
	  "Preallocation mode (allowed values: off, metadata, falloc, full)", false },
	{ "lazy_refcounts", OT_BOOL, NULL, "Postpone refcount updates", true },
	{ "refcount_bits", OT_NUM, NULL, "Width of a reference count entry in bits", true },
	{ "compression_type", OT_CHOICE, "zlib|zstd", "Compression method used for image cluster compression",
	  false },
	{ "extended_l2", OT_BOOL, NULL, "Extended L2 tables", false },
	{ NULL, 0, NULL, NULL, false },
};

static const struct fmt_opt raw_opts[] = {
	{ "size", OT_SIZE, NULL, "Virtual disk size", false },
	{ "preallocation", OT_CHOICE, "off|falloc|full", "Preallocation mode (allowed values: off, falloc, full)",
	  false },
	{ NULL, 0, NULL, NULL, false },
};

/* QEMU options that vdisk does not implement: a clearer message than "invalid". */
static const char *const unsupported_opts[] = {
	"data_file", "data_file_raw", "encryption", "encrypt.format", "encrypt.key-secret", "nocow",
	"extent_size_hint", "cluster_size_raw", NULL,
};

static const struct fmt_opt *fmt_opt_table(const char *fmt)
{
	if (strcmp(fmt, "qcow2") == 0)
		return qcow2_opts;
	if (strcmp(fmt, "raw") == 0)
		return raw_opts;
	return NULL;
}

static bool choice_ok(const char *choices, const char *v)
{
	size_t n = strlen(v);
	const char *p = choices;

	while (p && *p) {
		const char *bar = strchr(p, '|');
		size_t len = bar ? (size_t)(bar - p) : strlen(p);
		if (len == n && strncmp(p, v, n) == 0)
			return true;
		p = bar ? bar + 1 : NULL;
	}
	return false;
}

static bool parse_bool(const char *v, bool *out)
{
	if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "y")) {
		*out = true;
		return true;
	}
	if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false") || !strcmp(v, "n")) {
		*out = false;
		return true;
	}
	return false;
}

int img_check_format_opts(const char *cmd, const char *fmt, json_t *opts, const char *what)
{
	const struct fmt_opt *table = fmt_opt_table(fmt);
	bool amend = strcmp(what, "amend") == 0;
	const char *key;
	json_t *val;

	if (!table || !opts)
		return 0;
	json_object_foreach(opts, key, val) {
		const struct fmt_opt *o;
		const char *v = json_is_string(val) ? json_string_value(val) : "";

		for (o = table; o->name; o++)
			if (strcmp(o->name, key) == 0)
				break;
		if (!o->name) {
			for (const char *const *u = unsupported_opts; *u; u++) {
				if (strcmp(*u, key) == 0) {
					img_err(cmd, "Parameter '%s' is not supported by vdisk's %s driver", key, fmt);
					return -EINVAL;
				}
			}
			img_err(cmd, "Invalid parameter '%s' for format '%s' (see -o help)", key, fmt);
			return -EINVAL;
		}
		if (amend && !o->amend) {
			img_err(cmd, "Invalid parameter '%s': this option is only supported for image creation", key);
			return -EINVAL;
		}
		switch (o->type) {
		case OT_STR:
			break;
		case OT_SIZE: {
			uint64_t sz;
			if (img_parse_size(v, &sz) < 0) {
				img_err(cmd, "Parameter '%s' expects a size (with an optional k, M, G, T, P or E suffix), "
					"not '%s'", key, v);
				return -EINVAL;
			}
			if (strcmp(key, "cluster_size") == 0 && (sz < 512 || sz > (2u << 20) || (sz & (sz - 1)))) {
				img_err(cmd, "Cluster size must be a power of two between 512 and 2048k");
				return -EINVAL;
			}
			break;
		}
		case OT_BOOL: {
			bool b;
			if (!parse_bool(v, &b)) {
				img_err(cmd, "Parameter '%s' expects 'on' or 'off', not '%s'", key, v);
				return -EINVAL;
			}
			break;
		}
		case OT_NUM: {
			char *end;
			unsigned long long n;
			errno = 0;
			n = strtoull(v, &end, 10);
			if (errno || end == v || *end) {
				img_err(cmd, "Parameter '%s' expects a number, not '%s'", key, v);
				return -EINVAL;
			}
			if (strcmp(key, "refcount_bits") == 0 && (n == 0 || n > 64 || (n & (n - 1)))) {
				img_err(cmd, "Refcount width must be a power of two and may not exceed 64 bits");
				return -EINVAL;
			}
			break;
		}
		case OT_CHOICE:
			if (!choice_ok(o->choices, v)) {
				img_err(cmd, "Parameter '%s' does not accept value '%s' (allowed: %s)", key, v, o->choices);
				return -EINVAL;
			}
			break;
		}
	}
	return 0;
}

bool img_format_has_opt_list(const char *fmt)
{
	return fmt_opt_table(fmt) != NULL || vd_format_find(fmt) != NULL;
}

void img_print_format_opts(const char *fmt, const char *what)
{
	const struct fmt_opt *table = fmt_opt_table(fmt);
	bool amend = strcmp(what, "amend") == 0;

	if (!table) {
		printf("No option list is known for format '%s'.\n", fmt);
		return;
	}
	if (amend)
		printf("Amend options for '%s':\n", fmt);
	else
		printf("Supported options:\n");
	for (const struct fmt_opt *o = table; o->name; o++) {
		static const char *const tn[] = { "<str>", "<size>", "<bool (on/off)>", "<num>", "<str>" };
		char left[64];

		if (amend && !o->amend)
			continue;
		snprintf(left, sizeof(left), "%s=%s", o->name, tn[o->type]);
		printf("  %-22s - %s\n", left, o->help);
	}
}

/* ---- opening ------------------------------------------------------------------------ */

struct vd_bnode *img_open(const char *cmd, const char *spec, const char *fmt, bool image_opts,
			  const struct vd_cache_mode *cache, int flags)
{
	struct vd_bnode *bs;

	if (fmt && !vd_format_find(fmt)) {
		img_err(cmd, "Unknown file format '%s'", fmt);
		return NULL;
	}
	img_clear_err();
	if (image_opts) {
		json_t *o;

		if (fmt) {
			img_err(cmd, "--image-opts and --format/-f are mutually exclusive");
			return NULL;
		}
		o = vd_opts_parse(spec);
		if (!o) {
			img_err(cmd, "Invalid option string '%s': %s", spec, img_errmsg(-EINVAL));
			return NULL;
		}
		bs = vd_bnode_open_opts(o, cache, flags);
		json_decref(o);
	} else {
		bs = vd_bnode_open(spec, fmt, cache, flags);
	}
	if (!bs)
		img_err(cmd, "Could not open '%s': %s", spec, img_errmsg(-EIO));
	return bs;
}

const char *img_fmt_name(const struct vd_bnode *bs)
{
	return bs && bs->fmt && bs->fmt->name ? bs->fmt->name : "unknown";
}

uint32_t img_cluster_size(struct vd_bnode *bs)
{
	if (!bs || !bs->fmt || !bs->fmt->cluster_size)
		return 0;
	return bs->fmt->cluster_size(bs);
}

char *img_path_combine(const char *base_path, const char *filename)
{
	const char *slash;
	size_t dirlen;
	char *out;

	if (filename[0] == '/' || !base_path || strncmp(filename, "json:", 5) == 0)
		return strdup(filename);
	slash = strrchr(base_path, '/');
	dirlen = slash ? (size_t)(slash - base_path) + 1 : 0;
	out = malloc(dirlen + strlen(filename) + 1);
	if (!out)
		return NULL;
	memcpy(out, base_path, dirlen);
	memcpy(out + dirlen, filename, strlen(filename) + 1);
	return out;
}

const char *img_resolve_fmt(const char *cmd, const char *path, const char *fmt)
{
	const char *probed;

	if (fmt) {
		if (!vd_format_find(fmt)) {
			img_err(cmd, "Unknown file format '%s'", fmt);
			return NULL;
		}
		return fmt;
	}
	if (access(path, R_OK) != 0) {
		img_err(cmd, "Could not open '%s': %s", path, strerror(errno));
		return NULL;
	}
	probed = vd_format_probe(path);
	if (!probed) {
		img_err(cmd, "Could not determine the format of '%s': %s", path, img_errmsg(-EINVAL));
		return NULL;
	}
	return probed;
}

/* ---- block status ---------------------------------------------------------------------- */

int img_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			struct vd_bnode **file)
{
	uint64_t lmap = 0, n = 0;
	struct vd_bnode *lfile = NULL;
	int ret;

	if (off >= bs->size || len == 0) {
		*pnum = 0;
		return VD_BS_EOF;
	}
	if (len > bs->size - off)
		len = bs->size - off;
	/* the framework normalises (RECURSE, ALLOCATED, ZERO without backing, EOF) */
	ret = vd_bnode_co_block_status(bs, off, len, &n, &lmap, &lfile);
	if (ret < 0)
		return ret;
	if (n == 0 || n > len)
		return -EIO; /* a format must make progress */
	*pnum = n;
	if (map)
		*map = lmap;
	if (file)
		*file = (ret & VD_BS_OFFSET_VALID) ? lfile : NULL;
	return ret;
}

int img_co_block_status_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
			      uint64_t *pnum, uint64_t *map, struct vd_bnode **file)
{
	struct vd_bnode *p;
	int ret;

	ret = img_co_block_status(top, off, len, pnum, map, file);
	if (ret < 0 || (ret & VD_BS_ALLOCATED) || top == base || *pnum == 0)
		return ret;
	len = *pnum;
	for (p = top->backing; p && p != base; p = p->backing) {
		if (off >= p->size) {
			/* Past a short backing file: zeroes, "allocated" at this layer. */
			*pnum = len;
			if (map)
				*map = 0;
			if (file)
				*file = p;
			return VD_BS_ZERO | VD_BS_ALLOCATED;
		}
		ret = img_co_block_status(p, off, len, pnum, map, file);
		if (ret < 0 || (ret & VD_BS_ALLOCATED))
			return ret & ~VD_BS_EOF;
		len = *pnum;
	}
	return ret;
}

int img_co_is_allocated_above(struct vd_bnode *top, struct vd_bnode *base, uint64_t off, uint64_t len,
			      uint64_t *pnum)
{
	int ret;

	if (off >= top->size || len == 0) {
		*pnum = 0;
		return 0;
	}
	if (len > top->size - off)
		len = top->size - off;
	*pnum = 0;
	ret = vd_bnode_co_is_allocated_above(top, base, off, len, pnum);
	if (ret >= 0 && (*pnum == 0 || *pnum > len))
		return -EIO;
	return ret;
}

/* ---- coroutines ------------------------------------------------------------------------- */

struct co_call {
	int (*fn)(void *);
	void *arg;
	int ret;
};

static void co_call_entry(void *opaque)
{
	struct co_call *c = opaque;

	c->ret = c->fn(c->arg);
}

int img_run_co(int (*fn)(void *arg), void *arg)
{
	struct co_call c = { .fn = fn, .arg = arg, .ret = -EINPROGRESS };

	vd_co_run_sync(co_call_entry, &c);
	return c.ret;
}

/* ---- output ---------------------------------------------------------------------------- */

void img_size_to_str(uint64_t v, char *buf, size_t len)
{
	static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
	int i = 0;

	/* qemu: switch to the next unit once the number would reach 1000 */
	while (i < 6 && v >= (1000ull << (10 * i)))
		i++;
	snprintf(buf, len, "%0.3g %sB", (double)v / (double)(1ull << (10 * i)), suffixes[i]);
}

void img_json_print(json_t *o)
{
	char *s = json_dumps(o, JSON_INDENT(4) | JSON_PRESERVE_ORDER);

	if (s) {
		fputs(s, stdout);
		fputc('\n', stdout);
		free(s);
	}
}

static void dump_human_value(json_t *v, int indent);

void img_dump_human_object(json_t *o, int indent)
{
	const char *key;
	json_t *v;

	json_object_foreach(o, key, v) {
		bool composite = json_is_object(v) || json_is_array(v);

		printf("%*s", indent * 4, "");
		for (const char *k = key; *k; k++)
			putchar(*k == '-' ? ' ' : *k);
		printf(":%c", composite ? '\n' : ' ');
		dump_human_value(v, indent + 1);
	}
}

static void dump_human_value(json_t *v, int indent)
{
	size_t i;
	json_t *e;

	switch (json_typeof(v)) {
	case JSON_OBJECT:
		img_dump_human_object(v, indent);
		break;
	case JSON_ARRAY:
		json_array_foreach(v, i, e) {
			bool composite = json_is_object(e) || json_is_array(e);
			printf("%*s[%zu]:%c", indent * 4, "", i, composite ? '\n' : ' ');
			dump_human_value(e, indent + 1);
		}
		break;
	case JSON_STRING:
		printf("%s\n", json_string_value(v));
		break;
	case JSON_INTEGER:
		printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(v));
		break;
	case JSON_REAL:
		printf("%g\n", json_real_value(v));
		break;
	case JSON_TRUE:
		printf("true\n");
		break;
	case JSON_FALSE:
		printf("false\n");
		break;
	case JSON_NULL:
		printf("null\n");
		break;
	}
}

void img_snapshot_dump(const struct vd_snapshot_info *sn)
{
	char clock_buf[64], icount_buf[32] = "", date_buf[64], size_buf[32];
	uint64_t secs;
	time_t t;
	struct tm tm;

	if (!sn) {
		printf("%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
		return;
	}
	t = (time_t)sn->date_sec;
	localtime_r(&t, &tm);
	strftime(date_buf, sizeof(date_buf), "%Y-%m-%d %H:%M:%S", &tm);
	secs = sn->vm_clock_nsec / 1000000000ull;
	snprintf(clock_buf, sizeof(clock_buf), "%02d:%02d:%02d.%03d", (int)(secs / 3600), (int)((secs / 60) % 60),
		 (int)(secs % 60), (int)((sn->vm_clock_nsec / 1000000) % 1000));
	img_size_to_str(sn->vm_state_size, size_buf, sizeof(size_buf));
	if (sn->icount != UINT64_MAX)
		snprintf(icount_buf, sizeof(icount_buf), "%" PRIu64, sn->icount);
	printf("%-9s %-16s %8s%20s%13s%11s", sn->id, sn->name, size_buf, date_buf, clock_buf, icount_buf);
}

/* ---- progress --------------------------------------------------------------------------- */

static bool progress_on;
static double progress_last = -1;

void img_progress_init(bool enabled)
{
	progress_on = enabled;
	progress_last = -1;
	if (enabled)
		img_progress_print(0);
}

void img_progress_print(double percent)
{
	if (!progress_on)
		return;
	if (percent > 100)
		percent = 100;
	/* like qemu-img: redraw when it moved by at least 1% (and at 0 and 100) */
	if (progress_last >= 0 && percent - progress_last < 1.0 && percent < 100)
		return;
	if (percent == progress_last)
		return;
	progress_last = percent;
	printf("    (%3.2f/100%%)\r", percent);
	fflush(stdout);
}

void img_progress_end(void)
{
	if (!progress_on)
		return;
	printf("\n");
	fflush(stdout);
	progress_on = false;
}

/* ---- misc ---------------------------------------------------------------------------------- */

bool img_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;

	/* word at a time once aligned; the tail byte by byte */
	while (len && ((uintptr_t)p & 7)) {
		if (*p)
			return false;
		p++, len--;
	}
	for (; len >= 64; p += 64, len -= 64) {
		const uint64_t *w = (const uint64_t *)p;
		if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
			return false;
	}
	for (; len; p++, len--)
		if (*p)
			return false;
	return true;
}

int64_t img_find_nonzero(const uint8_t *buf, size_t len)
{
	size_t i;

	for (i = 0; i < len; i += IMG_SECTOR) {
		size_t n = len - i < IMG_SECTOR ? len - i : IMG_SECTOR;
		if (!img_is_zero(buf + i, n))
			return (int64_t)i;
	}
	return -1;
}

int img_compare_buffers(const uint8_t *a, const uint8_t *b, uint64_t len, uint64_t chunk, uint64_t *pnum)
{
	uint64_t i;
	int res;

	if (!chunk)
		chunk = IMG_SECTOR;
	i = len < chunk ? len : chunk;
	res = memcmp(a, b, i) != 0;
	while (i < len) {
		uint64_t n = len - i < chunk ? len - i : chunk;
		if ((memcmp(a + i, b + i, n) != 0) != res)
			break;
		i += n;
	}
	*pnum = i;
	return res;
}
