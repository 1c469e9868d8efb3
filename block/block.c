/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The node graph: the format registry and probing, opening nodes from
 * options (QEMU semantics), backing chains, reference counting, and creating
 * files and images.  The request path is in io.c.
 *
 * How options become a graph (as QEMU's blockdev options):
 *   driver=F        F a protocol ("file"): a leaf opened on `filename`.
 *                   F a format: its `file` child is opened first, from
 *                   `file` (a filename string, or an object of options) or
 *                   from a top-level `filename`; then F's open() runs.
 *   no driver       the file child is opened and its first bytes probed.
 *   backing         after a format with backing support opened, its
 *                   backing_file is opened read-only (see open_backing).
 * Cache modes: the node opened by the caller gets the cache mode asked for;
 * children always run in writeback mode (writethrough is implemented by
 * flushing the top node after each write, which flushes its children) and
 * inherit direct and no-flush.  `cache.direct` / `cache.no-flush` options
 * override the mode for a node and, through inheritance, its children.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block-int.h"

/* ---- errors ------------------------------------------------------------------------- */

int vd_error_prefix(int err, const char *fmt, ...)
{
	char prefix[256], saved[512];
	va_list ap;

	snprintf(saved, sizeof(saved), "%s", vdisk_get_error_msg());
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	return vd_error(err, "%s%s", prefix, saved[0] ? saved : strerror(err));
}

const char *vd_bnode_name(const struct vd_bnode *bs)
{
	if (bs->node_name)
		return bs->node_name;
	if (bs->filename)
		return bs->filename;
	return bs->fmt->name;
}

/* ---- format registry ----------------------------------------------------------------- */

/*
 * qcow2 lives in its own directory, written against block.h.  The build
 * defines VD_HAVE_QCOW2 once it has sources: a strong reference then pulls
 * its object out of the static library (a weak one would not), and until
 * then the weak reference resolves to NULL and the slot is skipped.
 */
#ifdef VD_HAVE_QCOW2
extern const struct vd_format vd_format_qcow2;
#else
extern const struct vd_format vd_format_qcow2 __attribute__((weak));
#endif

#define MAX_EXTRA_FORMATS 16

static const struct vd_format *const builtin_formats[] = {
	&vd_format_file,
	&vd_format_raw,
	&vd_format_qcow2,
};
#define N_BUILTIN (sizeof(builtin_formats) / sizeof(builtin_formats[0]))

static const struct vd_format *extra_formats[MAX_EXTRA_FORMATS];
static int n_extra_formats;

/* i-th known format (NULL for an absent builtin); false past the end. */
static bool format_at(size_t i, const struct vd_format **out)
{
	if (i < N_BUILTIN) {
		*out = builtin_formats[i];
		return true;
	}
	i -= N_BUILTIN;
	if (i < (size_t)n_extra_formats) {
		*out = extra_formats[i];
		return true;
	}
	return false;
}

const struct vd_format *vd_format_find(const char *name)
{
	const struct vd_format *f;

	for (size_t i = 0; name && format_at(i, &f); i++)
		if (f && !strcmp(f->name, name))
			return f;
	return NULL;
}

int vd_format_register(const struct vd_format *fmt)
{
	if (vd_format_find(fmt->name))
		return vd_error(EEXIST, "vd_format_register: format '%s' exists", fmt->name);
	if (n_extra_formats == MAX_EXTRA_FORMATS)
		return vd_error(ENOSPC, "vd_format_register: too many formats");
	extra_formats[n_extra_formats++] = fmt;
	return 0;
}

/* The format whose probe scores buf highest; raw when none claims it. */
static const struct vd_format *probe_buf(const uint8_t *buf, size_t len)
{
	const struct vd_format *f, *best = &vd_format_raw;
	int best_score = 0;

	for (size_t i = 0; format_at(i, &f); i++) {
		int score;

		if (!f || !f->probe || f->is_protocol)
			continue;
		score = f->probe(buf, len);
		if (score > best_score) {
			best_score = score;
			best = f;
		}
	}
	return best;
}

#define PROBE_SIZE 512

const char *vd_format_probe(const char *filename)
{
	uint8_t buf[PROBE_SIZE];
	int fd = open(filename, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0) {
		vd_error(errno, "cannot open '%s' to probe its format: %s", filename, strerror(errno));
		return NULL;
	}
	n = pread(fd, buf, sizeof(buf), 0);
	close(fd);
	if (n < 0) {
		vd_error(errno, "cannot read '%s' to probe its format: %s", filename, strerror(errno));
		return NULL;
	}
	return probe_buf(buf, (size_t)n)->name;
}

/* Probe through an open node (the file child), so any protocol options apply. */
static int probe_node(struct vd_bnode *file, const struct vd_format **fmt)
{
	uint8_t buf[PROBE_SIZE];
	size_t len = file->size < PROBE_SIZE ? (size_t)file->size : PROBE_SIZE;
	int ret = len ? vd_bnode_pread(file, 0, buf, len) : 0;

	if (ret < 0)
		return vd_error_prefix(-ret, "cannot probe the format of '%s': ", vd_bnode_name(file));
	*fmt = probe_buf(buf, len);
	return 0;
}

/* ---- nodes: allocation and release ---------------------------------------------------- */

static struct vd_bnode *bnode_new(const struct vd_format *fmt, json_t *opts, const struct vd_cache_mode *mode,
				  int flags)
{
	struct vd_bnode *bs = calloc(1, sizeof(*bs));
	const char *node_name = vd_opt_str(opts, "node-name", NULL);

	if (!bs)
		goto oom;
	bs->fmt = fmt;
	bs->refcnt = 1;
	bs->open_flags = flags;
	bs->read_only = !(flags & VD_BO_RDWR);
	bs->cache = *mode;
	bs->request_alignment = 1;
	bs->home = vd_loop_get();
	pthread_mutex_init(&bs->track_lock, NULL);
	vd_co_queue_init(&bs->chain_waiters);
	if (node_name && !(bs->node_name = strdup(node_name)))
		goto oom;
	/* Cache-line aligned: drivers keep per-thread state in it (file.c's slots). */
	if (fmt->state_size) {
		if (posix_memalign(&bs->opaque, 64, fmt->state_size) != 0) {
			bs->opaque = NULL;
			goto oom;
		}
		memset(bs->opaque, 0, fmt->state_size);
	}
	return bs;
oom:
	if (bs) {
		pthread_mutex_destroy(&bs->track_lock);
		free(bs->node_name);
		free(bs);
	}
	vd_error(ENOMEM, "out of memory opening a '%s' node", fmt->name);
	return NULL;
}

/* Free a node whose format is closed (or never opened), dropping its children. */
static void bnode_free(struct vd_bnode *bs)
{
	vd_bnode_unref(bs->backing);
	vd_bnode_unref(bs->file);
	free(bs->opaque);
	free(bs->node_name);
	free(bs->filename);
	pthread_mutex_destroy(&bs->track_lock);
	free(bs);
}

/* Undo a failed open without losing its message (closing children does I/O, which resets it). */
static void bnode_free_keep_error(struct vd_bnode *bs)
{
	char saved[512];

	snprintf(saved, sizeof(saved), "%s", vdisk_get_error_msg());
	bnode_free(bs);
	vd_error(EIO, "%s", saved); /* only the message matters here */
}

static void unref_keep_error(struct vd_bnode *bs)
{
	char saved[512];

	snprintf(saved, sizeof(saved), "%s", vdisk_get_error_msg());
	vd_bnode_unref(bs);
	vd_error(EIO, "%s", saved);
}

void vd_bnode_ref(struct vd_bnode *bs)
{
	bs->refcnt++;
}

void vd_bnode_unref(struct vd_bnode *bs)
{
	if (!bs || --bs->refcnt > 0)
		return;
	/* As QEMU's bdrv_close: what the format cached reaches the disk first. */
	if (!bs->read_only && !(bs->open_flags & VD_BO_NO_IO) && vd_bnode_flush(bs) < 0)
		fprintf(stderr, "vdisk: closing '%s': flush failed: %s\n", vd_bnode_name(bs), vdisk_get_error_msg());
	if (bs->fmt->close)
		bs->fmt->close(bs);
	bnode_free(bs);
}

/* ---- opening -------------------------------------------------------------------------- */

/*
 * Internally every open step returns 0 or -errno (message set) and hands the
 * node back through *out; the public functions turn that into NULL + errno.
 */
static int open_opts(json_t *opts, const struct vd_cache_mode *cache, int flags, struct vd_bnode **out);

/* `cache.direct` and `cache.no-flush` options override the inherited mode. */
static int apply_cache_opts(json_t *opts, struct vd_cache_mode *mode)
{
	int ret = vd_opt_bool(opts, "cache.direct", mode->direct, &mode->direct);

	if (ret == 0)
		ret = vd_opt_bool(opts, "cache.no-flush", mode->no_flush, &mode->no_flush);
	return ret;
}

static struct vd_cache_mode child_cache_mode(const struct vd_cache_mode *parent)
{
	struct vd_cache_mode m = *parent;

	m.writeback = true; /* writethrough is the top node's job */
	return m;
}

/* Options of the file child: from `file` (string or object), else `filename`. */
static int file_child_opts(json_t *opts, const struct vd_format *fmt, json_t **out)
{
	json_t *file = json_object_get(opts, "file");
	const char *filename = vd_opt_str(opts, "filename", NULL);
	const char *aio = vd_opt_str(opts, "aio", NULL);
	json_t *child;

	if (json_is_string(file) && json_string_length(file)) {
		child = json_pack("{s:s, s:s}", "driver", "file", "filename", json_string_value(file));
	} else if (json_is_object(file)) {
		child = json_deep_copy(file);
		if (child && !json_object_get(child, "driver"))
			json_object_set_new(child, "driver", json_string("file"));
		if (child && filename && !json_object_get(child, "filename") && !json_object_get(child, "file"))
			json_object_set_new(child, "filename", json_string(filename));
	} else if (filename) {
		child = json_pack("{s:s, s:s}", "driver", "file", "filename", filename);
	} else {
		return vd_error(EINVAL, "format '%s' needs a file: give 'file' or 'filename'", fmt->name);
	}
	if (!child)
		return vd_error(ENOMEM, "out of memory");
	/* -drive style: aio= at the top configures the protocol leaf. */
	if (aio && !json_object_get(child, "aio") && !json_object_get(child, "file"))
		json_object_set_new(child, "aio", json_string(aio));
	*out = child;
	return 0;
}

static int open_file_child(json_t *opts, const struct vd_format *fmt, const struct vd_cache_mode *mode, int flags,
			   struct vd_bnode **out)
{
	struct vd_cache_mode child_mode = child_cache_mode(mode);
	json_t *child_opts = NULL;
	int ret = file_child_opts(opts, fmt, &child_opts);

	if (ret < 0)
		return ret;
	ret = open_opts(child_opts, &child_mode, flags & ~VD_BO_NO_BACKING, out);
	json_decref(child_opts);
	return ret;
}

/* Open fmt's node; a format node gets `file` as its child (opened here if NULL, always consumed). */
static int open_node(const struct vd_format *fmt, json_t *opts, const struct vd_cache_mode *mode, int flags,
		     struct vd_bnode *file, struct vd_bnode **out)
{
	struct vd_bnode *bs = bnode_new(fmt, opts, mode, flags);
	const char *filename;
	int ret;

	if (!bs) {
		unref_keep_error(file);
		return -ENOMEM;
	}
	bs->file = file;
	if (!fmt->is_protocol && !bs->file) {
		ret = open_file_child(opts, fmt, mode, flags, &bs->file);
		if (ret < 0)
			goto fail;
	}
	filename = fmt->is_protocol ? vd_opt_str(opts, "filename", NULL) : bs->file->filename;
	if (filename && !(bs->filename = strdup(filename))) {
		ret = vd_error(ENOMEM, "out of memory opening a '%s' node", fmt->name);
		goto fail;
	}
	ret = fmt->open(bs, opts, flags);
	if (ret < 0)
		goto fail; /* a failed open cleans up after itself: no close() */
	if (fmt->supports_backing && !(flags & VD_BO_NO_BACKING)) {
		ret = vd_bnode_open_backing(bs, json_object_get(opts, "backing"));
		if (ret < 0) {
			if (fmt->close)
				fmt->close(bs);
			goto fail;
		}
	}
	*out = bs;
	return 0;
fail:
	bnode_free_keep_error(bs);
	return ret;
}

/* No driver given: open the file child, then pick the format from its first bytes. */
static int open_probed(json_t *opts, const struct vd_cache_mode *mode, int flags, struct vd_bnode **out)
{
	const struct vd_format *fmt;
	struct vd_bnode *file;
	int ret = open_file_child(opts, &vd_format_raw, mode, flags, &file);

	if (ret < 0)
		return ret;
	ret = probe_node(file, &fmt);
	if (ret < 0) {
		unref_keep_error(file);
		return ret;
	}
	return open_node(fmt, opts, mode, flags, file, out);
}

/* Keys any node takes (QEMU's generic blockdev options; some are accepted and have no effect here). */
static const char *const generic_options[] = {
	"driver", "node-name", "read-only", "auto-read-only", "force-share", "cache", "discard", "detect-zeroes",
	"file", "backing", "filename", "aio", "locking", NULL,
};

static bool option_listed(const char *const *list, const char *key, size_t len)
{
	for (; *list; list++)
		if (strlen(*list) == len && !strncmp(*list, key, len))
			return true;
	return false;
}

/* An unknown key is a mistake the user wants to hear about, not a silent no-op. */
static int check_options(const struct vd_format *fmt, json_t *opts)
{
	const char *key;
	json_t *val;

	if (!fmt->options)
		return 0;
	json_object_foreach(opts, key, val) {
		size_t len = strcspn(key, "."); /* "cache.direct" given flat */

		if (!option_listed(generic_options, key, len) && !option_listed(fmt->options, key, len))
			return vd_error(EINVAL, "driver '%s' does not take an option '%s'", fmt->name, key);
	}
	return 0;
}

static int open_opts(json_t *opts, const struct vd_cache_mode *cache, int flags, struct vd_bnode **out)
{
	struct vd_cache_mode mode = { .writeback = true };
	json_t *driver = json_object_get(opts, "driver");
	const struct vd_format *fmt;
	bool read_only;
	int ret;

	*out = NULL;
	if (!json_is_object(opts))
		return vd_error(EINVAL, "node options must be an object");
	if (cache)
		mode = *cache;
	ret = apply_cache_opts(opts, &mode);
	if (ret == 0)
		ret = vd_opt_bool(opts, "read-only", false, &read_only);
	if (ret < 0)
		return ret;
	if (read_only)
		flags &= ~VD_BO_RDWR;
	if (!driver)
		return open_probed(opts, &mode, flags, out);
	fmt = vd_format_find(json_string_value(driver));
	if (!fmt)
		return vd_error(EINVAL, "unknown block driver '%s'",
				json_is_string(driver) ? json_string_value(driver) : "(not a string)");
	ret = check_options(fmt, opts);
	if (ret < 0)
		return ret;
	return open_node(fmt, opts, &mode, flags, NULL, out);
}

struct vd_bnode *vd_bnode_open_opts(json_t *opts, const struct vd_cache_mode *cache, int flags)
{
	struct vd_bnode *bs;
	int ret = open_opts(opts, cache, flags, &bs);

	if (ret < 0)
		errno = -ret;
	return bs;
}

struct vd_bnode *vd_bnode_open(const char *spec, const char *fmt, const struct vd_cache_mode *cache, int flags)
{
	json_t *opts = vd_opts_parse_spec(spec);
	struct vd_bnode *bs = NULL;

	if (!opts) {
		errno = EINVAL;
		return NULL;
	}
	if (fmt) {
		const char *given = vd_opt_str(opts, "driver", NULL);

		if (given && strcmp(given, fmt)) {
			errno = -vd_error(EINVAL, "'%s' names driver '%s' but format '%s' was asked for", spec, given, fmt);
			goto out;
		}
		json_object_set_new(opts, "driver", json_string(fmt));
	}
	bs = vd_bnode_open_opts(opts, cache, flags);
out:
	json_decref(opts);
	return bs;
}

/* ---- backing chains ---------------------------------------------------------------------- */

/*
 * The files of the chain being opened in this thread, top first.  Backing
 * files are opened recursively (the backing's own backing opens inside its
 * open), so while a backing file is opened this holds all its ancestors:
 * one that is already here would make a loop.  Files are compared by device
 * and inode, so different spellings of a path (or symlinks) are caught.
 */
struct chain_file {
	dev_t dev;
	ino_t ino;
};
static _Thread_local struct chain_file opening_chain[VD_MAX_BACKING_DEPTH + 1];
static _Thread_local int opening_depth;

static bool file_identity(const char *filename, struct chain_file *id)
{
	struct stat st;

	if (!filename || stat(filename, &st) < 0)
		return false;
	id->dev = st.st_dev;
	id->ino = st.st_ino;
	return true;
}

static bool chain_contains(const struct chain_file *id)
{
	for (int i = 0; i < opening_depth; i++)
		if (opening_chain[i].dev == id->dev && opening_chain[i].ino == id->ino)
			return true;
	return false;
}

/* backing_file as seen from the current directory: relative to bs's file. */
static char *resolve_backing_path(const struct vd_bnode *bs)
{
	const char *slash = bs->filename ? strrchr(bs->filename, '/') : NULL;
	char *path;

	if (bs->backing_file[0] == '/' || !slash || !strncmp(bs->filename, "json:", 5))
		return strdup(bs->backing_file);
	if (asprintf(&path, "%.*s/%s", (int)(slash - bs->filename), bs->filename, bs->backing_file) < 0)
		return NULL;
	return path;
}

/* A string or object "backing" option that names a backing node. */
static bool backing_opts_given(json_t *backing_opts)
{
	if (json_is_object(backing_opts))
		return json_object_size(backing_opts) > 0;
	return json_is_string(backing_opts) && json_string_length(backing_opts) > 0;
}

static bool backing_disabled(json_t *backing_opts)
{
	return json_is_null(backing_opts) || (json_is_string(backing_opts) && !json_string_length(backing_opts));
}

/* Options for the backing node: the user's, completed from the image header. */
static json_t *backing_node_opts(struct vd_bnode *bs, json_t *backing_opts)
{
	json_t *o;

	if (json_is_string(backing_opts))
		o = vd_opts_parse_spec(json_string_value(backing_opts));
	else if (json_is_object(backing_opts))
		o = json_deep_copy(backing_opts);
	else if (!strncmp(bs->backing_file, "json:", 5))
		o = vd_opts_parse_spec(bs->backing_file);
	else
		o = json_object();
	if (!o)
		return NULL;
	if (!json_object_get(o, "file") && !json_object_get(o, "filename")) {
		char *path = resolve_backing_path(bs);

		if (!path || !path[0]) {
			free(path);
			json_decref(o);
			vd_error(EINVAL, "'%s': the backing options name no file", vd_bnode_name(bs));
			return NULL;
		}
		json_object_set_new(o, "filename", json_string(path));
		free(path);
	}
	if (!json_object_get(o, "driver") && bs->backing_format[0])
		json_object_set_new(o, "driver", json_string(bs->backing_format));
	return o;
}

/* The file a backing node's options open, for loop detection. */
static const char *backing_filename(json_t *o)
{
	const char *name = vd_opt_str(o, "filename", NULL);

	if (!name)
		name = vd_opt_str(o, "file.filename", NULL);
	if (!name)
		name = vd_opt_str(o, "file", NULL);
	return name;
}

static int check_chain(struct vd_bnode *bs, const char *backing_name)
{
	struct chain_file id;

	if (opening_depth >= VD_MAX_BACKING_DEPTH)
		return vd_error(ELOOP, "'%s': backing chain deeper than %d images", vd_bnode_name(bs),
				VD_MAX_BACKING_DEPTH);
	if (file_identity(backing_name, &id) && chain_contains(&id))
		return vd_error(ELOOP, "backing file '%s' of '%s' is already in the backing chain (loop)",
				backing_name, vd_bnode_name(bs));
	return 0;
}

static int open_backing_node(struct vd_bnode *bs, json_t *o)
{
	struct vd_cache_mode mode = child_cache_mode(&bs->cache);
	const char *name = backing_filename(o);
	int flags = bs->open_flags & ~VD_BO_RDWR; /* backing files are read-only */
	int saved_depth = opening_depth, ret;
	struct chain_file self;

	/* bs itself is part of the chain (the top of a chain is pushed here too). */
	if (file_identity(bs->filename, &self) && opening_depth < VD_MAX_BACKING_DEPTH)
		opening_chain[opening_depth++] = self;
	ret = check_chain(bs, name);
	if (ret == 0) {
		ret = open_opts(o, &mode, flags, &bs->backing);
		if (ret < 0 && ret != -ELOOP)
			vd_error_prefix(-ret, "cannot open backing file '%s' of '%s': ", name ? name : "?",
					vd_bnode_name(bs));
	}
	opening_depth = saved_depth;
	return ret;
}

int vd_bnode_open_backing(struct vd_bnode *bs, json_t *backing_opts)
{
	json_t *o;
	int ret;

	if (bs->backing || backing_disabled(backing_opts))
		return 0;
	if (!bs->backing_file[0] && !backing_opts_given(backing_opts))
		return 0;
	o = backing_node_opts(bs, backing_opts);
	if (!o)
		return -EINVAL; /* message set */
	ret = open_backing_node(bs, o);
	json_decref(o);
	return ret;
}

/* ---- creating files and images ------------------------------------------------------------- */

static int write_zeroes_fd(int fd, uint64_t size, const char *filename)
{
	size_t chunk = 1u << 20;
	char *zeroes = calloc(1, chunk);
	uint64_t off = 0;
	int ret = 0;

	if (!zeroes)
		return vd_error(ENOMEM, "out of memory");
	while (off < size) {
		size_t n = size - off < chunk ? (size_t)(size - off) : chunk;
		ssize_t done = pwrite(fd, zeroes, n, (off_t)off);

		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0) {
			ret = vd_error(done < 0 ? errno : EIO, "preallocating '%s': %s", filename,
				       done < 0 ? strerror(errno) : "short write");
			break;
		}
		off += (uint64_t)done;
	}
	free(zeroes);
	return ret;
}

