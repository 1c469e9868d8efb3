/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Consistency check and repair.  The references to every host cluster are
 * counted from the metadata (header, active and snapshot L1/L2 tables and
 * their clusters, snapshot table, refcount table and blocks, bitmaps) into
 * an in-memory table and compared with the on-disk refcounts:
 *   refcount > references  -> leak        (FIX_LEAKS lowers the refcount)
 *   refcount < references  -> corruption  (FIX_ERRORS raises it)
 *   refcount 0 with references, broken refcount blocks -> the refcount
 *   structure is rebuilt from scratch behind the used area (FIX_ERRORS).
 * Then the COPIED flags of the active tables are compared with the
 * refcounts (FIX_ERRORS corrects them).  Messages go to stderr like
 * qemu-img's.  Counting follows QEMU so the numbers agree.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

struct refs {
	uint32_t *r;
	uint64_t n; /* clusters */
};

static int refs_grow(struct refs *t, uint64_t n)
{
	uint32_t *nr;

	if (n <= t->n)
		return 0;
	nr = realloc(t->r, n * sizeof(*nr));
	if (!nr)
		return -ENOMEM;
	memset(nr + t->n, 0, (n - t->n) * sizeof(*nr));
	t->r = nr;
	t->n = n;
	return 0;
}

static int inc_refs(struct qcow2_state *s, struct vd_check_result *res, struct refs *t, uint64_t off, uint64_t len)
{
	uint64_t file_len = s->bs->file->size;

	if (!len)
		return 0;
	/*
	 * The last cluster may be only partly written, but a reference a whole
	 * cluster or more past the end of the file is corrupt metadata: count it
	 * as such instead of sizing the table after it (a flipped bit in an L2
	 * entry would otherwise ask for terabytes).
	 */
	if (off + len < off || (off + len > file_len && off + len - file_len >= s->cluster_size)) {
		fprintf(stderr, "ERROR: reference to %#" PRIx64 "+%#" PRIx64 " lies a cluster or more past the end of the file\n",
			off, len);
		res->corruptions++;
		return 0;
	}
	for (uint64_t c = off >> s->cluster_bits; c <= (off + len - 1) >> s->cluster_bits; c++) {
		if (c >= t->n && refs_grow(t, c + 1 > t->n * 2 ? c + 1 : t->n * 2) < 0) {
			res->check_errors++;
			return -ENOMEM;
		}
		if (t->r[c] == UINT32_MAX || (uint64_t)t->r[c] >= s->refcount_max) {
			fprintf(stderr, "ERROR: overflow cluster offset=%#" PRIx64 "\n", c << s->cluster_bits);
			res->corruptions++;
			continue;
		}
		t->r[c]++;
	}
	return 0;
}

static uint64_t file_clusters(struct qcow2_state *s)
{
	uint64_t f = s->bs->file->size > s->host_end ? s->bs->file->size : s->host_end;

	return (f + s->cluster_size - 1) >> s->cluster_bits;
}

