/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * vdisk-io: a small qemu-io-like tool that drives one libvdisk instance from
 * the command line.  The integration tests (tests/integration) run it; it is
 * built in the build directory and never installed.
 *
 *   vdisk-io --driver=D [--path=P] [--direct] [--read-only] [--map]
 *            [--set name=value]... [--set-after-start name=value]...
 *            [--queue-size N] [--iodepth N] -c "CMD" [-c "CMD"]...
 *
 * Exit status: 0 success, 1 an operation failed (message on stderr), 2 usage.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "vdisk.h"

#define MAX_CMDS 64
#define MAX_SETS 64
#define MAX_WORDS 16

struct ctx {
	struct vdisk *v;
	struct vdiskq *q;
	bool map;     /* vdisk_map_mem_region() every buffer before I/O */
	int iodepth;  /* max_completions per vdiskq_do_io() call */
	int buf_align;
	uint64_t capacity;
};

static const char *prog = "vdisk-io";

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk-io --driver=D [--path=P] [OPTIONS] -c CMD [-c CMD]...\n"
		"\n"
		"Options:\n"
		"  --driver=D              libvdisk driver (io_uring, linux-aio, posix-aio, threads, sync, null)\n"
		"  --path=P                file or block device\n"
		"  --direct                direct=true (O_DIRECT)\n"
		"  --read-only             read-only=true\n"
		"  --map                   map every I/O buffer with vdisk_map_mem_region()\n"
		"  --set NAME=VALUE        set a property before start (type inferred; retried after connect)\n"
		"  --set-after-start NAME=VALUE  set a property once started (to test state rules)\n"
		"  --queue-size N          property queue-size\n"
		"  --iodepth N             completions reaped per vdiskq_do_io() call (default 8)\n"
		"  -c CMD                  run CMD (repeatable, run in order)\n"
		"  -h, --help              show this help\n"
		"\n"
		"Commands (sizes take k/m/g/t suffixes):\n"
		"  write [-P pat | -s file] [-F] [-v] OFF LEN   (-F FUA, -v 3 iovecs)\n"
		"  read [-P pat | -s file] [-v] OFF LEN         (verify; exit 1 on mismatch)\n"
		"  dump [-v] OFF LEN                            raw bytes to stdout\n"
		"  flush\n"
		"  discard OFF LEN\n"
		"  zero [-u] [-n] [-F] OFF LEN                  write-zeroes (-u NO_UNMAP, -n NO_FALLBACK)\n"
		"  aio-write -P pat OFF LEN COUNT               COUNT writes enqueued at once, then drained\n"
		"  aio-read -P pat OFF LEN COUNT                same for reads, each verified\n"
		"  info                                         readable properties as name=value\n"
		"\n"
		"Exit status: 0 success, 1 an operation failed, 2 usage error.\n");
}

__attribute__((format(printf, 1, 2), noreturn)) static void usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s --help'.\n", prog);
	exit(2);
}

static int exit_status = 0;

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit_status = 1;
}

/* Parse a size: decimal or 0x hex, optional k/m/g/t suffix (binary). */
static bool parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long n;
	unsigned shift = 0;

	if (!s || !*s || *s == '-')
		return false;
	errno = 0;
	n = strtoull(s, &end, 0);
	if (errno || end == s)
		return false;
	if (*end) {
		switch (*end) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		case 't': case 'T': shift = 40; break;
		default: return false;
		}
		end++;
		if (*end == 'i')
			end++;
		if (*end == 'b' || *end == 'B')
			end++;
		if (*end)
			return false;
	}
	if (shift && n > (UINT64_MAX >> shift))
		return false;
	*out = (uint64_t)n << shift;
	return true;
}

static bool parse_int(const char *s, int *out)
{
	uint64_t n;

	if (!parse_size(s, &n) || n > INT_MAX)
		return false;
	*out = (int)n;
	return true;
}

static bool parse_bool_word(const char *s, bool *out)
{
	static const char *const yes[] = { "true", "on", "yes", NULL }, *const no[] = { "false", "off", "no", NULL };

	for (int i = 0; yes[i]; i++)
		if (!strcasecmp(s, yes[i]))
			return *out = true, true;
	for (int i = 0; no[i]; i++)
		if (!strcasecmp(s, no[i]))
			return *out = false, true;
	return false;
}

