/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Compressed clusters: zlib (raw deflate, 4 KiB window: windowBits -12) or
 * zstd (one frame), chosen by the header's compression_type.  A compressed
 * cluster is described by its host byte offset and a count of 512-byte
 * sectors; the data need not start or end on a sector boundary, and the
 * decompressor stops once it has produced a whole cluster.
 *
 * Writes: only whole clusters (or the last, partial cluster of the image)
 * that are not allocated yet are written compressed; anything else, and
 * data that does not shrink, goes through the normal write path.  Pieces
 * are packed one after the other into host clusters (alloc_bytes).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2.h"
#include "workpool.h"

/*
 * Compression contexts are kept per thread (the worker threads compress):
 * deflateReset / a reused ZSTD_CCtx give the same output as fresh ones
 * without allocating and clearing the state for every cluster.
 */
struct cctx {
	z_stream *deflate;
	ZSTD_CCtx *zstd;
};

static _Thread_local struct cctx *tls_cctx;
static pthread_key_t cctx_key;
static pthread_once_t cctx_once = PTHREAD_ONCE_INIT;

static void cctx_free(void *p)
{
	struct cctx *c = p;

	if (c->deflate) {
		deflateEnd(c->deflate);
		free(c->deflate);
	}
	ZSTD_freeCCtx(c->zstd);
	free(c);
}

static void cctx_key_init(void)
{
	(void)pthread_key_create(&cctx_key, cctx_free);
}

/* This thread's contexts (freed when the thread exits). */
static struct cctx *get_cctx(void)
{
	if (tls_cctx)
		return tls_cctx;
	pthread_once(&cctx_once, cctx_key_init);
	tls_cctx = calloc(1, sizeof(*tls_cctx));
	if (tls_cctx && pthread_setspecific(cctx_key, tls_cctx) != 0) {
		free(tls_cctx);
		tls_cctx = NULL;
	}
	return tls_cctx;
}

static z_stream *get_deflate(void)
{
	struct cctx *c = get_cctx();
	z_stream *z;

	if (!c)
		return NULL;
	if (c->deflate)
		return deflateReset(c->deflate) == Z_OK ? c->deflate : NULL;
	z = calloc(1, sizeof(*z));
	if (!z)
		return NULL;
	if (deflateInit2(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
		free(z);
		return NULL;
	}
	c->deflate = z;
	return z;
}

static ZSTD_CCtx *get_zstd(void)
{
	struct cctx *c = get_cctx();

	if (c && !c->zstd)
		c->zstd = ZSTD_createCCtx();
	return c ? c->zstd : NULL;
}

long qcow2_compress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_cap)
{
	if (type == QCOW2_COMPRESSION_ZLIB) {
		z_stream *z = get_deflate();
		long out;
		int ret;

		if (!z)
			return -ENOMEM;
		z->next_in = (Bytef *)src;
		z->avail_in = (uInt)src_len;
		z->next_out = dst;
		z->avail_out = (uInt)dst_cap;
		ret = deflate(z, Z_FINISH);
		out = (long)(dst_cap - z->avail_out);
		if (ret != Z_STREAM_END)
			return -ENOSPC;
		return out;
	}
	if (type == QCOW2_COMPRESSION_ZSTD) {
		ZSTD_CCtx *cc = get_zstd();
		size_t r;

		if (!cc)
			return -ENOMEM;
		r = ZSTD_compressCCtx(cc, dst, dst_cap, src, src_len, ZSTD_CLEVEL_DEFAULT);
		if (ZSTD_isError(r))
			return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? -ENOSPC : -EIO;
		return (long)r;
	}
	return -ENOTSUP;
}

