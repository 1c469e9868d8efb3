/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vdisk convert [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING [-F BACKING_FMT]]
 *               [-c] [-p] [-q] [-n] [--target-is-zero] [-t CACHE] [-T CACHE]
 *               [-S SPARSE] [-m N] [-W] FILE... TARGET
 *
 * As qemu-img convert.  The sources (several are concatenated) are walked
 * with block status: ranges that read as zero are not read at all, and on a
 * fresh target without a backing file (which reads as zeroes) they are not
 * written either; data ranges are read in chunks of up to 2 MiB and scanned
 * for runs of at least SPARSE (-S, default 4 KiB) zero bytes, which are
 * skipped too, so the target stays sparse.  -S 0 writes everything.
 *
 * With -B the target is an overlay of BACKING and only the source's top
 * layer is copied (what is unallocated there is left to the backing file),
 * as qemu-img does: BACKING is assumed to hold what the source's backing
 * chain holds.
 *
 * The copy runs in N coroutines (-m, default 8) on this thread's loop:
 * each takes the next chunk (under a coroutine mutex), reads it, and writes
 * it; writes are kept in order unless -W allows out-of-order writes.
 * In-order writes are pipelined (see conv_write), yet a qcow2 target's layout
 * is that of a serial copy; buffered targets go through a thread pool
 * (see open_target).
 * With -c the chunks are 2 MiB too (not one cluster, as in qemu-img): all-zero
 * clusters are skipped, and qcow2 compresses the clusters of one write in
 * parallel on worker threads before writing them in order, so in-order
 * output is the same whatever -m is while compression uses every CPU.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common.h"
#include "coroutine.h"
#include "loop.h"

static const char *const CMD = "convert";

#define MAX_COROUTINES 16
#define MAX_BUF_SIZE (16u * 1024 * 1024)
#define MAX_STATUS_REQ (1ull << 30)

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: vdisk convert [-f FMT | --image-opts] [-O FMT] [-o OPTIONS]\n"
		"                     [-B BACKING_FILE [-F BACKING_FMT]] [-c] [-p] [-q] [-n]\n"
		"                     [--target-is-zero] [-t CACHE] [-T CACHE] [-S SPARSE_SIZE]\n"
		"                     [-m NUM] [-W] FILE [FILE2 ...] TARGET\n"
		"\n"
		"Convert (copy) one or more disk images, concatenated, into TARGET.\n"
		"\n"
		"  -f, --source-format FMT   format of the sources (default: probed)\n"
		"  --image-opts              sources are option strings (driver=qcow2,file.filename=...)\n"
		"  -O, --target-format FMT   format of TARGET: raw (default) or qcow2\n"
		"  -o, --target-format-options OPTIONS\n"
		"                            creation options of TARGET ('-o help' lists them)\n"
		"  -B, -b, --backing BACKING_FILE\n"
		"                            make TARGET an overlay of BACKING_FILE and copy only\n"
		"                            the sources' top layer\n"
		"  -F, --backing-format FMT  format of BACKING_FILE (default: probed)\n"
		"  -c, --compress            write compressed clusters (qcow2)\n"
		"  -n, --no-create           do not create TARGET: it exists (and is large enough)\n"
		"  --target-is-zero          with -n: TARGET already reads as zeroes\n"
		"  -t, --target-cache CACHE  cache mode of TARGET (default: unsafe)\n"
		"  -T, --source-cache CACHE  cache mode of the sources (default: writeback)\n"
		"  -S, --sparse-size SIZE    zero runs of at least SIZE bytes are not written\n"
		"                            (multiple of 512, default 4k; 0 writes everything)\n"
		"  -m, --parallel NUM        coroutines copying in parallel, 1..16 (default 8)\n"
		"  -W, --oob-writes          allow out-of-order writes (faster)\n"
		"  -p, --progress            show progress\n"
		"  -q, --quiet               print nothing but errors\n"
		"  -U, --force-share         accepted for qemu-img compatibility\n"
		"  -h, --help                show this help\n"
		"\n"
		"Exit status: 0 converted, 1 error, 2 usage error.\n");
}

enum conv_status { BLK_DATA, BLK_ZERO, BLK_BACKING_FILE };