static int check_l2(struct qcow2_state *s, struct vd_check_result *res, struct refs *t, uint64_t l2off, bool active,
		    int fix)
{
	uint64_t next_contig = 0;
	uint8_t *l2;
	bool dirty = false;
	int ret;

	ret = qcow2_cache_get(s, &s->l2_cache, l2off, &l2, true, true);
	if (ret < 0) {
		fprintf(stderr, "ERROR: I/O error reading the L2 table at %#" PRIx64 "\n", l2off);
		res->check_errors++;
		return ret;
	}
	for (uint32_t i = 0; i < s->l2_size; i++) {
		uint64_t e = qcow2_l2_entry(s, l2, i), bm = qcow2_l2_bitmap(s, l2, i);

		if (e & QCOW2_OFLAG_COMPRESSED) {
			uint64_t start, len;
			if (e & QCOW2_OFLAG_COPIED) {
				fprintf(stderr, "%s: compressed cluster %#" PRIx64 " has the copied flag set\n",
					(fix & VD_CHECK_FIX_ERRORS) ? "Repairing" : "ERROR", e & s->cluster_offset_mask);
				if (fix & VD_CHECK_FIX_ERRORS) {
					e &= ~QCOW2_OFLAG_COPIED;
					qcow2_l2_set(s, l2, i, e, bm);
					dirty = true;
					res->corruptions_fixed++;
				} else {
					res->corruptions++;
				}
			}
			qcow2_compressed_decode(s, e, NULL, NULL, &start, &len);
			ret = inc_refs(s, res, t, start, len);
			if (ret < 0)
				goto out;
			if (active) {
				res->allocated_clusters++;
				res->compressed_clusters++;
				res->fragmented_clusters++;
			}
			continue;
		}
		uint64_t host = e & L2E_OFFSET_MASK;
		/* As QEMU: reported, not repaired (which bit was meant is unknown). */
		if (e & L2E_STD_RESERVED_MASK) {
			fprintf(stderr, "ERROR found l2 entry with reserved bits set: %" PRIx64 "\n", e);
			res->corruptions++;
		}
		if (host) {
			if (s->extl2 && ((bm >> 32) & bm & L2_BITMAP_ALL_ALLOC)) {
				fprintf(stderr, "ERROR: invalid cluster entry %#" PRIx64 " (bitmap %#" PRIx64 ")\n", e, bm);
				res->corruptions++;
			}
			if (host & (s->cluster_size - 1)) {
				bool repair = (fix & VD_CHECK_FIX_ERRORS) && active;
				fprintf(stderr, "%s offset=%" PRIx64 ": Cluster is not properly aligned; L2 entry corrupted.\n",
					repair ? "Repairing" : "ERROR", host);
				if (repair) {
					/* The data is unreachable anyway; make the cluster read as zeroes. */
					if (s->extl2)
						qcow2_l2_set(s, l2, i, 0, L2_BITMAP_ALL_ZERO);
					else
						qcow2_l2_set(s, l2, i, s->version >= 3 ? QCOW2_OFLAG_ZERO : 0, 0);
					dirty = true;
					res->corruptions_fixed++;
				} else {
					res->corruptions++;
				}
				continue;
			}
			if (active) {
				res->allocated_clusters++;
				if (next_contig && host != next_contig)
					res->fragmented_clusters++;
				next_contig = host + s->cluster_size;
			}
			ret = inc_refs(s, res, t, host, s->cluster_size);
			if (ret < 0)
				goto out;
		} else if (s->extl2 && (bm & L2_BITMAP_ALL_ALLOC)) {
			fprintf(stderr, "ERROR: invalid cluster entry %#" PRIx64 " (bitmap %#" PRIx64 ")\n", e, bm);
			res->corruptions++;
		}
	}
	ret = 0;
out:
	if (dirty)
		qcow2_cache_mark_dirty(&s->l2_cache, l2);
	qcow2_cache_put(&s->l2_cache, l2);
	return ret;
}

static int check_l1(struct qcow2_state *s, struct vd_check_result *res, struct refs *t, const uint64_t *l1,
		    uint32_t l1_size, uint64_t l1_off, bool active, int fix)
{
	uint64_t fc = file_clusters(s);
	int ret;

	ret = inc_refs(s, res, t, l1_off, (uint64_t)l1_size * 8);
	if (ret < 0)
		return ret;
	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t l2off = l1[i] & L1E_OFFSET_MASK;
		if (l1[i] & L1E_RESERVED_MASK) {
			fprintf(stderr, "ERROR found L1 entry with reserved bits set: %" PRIx64 "\n", l1[i]);
			res->corruptions++;
		}
		if (!l2off)
			continue;
		ret = inc_refs(s, res, t, l2off, s->cluster_size);
		if (ret < 0)
			return ret;
		if (l2off & (s->cluster_size - 1)) {
			fprintf(stderr, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted\n",
				l2off);
			res->corruptions++;
			continue;
		}
		if ((l2off >> s->cluster_bits) >= fc) {
			fprintf(stderr, "ERROR l2_offset=%" PRIx64 ": Table is past the end of the image\n", l2off);
			res->corruptions++;
			continue;
		}
		ret = check_l2(s, res, t, l2off, active, fix);
		if (ret < 0)
			return ret;
	}
	return 0;
}

