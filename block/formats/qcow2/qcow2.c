/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2: probe, open (header, extensions, tables), close, flush, header
 * updates, corruption handling, info, amend, change-backing, format table.
 *
 * ============================ CRASH SAFETY =================================
 *
 * Invariant on disk at every point: a cluster's refcount is never lower
 * than the number of references to it that are on disk, and every table a
 * pointer on disk points at has been written before that pointer.  A crash
 * can therefore only leak clusters (refcount > references), which `check -r
 * leaks` repairs, and data whose write was acknowledged by a completed flush
 * is still reachable.  Orderings (F = flush of the image file):
 *
 * 1. Allocating write (no lazy refcounts):
 *      refcount +1 in the refcount-block cache        (memory)
 *      guest data + copy-on-write head/tail written   (new cluster, one write)
 *      L2 entry set in the L2 cache                    (memory)
 *    The L2 cache "depends on" the refcount cache: before any dirty L2 table
 *    is written back, all dirty refcount blocks are written, then F (which
 *    also makes the new data durable), then the L2 table.  So: data +
 *    refcount -> F -> L2.
 * 2. New L2 table: allocated (refcount +1), refcount cache written + F,
 *    table contents (zeros or the copy of a shared table) written + F, then
 *    the L1 entry (write-through).  A replaced shared L2 table has its
 *    refcount dropped only after the L1 entry is written.
 * 3. Dropping references (discard, zero with unmap, COW of shared clusters,
 *    snapshot delete): the L2/L1 change goes first; the refcount cache then
 *    "depends on" the L2 cache (or on a flush when the change was written
 *    directly), so the decrement reaches the disk after the reference is
 *    gone.  Host discards (hole punching) of freed clusters are queued and
 *    issued only after the metadata is written and flushed; a queued range
 *    is dropped if its cluster is reallocated before that.
 * 4. New refcount block: written (it describes itself) + F, then the
 *    refcount table entry (write-through).  Refcount table growth: new
 *    blocks + new table written + F, then the header fields (one sector
 *    write) + F, then the old table clusters are freed.
 * 5. L1 growth: new table written + F, header (l1_size, l1_table_offset)
 *    written + F, old table freed.
 * 6. Lazy refcounts: the dirty bit is written and flushed before the first
 *    metadata change; then L2 tables no longer wait for refcount blocks.
 *    Opening a dirty image read/write repairs the refcounts first.  Close
 *    (and amend lazy_refcounts=off) write everything back, F, then clear
 *    the dirty bit.
 * 7. Snapshot create: L1 copy written, refcounts +1 everywhere (cached),
 *    all metadata flushed, new snapshot table written + F, header
 *    (nb_snapshots, snapshots_offset) + F, old table freed.  Snapshot
 *    delete: table without the entry first (as above), then refcounts -1.
 *
 * Reads of allocated clusters never take s->lock; allocating writes take
 * it for the metadata lookup/allocation and for linking the L2 entry, but
 * not while the data is written.  An allocating write registers its guest
 * cluster range in s->inflight; another allocation on an overlapping range
 * waits for it and then sees the new mapping.  In-place writes register
 * their host range (s->host_io) so that a concurrent free cannot hand the
 * cluster to someone else while the write is in progress.
 * ===========================================================================
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* ---------------------------------------------------------------------------
 * Pure helpers
 * ------------------------------------------------------------------------- */

uint64_t qcow2_size_to_l1(uint32_t cluster_bits, uint32_t l2_bits, uint64_t size)
{
	uint32_t shift = cluster_bits + l2_bits;
	uint64_t n = size >> shift;

	if (size & ((1ULL << shift) - 1))
		n++;
	return n;
}

enum qcow2_sc_type qcow2_sc_type(bool extl2, uint64_t entry, uint64_t bitmap, uint32_t sc)
{
	uint64_t host;

	if (entry & QCOW2_OFLAG_COMPRESSED)
		return QCOW2_SC_COMPRESSED;
	host = entry & L2E_OFFSET_MASK;
	if (!extl2) {
		if (entry & QCOW2_OFLAG_ZERO)
			return host ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_ZERO_PLAIN;
		return host ? QCOW2_SC_NORMAL : QCOW2_SC_UNALLOC_PLAIN;
	}
	bool alloc = (bitmap >> sc) & 1;
	bool zero = (bitmap >> (32 + sc)) & 1;
	if (alloc && zero)
		return QCOW2_SC_INVALID;
	if (host) {
		if (alloc)
			return QCOW2_SC_NORMAL;
		return zero ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_UNALLOC_ALLOC;
	}
	if (alloc)
		return QCOW2_SC_INVALID;
	return zero ? QCOW2_SC_ZERO_PLAIN : QCOW2_SC_UNALLOC_PLAIN;
}

void qcow2_compressed_decode(const struct qcow2_state *s, uint64_t entry, uint64_t *coffset, uint64_t *csize,
			     uint64_t *range_start, uint64_t *range_len)
{
	uint64_t off = entry & s->cluster_offset_mask;
	uint64_t nb_sectors = ((entry >> s->csize_shift) & s->csize_mask) + 1;

	if (coffset)
		*coffset = off;
	if (csize)
		*csize = nb_sectors * QCOW2_SECTOR - (off & (QCOW2_SECTOR - 1));
	if (range_start)
		*range_start = off & ~(uint64_t)(QCOW2_SECTOR - 1);
	if (range_len)
		*range_len = nb_sectors * QCOW2_SECTOR;
}

uint64_t qcow2_compressed_encode(const struct qcow2_state *s, uint64_t coffset, uint64_t clen)
{
	uint64_t nb_extra = ((coffset + clen - 1) >> 9) - (coffset >> 9);

	return QCOW2_OFLAG_COMPRESSED | (nb_extra << s->csize_shift) | coffset;
}