struct conv_src {
	struct vd_bnode *bs;
	uint64_t size;
	uint64_t align; /* request alignment / cluster size: status queries end on it */
};

struct conv {
	struct conv_src *src;
	int nsrc;
	uint64_t total;
	struct vd_bnode *target;
	bool has_zero_init, compressed, target_has_backing, wr_in_order;
	bool pipelined; /* in order: the next chunk's writes may start before ours complete (conv_write) */
	bool raw_target;
	int64_t target_backing_size; /* -1: unknown or none */
	uint64_t min_sparse;         /* bytes, 0: write everything */
	uint64_t alignment;          /* of sparse runs on the target (power of two) */
	uint64_t cluster_size;       /* target's (compressed writes are whole clusters) */
	uint64_t buf_size;
	int write_flags;
	int num_co;

	struct vd_co_mutex lock;
	uint64_t off;         /* next offset to hand out */
	enum conv_status status;
	uint64_t next_status; /* s->status holds up to here */
	uint64_t wr_off;      /* in order: the offset whose write is next */
	struct vd_co_queue wr_wait;
	int ret; /* -EINPROGRESS while copying */
	int running;
	bool done;

	uint64_t allocated_total, allocated_done;
};

static void select_part(struct conv *s, uint64_t off, int *cur, uint64_t *cur_off)
{
	*cur = 0;
	*cur_off = 0;
	while (*cur < s->nsrc - 1 && off - *cur_off >= s->src[*cur].size) {
		*cur_off += s->src[*cur].size;
		(*cur)++;
	}
}

/* How many bytes from off have the same treatment; sets s->status (qemu's convert_iteration_sectors). */
static int64_t conv_iteration(struct conv *s, uint64_t off)
{
	int cur;
	uint64_t cur_off, n;
	bool post_backing_zero = false;

	select_part(s, off, &cur, &cur_off);
	n = s->total - off;
	if (n > MAX_STATUS_REQ)
		n = MAX_STATUS_REQ;
	if (s->target_backing_size >= 0) {
		if (off >= (uint64_t)s->target_backing_size)
			post_backing_zero = true;
		else if (off + n > (uint64_t)s->target_backing_size)
			n = (uint64_t)s->target_backing_size - off; /* zeroes are handled differently past it */
	}
	if (s->next_status <= off) {
		struct conv_src *src = &s->src[cur];
		uint64_t local = off - cur_off, count = 0, tail;
		struct vd_bnode *base = s->target_has_backing ? src->bs->backing : NULL;
		int ret;

		if (n > src->size - local)
			n = src->size - local;
		ret = img_co_block_status_above(src->bs, base, local, n, &count, NULL, NULL);
		if (ret < 0) {
			img_err(CMD, "error while reading block status at offset %" PRIu64 ": %s", local, img_errmsg(ret));
			return ret;
		}
		n = count;
		/* end status ranges on the source's alignment, to avoid reading clusters twice */
		tail = (local + n) % src->align;
		if (n > tail)
			n -= tail;
		if (ret & VD_BS_ZERO)
			s->status = post_backing_zero ? BLK_BACKING_FILE : BLK_ZERO;
		else if (ret & VD_BS_DATA)
			s->status = BLK_DATA;
		else
			s->status = s->target_has_backing ? BLK_BACKING_FILE : BLK_DATA;
		s->next_status = off + n;
	}
	if (n > s->next_status - off)
		n = s->next_status - off;
	if (s->status == BLK_DATA && n > s->buf_size)
		n = s->buf_size;
	/* compressed clusters are written whole */
	if (s->compressed) {
		if (n < s->cluster_size) {
			n = s->cluster_size < s->total - off ? s->cluster_size : s->total - off;
			s->status = BLK_DATA;
		} else {
			n -= n % s->cluster_size;
		}
	}
	return (int64_t)n;
}

static int conv_read(struct conv *s, uint64_t off, uint64_t n, uint8_t *buf)
{
	while (n > 0) {
		int cur, ret;
		uint64_t cur_off, local, len;

		select_part(s, off, &cur, &cur_off);
		local = off - cur_off;
		len = s->src[cur].size - local;
		if (len > n)
			len = n;
		if (len == 0)
			return -EIO;
		ret = vd_bnode_co_pread(s->src[cur].bs, local, buf, len);
		if (ret < 0)
			return ret;
		off += len;
		n -= len;
		buf += len;
	}
	return 0;
}

