/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Image creation (header, refcount table and blocks, L1 table), resize
 * (grow with optional preallocation, shrink by discarding the tail) and
 * preallocation of guest ranges.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* ---------------------------------------------------------------------------
 * Create
 * ------------------------------------------------------------------------- */

struct create_params {
	const char *filename;
	uint64_t size;
	uint32_t cluster_bits;
	uint32_t refcount_order;
	uint32_t version;
	bool lazy;
	bool extl2;
	uint8_t compression_type;
	const char *backing_file;
	const char *backing_fmt;
	const char *prealloc;
};

static int log2_exact(uint64_t v, uint32_t *out)
{
	if (!v || (v & (v - 1)))
		return -1;
	*out = (uint32_t)__builtin_ctzll(v);
	return 0;
}

static bool is_prealloc_mode(const char *m)
{
	return !strcmp(m, "off") || !strcmp(m, "metadata") || !strcmp(m, "falloc") || !strcmp(m, "full");
}

static int parse_create_opts(const struct vd_create_opts *o, struct create_params *p)
{
	json_t *opts = o->opts;
	const char *compat, *ct, *key;
	uint64_t cluster_size, refcount_bits;
	json_t *val;
	bool b;
	int ret;

	memset(p, 0, sizeof(*p));
	p->filename = o->filename;
	p->size = o->size;
	if (opts) {
		json_object_foreach(opts, key, val) {
			static const char *const known[] = { "cluster_size", "refcount_bits", "compat", "backing_file",
							     "backing_fmt", "compression_type", "lazy_refcounts",
							     "extended_l2", "preallocation", "size", NULL };
			bool ok = false;
			for (int i = 0; known[i]; i++)
				ok |= !strcmp(key, known[i]);
			if (!strcmp(key, "encryption") || !strcmp(key, "encrypt.format") || !strcmp(key, "encrypt")) {
				if (!strcmp(vd_opt_str(opts, key, "off"), "off"))
					continue;
				return vd_error(ENOTSUP, "qcow2: encryption is not supported");
			}
			if (!strcmp(key, "data_file") || !strcmp(key, "data_file_raw"))
				return vd_error(ENOTSUP, "qcow2: external data files (data_file) are not supported");
			if (!ok)
				return vd_error(EINVAL, "qcow2: unknown create option '%s'", key);
		}
	}
	compat = vd_opt_str(opts, "compat", "1.1");
	if (!strcmp(compat, "1.1") || !strcmp(compat, "v3"))
		p->version = 3;
	else if (!strcmp(compat, "0.10") || !strcmp(compat, "v2"))
		p->version = 2;
	else
		return vd_error(EINVAL, "qcow2: invalid compat '%s' (use 0.10 or 1.1)", compat);

	ret = vd_opt_bool(opts, "extended_l2", false, &b);
	if (ret < 0)
		return vd_error(EINVAL, "qcow2: extended_l2 must be on or off");
	p->extl2 = b;
	ret = vd_opt_u64(opts, "cluster_size", 65536, &cluster_size);
	if (ret < 0 || log2_exact(cluster_size, &p->cluster_bits) < 0 || p->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
	    p->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return vd_error(EINVAL, "qcow2: cluster_size must be a power of two between 512 and 2M");
	ret = vd_opt_u64(opts, "refcount_bits", 16, &refcount_bits);
	if (ret < 0 || log2_exact(refcount_bits, &p->refcount_order) < 0 || refcount_bits > 64)
		return vd_error(EINVAL, "qcow2: refcount_bits must be a power of two between 1 and 64");
	ret = vd_opt_bool(opts, "lazy_refcounts", false, &b);
	if (ret < 0)
		return vd_error(EINVAL, "qcow2: lazy_refcounts must be on or off");
	p->lazy = b;
	ct = vd_opt_str(opts, "compression_type", "zlib");
	if (!strcmp(ct, "zlib"))
		p->compression_type = QCOW2_COMPRESSION_ZLIB;
	else if (!strcmp(ct, "zstd"))
		p->compression_type = QCOW2_COMPRESSION_ZSTD;
	else
		return vd_error(EINVAL, "qcow2: compression_type must be zlib or zstd");
	p->prealloc = vd_opt_str(opts, "preallocation", "off");
	if (!is_prealloc_mode(p->prealloc))
		return vd_error(EINVAL, "qcow2: preallocation must be off, metadata, falloc or full");
	p->backing_file = vd_opt_str(opts, "backing_file", NULL);
	p->backing_fmt = vd_opt_str(opts, "backing_fmt", NULL);
	if (p->backing_file && !*p->backing_file)
		p->backing_file = NULL;
	if (p->backing_file && strlen(p->backing_file) > QCOW2_MAX_BACKING_NAME)
		return vd_error(EINVAL, "qcow2: backing file name too long (max 1023 bytes)");
	if (p->backing_fmt && strlen(p->backing_fmt) > QCOW2_MAX_BACKING_FMT)
		return vd_error(EINVAL, "qcow2: backing format name too long");
	if (p->backing_file && strcmp(p->prealloc, "off"))
		return vd_error(EINVAL, "qcow2: backing file and preallocation cannot be used at the same time");

	if (p->version < 3) {
		if (p->refcount_order != 4)
			return vd_error(EINVAL, "qcow2: refcount_bits other than 16 need compat=1.1");
		if (p->lazy)
			return vd_error(EINVAL, "qcow2: lazy_refcounts need compat=1.1");
		if (p->extl2)
			return vd_error(EINVAL, "qcow2: extended_l2 needs compat=1.1");
		if (p->compression_type != QCOW2_COMPRESSION_ZLIB)
			return vd_error(EINVAL, "qcow2: compression_type zstd needs compat=1.1");
	}
	if (p->extl2 && p->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS)
		return vd_error(EINVAL, "qcow2: extended_l2 needs cluster_size of at least 16k");
	return 0;
}

/* Size of the backing image, to default the size of a new overlay. */
static int backing_size(const struct create_params *p, uint64_t *size)
{
	char path[4096], dir[4096];
	struct vd_bnode *b;

	if (p->backing_file[0] == '/' || strstr(p->backing_file, ":") || p->backing_file[0] == '{') {
		snprintf(path, sizeof(path), "%s", p->backing_file);
	} else {
		snprintf(dir, sizeof(dir), "%s", p->filename);
		snprintf(path, sizeof(path), "%s/%s", dirname(dir), p->backing_file);
	}
	b = vd_bnode_open(path, p->backing_fmt, NULL, VD_BO_NO_IO);
	if (!b)
		return vd_error(ENOENT, "qcow2: could not open backing file '%s' to get its size: %s", path,
				vdisk_get_error_msg());
	*size = b->size;
	vd_bnode_unref(b);
	return 0;
}

/* Initial layout: header, refcount table, refcount blocks, L1 table (like qemu-img's). */
struct create_layout {
	uint64_t l1_size, l1_clusters, rt_clusters, nblocks, total;
};

static int create_layout(const struct create_params *p, struct create_layout *l)
{
	uint64_t cs = 1ULL << p->cluster_bits, l2_bits = p->cluster_bits - (p->extl2 ? 4 : 3);
	uint64_t per_block = 1ULL << (p->cluster_bits + 3 - p->refcount_order), per_tc = cs / 8;

	l->l1_size = qcow2_size_to_l1(p->cluster_bits, (uint32_t)l2_bits, p->size);
	if (l->l1_size > QCOW2_MAX_L1_BYTES / 8)
		return vd_error(EFBIG, "qcow2: size %" PRIu64 " is too large for cluster_size %" PRIu64, p->size, cs);
	l->l1_clusters = l->l1_size ? (l->l1_size * 8 + cs - 1) / cs : 1;
	l->rt_clusters = 1;
	l->nblocks = 1;
	for (;;) {
		l->total = 1 + l->rt_clusters + l->nblocks + l->l1_clusters;
		uint64_t nb = (l->total + per_block - 1) / per_block;
		uint64_t rt = (nb + per_tc - 1) / per_tc;
		if (nb == l->nblocks && rt == l->rt_clusters)
			break;
		l->nblocks = nb;
		l->rt_clusters = rt;
	}
	if (l->rt_clusters * cs > QCOW2_MAX_REFTABLE_BYTES)
		return vd_error(EFBIG, "qcow2: size too large for this cluster size and refcount width");
	return 0;
}

struct create_ctx {
	struct create_params *p;
	struct create_layout *l;
	struct vd_bnode *file;
};

static int do_create(void *arg)
{
	struct create_ctx *c = arg;
	struct create_params *p = c->p;
	uint64_t cs = 1ULL << p->cluster_bits;
	uint64_t per_block = 1ULL << (p->cluster_bits + 3 - p->refcount_order), per_tc = cs / 8;
	uint64_t l1_size = c->l->l1_size, l1_clusters = c->l->l1_clusters, rt_clusters = c->l->rt_clusters;
	uint64_t nblocks = c->l->nblocks, total = c->l->total;
	bool prealloc = strcmp(p->prealloc, "off") != 0;
	struct qcow2_header h;
	struct qcow2_ext_info x;
	uint8_t *buf = NULL;
	int ret;

	memset(&h, 0, sizeof(h));
	memset(&x, 0, sizeof(x));
	h.magic = QCOW2_MAGIC;
	h.version = p->version;
	h.cluster_bits = p->cluster_bits;
	/* With preallocation the size is set by the resize that allocates. */
	h.size = prealloc ? 0 : p->size;
	h.l1_size = (uint32_t)l1_size;
	h.refcount_table_offset = cs;
	h.refcount_table_clusters = (uint32_t)rt_clusters;
	h.l1_table_offset = (1 + rt_clusters + nblocks) * cs;
	h.refcount_order = p->refcount_order;
	h.compression_type = p->compression_type;
	if (p->compression_type != QCOW2_COMPRESSION_ZLIB)
		h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
	if (p->extl2)
		h.incompatible_features |= QCOW2_INCOMPAT_EXTL2;
	if (p->lazy)
		h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;

	buf = vd_blk_alloc(cs);
	if (!buf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	/* Refcount blocks first, then the table, L1 and, last, the header (so a partial file is not a valid image). */
	for (uint64_t b = 0; b < nblocks; b++) {
		memset(buf, 0, cs);
		for (uint64_t cl = b * per_block; cl < (b + 1) * per_block && cl < total; cl++)
			qcow2_rc_set(buf, p->refcount_order, cl - b * per_block, 1);
		ret = vd_bnode_co_pwrite(c->file, (1 + rt_clusters + b) * cs, buf, cs, 0);
		if (ret < 0)
			goto out;
	}
	for (uint64_t t = 0; t < rt_clusters; t++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < per_tc && t * per_tc + i < nblocks; i++)
			st_be64(buf + i * 8, (1 + rt_clusters + t * per_tc + i) * cs);
		ret = vd_bnode_co_pwrite(c->file, (1 + t) * cs, buf, cs, 0);
		if (ret < 0)
			goto out;
	}
	memset(buf, 0, cs);
	for (uint64_t t = 0; t < l1_clusters; t++) {
		ret = vd_bnode_co_pwrite(c->file, h.l1_table_offset + t * cs, buf, cs, 0);
		if (ret < 0)
			goto out;
	}
	ret = vd_bnode_co_flush(c->file);
	if (ret < 0)
		goto out;
	ret = qcow2_build_header(&h, &x, p->backing_file, p->backing_file ? p->backing_fmt : NULL, buf, cs);
	if (ret < 0)
		goto out;
	ret = vd_bnode_co_pwrite(c->file, 0, buf, cs, 0);
	if (ret == 0)
		ret = vd_bnode_co_flush(c->file);
out:
	vd_blk_free(buf);
	return ret < 0 ? ret : 0;
}

int qcow2_create(const struct vd_create_opts *o)
{
	struct create_params p;
	struct create_layout lay;
	struct create_ctx c;
	int ret;

	ret = parse_create_opts(o, &p);
	if (ret < 0)
		return ret;
	if (p.size == 0 && p.backing_file) {
		ret = backing_size(&p, &p.size);
		if (ret < 0)
			return ret;
	}
	ret = create_layout(&p, &lay);
	if (ret < 0)
		return ret;
	ret = vd_create_file(p.filename, lay.total << p.cluster_bits, "off");
	if (ret < 0)
		return ret;
	c.p = &p;
	c.l = &lay;
	c.file = vd_bnode_open(p.filename, "file", NULL, VD_BO_RDWR);
	if (!c.file)
		return vd_error(EIO, "qcow2: could not open '%s': %s", p.filename, vdisk_get_error_msg());
	ret = qcow2_run_co(do_create, &c);
	vd_bnode_unref(c.file);
	if (ret < 0)
		return ret;
	if (strcmp(p.prealloc, "off")) {
		struct vd_bnode *bs = vd_bnode_open(p.filename, "qcow2", NULL, VD_BO_RDWR | VD_BO_NO_BACKING);
		if (!bs)
			return vd_error(EIO, "qcow2: could not open the new image: %s", vdisk_get_error_msg());
		ret = vd_bnode_truncate(bs, p.size, true, p.prealloc);
		if (ret == 0)
			ret = vd_bnode_flush(bs);
		vd_bnode_unref(bs);
	}
	return ret;
}

/* ---------------------------------------------------------------------------
 * Preallocation
 * ------------------------------------------------------------------------- */

/* Zeroes into host [off, off+len): real zero writes ("full") or allocated zero ranges ("falloc"/reuse). */
static int zero_host(struct qcow2_state *s, uint64_t off, uint64_t len, bool full)
{
	size_t bl = len < (1u << 20) ? (size_t)len : (1u << 20);
	uint8_t *zeros;
	int ret;

	if (!full) {
		ret = vd_bnode_co_pwrite_zeroes(s->bs->file, off, len, 0);
		if (ret != -ENOTSUP && ret != -EINVAL)
			return ret;
	}
	zeros = vd_blk_alloc(bl);
	if (!zeros)
		return vd_error(ENOMEM, "qcow2: out of memory");
	memset(zeros, 0, bl);
	ret = 0;
	for (uint64_t z = 0; ret == 0 && z < len; z += bl)
		ret = qcow2_file_pwrite(s, off + z, zeros, len - z < bl ? (size_t)(len - z) : bl);
	vd_blk_free(zeros);
	return ret;
}

int qcow2_preallocate(struct qcow2_state *s, uint64_t start, uint64_t end, const char *mode)
{
	uint64_t c = start >> s->cluster_bits, cend = (end + s->cluster_size - 1) >> s->cluster_bits;
	uint64_t old_file_end = s->bs->file->size > s->host_end ? s->bs->file->size : s->host_end;
	bool data = strcmp(mode, "metadata") != 0;
	int ret = 0;

	while (c < cend) {
		uint64_t off = c << s->cluster_bits, k = 0, bytes;
		uint32_t idx = qcow2_l2_index(s, off);
		uint8_t *l2;
		int64_t host;

		ret = qcow2_get_l2_write(s, off, &l2);
		if (ret < 0)
			break;
		while (c + k < cend && idx + k < s->l2_size && k < 8192) {
			uint64_t e = qcow2_l2_entry(s, l2, idx + (uint32_t)k);
			if ((e & QCOW2_OFLAG_COMPRESSED) || (e & L2E_OFFSET_MASK))
				break;
			k++;
		}
		if (!k) {
			qcow2_cache_put(&s->l2_cache, l2);
			c++;
			continue;
		}
		host = qcow2_alloc_clusters(s, k);
		if (host < 0) {
			qcow2_cache_put(&s->l2_cache, l2);
			ret = (int)host;
			break;
		}
		bytes = k << s->cluster_bits;
		if (data) {
			/* falloc / full: the host space is really allocated (and for full, written). */
			ret = zero_host(s, (uint64_t)host, bytes, !strcmp(mode, "full"));
		} else if ((uint64_t)host < old_file_end) {
			/* Reused clusters may hold old data: the preallocated range must read as zeroes. */
			uint64_t zl = (uint64_t)host + bytes < old_file_end ? bytes : old_file_end - (uint64_t)host;
			ret = zero_host(s, (uint64_t)host, zl, false);
		}
		if (ret == 0)
			ret = qcow2_l2_after_alloc(s);
		if (ret < 0) {
			qcow2_cache_put(&s->l2_cache, l2);
			break;
		}
		for (uint64_t i = 0; i < k; i++)
			qcow2_l2_set(s, l2, idx + (uint32_t)i, ((uint64_t)host + (i << s->cluster_bits)) | QCOW2_OFLAG_COPIED,
				     s->extl2 ? L2_BITMAP_ALL_ALLOC : 0);
		qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		if ((uint64_t)host + bytes > s->host_end)
			s->host_end = (uint64_t)host + bytes; /* the file covers the clusters: do not trim them away */
		c += k;
	}
	if (ret == 0)
		ret = qcow2_flush_metadata(s);
	return ret;
}

/* ---------------------------------------------------------------------------
 * Resize
 * ------------------------------------------------------------------------- */

static int write_size(struct qcow2_state *s, uint64_t size)
{
	uint8_t b[8];
	int ret;

	st_be64(b, size);
	ret = qcow2_file_pwrite(s, QCOW2_HDR_SIZE_OFF, b, 8);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	return ret;
}

static int shrink(struct qcow2_state *s, uint64_t size)
{
	uint64_t cs = s->cluster_size, start = (size + cs - 1) & ~(cs - 1), old = s->bs->size;
	uint64_t keep_l1 = qcow2_size_to_l1(s->cluster_bits, s->l2_bits, size);
	int ret;

	if (s->nb_snapshots)
		return vd_error(ENOTSUP, "qcow2: cannot shrink an image with internal snapshots");
	/* Make the header agree first: a crash leaves a smaller image with leaked clusters. */
	ret = qcow2_flush_metadata(s);
	if (ret == 0)
		ret = write_size(s, size);
	if (ret < 0)
		return ret;
	s->bs->size = size;
	if (start < old) {
		ret = qcow2_discard_clusters(s, start, old - start, true);
		if (ret < 0)
			return ret;
	}
	/* L2 tables wholly past the end go away. */
	for (uint64_t i = keep_l1; i < s->l1_size; i++) {
		uint64_t l2off = s->l1_table[i] & L1E_OFFSET_MASK;
		if (!l2off)
			continue;
		s->l1_table[i] = 0;
		ret = qcow2_flush_metadata(s);
		if (ret == 0)
			ret = qcow2_write_l1_entry(s, i);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret == 0)
			ret = qcow2_free_clusters(s, l2off, cs);
		if (ret < 0)
			return ret;
	}
	return qcow2_flush_metadata(s);
}