int qcow2_parse_header(const uint8_t *buf, size_t len, struct qcow2_header *h)
{
	memset(h, 0, sizeof(*h));
	if (len < QCOW2_V2_HEADER_LEN)
		return vd_error(EINVAL, "qcow2: file too small for a header (%zu bytes)", len);
	h->magic = ld_be32(buf + 0);
	if (h->magic != QCOW2_MAGIC)
		return vd_error(EINVAL, "qcow2: bad magic %#010x (not a qcow2 image)", h->magic);
	h->version = ld_be32(buf + 4);
	if (h->version < 2 || h->version > 3)
		return vd_error(ENOTSUP, "qcow2: unsupported version %u (only 2 and 3)", h->version);
	h->backing_file_offset = ld_be64(buf + 8);
	h->backing_file_size = ld_be32(buf + 16);
	h->cluster_bits = ld_be32(buf + 20);
	h->size = ld_be64(buf + 24);
	h->crypt_method = ld_be32(buf + 32);
	h->l1_size = ld_be32(buf + 36);
	h->l1_table_offset = ld_be64(buf + 40);
	h->refcount_table_offset = ld_be64(buf + 48);
	h->refcount_table_clusters = ld_be32(buf + 56);
	h->nb_snapshots = ld_be32(buf + 60);
	h->snapshots_offset = ld_be64(buf + 64);
	if (h->version == 2) {
		h->refcount_order = 4;
		h->header_length = QCOW2_V2_HEADER_LEN;
		return 0;
	}
	if (len < QCOW2_V3_MIN_HEADER_LEN)
		return vd_error(EINVAL, "qcow2: file too small for a version 3 header (%zu bytes)", len);
	h->incompatible_features = ld_be64(buf + 72);
	h->compatible_features = ld_be64(buf + 80);
	h->autoclear_features = ld_be64(buf + 88);
	h->refcount_order = ld_be32(buf + 96);
	h->header_length = ld_be32(buf + 100);
	if (h->header_length < QCOW2_V3_MIN_HEADER_LEN)
		return vd_error(EINVAL, "qcow2: header_length %u is smaller than 104", h->header_length);
	if (h->header_length % 8)
		return vd_error(EINVAL, "qcow2: header_length %u is not a multiple of 8", h->header_length);
	if (h->header_length > 104) {
		if (len < 105)
			return vd_error(EINVAL, "qcow2: header_length %u past the end of the file", h->header_length);
		h->compression_type = buf[104];
	}
	return 0;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

int qcow2_validate_header(const struct qcow2_header *h, uint64_t file_size)
{
	uint64_t cs, l2_bits, need_l1, l1_bytes, rt_bytes;
	bool extl2;

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return vd_error(EINVAL, "qcow2: cluster_bits %u out of range (9..21)", h->cluster_bits);
	cs = 1ULL << h->cluster_bits;
	if (h->header_length > cs)
		return vd_error(EINVAL, "qcow2: header_length %u is larger than the cluster size", h->header_length);
	if (h->refcount_order > 6)
		return vd_error(EINVAL, "qcow2: refcount_order %u out of range (0..6)", h->refcount_order);
	if (h->crypt_method != 0)
		return vd_error(ENOTSUP, "qcow2: encrypted images are not supported (crypt_method %u)",
				h->crypt_method);
	if (h->version == 3) {
		bool ct_bit = h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION;
		if (h->compression_type > QCOW2_COMPRESSION_ZSTD)
			return vd_error(ENOTSUP, "qcow2: unknown compression_type %u", h->compression_type);
		if (ct_bit && h->compression_type == QCOW2_COMPRESSION_ZLIB)
			return vd_error(EINVAL, "qcow2: compression type feature bit set but compression_type is zlib");
		if (!ct_bit && h->compression_type != QCOW2_COMPRESSION_ZLIB)
			return vd_error(EINVAL, "qcow2: compression_type %u set without the compression type feature bit",
					h->compression_type);
	}
	extl2 = h->version >= 3 && (h->incompatible_features & QCOW2_INCOMPAT_EXTL2);
	if (extl2 && h->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS)
		return vd_error(EINVAL, "qcow2: extended L2 entries need cluster_bits >= 14 (have %u)", h->cluster_bits);
	/* An empty name is no backing file, wherever it points (as in QEMU). */
	if (h->backing_file_offset && h->backing_file_size) {
		if (h->backing_file_size > QCOW2_MAX_BACKING_NAME)
			return vd_error(EINVAL, "qcow2: backing_file_size %u is too long (max 1023)", h->backing_file_size);
		if (h->backing_file_offset > cs || h->backing_file_size > cs - h->backing_file_offset)
			return vd_error(EINVAL, "qcow2: backing_file_offset %#" PRIx64 " is outside the header cluster",
					h->backing_file_offset);
		if (h->backing_file_offset < (h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length))
			return vd_error(EINVAL, "qcow2: backing_file_offset %#" PRIx64 " overlaps the header",
					h->backing_file_offset);
	}
	/* Size and L1. */
	l2_bits = h->cluster_bits - (extl2 ? 4 : 3);
	if (h->size > (1ULL << 62))
		return vd_error(EFBIG, "qcow2: size %" PRIu64 " is too large", h->size);
	need_l1 = qcow2_size_to_l1(h->cluster_bits, (uint32_t)l2_bits, h->size);
	if (need_l1 > QCOW2_MAX_L1_BYTES / 8)
		return vd_error(EFBIG, "qcow2: size %" PRIu64 " needs an L1 table larger than 32 MiB", h->size);
	if ((uint64_t)h->l1_size > QCOW2_MAX_L1_BYTES / 8)
		return vd_error(EFBIG, "qcow2: l1_size %u is too large (max %u entries)", h->l1_size,
				QCOW2_MAX_L1_BYTES / 8);
	if (h->l1_size < need_l1)
		return vd_error(EINVAL, "qcow2: l1_size %u is too small for size %" PRIu64, h->l1_size, h->size);
	l1_bytes = (uint64_t)h->l1_size * 8;
	if (h->l1_size) {
		if (h->l1_table_offset & (cs - 1))
			return vd_error(EINVAL, "qcow2: l1_table_offset %#" PRIx64 " is not cluster aligned",
					h->l1_table_offset);
		if (h->l1_table_offset == 0)
			return vd_error(EINVAL, "qcow2: l1_table_offset is 0 (overlaps the header)");
		if (h->l1_table_offset > file_size || l1_bytes > file_size - h->l1_table_offset)
			return vd_error(EINVAL, "qcow2: L1 table (l1_table_offset %#" PRIx64 ") is past the end of the file",
					h->l1_table_offset);
	}
	/* Refcount table. */
	if (h->refcount_table_clusters == 0)
		return vd_error(EINVAL, "qcow2: refcount_table_clusters is 0");
	if ((uint64_t)h->refcount_table_clusters > QCOW2_MAX_REFTABLE_BYTES / cs)
		return vd_error(EFBIG, "qcow2: refcount_table_clusters %u is too large", h->refcount_table_clusters);
	rt_bytes = (uint64_t)h->refcount_table_clusters << h->cluster_bits;
	if (h->refcount_table_offset & (cs - 1))
		return vd_error(EINVAL, "qcow2: refcount_table_offset %#" PRIx64 " is not cluster aligned",
				h->refcount_table_offset);
	if (h->refcount_table_offset == 0)
		return vd_error(EINVAL, "qcow2: refcount_table_offset is 0 (overlaps the header)");
	if (h->refcount_table_offset > file_size || rt_bytes > file_size - h->refcount_table_offset)
		return vd_error(EINVAL, "qcow2: refcount table (refcount_table_offset %#" PRIx64 ") is past the end of the file",
				h->refcount_table_offset);
	if (ranges_overlap(h->l1_table_offset, l1_bytes, h->refcount_table_offset, rt_bytes))
		return vd_error(EINVAL, "qcow2: L1 table overlaps the refcount table");
	/* Snapshot table. */
	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return vd_error(EINVAL, "qcow2: nb_snapshots %u is too large (max %u)", h->nb_snapshots,
				QCOW2_MAX_SNAPSHOTS);
	if (h->nb_snapshots) {
		if (h->snapshots_offset & (cs - 1))
			return vd_error(EINVAL, "qcow2: snapshots_offset %#" PRIx64 " is not cluster aligned",
					h->snapshots_offset);
		if (h->snapshots_offset == 0 || h->snapshots_offset >= file_size)
			return vd_error(EINVAL, "qcow2: snapshots_offset %#" PRIx64 " is outside the file",
					h->snapshots_offset);
		if (ranges_overlap(h->snapshots_offset, 1, h->l1_table_offset, l1_bytes) ||
		    ranges_overlap(h->snapshots_offset, 1, h->refcount_table_offset, rt_bytes))
			return vd_error(EINVAL, "qcow2: snapshot table overlaps the L1 or refcount table");
	}
	return 0;
}

void qcow2_ext_info_free(struct qcow2_ext_info *x)
{
	struct qcow2_ext *e, *next;

	free(x->features);
	x->features = NULL;
	x->nb_features = 0;
	free(x->hdr_extra);
	x->hdr_extra = NULL;
	x->hdr_extra_len = 0;
	for (e = x->unknown; e; e = next) {
		next = e->next;
		free(e->data);
		free(e);
	}
	x->unknown = NULL;
}

int qcow2_parse_extensions(const uint8_t *buf, size_t len, const struct qcow2_header *h, struct qcow2_ext_info *x)
{
	uint64_t off = h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length;
	uint64_t end = 1ULL << h->cluster_bits;
	struct qcow2_ext **tail;
	int ret;

	memset(x, 0, sizeof(*x));
	tail = &x->unknown;
	if (end > len)
		end = len;
	if (h->version >= 3 && h->header_length > QCOW2_V3_HEADER_LEN && h->header_length <= len) {
		x->hdr_extra_len = h->header_length - QCOW2_V3_HEADER_LEN;
		x->hdr_extra = malloc(x->hdr_extra_len);
		if (!x->hdr_extra)
			return vd_error(ENOMEM, "qcow2: out of memory");
		memcpy(x->hdr_extra, buf + QCOW2_V3_HEADER_LEN, x->hdr_extra_len);
	}
	if (h->backing_file_offset && h->backing_file_offset < end)
		end = h->backing_file_offset;
	while (off + 8 <= end) {
		uint32_t type = ld_be32(buf + off);
		uint32_t elen = ld_be32(buf + off + 4);
		const uint8_t *d = buf + off + 8;

		off += 8;
		if (type == QCOW2_EXT_END)
			break;
		if (elen > end - off) {
			ret = vd_error(EINVAL, "qcow2: header extension %#010x too large (%u bytes)", type, elen);
			goto fail;
		}
		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (elen > QCOW2_MAX_BACKING_FMT) {
				ret = vd_error(EINVAL, "qcow2: backing format extension too long (%u bytes)", elen);
				goto fail;
			}
			memcpy(x->backing_format, d, elen);
			x->backing_format[elen] = '\0';
			x->has_backing_format = true;
			break;
		case QCOW2_EXT_FEATURE_TABLE: {
			int n = (int)(elen / 48);
			free(x->features);
			x->features = calloc(n ? n : 1, sizeof(*x->features));
			if (!x->features) {
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				goto fail;
			}
			for (int i = 0; i < n; i++) {
				x->features[i].type = d[i * 48];
				x->features[i].bit = d[i * 48 + 1];
				memcpy(x->features[i].name, d + i * 48 + 2, 46);
				x->features[i].name[46] = '\0';
			}
			x->nb_features = n;
			break;
		}
		case QCOW2_EXT_BITMAPS:
			if (elen != 24) {
				ret = vd_error(EINVAL, "qcow2: bitmaps extension has length %u (expected 24)", elen);
				goto fail;
			}
			x->has_bitmaps = true;
			x->nb_bitmaps = ld_be32(d);
			x->bitmap_dir_size = ld_be64(d + 8);
			x->bitmap_dir_offset = ld_be64(d + 16);
			break;
		case QCOW2_EXT_CRYPTO:
			ret = vd_error(EINVAL, "qcow2: encryption header extension without an encryption method");
			goto fail;
		case QCOW2_EXT_DATA_FILE:
			if (elen >= sizeof(x->data_file)) {
				ret = vd_error(EINVAL, "qcow2: data file name extension too long (%u bytes)", elen);
				goto fail;
			}
			memcpy(x->data_file, d, elen);
			x->data_file[elen] = '\0';
			x->has_data_file = true;
			break;
		default: {
			struct qcow2_ext *e = calloc(1, sizeof(*e));
			if (!e || !(e->data = malloc(elen ? elen : 1))) {
				free(e);
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				goto fail;
			}
			e->type = type;
			e->len = elen;
			memcpy(e->data, d, elen);
			*tail = e;
			tail = &e->next;
			break;
		}
		}
		off += (elen + 7) & ~7ULL;
	}
	x->end_offset = (uint32_t)off;
	return 0;
fail:
	qcow2_ext_info_free(x);
	return ret;
}