/* Most sectors of data have a non-zero first word: no call to scan them. */
static inline bool sector_starts_with_data(const uint8_t *p, uint64_t len)
{
	uint64_t w;

	if (len < sizeof(w))
		return false;
	memcpy(&w, p, sizeof(w));
	return w != 0;
}

/*
 * qemu's is_allocated_sectors(): is the first 512-byte sector of buf data?
 * *pnum = bytes with the same state, ends moved to `align` boundaries.
 */
static bool is_allocated_run(const uint8_t *buf, uint64_t n, uint64_t *pnum, uint64_t off, uint64_t align)
{
	uint64_t i, tail, first;
	bool is_zero;

	if (n == 0) {
		*pnum = 0;
		return false;
	}
	first = n < IMG_SECTOR ? n : IMG_SECTOR;
	is_zero = img_is_zero(buf, first);
	for (i = first; i < n;) {
		uint64_t l = n - i < IMG_SECTOR ? n - i : IMG_SECTOR;
		if (is_zero || !sector_starts_with_data(buf + i, l)) {
			if (img_is_zero(buf + i, l) != is_zero)
				break;
		}
		i += l;
	}
	if (i == n) {
		*pnum = i;
		return !is_zero;
	}
	tail = (off + i) & (align - 1);
	if (tail) {
		if (is_zero && i <= tail)
			is_zero = false; /* the next sector is data and rewrites this one anyway */
		if (!is_zero) {
			i += align - tail;
			if (i > n)
				i = n;
		} else {
			i -= tail;
		}
	}
	*pnum = i;
	return !is_zero;
}

/* qemu's is_allocated_sectors_min(): data runs absorb zero runs shorter than min. */
static bool is_allocated_min(const uint8_t *buf, uint64_t n, uint64_t *pnum, uint64_t min, uint64_t off,
			     uint64_t align)
{
	uint64_t used, checked;

	if (n < min)
		min = n;
	if (!is_allocated_run(buf, n, pnum, off, align))
		return false;
	used = checked = *pnum;
	buf += *pnum;
	n -= *pnum;
	off += *pnum;
	while (n > 0) {
		bool data = is_allocated_run(buf, n, pnum, off, align);

		buf += *pnum;
		n -= *pnum;
		off += *pnum;
		checked += *pnum;
		if (data)
			used = checked;
		else if (*pnum >= min)
			break;
	}
	*pnum = used;
	return true;
}

/* Compressed targets: the run of whole clusters at buf that are all data (true) or all zero (false). */
static bool compressed_run(struct conv *s, const uint8_t *buf, uint64_t n, uint64_t *pnum)
{
	uint64_t cs = s->cluster_size, i = 0;
	bool data = !img_is_zero(buf, cs < n ? cs : n);

	while (i < n) {
		uint64_t l = cs < n - i ? cs : n - i;

		if (i && !img_is_zero(buf + i, l) != data)
			break;
		i += l;
	}
	*pnum = i;
	return data;
}

/* One write (or skip) that conv_write() issues for a part of a chunk. */
struct conv_piece {
	uint64_t off, len;
	enum { PIECE_DATA, PIECE_ZEROES, PIECE_SKIP } op;
};

/* The piece of [off, off+n) (buf holds its data) that starts at off. */
static struct conv_piece next_piece(struct conv *s, uint64_t off, uint64_t n, const uint8_t *buf,
				    enum conv_status status)
{
	struct conv_piece p = { .off = off, .len = n, .op = PIECE_SKIP };

	switch (status) {
	case BLK_BACKING_FILE:
		/* leave it unallocated: the target's backing file shows through */
		return p;
	case BLK_DATA:
		if (!s->min_sparse ||
		    (!s->compressed && is_allocated_min(buf, n, &p.len, s->min_sparse, off, s->alignment)) ||
		    (s->compressed && compressed_run(s, buf, n, &p.len))) {
			p.op = PIECE_DATA;
			return p;
		}
		/* all zeroes: treat as a zero range */
		__attribute__((fallthrough));
	case BLK_ZERO:
		p.op = s->has_zero_init ? PIECE_SKIP : PIECE_ZEROES;
		return p;
	}
	return p;
}