int qcow2_co_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t old = bs->size, g;
	int ret;

	if (!prealloc)
		prealloc = "off";
	if (!is_prealloc_mode(prealloc))
		return vd_error(EINVAL, "qcow2: unknown preallocation mode '%s'", prealloc);
	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is not writable");
	if (qcow2_size_to_l1(s->cluster_bits, s->l2_bits, size) > s->max_l1_entries)
		return vd_error(EFBIG, "qcow2: size %" PRIu64 " is too large for this cluster size", size);
	if (size == old)
		return 0;
	vd_co_mutex_lock(&s->lock);
	if (size < old) {
		if (strcmp(prealloc, "off")) {
			ret = vd_error(ENOTSUP, "qcow2: preallocation makes no sense when shrinking");
		} else {
			ret = shrink(s, size);
		}
		vd_co_mutex_unlock(&s->lock);
		return ret;
	}
	if (s->nb_snapshots && s->version < 3) {
		vd_co_mutex_unlock(&s->lock);
		return vd_error(ENOTSUP, "qcow2: cannot resize a version 2 image with internal snapshots");
	}
	ret = qcow2_grow_l1(s, qcow2_size_to_l1(s->cluster_bits, s->l2_bits, size));
	if (ret == 0)
		ret = write_size(s, size);
	if (ret == 0)
		bs->size = size;
	if (ret == 0 && strcmp(prealloc, "off"))
		ret = qcow2_preallocate(s, old, size, prealloc);
	vd_co_mutex_unlock(&s->lock);
	if (ret < 0)
		return ret;

	/* Stale bytes past the old end (partial last granule, backing data) must read as zeroes. */
	g = 1ULL << s->sc_bits;
	if (!strcmp(prealloc, "off")) {
		uint64_t gend = (old + g - 1) & ~(g - 1);
		if (old & (g - 1)) {
			uint64_t zend = gend < size ? gend : size;
			ret = qcow2_co_pwrite_zeroes(bs, old, zend - old, 0);
			if (ret < 0)
				return ret;
		}
		if (bs->backing && bs->backing->size > gend && gend < size) {
			uint64_t zend = bs->backing->size < size ? bs->backing->size : size;
			ret = qcow2_co_pwrite_zeroes(bs, gend, zend - gend, VD_BREQ_MAY_UNMAP);
		}
	}
	return ret;
}