static int count_bitmaps(struct qcow2_state *s, struct vd_check_result *res, struct refs *t)
{
	uint8_t *dir = NULL;
	uint64_t dsize = s->ext.bitmap_dir_size, off = 0;
	int ret;

	if (!s->ext.has_bitmaps || !(s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) || !dsize)
		return 0;
	if (dsize > (64u << 20) || (s->ext.bitmap_dir_offset & (s->cluster_size - 1))) {
		fprintf(stderr, "ERROR: bitmap directory is invalid\n");
		res->corruptions++;
		return 0;
	}
	ret = inc_refs(s, res, t, s->ext.bitmap_dir_offset, dsize);
	if (ret < 0)
		return ret;
	dir = malloc(dsize);
	if (!dir) {
		res->check_errors++;
		return -ENOMEM;
	}
	ret = qcow2_file_pread(s, s->ext.bitmap_dir_offset, dir, dsize);
	if (ret < 0) {
		free(dir);
		res->check_errors++;
		return ret;
	}
	for (uint32_t b = 0; b < s->ext.nb_bitmaps && off + 24 <= dsize; b++) {
		uint64_t toff = ld_be64(dir + off);
		uint32_t tsize = ld_be32(dir + off + 8);
		uint16_t name_size = ld_be16(dir + off + 18);
		uint32_t extra = ld_be32(dir + off + 20);
		uint64_t *tbl;

		off += (24 + (uint64_t)extra + name_size + 7) & ~7ULL;
		if (!tsize)
			continue;
		ret = inc_refs(s, res, t, toff, (uint64_t)tsize * 8);
		if (ret < 0)
			break;
		tbl = malloc((size_t)tsize * 8);
		if (!tbl || qcow2_file_pread(s, toff, tbl, (size_t)tsize * 8) < 0) {
			free(tbl);
			res->check_errors++;
			continue;
		}
		for (uint32_t i = 0; i < tsize; i++) {
			uint64_t d = be64toh(tbl[i]) & 0x00fffffffffffe00ULL;
			if (d)
				inc_refs(s, res, t, d, s->cluster_size);
		}
		free(tbl);
	}
	free(dir);
	return 0;
}

/* References to everything; *rebuild set when the refcount structure itself is broken. */
static int calculate(struct qcow2_state *s, struct vd_check_result *res, struct refs *t, bool *rebuild, int fix)
{
	uint64_t fc = file_clusters(s);
	int ret;

	ret = inc_refs(s, res, t, 0, s->cluster_size);
	if (ret == 0)
		ret = check_l1(s, res, t, s->l1_table, s->l1_size, s->l1_table_offset, true, fix);
	for (uint32_t i = 0; ret == 0 && i < s->nb_snapshots; i++) {
		struct qcow2_snapshot *sn = &s->snapshots[i];
		uint64_t *l1 = calloc(sn->l1_size ? sn->l1_size : 1, 8);
		if (!l1) {
			res->check_errors++;
			return -ENOMEM;
		}
		if (sn->l1_size && qcow2_file_pread(s, sn->l1_table_offset, l1, (size_t)sn->l1_size * 8) < 0) {
			fprintf(stderr, "ERROR: could not read the L1 table of snapshot '%s'\n", sn->name);
			res->check_errors++;
			free(l1);
			continue;
		}
		for (uint32_t j = 0; j < sn->l1_size; j++)
			l1[j] = be64toh(l1[j]);
		ret = check_l1(s, res, t, l1, sn->l1_size, sn->l1_table_offset, false, 0);
		free(l1);
	}
	if (ret == 0)
		ret = inc_refs(s, res, t, s->snapshots_offset, s->snapshots_size);
	if (ret == 0)
		ret = inc_refs(s, res, t, s->refcount_table_offset, (uint64_t)s->refcount_table_clusters << s->cluster_bits);
	if (ret == 0)
		ret = count_bitmaps(s, res, t);
	if (ret < 0)
		return ret;
	for (uint64_t i = 0; i < s->refcount_table_size; i++) {
		uint64_t e = s->refcount_table[i], off = e & REFT_OFFSET_MASK;
		if (!e)
			continue;
		if ((e & REFT_RESERVED_MASK) || (off & (s->cluster_size - 1))) {
			fprintf(stderr, "ERROR refcount block %" PRIu64 " is not cluster aligned; refcount table entry corrupted\n",
				i);
			res->corruptions++;
			*rebuild = true;
			continue;
		}
		if ((off >> s->cluster_bits) >= fc) {
			fprintf(stderr, "ERROR refcount block %" PRIu64 " is outside image\n", i);
			res->corruptions++;
			*rebuild = true;
			continue;
		}
		ret = inc_refs(s, res, t, off, s->cluster_size);
		if (ret < 0)
			return ret;
		if (t->r[off >> s->cluster_bits] != 1) {
			fprintf(stderr, "ERROR refcount block %" PRIu64 " refcount=%u\n", i, t->r[off >> s->cluster_bits]);
			res->corruptions++;
			*rebuild = true;
		}
	}
	return 0;
}