/*
 * Set a property whose type we do not know: the library reports a wrong type
 * as -ENOTTY, so try the types the value can be read as.  Returns 0 or -errno
 * (message in vdisk_get_error_msg(), or in *why for an unparsable value).
 */
static int set_property(struct vdisk *v, const char *name, const char *value, const char **why)
{
	uint64_t n;
	bool b;
	int ret;

	*why = NULL;
	ret = vdisk_set_str(v, name, value);
	if (ret != -ENOTTY)
		return ret;
	if (parse_bool_word(value, &b)) {
		ret = vdisk_set_bool(v, name, b);
		if (ret != -ENOTTY)
			return ret;
		*why = "a number is expected";
		return -EINVAL;
	}
	if (!parse_size(value, &n)) {
		*why = "cannot parse the value";
		return -EINVAL;
	}
	if (n <= 1) {
		ret = vdisk_set_bool(v, name, n == 1);
		if (ret != -ENOTTY)
			return ret;
	}
	if (n <= INT_MAX) {
		ret = vdisk_set_int(v, name, (int)n);
		if (ret != -ENOTTY)
			return ret;
		return vdisk_set_uint64(v, name, n);
	}
	ret = vdisk_set_uint64(v, name, n);
	if (ret == -ENOTTY) {
		*why = "value does not fit the property's type (int)";
		return -EINVAL;
	}
	return ret;
}

struct setting {
	char *name;
	const char *value;
	bool done;
};

static int apply_setting(struct vdisk *v, struct setting *s, bool retry_busy_later)
{
	const char *why;
	int ret = set_property(v, s->name, s->value, &why);

	if (ret == -EBUSY && retry_busy_later)
		return 0;
	if (ret < 0) {
		fail("cannot set property '%s' to '%s': %s (%s)", s->name, s->value,
		     why ? why : vdisk_get_error_msg(), strerror(-ret));
		return ret;
	}
	s->done = true;
	return 0;
}

/* ---- buffers ---- */

struct buf {
	struct vdisk_mem_region r;
	bool mapped;
};

static bool buf_alloc(struct ctx *c, struct buf *b, size_t len)
{
	int ret;

	memset(b, 0, sizeof(*b));
	b->r.fd = -1;
	ret = vdisk_alloc_mem_region(c->v, &b->r, len ? len : 1);
	if (ret < 0) {
		fail("cannot allocate %zu bytes: %s", len, vdisk_get_error_msg());
		return false;
	}
	if (c->map) {
		ret = vdisk_map_mem_region(c->v, &b->r);
		if (ret < 0) {
			fail("cannot map a memory region: %s", vdisk_get_error_msg());
			vdisk_free_mem_region(c->v, &b->r);
			return false;
		}
		b->mapped = true;
	}
	return true;
}

static void buf_free(struct ctx *c, struct buf *b)
{
	if (b->mapped)
		vdisk_unmap_mem_region(c->v, &b->r);
	vdisk_free_mem_region(c->v, &b->r);
}

/*
 * Vectored layout: up to 3 pieces of unequal size (multiples of
 * buf-alignment) separated by poisoned gaps, so a driver that treats the
 * iovec array as one contiguous buffer reads or writes the wrong bytes.
 */
struct layout {
	int n;
	struct iovec iov[3];
	size_t gap, total; /* bytes of buffer needed */
	size_t data_off[3]; /* offset of each piece within the data */
};

static void make_layout(struct ctx *c, size_t len, bool vectored, struct layout *l)
{
	size_t g = c->buf_align > 1 ? (size_t)c->buf_align : 1;
	size_t units = len / g, p[3];

	memset(l, 0, sizeof(*l));
	if (!vectored || units < 3 || len % g) {
		l->n = 1;
		p[0] = len;
		l->gap = 0;
	} else {
		l->n = 3;
		p[0] = units / 4 ? units / 4 : 1;
		p[1] = (units - p[0]) / 2 ? (units - p[0]) / 2 : 1;
		p[2] = units - p[0] - p[1];
		for (int i = 0; i < 3; i++)
			p[i] *= g;
		l->gap = g > 64 ? g : 64;
	}
	for (int i = 0, boff = 0, doff = 0; i < l->n; i++) {
		l->iov[i].iov_len = p[i];
		l->iov[i].iov_base = (void *)(uintptr_t)boff; /* relative, fixed up in layout_bind */
		l->data_off[i] = (size_t)doff;
		boff += (int)(p[i] + l->gap);
		doff += (int)p[i];
		l->total = (size_t)boff;
	}
}