int qcow2_decompress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_len)
{
	if (type == QCOW2_COMPRESSION_ZLIB) {
		z_stream z;
		int ret;

		memset(&z, 0, sizeof(z));
		if (inflateInit2(&z, -12) != Z_OK)
			return -ENOMEM;
		z.next_in = (Bytef *)src;
		z.avail_in = (uInt)src_len;
		z.next_out = dst;
		z.avail_out = (uInt)dst_len;
		ret = inflate(&z, Z_FINISH);
		/* Done when the cluster is full; the input may carry the next cluster's bytes. */
		ret = ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && z.avail_out == 0) ? 0 : -EIO;
		inflateEnd(&z);
		return ret;
	}
	if (type == QCOW2_COMPRESSION_ZSTD) {
		ZSTD_DCtx *dctx = ZSTD_createDCtx();
		ZSTD_inBuffer in = { src, src_len, 0 };
		ZSTD_outBuffer out = { dst, dst_len, 0 };
		int ret = 0;

		if (!dctx)
			return -ENOMEM;
		while (out.pos < out.size) {
			size_t in_pos = in.pos, out_pos = out.pos;
			size_t r = ZSTD_decompressStream(dctx, &out, &in);
			if (ZSTD_isError(r) || (in.pos == in_pos && out.pos == out_pos)) {
				ret = -EIO;
				break;
			}
		}
		ZSTD_freeDCtx(dctx);
		return ret;
	}
	return -ENOTSUP;
}