/* On-disk refcount, treating a broken refcount block as an error. */
static int disk_refcount(struct qcow2_state *s, uint64_t c, uint64_t *rc)
{
	uint64_t idx = c >> s->refblock_bits, e;

	*rc = 0;
	if (idx >= s->refcount_table_size)
		return 0;
	e = s->refcount_table[idx];
	if (!e)
		return 0;
	if ((e & REFT_RESERVED_MASK) || ((e & REFT_OFFSET_MASK) & (s->cluster_size - 1)) ||
	    ((e & REFT_OFFSET_MASK) >> s->cluster_bits) >= file_clusters(s))
		return -EIO;
	return qcow2_get_refcount(s, c, rc);
}

static void compare(struct qcow2_state *s, struct vd_check_result *res, struct refs *t, int fix, bool *rebuild,
		    uint64_t *highest)
{
	uint64_t n = t->n > file_clusters(s) ? t->n : file_clusters(s);

	*highest = 0;
	for (uint64_t c = 0; c < n; c++) {
		uint64_t rc1, rc2 = c < t->n ? t->r[c] : 0;
		int64_t *fixed = NULL;
		int ret = disk_refcount(s, c, &rc1);

		if (ret < 0) {
			fprintf(stderr, "Can't get refcount for cluster %" PRIu64 ": %s\n", c, strerror(-ret));
			res->check_errors++;
			continue;
		}
		if (rc1 || rc2)
			*highest = c;
		if (rc1 == rc2)
			continue;
		if (rc1 == 0)
			*rebuild = true;
		else if (rc1 > rc2 && (fix & VD_CHECK_FIX_LEAKS))
			fixed = &res->leaks_fixed;
		else if (rc1 < rc2 && (fix & VD_CHECK_FIX_ERRORS))
			fixed = &res->corruptions_fixed;
		fprintf(stderr, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64 "\n",
			fixed ? "Repairing" : rc1 < rc2 ? "ERROR" : "Leaked", c, rc1, rc2);
		if (fixed) {
			ret = qcow2_update_refcount(s, c << s->cluster_bits, 1, rc1 > rc2 ? rc1 - rc2 : rc2 - rc1, rc1 > rc2);
			if (ret >= 0) {
				(*fixed)++;
				continue;
			}
		}
		if (rc1 < rc2)
			res->corruptions++;
		else
			res->leaks++;
	}
}

/*
 * Write a new refcount structure describing t (minus the old structure),
 * placed behind everything in use, and switch the header to it.
 */