static int preallocate(int fd, uint64_t size, const char *prealloc, const char *filename)
{
	if (!strcmp(prealloc, "off"))
		return 0;
	if (!strcmp(prealloc, "full"))
		return write_zeroes_fd(fd, size, filename);
	/* falloc */
	if (size && fallocate(fd, 0, 0, (off_t)size) < 0) {
		if (errno == EOPNOTSUPP)
			return vd_error(ENOTSUP, "preallocation=falloc: not supported by the filesystem of '%s'",
					filename);
		return vd_error(errno, "preallocating '%s': %s", filename, strerror(errno));
	}
	return 0;
}

int vd_create_file(const char *filename, uint64_t size, const char *prealloc)
{
	int fd, ret;

	if (!prealloc)
		prealloc = "off";
	if (strcmp(prealloc, "off") && strcmp(prealloc, "falloc") && strcmp(prealloc, "full"))
		return vd_error(EINVAL, "invalid preallocation mode '%s' for '%s' (off, falloc, full)", prealloc,
				filename);
	fd = open(filename, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return vd_error(errno, "cannot create '%s': %s", filename, strerror(errno));
	ret = ftruncate(fd, (off_t)size) < 0 ? vd_error(errno, "cannot resize '%s' to %llu bytes: %s", filename,
							  (unsigned long long)size, strerror(errno))
					      : preallocate(fd, size, prealloc, filename);
	if (close(fd) < 0 && ret == 0)
		ret = vd_error(errno, "closing '%s': %s", filename, strerror(errno));
	return ret;
}

int vd_image_create(const char *fmt, const struct vd_create_opts *o)
{
	const struct vd_format *f = vd_format_find(fmt);

	if (!f)
		return vd_error(EINVAL, "unknown image format '%s'", fmt ? fmt : "(null)");
	if (!f->create)
		return vd_error(ENOTSUP, "format '%s' does not support image creation", f->name);
	if (!o || !o->filename || !o->filename[0])
		return vd_error(EINVAL, "creating a '%s' image: no filename given", f->name);
	return f->create(o);
}