static void layout_bind(struct layout *l, void *base)
{
	for (int i = 0; i < l->n; i++)
		l->iov[i].iov_base = (char *)base + (uintptr_t)l->iov[i].iov_base;
}

/* Copy data (len bytes, contiguous) into the pieces, or back out. */
static void layout_scatter(const struct layout *l, const unsigned char *data)
{
	for (int i = 0; i < l->n; i++)
		memcpy(l->iov[i].iov_base, data + l->data_off[i], l->iov[i].iov_len);
}

static void layout_gather(const struct layout *l, unsigned char *data)
{
	for (int i = 0; i < l->n; i++)
		memcpy(data + l->data_off[i], l->iov[i].iov_base, l->iov[i].iov_len);
}

static bool layout_gaps_intact(const struct layout *l, unsigned char poison)
{
	for (int i = 0; i < l->n && l->gap; i++) {
		const unsigned char *g = (const unsigned char *)l->iov[i].iov_base + l->iov[i].iov_len;

		for (size_t k = 0; k < l->gap; k++)
			if (g[k] != poison)
				return false;
	}
	return true;
}

/* ---- running requests ---- */

/*
 * Collect n completions whose user_data are tags 1..n (as pointers); every
 * tag must come back exactly once.  Returns true when all succeeded.
 */
static bool drain(struct ctx *c, int n, const char *what, uint64_t offset)
{
	struct vdisk_completion *comps = calloc((size_t)c->iodepth, sizeof(*comps));
	unsigned char *seen = calloc((size_t)n + 1, 1);
	bool ok = true;
	int got = 0;

	if (!comps || !seen) {
		fail("out of memory");
		free(comps);
		free(seen);
		return false;
	}
	while (got < n) {
		int want = n - got < c->iodepth ? n - got : c->iodepth;
		int ret = vdiskq_do_io(c->q, comps, 1 <= want ? 1 : 0, want, NULL);

		if (ret < 0) {
			fail("%s: vdiskq_do_io: %s (%s)", what, vdisk_get_error_msg(), strerror(-ret));
			ok = false;
			break;
		}
		if (ret > want) {
			fail("%s: vdiskq_do_io returned %d completions, more than max_completions %d", what, ret, want);
			ok = false;
			break;
		}
		for (int i = 0; i < ret; i++) {
			uintptr_t tag = (uintptr_t)comps[i].user_data;

			if (tag < 1 || tag > (uintptr_t)n || seen[tag]) {
				fail("%s: bogus completion (user_data %p%s)", what, comps[i].user_data,
				     tag >= 1 && tag <= (uintptr_t)n ? ", seen twice" : "");
				ok = false;
				continue;
			}
			seen[tag] = 1;
			if (comps[i].ret < 0) {
				if (ok) /* report the first failure */
					fail("%s at offset %" PRIu64 ": %s (%s)", what, offset,
					     comps[i].error_msg ? comps[i].error_msg : "(no error message)",
					     strerror(-comps[i].ret));
				ok = false;
			} else if (comps[i].ret > 0 || comps[i].error_msg) {
				fail("%s: successful completion with ret %d / error_msg %s", what, comps[i].ret,
				     comps[i].error_msg ? comps[i].error_msg : "NULL");
				ok = false;
			}
		}
		got += ret;
		if (!ok && got < n && ret == 0)
			break;
	}
	free(comps);
	free(seen);
	return ok;
}

/* An enqueue function's result: 0, or no completion will follow. */
static bool enqueued(int ret, const char *what)
{
	if (ret < 0) {
		fail("%s: could not enqueue: %s (%s)", what, vdisk_get_error_msg(), strerror(-ret));
		return false;
	}
	return true;
}

static bool read_source_file(const char *path, unsigned char *data, size_t len)
{
	FILE *f = fopen(path, "rb");
	size_t n;

	if (!f) {
		fail("cannot open source file '%s': %s", path, strerror(errno));
		return false;
	}
	n = fread(data, 1, len, f);
	fclose(f);
	if (n != len) {
		fail("source file '%s' is shorter than %zu bytes", path, len);
		return false;
	}
	return true;
}