static int rebuild(struct qcow2_state *s, struct refs *t)
{
	uint64_t per_block = 1ULL << s->refblock_bits, per_tc = s->cluster_size / 8;
	uint64_t P, nblocks, tclusters, entries, total;
	uint64_t *table = NULL;
	uint8_t *buf = NULL, hdr[12];
	int ret;

	fprintf(stderr, "Rebuilding refcount structure\n");
	/* Forget the old structure. */
	if (s->refcount_table_offset >> s->cluster_bits < t->n)
		for (uint64_t c = 0; c < s->refcount_table_clusters; c++)
			if (t->r[(s->refcount_table_offset >> s->cluster_bits) + c])
				t->r[(s->refcount_table_offset >> s->cluster_bits) + c]--;
	for (uint64_t i = 0; i < s->refcount_table_size; i++) {
		uint64_t e = s->refcount_table[i], c = (e & REFT_OFFSET_MASK) >> s->cluster_bits;
		if (e && !(e & REFT_RESERVED_MASK) && !((e & REFT_OFFSET_MASK) & (s->cluster_size - 1)) && c < t->n &&
		    t->r[c])
			t->r[c]--;
	}
	P = t->n;
	while (P > 1 && !t->r[P - 1])
		P--;
	if (P < 1)
		P = 1;
	/* Blocks for every index with a reference plus the new area; iterate to a fixpoint. */
	nblocks = 0;
	tclusters = 1;
	for (;;) {
		total = P + nblocks + tclusters;
		entries = (total + per_block - 1) / per_block;
		uint64_t nb = 0;
		for (uint64_t i = 0; i < entries; i++) {
			bool used = i >= (P >> s->refblock_bits);
			for (uint64_t c = i * per_block; !used && c < (i + 1) * per_block && c < t->n; c++)
				used = t->r[c] != 0;
			nb += used;
		}
		uint64_t tc = (entries + per_tc - 1) / per_tc;
		if (nb == nblocks && tc == tclusters)
			break;
		nblocks = nb;
		tclusters = tc;
	}
	if (tclusters * s->cluster_size > QCOW2_MAX_REFTABLE_BYTES)
		return vd_error(EFBIG, "qcow2: rebuilt refcount table would be too large");
	ret = refs_grow(t, P + nblocks + tclusters);
	if (ret < 0)
		return ret;
	for (uint64_t c = P; c < P + nblocks + tclusters; c++)
		t->r[c] = 1;
	ret = qcow2_ensure_file(s, (P + nblocks + tclusters) << s->cluster_bits);
	if (ret < 0)
		return ret;
	table = calloc(tclusters * per_tc, 8);
	buf = vd_blk_alloc(s->cluster_size);
	if (!table || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	{
		uint64_t b = 0;
		for (uint64_t i = 0; i < entries; i++) {
			bool used = false;
			for (uint64_t c = i * per_block; c < (i + 1) * per_block && c < t->n; c++)
				if (t->r[c]) {
					used = true;
					break;
				}
			if (!used)
				continue;
			memset(buf, 0, s->cluster_size);
			for (uint64_t c = i * per_block; c < (i + 1) * per_block && c < t->n; c++) {
				if ((uint64_t)t->r[c] > s->refcount_max) {
					ret = vd_error(ERANGE, "qcow2: refcount overflow while rebuilding");
					goto out;
				}
				qcow2_rc_set(buf, s->refcount_order, c - i * per_block, t->r[c]);
			}
			table[i] = (P + b) << s->cluster_bits;
			ret = qcow2_file_pwrite(s, table[i], buf, s->cluster_size);
			if (ret < 0)
				goto out;
			b++;
		}
	}
	for (uint64_t c = 0; c < tclusters; c++) {
		for (uint64_t i = 0; i < per_tc; i++)
			st_be64(buf + i * 8, table[c * per_tc + i]);
		ret = qcow2_file_pwrite(s, (P + nblocks + c) << s->cluster_bits, buf, s->cluster_size);
		if (ret < 0)
			goto out;
	}
	ret = qcow2_file_flush(s);
	if (ret < 0)
		goto out;
	st_be64(hdr, (P + nblocks) << s->cluster_bits);
	st_be32(hdr + 8, (uint32_t)tclusters);
	ret = qcow2_file_pwrite(s, QCOW2_HDR_REFTABLE_OFF, hdr, 12);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0)
		goto out;
	qcow2_cache_drop_all(&s->rc_cache);
	free(s->refcount_table);
	s->refcount_table = table;
	table = NULL;
	s->refcount_table_size = tclusters * per_tc;
	qcow2_reftable_rescan(s);
	s->refcount_table_offset = (P + nblocks) << s->cluster_bits;
	s->refcount_table_clusters = (uint32_t)tclusters;
	s->free_cluster_index = 0;
	qcow2_free_discards(s);
out:
	free(table);
	vd_blk_free(buf);
	return ret;
}

