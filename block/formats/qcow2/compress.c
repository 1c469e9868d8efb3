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
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2.h"

long qcow2_compress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_cap)
{
	if (type == QCOW2_COMPRESSION_ZLIB) {
		z_stream z;
		long out;
		int ret;

		memset(&z, 0, sizeof(z));
		if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
			return -ENOMEM;
		z.next_in = (Bytef *)src;
		z.avail_in = (uInt)src_len;
		z.next_out = dst;
		z.avail_out = (uInt)dst_cap;
		ret = deflate(&z, Z_FINISH);
		out = (long)(dst_cap - z.avail_out);
		deflateEnd(&z);
		if (ret != Z_STREAM_END)
			return -ENOSPC;
		return out;
	}
	if (type == QCOW2_COMPRESSION_ZSTD) {
		size_t r = ZSTD_compress(dst, dst_cap, src, src_len, ZSTD_CLEVEL_DEFAULT);
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

int qcow2_co_pwrite_compressed(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff)
{
	uint64_t cs = s->cluster_size, c = off >> s->cluster_bits, entry;
	uint8_t *src = NULL, *dst = NULL, *l2;
	struct qcow2_inflight inf;
	int64_t coff;
	long clen;
	int ret;

	src = malloc(cs);
	dst = vd_blk_alloc(cs);
	if (!src || !dst) {
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	memset(src, 0, cs);
	vd_qiov_to_buf(qiov, qoff, src, len);
	clen = qcow2_compress(s->compression_type, src, cs, dst, cs - 1);
	if (clen == -ENOSPC)
		goto plain;
	if (clen < 0) {
		ret = vd_error((int)-clen, "qcow2: compression failed");
		goto out;
	}

	vd_co_mutex_lock(&s->lock);
	while (qcow2_wait_inflight(s, c, c + 1))
		;
	ret = qcow2_get_l2_write(s, off, &l2);
	if (ret < 0) {
		vd_co_mutex_unlock(&s->lock);
		goto out;
	}
	entry = qcow2_l2_entry(s, l2, qcow2_l2_index(s, off));
	qcow2_cache_put(&s->l2_cache, l2);
	if ((entry & QCOW2_OFLAG_COMPRESSED) || (entry & L2E_OFFSET_MASK)) {
		/* Already allocated: overwrite normally. */
		vd_co_mutex_unlock(&s->lock);
		goto plain;
	}
	coff = qcow2_alloc_bytes(s, (uint64_t)clen);
	if (coff < 0) {
		vd_co_mutex_unlock(&s->lock);
		ret = (int)coff;
		goto out;
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
	goto out;

plain:
	ret = qcow2_do_pwritev(s, off, len, qiov, qoff, 0);
out:
	free(src);
	vd_blk_free(dst);
	return ret;
}