/* ---- commands ---- */

struct cmd_opts {
	bool has_pattern;
	unsigned char pattern;
	const char *source;
	bool fua, vectored, no_unmap, no_fallback;
	uint64_t num[3];
	int n_num;
};

/* Parse "[-X]... NUM..." for command name; allowed: flag letters, "P" and "s" take a value. */
static void parse_cmd(char **w, int nw, const char *allowed, int n_num, struct cmd_opts *o)
{
	int i = 1;

	memset(o, 0, sizeof(*o));
	for (; i < nw && w[i][0] == '-' && w[i][1]; i++) {
		for (const char *f = w[i] + 1; *f; f++) {
			if (!strchr(allowed, *f))
				usage_error("%s: unknown option -%c", w[0], *f);
			switch (*f) {
			case 'P': {
				uint64_t p;

				if (f[1] || i + 1 >= nw || !parse_size(w[i + 1], &p) || p > 0xff)
					usage_error("%s: -P needs a byte pattern (0..0xff)", w[0]);
				o->has_pattern = true;
				o->pattern = (unsigned char)p;
				i++;
				goto next_word;
			}
			case 's':
				if (f[1] || i + 1 >= nw)
					usage_error("%s: -s needs a file name", w[0]);
				o->source = w[++i];
				goto next_word;
			case 'F': o->fua = true; break;
			case 'v': o->vectored = true; break;
			case 'u': o->no_unmap = true; break;
			case 'n': o->no_fallback = true; break;
			}
		}
	next_word:;
	}
	if (nw - i != n_num)
		usage_error("%s: expected %d numeric argument%s, got %d", w[0], n_num, n_num == 1 ? "" : "s", nw - i);
	for (int k = 0; k < n_num; k++)
		if (!parse_size(w[i + k], &o->num[k]))
			usage_error("%s: invalid number '%s'", w[0], w[i + k]);
	o->n_num = n_num;
	if (o->has_pattern && o->source)
		usage_error("%s: -P and -s exclude each other", w[0]);
}

static bool check_len(uint64_t len)
{
	if (len > (1ull << 30)) {
		fail("length %" PRIu64 " too large for vdisk-io (max 1 GiB per command)", len);
		return false;
	}
	return true;
}

static void cmd_rw(struct ctx *c, bool write, bool dump, const struct cmd_opts *o)
{
	uint64_t off = o->num[0];
	size_t len = (size_t)o->num[1];
	unsigned char poison = o->has_pattern ? (unsigned char)(o->pattern ^ 0xff) : 0xa5;
	unsigned char *data = NULL;
	struct layout l;
	struct buf b;
	int ret;

	if (!check_len(o->num[1]))
		return;
	make_layout(c, len, o->vectored, &l);
	data = malloc(len ? len : 1);
	if (!data) {
		fail("out of memory");
		return;
	}
	if (!buf_alloc(c, &b, l.total)) {
		free(data);
		return;
	}
	layout_bind(&l, b.r.addr);
	if (write) {
		if (o->source) {
			if (!read_source_file(o->source, data, len))
				goto out;
		} else {
			memset(data, o->has_pattern ? o->pattern : 0xcd, len);
		}
		memset(b.r.addr, poison, l.total);
		layout_scatter(&l, data);
	} else {
		memset(b.r.addr, poison, l.total);
	}

	if (l.n == 1 && !o->vectored) {
		if (write)
			ret = vdiskq_write(c->q, off, l.iov[0].iov_base, len, (void *)1, o->fua ? VDISK_REQ_FUA : 0);
		else
			ret = vdiskq_read(c->q, off, l.iov[0].iov_base, len, (void *)1, 0);
	} else {
		if (write)
			ret = vdiskq_writev(c->q, off, l.iov, l.n, (void *)1, o->fua ? VDISK_REQ_FUA : 0);
		else
			ret = vdiskq_readv(c->q, off, l.iov, l.n, (void *)1, 0);
	}
	if (!enqueued(ret, write ? "write" : "read") || !drain(c, 1, write ? "write" : "read", off))
		goto out;
	if (!layout_gaps_intact(&l, poison)) {
		fail("%s: the driver touched memory outside the iovecs", write ? "write" : "read");
		goto out;
	}
	if (write) {
		printf("wrote %zu/%zu bytes at offset %" PRIu64 "\n", len, len, off);
		goto out;
	}
	layout_gather(&l, data);
	if (dump) {
		if (fwrite(data, 1, len, stdout) != len)
			fail("dump: writing to stdout failed");
		goto out;
	}
	if (o->has_pattern) {
		for (size_t i = 0; i < len; i++) {
			if (data[i] != o->pattern) {
				fail("Pattern verification failed at offset %" PRIu64 ": expected 0x%02x, got 0x%02x",
				     off + i, o->pattern, data[i]);
				goto out;
			}
		}
	} else if (o->source) {
		unsigned char *want = malloc(len ? len : 1);

		if (!want) {
			fail("out of memory");
			goto out;
		}
		if (read_source_file(o->source, want, len)) {
			for (size_t i = 0; i < len; i++) {
				if (data[i] != want[i]) {
					fail("Data verification failed at offset %" PRIu64 ": expected 0x%02x, got 0x%02x",
					     off + i, want[i], data[i]);
					break;
				}
			}
		}
		free(want);
		if (exit_status)
			goto out;
	}
	printf("read %zu/%zu bytes at offset %" PRIu64 "\n", len, len, off);
out:
	buf_free(c, &b);
	free(data);
}