static const struct {
	uint8_t type, bit;
	const char *name;
} known_features[] = {
	{ 0, 0, "dirty bit" },
	{ 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" },
	{ 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" },
	{ 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" },
	{ 2, 1, "raw external data" },
};

static size_t put_ext(uint8_t *buf, size_t off, uint32_t type, const void *data, uint32_t len)
{
	st_be32(buf + off, type);
	st_be32(buf + off + 4, len);
	if (len)
		memcpy(buf + off + 8, data, len);
	return off + 8 + ((len + 7) & ~7U);
}

int qcow2_build_header(const struct qcow2_header *h, const struct qcow2_ext_info *x, const char *backing_file,
		       const char *backing_format, uint8_t *buf, size_t cluster_size)
{
	size_t hlen = h->version == 2 ? QCOW2_V2_HEADER_LEN
				      : QCOW2_V3_HEADER_LEN + (x && x->hdr_extra ? x->hdr_extra_len : 0);
	size_t need = hlen + 8, off, blen = backing_file ? strlen(backing_file) : 0;
	size_t flen = backing_format ? strlen(backing_format) : 0;
	const struct qcow2_ext *e;

	size_t ftable = 8 + sizeof(known_features) / sizeof(known_features[0]) * 48;
	bool with_ftable;

	/* Size first so nothing is written past the cluster. */
	if (flen)
		need += 8 + ((flen + 7) & ~7U);
	if (x && x->has_bitmaps)
		need += 8 + 24;
	for (e = x ? x->unknown : NULL; e; e = e->next)
		need += 8 + ((e->len + 7) & ~7U);
	need += blen;
	if (blen > QCOW2_MAX_BACKING_NAME)
		return vd_error(EINVAL, "qcow2: backing file name too long (%zu bytes, max 1023)", blen);
	if (flen > QCOW2_MAX_BACKING_FMT)
		return vd_error(EINVAL, "qcow2: backing format name too long");
	if (need > cluster_size)
		return vd_error(ENOSPC, "qcow2: header, extensions and backing file name do not fit in one cluster");
	/* The feature name table is optional: left out when it does not fit (512-byte clusters), as qemu-img does. */
	with_ftable = h->version >= 3 && need + ftable <= cluster_size;

	memset(buf, 0, cluster_size);
	st_be32(buf + 0, QCOW2_MAGIC);
	st_be32(buf + 4, h->version);
	st_be32(buf + 20, h->cluster_bits);
	st_be64(buf + 24, h->size);
	st_be32(buf + 32, h->crypt_method);
	st_be32(buf + 36, h->l1_size);
	st_be64(buf + 40, h->l1_table_offset);
	st_be64(buf + 48, h->refcount_table_offset);
	st_be32(buf + 56, h->refcount_table_clusters);
	st_be32(buf + 60, h->nb_snapshots);
	st_be64(buf + 64, h->snapshots_offset);
	if (h->version >= 3) {
		st_be64(buf + 72, h->incompatible_features);
		st_be64(buf + 80, h->compatible_features);
		st_be64(buf + 88, h->autoclear_features);
		st_be32(buf + 96, h->refcount_order);
		st_be32(buf + 100, (uint32_t)hlen);
		buf[104] = h->compression_type;
		if (x && x->hdr_extra)
			memcpy(buf + QCOW2_V3_HEADER_LEN, x->hdr_extra, x->hdr_extra_len);
	}
	off = hlen;
	if (flen)
		off = put_ext(buf, off, QCOW2_EXT_BACKING_FORMAT, backing_format, (uint32_t)flen);
	if (x && x->has_bitmaps) {
		uint8_t d[24] = { 0 };
		st_be32(d, x->nb_bitmaps);
		st_be64(d + 8, x->bitmap_dir_size);
		st_be64(d + 16, x->bitmap_dir_offset);
		off = put_ext(buf, off, QCOW2_EXT_BITMAPS, d, 24);
	}
	if (with_ftable) {
		size_t n = sizeof(known_features) / sizeof(known_features[0]);
		st_be32(buf + off, QCOW2_EXT_FEATURE_TABLE);
		st_be32(buf + off + 4, (uint32_t)(n * 48));
		off += 8;
		for (size_t i = 0; i < n; i++) {
			buf[off] = known_features[i].type;
			buf[off + 1] = known_features[i].bit;
			memcpy(buf + off + 2, known_features[i].name, strlen(known_features[i].name));
			off += 48;
		}
	}
	for (e = x ? x->unknown : NULL; e; e = e->next)
		off = put_ext(buf, off, e->type, e->data, e->len);
	off = put_ext(buf, off, QCOW2_EXT_END, NULL, 0);
	if (blen) {
		memcpy(buf + off, backing_file, blen);
		st_be64(buf + 8, off);
		st_be32(buf + 16, (uint32_t)blen);
	}
	return 0;
}

/* ---------------------------------------------------------------------------
 * Coroutine and file helpers
 * ------------------------------------------------------------------------- */

struct run_co_ctx {
	int (*fn)(void *);
	void *arg;
	int ret;
};

static void run_co_entry(void *p)
{
	struct run_co_ctx *c = p;

	c->ret = c->fn(c->arg);
}

int qcow2_run_co(int (*fn)(void *), void *arg)
{
	struct run_co_ctx c = { fn, arg, 0 };

	if (vd_in_co())
		return fn(arg);
	vd_co_run_sync(run_co_entry, &c);
	return c.ret;
}

int qcow2_file_pread(struct qcow2_state *s, uint64_t off, void *buf, size_t len)
{
	int ret = vd_bnode_co_pread(s->bs->file, off, buf, len);

	return ret < 0 ? ret : 0;
}

int qcow2_file_pwrite(struct qcow2_state *s, uint64_t off, const void *buf, size_t len)
{
	int ret = vd_bnode_co_pwrite(s->bs->file, off, buf, len, 0);

	if (ret < 0)
		return ret;
	if (off + len > s->host_end)
		s->host_end = off + len;
	return 0;
}

int qcow2_file_flush(struct qcow2_state *s)
{
	return vd_bnode_co_flush(s->bs->file);
}

/* ---------------------------------------------------------------------------
 * Header updates, dirty and corrupt bits
 * ------------------------------------------------------------------------- */

static void state_to_header(struct qcow2_state *s, struct qcow2_header *h)
{
	*h = s->hdr;
	h->version = s->version;
	h->cluster_bits = s->cluster_bits;
	h->size = s->bs->size;
	h->crypt_method = 0;
	h->l1_size = s->l1_size;
	h->l1_table_offset = s->l1_table_offset;
	h->refcount_table_offset = s->refcount_table_offset;
	h->refcount_table_clusters = s->refcount_table_clusters;
	h->nb_snapshots = s->nb_snapshots;
	h->snapshots_offset = s->snapshots_offset;
	h->incompatible_features = s->incompatible_features;
	h->compatible_features = s->compatible_features;
	h->autoclear_features = s->autoclear_features;
	h->refcount_order = s->refcount_order;
	h->compression_type = s->compression_type;
}

int qcow2_write_header(struct qcow2_state *s)
{
	struct qcow2_header h;
	uint8_t *buf;
	int ret;

	state_to_header(s, &h);
	buf = vd_blk_alloc(s->cluster_size);
	if (!buf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	ret = qcow2_build_header(&h, &s->ext, s->bs->backing_file[0] ? s->bs->backing_file : NULL,
				 s->bs->backing_format[0] ? s->bs->backing_format : NULL, buf, s->cluster_size);
	if (ret == 0)
		ret = qcow2_file_pwrite(s, 0, buf, s->cluster_size);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret == 0) {
		s->hdr = h;
		s->header_length = ld_be32(buf + 100);
		if (h.version == 2)
			s->header_length = QCOW2_V2_HEADER_LEN;
	}
	vd_blk_free(buf);
	return ret;
}

int qcow2_write_incompat(struct qcow2_state *s)
{
	uint8_t b[8];
	int ret;

	if (s->version < 3)
		return 0;
	st_be64(b, s->incompatible_features);
	ret = qcow2_file_pwrite(s, QCOW2_HDR_INCOMPAT_OFF, b, 8);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	return ret;
}

int qcow2_mark_dirty(struct qcow2_state *s)
{
	int ret;

	if (s->dirty_marked || !s->lazy_refcounts)
		return 0;
	/* Everything before must be on disk before refcounts may lag behind. */
	ret = qcow2_file_flush(s);
	if (ret < 0)
		return ret;
	s->incompatible_features |= QCOW2_INCOMPAT_DIRTY;
	ret = qcow2_write_incompat(s);
	if (ret < 0) {
		s->incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
		return ret;
	}
	s->dirty_marked = true;
	/* L2 tables no longer wait for refcount blocks. */
	return 0;
}

int qcow2_mark_clean(struct qcow2_state *s)
{
	int ret;

	if (!(s->incompatible_features & QCOW2_INCOMPAT_DIRTY))
		return 0;
	if (s->needs_repair)
		return vd_error(EINVAL, "qcow2: the image is dirty and its refcounts were not repaired (run check -r all)");
	ret = qcow2_flush_metadata(s);
	if (ret < 0)
		return ret;
	s->incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
	ret = qcow2_write_incompat(s);
	if (ret < 0)
		return ret;
	s->dirty_marked = false;
	return 0;
}

int qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...)
{
	char msg[384];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (!s->bs->corrupt) {
		fprintf(stderr, "qcow2: marking image as corrupt: %s; further corruption events will be suppressed\n",
			msg);
		s->bs->corrupt = true;
		if (s->writable && s->version >= 3) {
			s->incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
			(void)qcow2_write_incompat(s);
		}
		s->writable = false;
	}
	return vd_error(EIO, "qcow2: image is corrupt: %s", msg);
}

/* ---------------------------------------------------------------------------
 * Metadata overlap check
 * ------------------------------------------------------------------------- */

#define OVERLAP_FULL_SCAN_LIMIT 65536

int qcow2_overlap_check(struct qcow2_state *s, int ignore, uint64_t off, uint64_t len)
{
	const char *what = NULL;

	if (!len)
		return 0;
	if (!(ignore & QCOW2_OL_HEADER) && ranges_overlap(off, len, 0, s->cluster_size))
		what = "the header";
	else if (!(ignore & QCOW2_OL_L1) && ranges_overlap(off, len, s->l1_table_offset, (uint64_t)s->l1_size * 8))
		what = "the active L1 table";
	else if (!(ignore & QCOW2_OL_REFTABLE) &&
		 ranges_overlap(off, len, s->refcount_table_offset,
				(uint64_t)s->refcount_table_clusters << s->cluster_bits))
		what = "the refcount table";
	else if (!(ignore & QCOW2_OL_SNAPSHOTS) && ranges_overlap(off, len, s->snapshots_offset, s->snapshots_size))
		what = "the snapshot table";
	if (!what && !(ignore & QCOW2_OL_SNAPSHOT_L1)) {
		for (uint32_t i = 0; i < s->nb_snapshots; i++)
			if (ranges_overlap(off, len, s->snapshots[i].l1_table_offset,
					   (uint64_t)s->snapshots[i].l1_size * 8)) {
				what = "a snapshot L1 table";
				break;
			}
	}
	if (!what && !(ignore & QCOW2_OL_L2)) {
		if (qcow2_cache_contains(&s->l2_cache, off, len)) {
			what = "an L2 table";
		} else if (s->l1_size <= OVERLAP_FULL_SCAN_LIMIT) {
			for (uint32_t i = 0; i < s->l1_size; i++) {
				uint64_t l2 = s->l1_table[i] & L1E_OFFSET_MASK;
				if (l2 && ranges_overlap(off, len, l2, s->cluster_size)) {
					what = "an active L2 table";
					break;
				}
			}
		}
	}
	if (!what && !(ignore & QCOW2_OL_REFBLOCK)) {
		if (qcow2_cache_contains(&s->rc_cache, off, len)) {
			what = "a refcount block";
		} else if (s->reftable_used <= OVERLAP_FULL_SCAN_LIMIT) {
			/* Only up to the last refcount block (the table is mostly empty). */
			for (uint64_t i = 0; i < s->reftable_used; i++) {
				uint64_t rb = s->refcount_table[i] & REFT_OFFSET_MASK;
				if (rb && ranges_overlap(off, len, rb, s->cluster_size)) {
					what = "a refcount block";
					break;
				}
			}
		}
	}
	if (what)
		return qcow2_signal_corruption(s, "preventing invalid write at %#" PRIx64 " (+%" PRIu64
					       "): it overlaps %s", off, len, what);
	return 0;
}

/* ---------------------------------------------------------------------------
 * Flush
 * ------------------------------------------------------------------------- */

int qcow2_flush_metadata(struct qcow2_state *s)
{
	int ret;

	if (s->bs->corrupt)
		return -EIO;
	ret = qcow2_cache_flush(s, &s->l2_cache);
	if (ret == 0)
		ret = qcow2_cache_flush(s, &s->rc_cache);
	if (ret == 0 && s->discards) {
		ret = qcow2_file_flush(s);
		if (ret == 0)
			ret = qcow2_process_discards(s);
	}
	return ret;
}

static int qcow2_co_flush(struct vd_bnode *bs)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	if (!s->writable)
		return 0;
	vd_co_mutex_lock(&s->lock);
	ret = qcow2_flush_metadata(s);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

/* ---------------------------------------------------------------------------
 * Open
 * ------------------------------------------------------------------------- */

static int qcow2_probe(const uint8_t *buf, size_t len)
{
	if (len >= 8 && ld_be32(buf) == QCOW2_MAGIC && ld_be32(buf + 4) >= 2)
		return 100;
	return 0;
}

static void describe_features(struct qcow2_state *s, uint64_t mask, char *out, size_t outlen)
{
	size_t used = 0;

	out[0] = '\0';
	for (int bit = 0; bit < 64; bit++) {
		const char *name = NULL;
		char tmp[64];

		if (!(mask & (1ULL << bit)))
			continue;
		for (int i = 0; i < s->ext.nb_features; i++)
			if (s->ext.features[i].type == 0 && s->ext.features[i].bit == bit)
				name = s->ext.features[i].name;
		if (!name) {
			snprintf(tmp, sizeof(tmp), "unknown feature bit %d", bit);
			name = tmp;
		}
		used += snprintf(out + used, used < outlen ? outlen - used : 0, "%s%s", used ? ", " : "", name);
		if (used >= outlen)
			break;
	}
}

static int load_l1(struct qcow2_state *s)
{
	uint64_t bytes;
	int ret;

	s->l1_alloc = (uint32_t)(((uint64_t)s->l1_size * 8 + s->cluster_size - 1) / s->cluster_size *
				 (s->cluster_size / 8));
	if (s->l1_alloc == 0)
		s->l1_alloc = s->cluster_size / 8;
	s->l1_table = calloc(s->l1_alloc, 8);
	if (!s->l1_table)
		return vd_error(ENOMEM, "qcow2: out of memory for the L1 table");
	bytes = (uint64_t)s->l1_size * 8;
	if (!bytes)
		return 0;
	ret = qcow2_file_pread(s, s->l1_table_offset, s->l1_table, bytes);
	if (ret < 0)
		return vd_error(-ret, "qcow2: could not read the L1 table");
	for (uint32_t i = 0; i < s->l1_size; i++)
		s->l1_table[i] = be64toh(s->l1_table[i]);
	return 0;
}

struct open_args {
	struct vd_bnode *bs;
	json_t *opts;
	int flags;
};

static int do_open(void *p)
{
	struct open_args *a = p;
	struct vd_bnode *bs = a->bs;
	struct qcow2_state *s = bs->opaque;
	uint64_t file_size, l2_cache_bytes, rc_cache_bytes, want;
	uint8_t *hbuf = NULL;
	size_t hlen;
	char feat[256];
	bool b;
	int ret;

	if (!bs->file)
		return vd_error(EINVAL, "qcow2: no file child");
	file_size = bs->file->size;
	s->host_end = file_size;
	s->sparse_data = -1;
	s->size_at_open = file_size;
	/* A cluster starting at or past the end of the file at open never held data (the file grows by truncate: holes). */
	s->fresh_start = file_size;
	hlen = file_size < 4096 ? (size_t)file_size : 4096;
	if (hlen < QCOW2_V2_HEADER_LEN)
		return vd_error(EINVAL, "qcow2: file too small for a header (%zu bytes)", hlen);
	hbuf = vd_blk_alloc(1u << QCOW2_MAX_CLUSTER_BITS);
	if (!hbuf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	memset(hbuf, 0, 1u << QCOW2_MAX_CLUSTER_BITS);
	ret = qcow2_file_pread(s, 0, hbuf, hlen);
	if (ret < 0) {
		vd_error(-ret, "qcow2: could not read the header");
		goto out;
	}
	ret = qcow2_parse_header(hbuf, hlen, &s->hdr);
	if (ret < 0)
		goto out;
	ret = qcow2_validate_header(&s->hdr, file_size);
	if (ret < 0)
		goto out;
	/* Whole first cluster for the extensions and the backing file name. */
	if ((1ULL << s->hdr.cluster_bits) > hlen) {
		size_t more = (size_t)(1ULL << s->hdr.cluster_bits);
		if (more > file_size)
			more = (size_t)file_size;
		if (more > hlen) {
			ret = qcow2_file_pread(s, hlen, hbuf + hlen, more - hlen);
			if (ret < 0) {
				vd_error(-ret, "qcow2: could not read the header cluster");
				goto out;
			}
			hlen = more;
		}
	}
	ret = qcow2_parse_extensions(hbuf, hlen, &s->hdr, &s->ext);
	if (ret < 0)
		goto out;

	s->version = s->hdr.version;
	s->cluster_bits = s->hdr.cluster_bits;
	s->cluster_size = 1u << s->cluster_bits;
	s->l1_size = s->hdr.l1_size;
	s->l1_table_offset = s->hdr.l1_table_offset;
	s->refcount_table_offset = s->hdr.refcount_table_offset;
	s->refcount_table_clusters = s->hdr.refcount_table_clusters;
	s->nb_snapshots = s->hdr.nb_snapshots;
	s->snapshots_offset = s->hdr.snapshots_offset;
	s->incompatible_features = s->hdr.incompatible_features;
	s->compatible_features = s->hdr.compatible_features;
	s->autoclear_features = s->hdr.autoclear_features;
	s->refcount_order = s->hdr.refcount_order;
	s->header_length = s->hdr.header_length;
	s->compression_type = s->hdr.compression_type;

	if (s->incompatible_features & ~QCOW2_INCOMPAT_KNOWN) {
		describe_features(s, s->incompatible_features & ~QCOW2_INCOMPAT_KNOWN, feat, sizeof(feat));
		ret = vd_error(ENOTSUP, "qcow2: unsupported incompatible features: %s", feat);
		goto out;
	}
	/* A data-file name without the incompatible bit means nothing (QEMU ignores it too). */
	if (s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		ret = vd_error(ENOTSUP, "qcow2: images with an external data file are not supported");
		goto out;
	}

	s->extl2 = s->incompatible_features & QCOW2_INCOMPAT_EXTL2;
	s->l2_entry_size = s->extl2 ? 16 : 8;
	s->l2_bits = s->cluster_bits - (s->extl2 ? 4 : 3);
	s->l2_size = 1u << s->l2_bits;
	s->sc_per_cluster = s->extl2 ? 32 : 1;
	s->sc_bits = s->cluster_bits - (s->extl2 ? 5 : 0);
	s->csize_shift = 62 - (s->cluster_bits - 8);
	s->csize_mask = (1ULL << (s->cluster_bits - 8)) - 1;
	s->cluster_offset_mask = (1ULL << s->csize_shift) - 1;
	s->refcount_bits = 1u << s->refcount_order;
	s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX : (1ULL << s->refcount_bits) - 1;
	s->refblock_bits = s->cluster_bits + 3 - s->refcount_order;
	s->max_l1_entries = QCOW2_MAX_L1_BYTES / 8;
	s->lazy_refcounts = s->version >= 3 && (s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS);
	s->free_cluster_index = 0;

	/* Corrupt images are served read-only (or opened for repair by check). */
	if (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		if ((a->flags & VD_BO_RDWR) && !(a->flags & VD_BO_CHECK)) {
			ret = vd_error(EACCES, "qcow2: image is corrupt (corrupt bit set); it cannot be opened "
					       "read/write (repair it with check -r all)");
			goto out;
		}
		if (!(a->flags & VD_BO_CHECK))
			bs->corrupt = true;
	}

	/* Backing file name. */
	bs->backing_file[0] = '\0';
	bs->backing_format[0] = '\0';
	if (s->hdr.backing_file_offset && s->hdr.backing_file_size) {
		uint32_t n = s->hdr.backing_file_size;
		if (s->hdr.backing_file_offset + n > hlen) {
			ret = vd_error(EINVAL, "qcow2: backing file name is past the end of the file");
			goto out;
		}
		memcpy(bs->backing_file, hbuf + s->hdr.backing_file_offset, n);
		bs->backing_file[n] = '\0';
		if (strlen(bs->backing_file) != n) {
			ret = vd_error(EINVAL, "qcow2: backing file name contains a NUL byte");
			goto out;
		}
		if (s->ext.has_backing_format)
			snprintf(bs->backing_format, sizeof(bs->backing_format), "%s", s->ext.backing_format);
	}

	ret = load_l1(s);
	if (ret < 0)
		goto out;
	ret = qcow2_refcount_init(s);
	if (ret < 0)
		goto out;
	ret = qcow2_read_snapshots(s);
	if (ret < 0)
		goto out;

	/* Caches. */
	want = qcow2_size_to_l1(s->cluster_bits, s->l2_bits, s->hdr.size) * s->cluster_size;
	if (want > (32u << 20))
		want = 32u << 20;
	if (want < 2ULL * s->cluster_size)
		want = 2ULL * s->cluster_size;
	/* QEMU's options: l2-cache-size, refcount-cache-size, or cache-size for both (3:1). */
	if (json_object_get(a->opts, "cache-size") && !json_object_get(a->opts, "l2-cache-size")) {
		uint64_t total;
		ret = vd_opt_u64(a->opts, "cache-size", 0, &total);
		if (ret < 0)
			goto out;
		want = total / 4 * 3;
	}
	ret = vd_opt_u64(a->opts, "l2-cache-size", want, &l2_cache_bytes);
	if (ret == 0)
		ret = vd_opt_u64(a->opts, "refcount-cache-size", l2_cache_bytes / 3, &rc_cache_bytes);
	if (ret < 0) {
		vd_error(EINVAL, "qcow2: invalid cache size option");
		goto out;
	}
	{
		uint64_t n2 = l2_cache_bytes / s->cluster_size, nr = rc_cache_bytes / s->cluster_size;
		if (n2 < 2)
			n2 = 2;
		if (nr < 4)
			nr = 4;
		if (n2 > 65536)
			n2 = 65536;
		if (nr > 65536)
			nr = 65536;
		ret = qcow2_cache_init(&s->l2_cache, "L2", (int)n2, s->cluster_size);
		if (ret == 0)
			ret = qcow2_cache_init(&s->rc_cache, "refcount", (int)nr, s->cluster_size);
		if (ret < 0)
			goto out;
	}
	vd_co_mutex_init(&s->lock);
	vd_co_queue_init(&s->inflight_wq);

	ret = vd_opt_bool(a->opts, "pass-discard-request", true, &b);
	if (ret < 0)
		goto out;
	s->discard_passthrough = b;
	ret = vd_opt_bool(a->opts, "compress-writes", false, &b);
	if (ret < 0)
		goto out;
	s->compress_writes = b;
	ret = vd_opt_bool(a->opts, "lazy-refcounts", s->lazy_refcounts, &b);
	if (ret < 0)
		goto out;
	if (b && s->version < 3) {
		ret = vd_error(EINVAL, "qcow2: lazy-refcounts needs a version 3 (compat=1.1) image");
		goto out;
	}
	s->lazy_refcounts = b;

	bs->size = s->hdr.size;
	bs->request_alignment = 1;
	s->writable = (a->flags & VD_BO_RDWR) && !bs->corrupt;
	if (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
		s->dirty_marked = true;
		s->needs_repair = true; /* until the repair below (or a check -r) has run */
	}

	if (s->writable) {
		/* Clear auto-clear bits we do not maintain (bitmaps become inconsistent, as the spec wants). */
		if (s->autoclear_features) {
			s->autoclear_features = 0;
			ret = qcow2_write_header(s);
			if (ret < 0)
				goto out;
		}
		if ((s->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !(a->flags & VD_BO_CHECK)) {
			struct vd_check_result r;
			memset(&r, 0, sizeof(r));
			vd_co_mutex_lock(&s->lock);
			ret = qcow2_check_locked(s, &r, VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS);
			if (ret == 0 && (r.check_errors || r.corruptions))
				ret = -EIO;
			if (ret == 0)
				ret = qcow2_mark_clean(s);
			vd_co_mutex_unlock(&s->lock);
			if (ret < 0) {
				vd_error(-ret, "qcow2: could not repair the refcounts of a dirty image");
				goto out;
			}
		}
	}
	ret = 0;
out:
	vd_blk_free(hbuf);
	return ret;
}

static void free_state(struct qcow2_state *s)
{
	free(s->l1_table);
	s->l1_table = NULL;
	free(s->refcount_table);
	s->refcount_table = NULL;
	vd_blk_free(s->compress_buf);
	s->compress_buf = NULL;
	qcow2_snapshots_free(s->snapshots, s->nb_snapshots);
	s->snapshots = NULL;
	qcow2_cache_destroy(&s->l2_cache);
	qcow2_cache_destroy(&s->rc_cache);
	qcow2_free_discards(s);
	qcow2_ext_info_free(&s->ext);
	free(s->check_refs);
	s->check_refs = NULL;
}

static int qcow2_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct qcow2_state *s = bs->opaque;
	struct open_args a = { bs, opts, flags };
	int ret;

	memset(s, 0, sizeof(*s));
	s->bs = bs;
	ret = qcow2_run_co(do_open, &a);
	if (ret < 0) {
		free_state(s);
		return ret;
	}
	/* The framework opens the backing chain from bs->backing_file / backing_format. */
	return 0;
}

static int do_close(void *p)
{
	struct qcow2_state *s = p;
	int ret = 0;

	if (!s->writable)
		return 0;
	vd_co_mutex_lock(&s->lock);
	ret = qcow2_flush_metadata(s);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret == 0 && (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !s->needs_repair)
		ret = qcow2_mark_clean(s);
	if (ret == 0 && s->file_grown) {
		/* Give back what we grew the file by in advance. */
		uint64_t end = s->alloc_end > s->size_at_open ? s->alloc_end : s->size_at_open;
		if (end < s->host_end)
			end = s->host_end;
		if (end < s->bs->file->size)
			ret = vd_bnode_co_truncate(s->bs->file, end, true, "off");
	}
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

static void qcow2_close(struct vd_bnode *bs)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	if (!s->bs)
		return;
	ret = qcow2_run_co(do_close, s);
	if (ret < 0)
		fprintf(stderr, "qcow2: error while closing %s: %s\n", bs->filename ? bs->filename : "image",
			strerror(-ret));
	free_state(s);
	s->bs = NULL;
}

/* ---------------------------------------------------------------------------
 * Info, amend, backing change
 * ------------------------------------------------------------------------- */

static int qcow2_get_info(struct vd_bnode *bs, json_t *info)
{
	struct qcow2_state *s = bs->opaque;
	json_t *data = json_object(), *fs = json_object();

	if (!data || !fs) {
		json_decref(data);
		json_decref(fs);
		return -ENOMEM;
	}
	/* The same keys as qemu-img info: version 2 images have no feature bits to show. */
	json_object_set_new(data, "compat", json_string(s->version >= 3 ? "1.1" : "0.10"));
	json_object_set_new(data, "compression-type",
			    json_string(s->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib"));
	if (s->version >= 3)
		json_object_set_new(data, "lazy-refcounts",
				    json_boolean(s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS));
	json_object_set_new(data, "refcount-bits", json_integer(s->refcount_bits));
	if (s->version >= 3) {
		json_object_set_new(data, "corrupt", json_boolean(bs->corrupt ||
								  (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT)));
		json_object_set_new(data, "extended-l2", json_boolean(s->extl2));
	}
	json_object_set_new(fs, "type", json_string("qcow2"));
	json_object_set_new(fs, "data", data);
	json_object_set_new(info, "format-specific", fs);
	json_object_set_new(info, "dirty-flag", json_boolean(s->incompatible_features & QCOW2_INCOMPAT_DIRTY));
	json_object_set_new(info, "cluster-size", json_integer(s->cluster_size));
	return 0;
}

static uint32_t qcow2_cluster_size(struct vd_bnode *bs)
{
	struct qcow2_state *s = bs->opaque;

	return s->cluster_size;
}

static int64_t qcow2_get_allocated_size(struct vd_bnode *bs)
{
	return bs->file ? vd_bnode_allocated_size(bs->file) : -ENOTSUP;
}

static int set_backing(struct qcow2_state *s, const char *file, const char *fmt)
{
	struct vd_bnode *bs = s->bs;
	char old_file[sizeof(bs->backing_file)], old_fmt[sizeof(bs->backing_format)];
	int ret;

	if (file && strlen(file) >= sizeof(bs->backing_file))
		return vd_error(EINVAL, "qcow2: backing file name too long");
	if (fmt && strlen(fmt) >= sizeof(bs->backing_format))
		return vd_error(EINVAL, "qcow2: backing format name too long");
	memcpy(old_file, bs->backing_file, sizeof(old_file));
	memcpy(old_fmt, bs->backing_format, sizeof(old_fmt));
	snprintf(bs->backing_file, sizeof(bs->backing_file), "%s", file ? file : "");
	snprintf(bs->backing_format, sizeof(bs->backing_format), "%s", (file && *file && fmt) ? fmt : "");
	ret = qcow2_write_header(s);
	if (ret < 0) {
		memcpy(bs->backing_file, old_file, sizeof(old_file));
		memcpy(bs->backing_format, old_fmt, sizeof(old_fmt));
	}
	return ret;
}

static int qcow2_co_change_backing(struct vd_bnode *bs, const char *backing_file, const char *backing_fmt)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is read-only");
	vd_co_mutex_lock(&s->lock);
	ret = set_backing(s, backing_file, backing_fmt);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

/* Rewrite zero clusters of the active L1 so a version 2 reader sees the same data. */
static int expand_zero_clusters(struct qcow2_state *s)
{
	uint8_t *zeros = NULL;
	int ret = 0;

	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		/* Zero clusters in snapshots would need their L2 tables rewritten too. */
		uint64_t *l1 = NULL;
		uint32_t n = s->snapshots[i].l1_size;
		if (!n)
			continue;
		l1 = malloc((size_t)n * 8);
		if (!l1)
			return vd_error(ENOMEM, "qcow2: out of memory");
		ret = qcow2_file_pread(s, s->snapshots[i].l1_table_offset, l1, (size_t)n * 8);
		for (uint32_t j = 0; ret == 0 && j < n; j++) {
			uint64_t l2off = be64toh(l1[j]) & L1E_OFFSET_MASK;
			uint8_t *l2;
			if (!l2off)
				continue;
			ret = qcow2_cache_get(s, &s->l2_cache, l2off, &l2, true, true);
			if (ret < 0)
				break;
			for (uint32_t k = 0; k < s->l2_size; k++)
				if ((qcow2_l2_entry(s, l2, k) & (QCOW2_OFLAG_ZERO | QCOW2_OFLAG_COMPRESSED)) ==
				    QCOW2_OFLAG_ZERO)
					ret = -ENOTSUP;
			qcow2_cache_put(&s->l2_cache, l2);
		}
		free(l1);
		if (ret == -ENOTSUP)
			return vd_error(ENOTSUP, "qcow2: snapshot '%s' has zero clusters; cannot downgrade to compat=0.10",
					s->snapshots[i].name);
		if (ret < 0)
			return ret;
	}
	for (uint64_t gc = 0; gc < qcow2_size_to_clusters(s, s->bs->size); gc++) {
		uint64_t off = gc << s->cluster_bits, entry;
		uint8_t *l2;
		uint32_t idx = qcow2_l2_index(s, off);

		if (!(s->l1_table[qcow2_l1_index(s, off)] & L1E_OFFSET_MASK)) {
			gc = ((qcow2_l1_index(s, off) + 1) << s->l2_bits) - 1;
			continue;
		}
		ret = qcow2_get_l2_read(s, off, &l2, true);
		if (ret < 0)
			break;
		entry = l2 ? qcow2_l2_entry(s, l2, idx) : 0;
		if (l2)
			qcow2_cache_put(&s->l2_cache, l2);
		if ((entry & (QCOW2_OFLAG_ZERO | QCOW2_OFLAG_COMPRESSED)) != QCOW2_OFLAG_ZERO)
			continue;
		if (!zeros) {
			zeros = vd_blk_alloc(s->cluster_size);
			if (!zeros) {
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				break;
			}
			memset(zeros, 0, s->cluster_size);
		}
		uint64_t host = entry & L2E_OFFSET_MASK;
		bool keep = host && (entry & QCOW2_OFLAG_COPIED);
		if (!host && !s->bs->backing_file[0]) {
			/* Unallocated reads as zero without a backing file. */
			ret = qcow2_get_l2_write(s, off, &l2);
			if (ret < 0)
				break;
			qcow2_l2_set(s, l2, idx, 0, 0);
			qcow2_cache_mark_dirty(&s->l2_cache, l2);
			qcow2_cache_put(&s->l2_cache, l2);
			continue;
		}
		if (!keep) {
			int64_t nh = qcow2_alloc_clusters(s, 1);
			if (nh < 0) {
				ret = (int)nh;
				break;
			}
			host = (uint64_t)nh;
		}
		ret = qcow2_overlap_check(s, 0, host, s->cluster_size);
		if (ret == 0)
			ret = qcow2_file_pwrite(s, host, zeros, s->cluster_size);
		if (ret == 0)
			ret = qcow2_l2_after_alloc(s);
		if (ret == 0)
			ret = qcow2_get_l2_write(s, off, &l2);
		if (ret < 0)
			break;
		qcow2_l2_set(s, l2, idx, host | QCOW2_OFLAG_COPIED, 0);
		qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		if (!keep && (entry & L2E_OFFSET_MASK)) {
			ret = qcow2_rc_after_unref(s);
			if (ret == 0)
				ret = qcow2_free_entry_cluster(s, entry);
			if (ret < 0)
				break;
		}
	}
	vd_blk_free(zeros);
	if (ret == 0)
		ret = qcow2_flush_metadata(s);
	return ret;
}

static int amend_compat(struct qcow2_state *s, const char *compat)
{
	int want;
	int ret;

	if (!strcmp(compat, "1.1") || !strcmp(compat, "v3"))
		want = 3;
	else if (!strcmp(compat, "0.10") || !strcmp(compat, "v2"))
		want = 2;
	else
		return vd_error(EINVAL, "qcow2: invalid compat '%s' (0.10 or 1.1)", compat);
	if (want == (int)s->version)
		return 0;
	if (want == 3) {
		s->version = 3;
		s->refcount_order = 4;
		ret = qcow2_write_header(s);
		if (ret < 0)
			s->version = 2;
		return ret;
	}
	/* Downgrade. */
	if (s->extl2)
		return vd_error(ENOTSUP, "qcow2: compat=0.10 does not support extended L2 entries");
	if (s->compression_type != QCOW2_COMPRESSION_ZLIB)
		return vd_error(ENOTSUP, "qcow2: compat=0.10 only supports zlib compression");
	if (s->refcount_order != 4)
		return vd_error(ENOTSUP, "qcow2: compat=0.10 needs refcount_bits=16");
	if (s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
		return vd_error(ENOTSUP, "qcow2: disable lazy_refcounts before downgrading to compat=0.10");
	ret = qcow2_mark_clean(s);
	if (ret == 0)
		ret = expand_zero_clusters(s);
	if (ret < 0)
		return ret;
	s->version = 2;
	free(s->ext.hdr_extra);
	s->ext.hdr_extra = NULL;
	s->ext.hdr_extra_len = 0;
	s->incompatible_features = 0;
	s->compatible_features = 0;
	s->autoclear_features = 0;
	/* Unknown extensions may describe v3-only data. */
	ret = qcow2_write_header(s);
	if (ret < 0)
		s->version = 3;
	return ret;
}

static int amend_lazy(struct qcow2_state *s, bool lazy)
{
	int ret = 0;

	if (lazy && s->version < 3)
		return vd_error(EINVAL, "qcow2: lazy_refcounts=on needs compat=1.1");
	if (lazy == !!(s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS))
		return 0;
	if (!lazy)
		ret = qcow2_mark_clean(s);
	if (ret < 0)
		return ret;
	if (lazy)
		s->compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
	else
		s->compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS;
	s->lazy_refcounts = lazy;
	return qcow2_write_header(s);
}

static int qcow2_co_amend(struct vd_bnode *bs, json_t *opts)
{
	struct qcow2_state *s = bs->opaque;
	const char *key;
	bool lazy = false;
	json_t *val;
	int ret = 0;

	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is not writable");
	/* Reject unsupported keys before changing anything. */
	json_object_foreach(opts, key, val) {
		if (!strcmp(key, "compat") || !strcmp(key, "lazy_refcounts") || !strcmp(key, "backing_file") ||
		    !strcmp(key, "backing_fmt") || !strcmp(key, "size"))
			continue;
		if (!strcmp(key, "cluster_size")) {
			uint64_t v;
			if (vd_opt_u64(opts, key, 0, &v) == 0 && v == s->cluster_size)
				continue;
			return vd_error(ENOTSUP, "qcow2: changing cluster_size is not supported");
		}
		if (!strcmp(key, "refcount_bits")) {
			uint64_t v;
			if (vd_opt_u64(opts, key, 0, &v) == 0 && v == s->refcount_bits)
				continue;
			return vd_error(ENOTSUP, "qcow2: changing refcount_bits is not supported");
		}
		if (!strcmp(key, "compression_type") || !strcmp(key, "extended_l2") || !strcmp(key, "preallocation") ||
		    !strcmp(key, "encryption") || !strcmp(key, "data_file") || !strcmp(key, "data_file_raw"))
			return vd_error(ENOTSUP, "qcow2: amending '%s' is not supported", key);
		return vd_error(EINVAL, "qcow2: unknown option '%s'", key);
	}
	vd_co_mutex_lock(&s->lock);
	/* lazy_refcounts=off before a downgrade, =on after an upgrade. */
	if (json_object_get(opts, "lazy_refcounts")) {
		ret = vd_opt_bool(opts, "lazy_refcounts", false, &lazy);
		if (ret == 0 && !lazy)
			ret = amend_lazy(s, false);
	}
	if (ret == 0 && json_object_get(opts, "compat"))
		ret = amend_compat(s, vd_opt_str(opts, "compat", ""));
	if (ret == 0 && json_object_get(opts, "lazy_refcounts") && lazy)
		ret = amend_lazy(s, true);
	if (ret == 0 && (json_object_get(opts, "backing_file") || json_object_get(opts, "backing_fmt"))) {
		const char *bf = vd_opt_str(opts, "backing_file", bs->backing_file);
		const char *bfmt = vd_opt_str(opts, "backing_fmt", bs->backing_format);
		char f[1024], fm[32];
		snprintf(f, sizeof(f), "%s", bf);
		snprintf(fm, sizeof(fm), "%s", bfmt);
		ret = set_backing(s, f, fm);
	}
	vd_co_mutex_unlock(&s->lock);
	if (ret == 0 && json_object_get(opts, "size")) {
		uint64_t size;
		ret = vd_opt_u64(opts, "size", 0, &size);
		if (ret == 0 && size != bs->size)
			ret = qcow2_co_truncate(bs, size, true, "off");
		if (ret == 0)
			bs->size = size;
	}
	return ret;
}

/* Sync wrappers for the non-coroutine snapshot ops. */
struct snap_args {
	struct vd_bnode *bs;
	const char *name;
	struct vd_snapshot_info **list;
	int *count;
	int op;
};

static int snap_entry(void *p)
{
	struct snap_args *a = p;

	switch (a->op) {
	case 0:
		return qcow2_snapshot_create(a->bs, a->name);
	case 1:
		return qcow2_snapshot_list(a->bs, a->list, a->count);
	case 2:
		return qcow2_snapshot_goto(a->bs, a->name);
	default:
		return qcow2_snapshot_delete(a->bs, a->name);
	}
}

static int snap_create(struct vd_bnode *bs, const char *name)
{
	struct snap_args a = { bs, name, NULL, NULL, 0 };
	return qcow2_run_co(snap_entry, &a);
}
static int snap_list(struct vd_bnode *bs, struct vd_snapshot_info **list, int *count)
{
	struct snap_args a = { bs, NULL, list, count, 1 };
	return qcow2_run_co(snap_entry, &a);
}
static int snap_goto(struct vd_bnode *bs, const char *name)
{
	struct snap_args a = { bs, name, NULL, NULL, 2 };
	return qcow2_run_co(snap_entry, &a);
}
static int snap_delete(struct vd_bnode *bs, const char *name)
{
	struct snap_args a = { bs, name, NULL, NULL, 3 };
	return qcow2_run_co(snap_entry, &a);
}

static const char *const qcow2_options[] = {
	"cache-size", "l2-cache-size", "refcount-cache-size", "pass-discard-request", "compress-writes",
	"lazy-refcounts", NULL,
};

const struct vd_format vd_format_qcow2 = {
	.name = "qcow2",
	.state_size = sizeof(struct qcow2_state),
	.options = qcow2_options,
	.supports_backing = true,
	.supports_fua = true,
	.probe = qcow2_probe,
	.open = qcow2_open,
	.close = qcow2_close,
	.co_preadv = qcow2_co_preadv,
	.co_pwritev = qcow2_co_pwritev,
	.co_pwritev_ordered = qcow2_co_pwritev_ordered,
	.co_pwrite_zeroes = qcow2_co_pwrite_zeroes,
	.co_pdiscard = qcow2_co_pdiscard,
	.co_flush = qcow2_co_flush,
	.co_block_status = qcow2_co_block_status,
	.co_truncate = qcow2_co_truncate,
	.get_allocated_size = qcow2_get_allocated_size,
	.create = qcow2_create,
	.get_info = qcow2_get_info,
	.co_check = qcow2_co_check,
	.co_amend = qcow2_co_amend,
	.co_change_backing = qcow2_co_change_backing,
	.co_make_empty = qcow2_co_make_empty,
	.cluster_size = qcow2_cluster_size,
	.snapshot_create = snap_create,
	.snapshot_list = snap_list,
	.snapshot_goto = snap_goto,
	.snapshot_delete = snap_delete,
};