/* In-order writes: let the chunk after [off, off+n) issue its writes. */
static void conv_release_order(struct conv *s, uint64_t off, uint64_t n)
{
	if (s->wr_in_order && s->wr_off == off) {
		s->wr_off = off + n;
		vd_co_queue_wake_all(&s->wr_wait);
	}
}

struct conv_order {
	struct conv *s;
	uint64_t off, n; /* the chunk */
};

static void conv_order_released(void *opaque)
{
	struct conv_order *o = opaque;

	conv_release_order(o->s, o->off, o->n);
}

/*
 * Write a chunk, piece by piece.  With in-order writes and `pipelined`, the
 * next chunk may issue its writes as soon as this chunk's last write no
 * longer needs to come first: for a raw target once it is issued, for qcow2
 * once its clusters are allocated (vd_bnode_co_pwritev_ordered; woken
 * coroutines run only after this one yields).  So the target always has a
 * write queued instead of idling from one completion to the next
 * submission, while the order in which clusters are allocated (a qcow2
 * target's layout) stays that of the guest offsets, whatever -m is.
 */
static int conv_write(struct conv *s, uint64_t off, uint64_t n, uint8_t *buf, enum conv_status status,
		      bool pipelined)
{
	const uint64_t chunk_off = off, chunk_len = n;
	struct conv_piece p = next_piece(s, off, n, buf, status);
	int ret = 0;

	while (n > 0) {
		uint64_t rest = n - p.len;
		struct conv_piece next = { 0 };

		/* Find the next piece that writes something, to know whether p is the last. */
		if (rest) {
			next = next_piece(s, off + p.len, rest, buf + p.len, status);
			while (next.op == PIECE_SKIP && next.off + next.len < off + n) {
				uint64_t skip_end = next.off + next.len;
				next = next_piece(s, skip_end, off + n - skip_end, buf + (skip_end - off), status);
			}
		}
		bool last = !rest || next.op == PIECE_SKIP;

		if (p.op == PIECE_DATA) {
			struct conv_order o = { .s = s, .off = chunk_off, .n = chunk_len };
			struct vd_write_order ord = { .release = conv_order_released, .opaque = &o };
			struct vd_qiov q;

			vd_qiov_init_buf(&q, buf + (p.off - off), p.len);
			ret = vd_bnode_co_pwritev_ordered(s->target, p.off, p.len, &q, 0, s->write_flags,
							  pipelined && last ? &ord : NULL);
			vd_qiov_destroy(&q);
		} else if (p.op == PIECE_ZEROES) {
			/* Zeroes may allocate metadata (qcow2 L2 tables): released early only into raw. */
			if (pipelined && last && s->raw_target)
				conv_release_order(s, chunk_off, chunk_len);
			ret = vd_bnode_co_pwrite_zeroes(s->target, p.off, p.len, VD_BREQ_MAY_UNMAP);
		}
		if (ret < 0)
			break;
		if (!rest || next.op == PIECE_SKIP)
			break; /* nothing more to write in this chunk */
		buf += next.off - off;
		n -= next.off - off;
		off = next.off;
		p = next;
	}
	conv_release_order(s, chunk_off, chunk_len);
	return ret;
}

static void conv_fail(struct conv *s, int ret)
{
	if (s->ret == -EINPROGRESS)
		s->ret = ret;
	vd_co_queue_wake_all(&s->wr_wait);
}