static void cmd_aio(struct ctx *c, bool write, const struct cmd_opts *o)
{
	uint64_t off = o->num[0], len = o->num[1], count = o->num[2];
	struct buf b;
	unsigned char *base;

	if (!o->has_pattern)
		usage_error("aio-%s: -P pattern is required", write ? "write" : "read");
	if (count < 1 || count > 100000)
		usage_error("aio-%s: COUNT must be in [1, 100000]", write ? "write" : "read");
	if (!check_len(len * count))
		return;
	/* Writes share one buffer; reads get one each so they can all be verified. */
	if (!buf_alloc(c, &b, write ? len : len * count))
		return;
	base = b.r.addr;
	memset(base, write ? o->pattern : (unsigned char)(o->pattern ^ 0xff), write ? len : len * count);
	for (uint64_t i = 0; i < count; i++) {
		int ret = write ? vdiskq_write(c->q, off + i * len, base, len, (void *)(uintptr_t)(i + 1), 0)
				: vdiskq_read(c->q, off + i * len, base + i * len, len, (void *)(uintptr_t)(i + 1), 0);

		if (!enqueued(ret, write ? "aio-write" : "aio-read")) {
			/* The ones already enqueued still complete: collect them before freeing the buffer. */
			if (i > 0)
				drain(c, (int)i, write ? "aio-write" : "aio-read", off);
			buf_free(c, &b);
			return;
		}
	}
	if (drain(c, (int)count, write ? "aio-write" : "aio-read", off)) {
		if (!write) {
			for (uint64_t i = 0; i < len * count; i++) {
				if (base[i] != o->pattern) {
					fail("Pattern verification failed at offset %" PRIu64 ": expected 0x%02x, got 0x%02x",
					     off + i, o->pattern, base[i]);
					break;
				}
			}
		}
		if (!exit_status)
			printf("%s %" PRIu64 " x %" PRIu64 " bytes at offset %" PRIu64 "\n",
			       write ? "wrote" : "read", count, len, off);
	}
	buf_free(c, &b);
}

static void cmd_info(struct ctx *c)
{
	const char *const *names = vdisk_list_properties(c->v);

	if (!names) {
		fail("info: vdisk_list_properties failed");
		return;
	}
	for (int i = 0; names[i]; i++) {
		const char *n = names[i];
		bool b;
		int iv;
		uint64_t u;
		char *s;

		if (vdisk_get_bool(c->v, n, &b) == 0)
			printf("%s=%s\n", n, b ? "true" : "false");
		else if (vdisk_get_int(c->v, n, &iv) == 0)
			printf("%s=%d\n", n, iv);
		else if (vdisk_get_uint64(c->v, n, &u) == 0)
			printf("%s=%" PRIu64 "\n", n, u);
		else if (vdisk_get_str(c->v, n, &s) == 0) {
			printf("%s=%s\n", n, s);
			free(s);
		}
	}
}