static int check_copied(struct qcow2_state *s, struct vd_check_result *res, int fix)
{
	bool l1_dirty = false;
	uint64_t rc;
	int ret;

	for (uint32_t i = 0; i < s->l1_size; i++) {
		uint64_t l1e = s->l1_table[i], l2off = l1e & L1E_OFFSET_MASK;
		uint8_t *l2;
		bool dirty = false;

		if (!l2off || (l2off & (s->cluster_size - 1)) || (l2off >> s->cluster_bits) >= file_clusters(s))
			continue;
		if (disk_refcount(s, l2off >> s->cluster_bits, &rc) < 0)
			continue;
		if ((rc == 1) != !!(l1e & QCOW2_OFLAG_COPIED)) {
			fprintf(stderr, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64 "\n",
				(fix & VD_CHECK_FIX_ERRORS) ? "Repairing" : "ERROR", i, l1e, rc);
			if (fix & VD_CHECK_FIX_ERRORS) {
				s->l1_table[i] = rc == 1 ? l1e | QCOW2_OFLAG_COPIED : l1e & ~QCOW2_OFLAG_COPIED;
				l1_dirty = true;
				res->corruptions_fixed++;
			} else {
				res->corruptions++;
			}
		}
		ret = qcow2_cache_get(s, &s->l2_cache, l2off, &l2, true, true);
		if (ret < 0) {
			res->check_errors++;
			return ret;
		}
		for (uint32_t j = 0; j < s->l2_size; j++) {
			uint64_t e = qcow2_l2_entry(s, l2, j), host = e & L2E_OFFSET_MASK;
			if ((e & QCOW2_OFLAG_COMPRESSED) || !host || (host & (s->cluster_size - 1)))
				continue;
			if (disk_refcount(s, host >> s->cluster_bits, &rc) < 0)
				continue;
			if ((rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
				fprintf(stderr, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64 "\n",
					(fix & VD_CHECK_FIX_ERRORS) ? "Repairing" : "ERROR", e, rc);
				if (fix & VD_CHECK_FIX_ERRORS) {
					st_be64(l2 + (size_t)j * s->l2_entry_size,
						rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED);
					dirty = true;
					res->corruptions_fixed++;
				} else {
					res->corruptions++;
				}
			}
		}
		if (dirty)
			qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
	}
	if (l1_dirty) {
		for (uint32_t i = 0; i < s->l1_size; i += 64) {
			ret = qcow2_write_l1_entry(s, i);
			if (ret < 0) {
				res->check_errors++;
				return ret;
			}
		}
	}
	return 0;
}

int qcow2_check_locked(struct qcow2_state *s, struct vd_check_result *res, int fix)
{
	struct refs t = { NULL, 0 };
	struct vd_check_result pre;
	uint64_t highest = 0;
	bool rebuild_needed = false, writable = s->writable || (s->bs->open_flags & VD_BO_RDWR);
	int ret;

	if (!writable)
		fix = 0;
	if (fix && s->bs->corrupt)
		s->bs->corrupt = false; /* opened for repair */
	if (fix)
		s->writable = true;
	if (s->writable) {
		ret = qcow2_flush_metadata(s);
		if (ret < 0)
			return ret;
	}
	ret = refs_grow(&t, file_clusters(s) ? file_clusters(s) : 1);
	if (ret < 0)
		return vd_error(ENOMEM, "qcow2: out of memory for the check");
	ret = calculate(s, res, &t, &rebuild_needed, fix);
	if (ret < 0)
		goto out;
	pre = *res;
	compare(s, res, &t, 0, &rebuild_needed, &highest);
	if (rebuild_needed && (fix & VD_CHECK_FIX_ERRORS)) {
		struct vd_check_result old = *res, again;
		ret = rebuild(s, &t);
		if (ret < 0) {
			res->check_errors++;
			goto out;
		}
		/* Recount against the new structure and drop what the rebuild leaked. */
		memset(&again, 0, sizeof(again));
		memset(t.r, 0, t.n * sizeof(*t.r));
		rebuild_needed = false;
		ret = calculate(s, &again, &t, &rebuild_needed, 0);
		if (ret < 0)
			goto out;
		memset(&again, 0, sizeof(again));
		compare(s, &again, &t, fix & VD_CHECK_FIX_LEAKS, &rebuild_needed, &highest);
		if (rebuild_needed)
			fprintf(stderr, "ERROR rebuilt refcount structure is still broken\n");
		res->corruptions = again.corruptions;
		res->leaks = again.leaks;
		if (res->corruptions < old.corruptions)
			res->corruptions_fixed += old.corruptions - res->corruptions;
		if (res->leaks < old.leaks)
			res->leaks_fixed += old.leaks - res->leaks;
	} else if (fix && (res->leaks || res->corruptions)) {
		if (rebuild_needed) {
			fprintf(stderr, "ERROR need to rebuild refcount structures\n");
			res->check_errors++;
			ret = -EIO;
			goto out;
		}
		*res = pre;
		compare(s, res, &t, fix, &rebuild_needed, &highest);
	}
	ret = check_copied(s, res, fix);
	if (ret < 0)
		goto out;
	if (fix) {
		ret = qcow2_flush_metadata(s);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret < 0)
			goto out;
	}
	res->image_end_offset = (int64_t)((highest + 1) << s->cluster_bits);
	res->total_clusters = (int64_t)qcow2_size_to_clusters(s, s->bs->size);
	/* A repaired image with the corrupt bit can be used again. */
	if (fix && !res->corruptions && !res->check_errors && (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
		s->incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT;
		ret = qcow2_write_incompat(s);
	}
	/* A dirty image whose refcounts were just made consistent is clean. */
	if (fix && ret == 0 && !res->corruptions && !res->check_errors) {
		s->needs_repair = false;
		if (s->incompatible_features & QCOW2_INCOMPAT_DIRTY)
			ret = qcow2_mark_clean(s);
	}
out:
	free(t.r);
	return ret;
}

int qcow2_co_check(struct vd_bnode *bs, struct vd_check_result *res, int fix)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	vd_co_mutex_lock(&s->lock);
	ret = qcow2_check_locked(s, res, fix);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}