static void conv_worker(void *opaque)
{
	struct conv *s = opaque;
	uint8_t *buf = vd_blk_alloc(s->buf_size);

	if (!buf) {
		img_err(CMD, "out of memory");
		conv_fail(s, -ENOMEM);
	}
	while (buf) {
		uint64_t off;
		int64_t n;
		enum conv_status status;
		int ret;

		vd_co_mutex_lock(&s->lock);
		if (s->ret != -EINPROGRESS || s->off >= s->total) {
			vd_co_mutex_unlock(&s->lock);
			break;
		}
		n = conv_iteration(s, s->off);
		if (n <= 0) {
			vd_co_mutex_unlock(&s->lock);
			conv_fail(s, n < 0 ? (int)n : -EIO);
			break;
		}
		off = s->off;
		status = s->status;
		if (!s->min_sparse && status == BLK_ZERO && (uint64_t)n > s->buf_size)
			n = (int64_t)s->buf_size;
		s->off += (uint64_t)n; /* others may go on reading past this chunk */
		vd_co_mutex_unlock(&s->lock);

		if (status == BLK_DATA || (!s->min_sparse && status == BLK_ZERO)) {
			s->allocated_done += (uint64_t)n;
			if (s->allocated_total)
				img_progress_print(100.0 * (double)s->allocated_done / (double)s->allocated_total);
		}
		if (status == BLK_DATA) {
			ret = conv_read(s, off, (uint64_t)n, buf);
			if (ret < 0) {
				img_err(CMD, "error while reading at byte %" PRIu64 ": %s", off, img_errmsg(ret));
				conv_fail(s, ret);
			}
		} else if (!s->min_sparse && status == BLK_ZERO) {
			memset(buf, 0, (size_t)n);
			status = BLK_DATA;
		}

		if (s->wr_in_order) {
			while (s->wr_off != off && s->ret == -EINPROGRESS)
				vd_co_queue_wait(&s->wr_wait, NULL);
		}
		if (s->ret == -EINPROGRESS) {
			ret = conv_write(s, off, (uint64_t)n, buf, status, s->pipelined);
			if (ret < 0) {
				img_err(CMD, "error while writing at byte %" PRIu64 ": %s", off, img_errmsg(ret));
				conv_fail(s, ret);
			}
		} else {
			conv_release_order(s, off, (uint64_t)n);
		}
	}
	if (buf)
		vd_blk_free(buf);
	if (--s->running == 0) {
		if (s->ret == -EINPROGRESS)
			s->ret = 0;
		s->done = true;
	}
}