/* Split a command line into words (whitespace separated, no quoting). */
static int split_words(char *s, char **w)
{
	char *save = NULL;
	int n = 0;

	for (char *tok = strtok_r(s, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
		if (n == MAX_WORDS)
			usage_error("command has too many words");
		w[n++] = tok;
	}
	return n;
}

struct parsed_cmd {
	char *words[MAX_WORDS];
	int nw;
	struct cmd_opts o;
	enum { C_WRITE, C_READ, C_DUMP, C_FLUSH, C_DISCARD, C_ZERO, C_AIO_WRITE, C_AIO_READ, C_INFO } kind;
};

static void parse_command(char *text, struct parsed_cmd *pc)
{
	pc->nw = split_words(text, pc->words);
	if (pc->nw == 0)
		usage_error("empty command");
	const char *name = pc->words[0];

	if (!strcmp(name, "write")) {
		pc->kind = C_WRITE;
		parse_cmd(pc->words, pc->nw, "PsFv", 2, &pc->o);
	} else if (!strcmp(name, "read")) {
		pc->kind = C_READ;
		parse_cmd(pc->words, pc->nw, "Psv", 2, &pc->o);
	} else if (!strcmp(name, "dump")) {
		pc->kind = C_DUMP;
		parse_cmd(pc->words, pc->nw, "v", 2, &pc->o);
	} else if (!strcmp(name, "flush")) {
		pc->kind = C_FLUSH;
		parse_cmd(pc->words, pc->nw, "", 0, &pc->o);
	} else if (!strcmp(name, "discard")) {
		pc->kind = C_DISCARD;
		parse_cmd(pc->words, pc->nw, "", 2, &pc->o);
	} else if (!strcmp(name, "zero")) {
		pc->kind = C_ZERO;
		parse_cmd(pc->words, pc->nw, "unF", 2, &pc->o);
	} else if (!strcmp(name, "aio-write")) {
		pc->kind = C_AIO_WRITE;
		parse_cmd(pc->words, pc->nw, "P", 3, &pc->o);
	} else if (!strcmp(name, "aio-read")) {
		pc->kind = C_AIO_READ;
		parse_cmd(pc->words, pc->nw, "P", 3, &pc->o);
	} else if (!strcmp(name, "info")) {
		pc->kind = C_INFO;
		parse_cmd(pc->words, pc->nw, "", 0, &pc->o);
	} else {
		usage_error("unknown command '%s'", name);
	}
}

static void run_command(struct ctx *c, const struct parsed_cmd *pc)
{
	const struct cmd_opts *o = &pc->o;
	uint32_t flags;

	switch (pc->kind) {
	case C_WRITE: cmd_rw(c, true, false, o); break;
	case C_READ: cmd_rw(c, false, false, o); break;
	case C_DUMP: cmd_rw(c, false, true, o); break;
	case C_FLUSH:
		if (enqueued(vdiskq_flush(c->q, (void *)1, 0), "flush") && drain(c, 1, "flush", 0))
			printf("flushed\n");
		break;
	case C_DISCARD:
		if (enqueued(vdiskq_discard(c->q, o->num[0], o->num[1], (void *)1, 0), "discard") &&
		    drain(c, 1, "discard", o->num[0]))
			printf("discarded %" PRIu64 " bytes at offset %" PRIu64 "\n", o->num[1], o->num[0]);
		break;
	case C_ZERO:
		flags = (o->no_unmap ? VDISK_REQ_NO_UNMAP : 0) | (o->no_fallback ? VDISK_REQ_NO_FALLBACK : 0) |
			(o->fua ? VDISK_REQ_FUA : 0);
		if (enqueued(vdiskq_write_zeroes(c->q, o->num[0], o->num[1], (void *)1, flags), "write-zeroes") &&
		    drain(c, 1, "write-zeroes", o->num[0]))
			printf("zeroed %" PRIu64 " bytes at offset %" PRIu64 "\n", o->num[1], o->num[0]);
		break;
	case C_AIO_WRITE: cmd_aio(c, true, o); break;
	case C_AIO_READ: cmd_aio(c, false, o); break;
	case C_INFO: cmd_info(c); break;
	}
}

static void split_setting(const char *opt, char *arg, struct setting *s)
{
	char *eq = strchr(arg, '=');

	if (!eq || eq == arg)
		usage_error("%s needs NAME=VALUE, got '%s'", opt, arg);
	*eq = '\0';
	s->name = arg;
	s->value = eq + 1;
	s->done = false;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "driver", required_argument, NULL, 'd' },
		{ "path", required_argument, NULL, 'p' },
		{ "direct", no_argument, NULL, 'D' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "map", no_argument, NULL, 'm' },
		{ "set", required_argument, NULL, 'S' },
		{ "set-after-start", required_argument, NULL, 'A' },
		{ "queue-size", required_argument, NULL, 'Q' },
		{ "iodepth", required_argument, NULL, 'I' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct setting sets[MAX_SETS], after[MAX_SETS];
	struct parsed_cmd *cmds;
	const char *driver = NULL, *path = NULL;
	bool direct = false, read_only = false;
	int n_sets = 0, n_after = 0, n_cmds = 0, queue_size = 0, opt, ret;
	struct ctx c = { .iodepth = 8 };

	cmds = calloc(MAX_CMDS, sizeof(*cmds));
	if (!cmds)
		return 1;
	while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'd': driver = optarg; break;
		case 'p': path = optarg; break;
		case 'D': direct = true; break;
		case 'r': read_only = true; break;
		case 'm': c.map = true; break;
		case 'S':
			if (n_sets == MAX_SETS)
				usage_error("too many --set");
			split_setting("--set", optarg, &sets[n_sets++]);
			break;
		case 'A':
			if (n_after == MAX_SETS)
				usage_error("too many --set-after-start");
			split_setting("--set-after-start", optarg, &after[n_after++]);
			break;
		case 'Q':
			if (!parse_int(optarg, &queue_size) || queue_size < 1)
				usage_error("--queue-size needs a positive number, got '%s'", optarg);
			break;
		case 'I':
			if (!parse_int(optarg, &c.iodepth) || c.iodepth < 1)
				usage_error("--iodepth needs a positive number, got '%s'", optarg);
			break;
		case 'c':
			if (n_cmds == MAX_CMDS)
				usage_error("too many commands");
			parse_command(optarg, &cmds[n_cmds++]);
			break;
		case 'h':
			usage(stdout);
			free(cmds);
			return 0;
		default:
			usage_error("invalid option");
		}
	}
	if (optind < argc)
		usage_error("unexpected argument '%s'", argv[optind]);
	if (!driver)
		usage_error("--driver is required");
	if (n_cmds == 0)
		usage_error("no command given (-c)");

	ret = vdisk_create(driver, &c.v);
	if (ret < 0) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	if ((path && (ret = vdisk_set_str(c.v, "path", path)) < 0) ||
	    (direct && (ret = vdisk_set_bool(c.v, "direct", true)) < 0) ||
	    (read_only && (ret = vdisk_set_bool(c.v, "read-only", true)) < 0)) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	for (int i = 0; i < n_sets; i++)
		if (apply_setting(c.v, &sets[i], true) < 0)
			goto out;
	ret = vdisk_connect(c.v);
	if (ret < 0) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	for (int i = 0; i < n_sets; i++)
		if (!sets[i].done && apply_setting(c.v, &sets[i], false) < 0)
			goto out;
	if (queue_size && (ret = vdisk_set_int(c.v, "queue-size", queue_size)) < 0) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	ret = vdisk_start(c.v);
	if (ret < 0) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	for (int i = 0; i < n_after; i++)
		if (apply_setting(c.v, &after[i], false) < 0)
			goto out;
	c.q = vdisk_get_queue(c.v, 0);
	if (!c.q) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	if (vdisk_get_int(c.v, "buf-alignment", &c.buf_align) < 0 ||
	    vdisk_get_uint64(c.v, "capacity", &c.capacity) < 0) {
		fail("%s", vdisk_get_error_msg());
		goto out;
	}
	for (int i = 0; i < n_cmds && !exit_status; i++)
		run_command(&c, &cmds[i]);
out:
	vdisk_destroy(&c.v);
	free(cmds);
	if (fflush(stdout) != 0 && !exit_status) {
		fprintf(stderr, "%s: writing to stdout failed\n", prog);
		exit_status = 1;
	}
	return exit_status;
}