int qcow2_read_compressed(struct qcow2_state *s, uint64_t entry, uint8_t *cluster_buf)
{
	uint64_t coff, csize, fe = s->bs->file->size > s->host_end ? s->bs->file->size : s->host_end;
	uint8_t *buf;
	int ret;

	qcow2_compressed_decode(s, entry, &coff, &csize, NULL, NULL);
	if (coff < s->cluster_size || coff >= fe)
		return qcow2_signal_corruption(s, "compressed cluster at %#" PRIx64 " is outside the image", coff);
	/* The last sector may run past the end of the file (the writer does not pad). */
	if (csize > fe - coff)
		csize = fe - coff;
	buf = vd_blk_alloc(csize);
	if (!buf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	ret = qcow2_file_pread(s, coff, buf, csize);
	if (ret == 0) {
		ret = qcow2_decompress(s->compression_type, buf, csize, cluster_buf, s->cluster_size);
		if (ret < 0)
			ret = vd_error(EIO, "qcow2: could not decompress the cluster at %#" PRIx64 " (%s)", coff,
				       s->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib");
	}
	vd_blk_free(buf);
	return ret;
}

/* Write one compressed cluster (clen bytes at dst) for guest cluster off; plain if it is allocated already. */
static int write_one_compressed(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff,
				const uint8_t *dst, long clen)
{
	uint64_t c = off >> s->cluster_bits, entry;
	struct qcow2_inflight inf;
	uint8_t *l2;
	int64_t coff;
	int ret;

	vd_co_mutex_lock(&s->lock);
	while (qcow2_wait_inflight(s, c, c + 1))
		;
	ret = qcow2_get_l2_write(s, off, &l2);
	if (ret < 0) {
		vd_co_mutex_unlock(&s->lock);
		return ret;
	}
	entry = qcow2_l2_entry(s, l2, qcow2_l2_index(s, off));
	qcow2_cache_put(&s->l2_cache, l2);
	if ((entry & QCOW2_OFLAG_COMPRESSED) || (entry & L2E_OFFSET_MASK)) {
		/* Already allocated: overwrite normally. */
		vd_co_mutex_unlock(&s->lock);
		return qcow2_do_pwritev(s, off, len, qiov, qoff, 0, NULL);
	}
	coff = qcow2_alloc_bytes(s, (uint64_t)clen);
	if (coff < 0) {
		vd_co_mutex_unlock(&s->lock);
		return (int)coff;
	}
	inf.start = c;
	inf.end = c + 1;
	inf.next = s->inflight;
	s->inflight = &inf;
	vd_co_mutex_unlock(&s->lock);

	ret = qcow2_overlap_check(s, 0, (uint64_t)coff, (uint64_t)clen);
	if (ret == 0)
		ret = qcow2_file_pwrite(s, (uint64_t)coff, dst, (size_t)clen);

	vd_co_mutex_lock(&s->lock);
	if (ret == 0)
		ret = qcow2_l2_after_alloc(s);
	if (ret == 0)
		ret = qcow2_get_l2_write(s, off, &l2);
	if (ret == 0) {
		uint32_t idx = qcow2_l2_index(s, off);
		uint64_t old = qcow2_l2_entry(s, l2, idx);
		qcow2_l2_set(s, l2, idx, qcow2_compressed_encode(s, (uint64_t)coff, (uint64_t)clen), 0);
		qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		if (old & (QCOW2_OFLAG_COMPRESSED | L2E_OFFSET_MASK))
			ret = qcow2_free_entry_cluster(s, old);
	} else {
		(void)qcow2_free_clusters(s, (uint64_t)coff, (uint64_t)clen);
	}
	for (struct qcow2_inflight **pp = &s->inflight; *pp; pp = &(*pp)->next) {
		if (*pp == &inf) {
			*pp = inf.next;
			break;
		}
	}
	vd_co_queue_wake_all(&s->inflight_wq);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

struct compress_job {
	uint8_t type;
	const uint8_t *src;
	uint8_t *dst;
	size_t cs;
};

static long compress_job_run(void *opaque)
{
	struct compress_job *j = opaque;

	return qcow2_compress(j->type, j->src, j->cs, j->dst, j->cs - 1);
}

/* The bytes [off, off+len) of q when they are one piece of memory, else NULL. */
static const uint8_t *contiguous(const struct vd_qiov *q, size_t off, uint64_t len)
{
	for (int i = 0; i < q->niov; i++) {
		if (off < q->iov[i].iov_len)
			return q->iov[i].iov_len - off >= len ? (const uint8_t *)q->iov[i].iov_base + off : NULL;
		off -= q->iov[i].iov_len;
	}
	return NULL;
}

/* Clusters compressed at once: up to 64, and up to 4 MiB of input. */
#define COMPRESS_BATCH 64
#define COMPRESS_BATCH_BYTES (4u << 20)

/*
 * Whole clusters [off, off+len) (the last may end the image short): the
 * clusters of a batch are compressed in parallel on worker threads, then
 * written one after the other in guest order (allocation stays ordered).
 * Runs of clusters that do not shrink are written plain, in one request.
 */
int qcow2_co_pwrite_compressed(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff)
{
	uint64_t cs = s->cluster_size, max_nb = COMPRESS_BATCH_BYTES / cs;
	struct compress_job jobs[COMPRESS_BATCH];
	void *args[COMPRESS_BATCH];
	long clen[COMPRESS_BATCH];
	uint8_t *src = NULL, *dst = NULL;
	int ret = 0;

	if (max_nb < 1)
		max_nb = 1;
	if (max_nb > COMPRESS_BATCH)
		max_nb = COMPRESS_BATCH;
	while (len > 0 && ret == 0) {
		uint64_t nb = (len + cs - 1) / cs, bytes;
		const uint8_t *in;

		if (nb > max_nb)
			nb = max_nb;
		bytes = nb * cs < len ? nb * cs : len;
		if (!dst) {
			/* Kept in the state between requests: big fresh buffers cost page faults. */
			dst = s->compress_buf;
			s->compress_buf = NULL;
			if (!dst)
				dst = vd_blk_alloc(2 * COMPRESS_BATCH_BYTES);
			if (!dst) {
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				break;
			}
			src = dst + COMPRESS_BATCH_BYTES;
		}
		in = bytes == nb * cs ? contiguous(qiov, qoff, bytes) : NULL;
		if (!in) {
			/* Scattered, or a short last cluster: gather (and zero-pad) a copy. */
			if (bytes < nb * cs)
				memset(src + bytes, 0, nb * cs - bytes);
			vd_qiov_to_buf(qiov, qoff, src, bytes);
			in = src;
		}
		for (uint64_t i = 0; i < nb; i++) {
			jobs[i] = (struct compress_job){ s->compression_type, in + i * cs, dst + i * cs, cs };
			args[i] = &jobs[i];
		}
		vd_co_run_in_workers(compress_job_run, args, clen, (int)nb);
		for (uint64_t i = 0; i < nb && ret == 0;) {
			uint64_t j = i + 1, a = i * cs, b;

			if (clen[i] == -ENOSPC) {
				while (j < nb && clen[j] == -ENOSPC)
					j++;
				b = j * cs < bytes ? j * cs : bytes;
				ret = qcow2_do_pwritev(s, off + a, b - a, qiov, qoff + a, 0, NULL);
			} else if (clen[i] < 0) {
				ret = vd_error((int)-clen[i], "qcow2: compression failed");
			} else {
				b = j * cs < bytes ? j * cs : bytes;
				ret = write_one_compressed(s, off + a, b - a, qiov, qoff + a, dst + a, clen[i]);
			}
			i = j;
		}
		off += bytes;
		qoff += bytes;
		len -= bytes;
	}
	if (dst && !s->compress_buf)
		s->compress_buf = dst;
	else
		vd_blk_free(dst);
	return ret;
}