/* Sum of what will be copied, for the progress meter (qemu-img does the same pass). */
static int conv_prepass(void *opaque)
{
	struct conv *s = opaque;
	uint64_t off = 0;

	while (off < s->total) {
		int64_t n = conv_iteration(s, off);

		if (n <= 0)
			return n < 0 ? (int)n : -EIO;
		if (s->status == BLK_DATA || (!s->min_sparse && s->status == BLK_ZERO))
			s->allocated_total += (uint64_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int conv_do_copy(struct conv *s, bool progress)
{
	if (progress) {
		int ret = img_run_co(conv_prepass, s);
		if (ret < 0)
			return ret;
	}
	s->next_status = 0;
	s->off = 0;
	s->wr_off = 0;
	s->ret = -EINPROGRESS;
	s->done = false;
	vd_co_mutex_init(&s->lock);
	vd_co_queue_init(&s->wr_wait);
	s->running = s->num_co;
	for (int i = 0; i < s->num_co; i++) {
		struct vd_co *co = vd_co_create(conv_worker, s);

		if (!co) {
			img_err(CMD, "could not create a coroutine: out of memory");
			conv_fail(s, -ENOMEM);
			s->running -= s->num_co - i;
			if (s->running == 0)
				s->done = true;
			break;
		}
		vd_co_enter(co);
	}
	vd_loop_run_until(vd_loop_get(), &s->done);
	return s->ret;
}

/*
 * The target.  A target written through the page cache (no cache.direct)
 * gets aio=threads, as qemu-img's default, rather than io_uring, so that its
 * writes run on a second CPU while this thread reads the next chunks.  With
 * io_uring a regular file's buffered write is either done in the submitting
 * call (the driver does that on ext4, which cannot take them without
 * blocking) or handed to io-wq, serialised per file; done inline the copy
 * into the page cache and the read of the source take turns on one CPU
 * (perf: each about half of the time).  One worker, not the driver's
 * default eight: buffered writes to one file serialise on its inode lock
 * (i_rwsem), so more writers only spin on it (perf: 12% of the cycles in
 * rwsem_spin_on_owner with eight); one worker already overlaps the writes
 * with the reads, and measured fastest (2 GiB half-full qcow2->raw, median
 * of 5: 1 worker 0.36 s, 2: 0.39 s, 4: 0.41 s, 8: 0.42 s, qemu-img 0.39 s;
 * raw->qcow2, 2026-12-07: 0.21-0.23 s, io_uring 0.28 s, qemu-img 0.31 s).
 * Only for a target named by a plain file name: an option string or json:
 * spec says what it wants.
 */
static struct vd_bnode *open_target(const char *filename, const char *fmt, const struct vd_cache_mode *cache)
{
	json_t *opts;
	struct vd_bnode *bs;

	if (cache->direct || !fmt)
		return img_open(CMD, filename, fmt, false, cache, VD_BO_RDWR);
	opts = vd_opts_parse_spec(filename);
	if (!opts || json_object_size(opts) != 1 || !json_object_get(opts, "filename")) {
		json_decref(opts);
		return img_open(CMD, filename, fmt, false, cache, VD_BO_RDWR);
	}
	json_object_set_new(opts, "file", json_pack("{s:s, s:O, s:s, s:i}", "driver", "file", "filename",
						    json_object_get(opts, "filename"), "aio", "threads", "aio-threads", 1));
	json_object_del(opts, "filename");
	json_object_set_new(opts, "driver", json_string(fmt));
	img_clear_err();
	bs = vd_bnode_open_opts(opts, cache, VD_BO_RDWR);
	if (!bs)
		img_err(CMD, "Could not open '%s': %s", filename, img_errmsg(-EIO));
	json_decref(opts);
	return bs;
}

enum { OPT_IMAGE_OPTS = 256, OPT_TARGET_IS_ZERO };

static uint64_t pow2floor(uint64_t v)
{
	uint64_t p = 1;

	while (p <= v / 2)
		p <<= 1;
	return v ? p : 0;
}

int vd_img_convert(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "source-format", required_argument, NULL, 'f' },
		{ "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
		{ "source-cache", required_argument, NULL, 'T' },
		{ "target-format", required_argument, NULL, 'O' },
		{ "target-format-options", required_argument, NULL, 'o' },
		{ "target-cache", required_argument, NULL, 't' },
		{ "backing", required_argument, NULL, 'B' },
		{ "backing-format", required_argument, NULL, 'F' },
		{ "sparse-size", required_argument, NULL, 'S' },
		{ "no-create", no_argument, NULL, 'n' },
		{ "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
		{ "compress", no_argument, NULL, 'c' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "parallel", required_argument, NULL, 'm' },
		{ "oob-writes", no_argument, NULL, 'W' },
		{ "progress", no_argument, NULL, 'p' },
		{ "quiet", no_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *out_fmt = NULL, *cache_name = "unsafe", *src_cache_name = "writeback";
	const char *out_base = NULL, *out_base_fmt = NULL, *out_filename;
	bool image_opts = false, skip_create = false, progress = false, quiet = false;
	struct vd_cache_mode cache, src_cache;
	struct conv s = {
		.min_sparse = 4096,
		.wr_in_order = true,
		.num_co = 8,
		.buf_size = IMG_IO_BUF_SIZE,
		.target_backing_size = -1,
	};
	json_t *opts = json_object();
	char *base_full = NULL;
	int c, ret = IMG_EXIT_ERR;

	img_getopt_reset();
	while ((c = getopt_long(argc, argv, ":hf:O:b:B:cF:o:S:pt:T:nm:WUq", longopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			json_decref(opts);
			return 0;
		case 'f':
			fmt = optarg;
			break;
		case OPT_IMAGE_OPTS:
			image_opts = true;
			break;
		case 'T':
			src_cache_name = optarg;
			break;
		case 'O':
			out_fmt = optarg;
			break;
		case 'o':
			if (!img_parse_opts(CMD, optarg, opts)) {
				json_decref(opts);
				return IMG_EXIT_USAGE;
			}
			break;
		case 't':
			cache_name = optarg;
			break;
		case 'b':
		case 'B':
			out_base = optarg;
			break;
		case 'F':
			out_base_fmt = optarg;
			break;
		case 'S': {
			uint64_t v;
			if (img_parse_size(optarg, &v) < 0 || v % IMG_SECTOR || v > 32768ull * IMG_SECTOR) {
				json_decref(opts);
				return img_usage_err(CMD, "Invalid buffer size for sparse output specified. Valid sizes are "
						     "multiples of 512 up to 16777216. Select 0 to disable sparse detection "
						     "(fully allocates output).");
			}
			s.min_sparse = v;
			break;
		}
		case 'n':
			skip_create = true;
			break;
		case OPT_TARGET_IS_ZERO:
			s.has_zero_init = true;
			break;
		case 'c':
			s.compressed = true;
			break;
		case 'U':
			break;
		case 'm': {
			char *end;
			long v = strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end || v < 1 || v > MAX_COROUTINES) {
				json_decref(opts);
				return img_usage_err(CMD, "Invalid number of coroutines '%s'. Allowed number of coroutines "
						     "is between 1 and %d", optarg, MAX_COROUTINES);
			}
			s.num_co = (int)v;
			break;
		}
		case 'W':
			s.wr_in_order = false;
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		default:
			json_decref(opts);
			return img_bad_option(CMD, c, argc, argv);
		}
	}
	if (quiet)
		progress = false;
	if (!out_fmt && !skip_create)
		out_fmt = "raw";

	if (img_opts_want_help(opts)) {
		if (!out_fmt) {
			img_err(CMD, "Option help requires a format be specified");
			goto out;
		}
		if (!img_format_has_opt_list(out_fmt)) {
			img_err(CMD, "Unknown file format '%s'", out_fmt);
			goto out;
		}
		img_print_format_opts(out_fmt, "create");
		ret = 0;
		goto out;
	}
	if (s.has_zero_init && !skip_create) {
		ret = img_usage_err(CMD, "--target-is-zero requires use of -n flag");
		goto out;
	}
	if (skip_create && json_object_size(opts)) {
		ret = img_usage_err(CMD, "-o has no effect when skipping image creation");
		goto out;
	}
	s.nsrc = argc - optind - 1;
	if (s.nsrc < 1) {
		ret = img_usage_err(CMD, "Must specify image file name (sources and a target)");
		goto out;
	}
	out_filename = argv[argc - 1];
	if (img_parse_cache(CMD, src_cache_name, "source cache", &src_cache) < 0 ||
	    img_parse_cache(CMD, cache_name, "cache", &cache) < 0) {
		ret = IMG_EXIT_USAGE;
		goto out;
	}
	if (out_fmt && !vd_format_find(out_fmt)) {
		img_err(CMD, "Unknown file format '%s'", out_fmt);
		goto out;
	}

	/* sources */
	s.src = calloc((size_t)s.nsrc, sizeof(*s.src));
	if (!s.src) {
		img_err(CMD, "out of memory");
		goto out;
	}
	for (int i = 0; i < s.nsrc; i++) {
		struct conv_src *src = &s.src[i];
		uint32_t cs;

		src->bs = img_open(CMD, argv[optind + i], fmt, image_opts, &src_cache, 0);
		if (!src->bs)
			goto out;
		src->size = src->bs->size;
		src->align = src->bs->request_alignment > IMG_SECTOR ? src->bs->request_alignment : IMG_SECTOR;
		cs = img_cluster_size(src->bs);
		if (cs > src->align)
			src->align = cs;
		s.total += src->size;
	}

	/* target */
	if (json_object_get(opts, "backing_file")) {
		out_base = json_string_value(json_object_get(opts, "backing_file"));
		if (!out_base_fmt)
			out_base_fmt = json_string_value(json_object_get(opts, "backing_fmt"));
	}
	if (out_base && !*out_base)
		out_base = NULL;
	s.target_has_backing = out_base != NULL;
	if (s.has_zero_init && s.target_has_backing) {
		img_err(CMD, "Cannot use --target-is-zero when the destination image has a backing file");
		goto out;
	}
	if (s.nsrc > 1 && out_base) {
		img_err(CMD, "Having a backing file for the target makes no sense when concatenating multiple input "
			"images");
		goto out;
	}

	if (!skip_create) {
		const struct vd_format *drv = vd_format_find(out_fmt);
		struct vd_create_opts co;
		int r;

		if (drv->is_protocol || !drv->create) {
			img_err(CMD, "Format driver '%s' does not support image creation", out_fmt);
			goto out;
		}
		if (s.compressed) {
			const char *pa = json_string_value(json_object_get(opts, "preallocation"));
			if (strcmp(out_fmt, "qcow2") != 0) {
				img_err(CMD, "Compression not supported for this file format");
				goto out;
			}
			if (pa && strcmp(pa, "off") != 0) {
				img_err(CMD, "Compression and preallocation not supported at the same time");
				goto out;
			}
		}
		if (out_base) {
			if (!drv->supports_backing) {
				img_err(CMD, "Backing file not supported for file format '%s'", out_fmt);
				goto out;
			}
			json_object_set_new(opts, "backing_file", json_string(out_base));
			if (!out_base_fmt) {
				base_full = img_path_combine(out_filename, out_base);
				out_base_fmt = base_full ? img_resolve_fmt(CMD, base_full, NULL) : NULL;
				if (!out_base_fmt)
					goto out;
			} else if (!vd_format_find(out_base_fmt)) {
				img_err(CMD, "Unknown backing file format '%s'", out_base_fmt);
				goto out;
			}
			json_object_set_new(opts, "backing_fmt", json_string(out_base_fmt));
		}
		json_object_del(opts, "size");
		if (img_check_format_opts(CMD, out_fmt, opts, "create") < 0)
			goto out;
		co.filename = out_filename;
		co.size = s.total;
		co.opts = opts;
		img_clear_err();
		r = vd_image_create(out_fmt, &co);
		if (r < 0) {
			img_err(CMD, "%s: error while converting %s: %s", out_filename, out_fmt, img_errmsg(r));
			goto out;
		}
	}

	s.target = open_target(out_filename, out_fmt, &cache);
	if (!s.target)
		goto out;
	if (skip_create) {
		if (s.target->size < s.total) {
			img_err(CMD, "output file is smaller than input file");
			goto out;
		}
	} else if (!s.target_has_backing && s.min_sparse) {
		/* a fresh image reads as zeroes (a block device might not) */
		struct stat st;
		bool blockdev = strcmp(out_fmt, "raw") == 0 && stat(out_filename, &st) == 0 && !S_ISREG(st.st_mode);

		s.has_zero_init = !blockdev;
	}
	if (s.target_has_backing && !skip_create && s.target->backing)
		s.target_backing_size = (int64_t)s.target->backing->size;
	s.cluster_size = img_cluster_size(s.target);
	if (s.compressed) {
		if (strcmp(img_fmt_name(s.target), "qcow2") != 0) {
			img_err(CMD, "Compression not supported for this file format");
			goto out;
		}
		s.write_flags = VD_BREQ_COMPRESSED;
		if (s.cluster_size == 0 || s.cluster_size > MAX_BUF_SIZE) {
			img_err(CMD, "invalid cluster size");
			goto out;
		}
		/* Chunks of several clusters: qcow2 compresses the clusters of one write in parallel. */
		if (s.cluster_size > s.buf_size)
			s.buf_size = s.cluster_size;
	}
	/*
	 * Compressed writes are not pipelined: qcow2 compresses the clusters of
	 * one write on every CPU already, and allocates only after that.
	 */
	s.raw_target = !strcmp(img_fmt_name(s.target), "raw");
	s.pipelined = s.wr_in_order && !s.compressed;
	s.alignment = pow2floor(s.min_sparse);
	if (s.alignment < IMG_SECTOR)
		s.alignment = IMG_SECTOR;
	{
		uint64_t ra = s.target->request_alignment;

		if (ra > s.alignment && !(ra & (ra - 1)))
			s.alignment = ra;
	}

	img_progress_init(progress);
	c = conv_do_copy(&s, progress);
	if (c == 0) {
		img_clear_err();
		c = vd_bnode_flush(s.target);
		if (c < 0)
			img_err(CMD, "error while flushing %s: %s", out_filename, img_errmsg(c));
	}
	if (c == 0)
		img_progress_print(100);
	img_progress_end();
	ret = c == 0 ? 0 : IMG_EXIT_ERR;
out:
	if (s.target)
		vd_bnode_unref(s.target);
	if (s.src) {
		for (int i = 0; i < s.nsrc; i++)
			if (s.src[i].bs)
				vd_bnode_unref(s.src[i].bs);
		free(s.src);
	}
	free(base_full);
	json_decref(opts);
	return ret;
}
