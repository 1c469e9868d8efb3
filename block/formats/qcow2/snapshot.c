/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internal snapshots: the snapshot table (parse / serialise / rewrite),
 * refcount updates over a whole L1 table, and create / list / goto / delete.
 * The snapshot operations expect the node to be drained (no guest I/O in
 * flight); they take s->lock anyway.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2.h"

#define SN_HDR 40
#define SN_EXTRA_KNOWN 24 /* vm_state_size_large, disk_size, icount */

void qcow2_snapshots_free(struct qcow2_snapshot *sn, uint32_t nb)
{
	if (!sn)
		return;
	for (uint32_t i = 0; i < nb; i++) {
		free(sn[i].id);
		free(sn[i].name);
		free(sn[i].extra_unknown);
	}
	free(sn);
}

static char *dup_str(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memcpy(s, p, n);
		s[n] = '\0';
	}
	return s;
}

int qcow2_parse_snapshots(const uint8_t *buf, size_t len, uint32_t nb, uint32_t version, uint32_t cluster_bits,
			  struct qcow2_snapshot **out, uint64_t *used)
{
	struct qcow2_snapshot *sn;
	uint64_t off = 0;
	int ret;

	*out = NULL;
	sn = calloc(nb ? nb : 1, sizeof(*sn));
	if (!sn)
		return vd_error(ENOMEM, "qcow2: out of memory for the snapshot table");
	for (uint32_t i = 0; i < nb; i++) {
		struct qcow2_snapshot *p = &sn[i];
		uint32_t extra, id_len, name_len;
		uint64_t need;
		const uint8_t *h;

		if (off + SN_HDR > len) {
			*used = off + SN_HDR;
			ret = -EAGAIN;
			goto fail;
		}
		h = buf + off;
		p->l1_table_offset = ld_be64(h);
		p->l1_size = ld_be32(h + 8);
		id_len = ld_be16(h + 12);
		name_len = ld_be16(h + 14);
		p->date_sec = ld_be32(h + 16);
		p->date_nsec = ld_be32(h + 20);
		p->vm_clock_nsec = ld_be64(h + 24);
		p->vm_state_size = ld_be32(h + 32);
		extra = ld_be32(h + 36);
		if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
			ret = vd_error(EINVAL, "qcow2: snapshot %u: extra data size %u too large", i, extra);
			goto fail;
		}
		/* The padding of the last entry need not exist (qemu-img ends the file there). */
		need = (uint64_t)SN_HDR + extra + id_len + name_len;
		if (off + need > len) {
			*used = off + need;
			ret = -EAGAIN;
			goto fail;
		}
		need = (need + 7) & ~7ULL;
		if (p->l1_table_offset & ((1ULL << cluster_bits) - 1)) {
			ret = vd_error(EINVAL, "qcow2: snapshot %u: L1 table offset %#" PRIx64 " is not cluster aligned", i,
				       p->l1_table_offset);
			goto fail;
		}
		if ((uint64_t)p->l1_size > QCOW2_MAX_L1_BYTES / 8) {
			ret = vd_error(EFBIG, "qcow2: snapshot %u: L1 table too large (%u entries)", i, p->l1_size);
			goto fail;
		}
		p->extra_size = extra;
		p->icount = UINT64_MAX;
		if (extra >= 8)
			p->vm_state_size = ld_be64(h + SN_HDR);
		if (extra >= 16)
			p->disk_size = ld_be64(h + SN_HDR + 8);
		if (extra >= 24)
			p->icount = ld_be64(h + SN_HDR + 16);
		if (extra > SN_EXTRA_KNOWN) {
			p->extra_unknown_len = extra - SN_EXTRA_KNOWN;
			p->extra_unknown = malloc(p->extra_unknown_len);
			if (!p->extra_unknown) {
				ret = vd_error(ENOMEM, "qcow2: out of memory");
				goto fail;
			}
			memcpy(p->extra_unknown, h + SN_HDR + SN_EXTRA_KNOWN, p->extra_unknown_len);
		}
		p->id = dup_str(h + SN_HDR + extra, id_len);
		p->name = dup_str(h + SN_HDR + extra + id_len, name_len);
		if (!p->id || !p->name) {
			ret = vd_error(ENOMEM, "qcow2: out of memory");
			goto fail;
		}
		off += need;
		if (off > QCOW2_MAX_SNAPSHOT_TABLE_BYTES) {
			ret = vd_error(EFBIG, "qcow2: snapshot table too large");
			goto fail;
		}
	}
	(void)version;
	*used = off;
	*out = sn;
	return 0;
fail:
	qcow2_snapshots_free(sn, nb);
	return ret;
}

static size_t entry_size(const struct qcow2_snapshot *p)
{
	return ((size_t)SN_HDR + SN_EXTRA_KNOWN + p->extra_unknown_len + strlen(p->id) + strlen(p->name) + 7) & ~7UL;
}

size_t qcow2_snapshot_table_size(const struct qcow2_snapshot *sn, uint32_t nb)
{
	size_t n = 0;

	for (uint32_t i = 0; i < nb; i++)
		n += entry_size(&sn[i]);
	return n;
}

void qcow2_serialize_snapshots(const struct qcow2_snapshot *sn, uint32_t nb, uint8_t *buf)
{
	size_t off = 0;

	for (uint32_t i = 0; i < nb; i++) {
		const struct qcow2_snapshot *p = &sn[i];
		size_t il = strlen(p->id), nl = strlen(p->name), es = entry_size(p);
		uint32_t extra = SN_EXTRA_KNOWN + p->extra_unknown_len;
		uint8_t *h = buf + off;

		memset(h, 0, es);
		st_be64(h, p->l1_table_offset);
		st_be32(h + 8, p->l1_size);
		st_be16(h + 12, (uint16_t)il);
		st_be16(h + 14, (uint16_t)nl);
		st_be32(h + 16, p->date_sec);
		st_be32(h + 20, p->date_nsec);
		st_be64(h + 24, p->vm_clock_nsec);
		st_be32(h + 32, (uint32_t)p->vm_state_size);
		st_be32(h + 36, extra);
		st_be64(h + SN_HDR, p->vm_state_size);
		st_be64(h + SN_HDR + 8, p->disk_size);
		st_be64(h + SN_HDR + 16, p->icount);
		if (p->extra_unknown_len)
			memcpy(h + SN_HDR + SN_EXTRA_KNOWN, p->extra_unknown, p->extra_unknown_len);
		memcpy(h + SN_HDR + extra, p->id, il);
		memcpy(h + SN_HDR + extra + il, p->name, nl);
		off += es;
	}
}

int qcow2_read_snapshots(struct qcow2_state *s)
{
	uint64_t fsize = s->bs->file->size, want = 65536, used = 0;
	uint8_t *buf = NULL;
	int ret;

	s->snapshots = NULL;
	s->snapshots_size = 0;
	if (!s->nb_snapshots)
		return 0;
	for (;;) {
		uint64_t avail = fsize - s->snapshots_offset;
		uint64_t n = want < avail ? want : avail;
		vd_blk_free(buf);
		buf = vd_blk_alloc(n ? n : 1);
		if (!buf)
			return vd_error(ENOMEM, "qcow2: out of memory for the snapshot table");
		ret = qcow2_file_pread(s, s->snapshots_offset, buf, n);
		if (ret < 0) {
			vd_blk_free(buf);
			return vd_error(-ret, "qcow2: could not read the snapshot table");
		}
		ret = qcow2_parse_snapshots(buf, n, s->nb_snapshots, s->version, s->cluster_bits, &s->snapshots, &used);
		if (ret != -EAGAIN)
			break;
		if (n == avail) {
			ret = vd_error(EINVAL, "qcow2: snapshot table is past the end of the file");
			break;
		}
		if (used > QCOW2_MAX_SNAPSHOT_TABLE_BYTES) {
			ret = vd_error(EFBIG, "qcow2: snapshot table too large");
			break;
		}
		want = used > want * 2 ? used : want * 2;
	}
	vd_blk_free(buf);
	if (ret < 0)
		return ret;
	s->snapshots_size = used;
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		struct qcow2_snapshot *p = &s->snapshots[i];
		if (p->l1_size && (p->l1_table_offset == 0 || p->l1_table_offset > fsize ||
				   (uint64_t)p->l1_size * 8 > fsize - p->l1_table_offset))
			return vd_error(EINVAL, "qcow2: snapshot '%s': L1 table is outside the file", p->name);
		if (p->extra_size < 16)
			p->disk_size = s->hdr.size; /* old images: the size at the time is not recorded */
	}
	return 0;
}

int qcow2_write_snapshots(struct qcow2_state *s, struct qcow2_snapshot *sn, uint32_t nb)
{
	size_t size = qcow2_snapshot_table_size(sn, nb);
	uint64_t old_off = s->snapshots_offset, old_size = s->snapshots_size, new_off = 0;
	uint8_t *buf = NULL, hdr[12];
	int ret;

	if (size > QCOW2_MAX_SNAPSHOT_TABLE_BYTES)
		return vd_error(EFBIG, "qcow2: snapshot table too large");
	if (nb) {
		uint64_t clusters = (size + s->cluster_size - 1) >> s->cluster_bits;
		int64_t o;
		buf = vd_blk_alloc(clusters << s->cluster_bits);
		if (!buf)
			return vd_error(ENOMEM, "qcow2: out of memory");
		memset(buf, 0, clusters << s->cluster_bits);
		qcow2_serialize_snapshots(sn, nb, buf);
		o = qcow2_alloc_clusters(s, clusters);
		if (o < 0) {
			vd_blk_free(buf);
			return (int)o;
		}
		new_off = (uint64_t)o;
		/* Everything (refcounts of the new table, L1 copies, refcount updates) on disk first. */
		ret = qcow2_flush_metadata(s);
		if (ret == 0)
			ret = qcow2_overlap_check(s, 0, new_off, size);
		if (ret == 0)
			ret = qcow2_file_pwrite(s, new_off, buf, size);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		vd_blk_free(buf);
		if (ret < 0) {
			(void)qcow2_free_clusters(s, new_off, size);
			return ret;
		}
	} else {
		ret = qcow2_flush_metadata(s);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret < 0)
			return ret;
	}
	st_be32(hdr, nb);
	st_be64(hdr + 4, new_off);
	ret = qcow2_file_pwrite(s, QCOW2_HDR_NB_SNAPSHOTS_OFF, hdr, 12);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0) {
		if (nb)
			(void)qcow2_free_clusters(s, new_off, size);
		return ret;
	}
	s->nb_snapshots = nb;
	s->snapshots_offset = new_off;
	s->snapshots_size = size;
	/*
	 * The header points at the new table: the caller must adopt it, so this
	 * cannot fail any more.  Not freeing the old table (its refcount is
	 * damaged) only leaks its clusters, as in QEMU.
	 */
	if (old_size)
		(void)qcow2_free_clusters(s, old_off, old_size);
	return 0;
}

/* Read a snapshot's L1 table (host order). */
static int read_l1(struct qcow2_state *s, uint64_t off, uint32_t n, uint64_t **out)
{
	uint64_t *l1;
	int ret;

	*out = NULL;
	l1 = calloc(n ? n : 1, 8);
	if (!l1)
		return vd_error(ENOMEM, "qcow2: out of memory");
	if (n) {
		ret = qcow2_file_pread(s, off, l1, (size_t)n * 8);
		if (ret < 0) {
			free(l1);
			return vd_error(-ret, "qcow2: could not read a snapshot L1 table");
		}
	}
	for (uint32_t i = 0; i < n; i++)
		l1[i] = be64toh(l1[i]);
	*out = l1;
	return 0;
}

static int write_l1_table(struct qcow2_state *s, uint64_t off, const uint64_t *l1, uint32_t n, int ignore)
{
	uint8_t *buf;
	int ret;

	if (!n)
		return 0;
	buf = vd_blk_alloc((size_t)n * 8);
	if (!buf)
		return vd_error(ENOMEM, "qcow2: out of memory");
	for (uint32_t i = 0; i < n; i++)
		st_be64(buf + (size_t)i * 8, l1[i]);
	ret = qcow2_overlap_check(s, ignore, off, (uint64_t)n * 8);
	if (ret == 0)
		ret = qcow2_file_pwrite(s, off, buf, (size_t)n * 8);
	vd_blk_free(buf);
	return ret;
}

/* Would adding one reference to everything this L1 references overflow a refcount? */
static int check_increment(struct qcow2_state *s, const uint64_t *l1, uint32_t n)
{
	uint64_t rc;
	int ret;

	if (s->refcount_bits >= 32)
		return 0;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t l2off = l1[i] & L1E_OFFSET_MASK;
		uint8_t *l2;
		if (!l2off)
			continue;
		ret = qcow2_get_refcount(s, l2off >> s->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		if (rc >= s->refcount_max)
			goto overflow;
		ret = qcow2_cache_get(s, &s->l2_cache, l2off, &l2, true, true);
		if (ret < 0)
			return ret;
		for (uint32_t j = 0; j < s->l2_size; j++) {
			uint64_t e = qcow2_l2_entry(s, l2, j), start, len;
			if (e & QCOW2_OFLAG_COMPRESSED) {
				qcow2_compressed_decode(s, e, NULL, NULL, &start, &len);
			} else if (e & L2E_OFFSET_MASK) {
				start = e & L2E_OFFSET_MASK;
				len = 1;
			} else {
				continue;
			}
			for (uint64_t c = start >> s->cluster_bits; c <= (start + len - 1) >> s->cluster_bits; c++) {
				ret = qcow2_get_refcount(s, c, &rc);
				if (ret < 0 || rc >= s->refcount_max) {
					qcow2_cache_put(&s->l2_cache, l2);
					if (ret < 0)
						return ret;
					goto overflow;
				}
			}
		}
		qcow2_cache_put(&s->l2_cache, l2);
	}
	return 0;
overflow:
	return vd_error(ERANGE, "qcow2: a refcount would overflow (refcount_bits=%u is too small for another snapshot)",
			s->refcount_bits);
}

int qcow2_update_l1_refcounts(struct qcow2_state *s, uint64_t *l1, uint32_t l1_size, int addend, bool active)
{
	bool l1_modified = false;
	uint64_t rc;
	int ret = 0;

	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t l1e = l1[i], l2off = l1e & L1E_OFFSET_MASK, nl1e;
		uint8_t *l2;
		bool dirty = false;

		if (!l2off)
			continue;
		if (l2off & (s->cluster_size - 1))
			return qcow2_signal_corruption(s, "L2 table offset %#" PRIx64 " unaligned (L1 index %#x)", l2off, i);
		ret = qcow2_cache_get(s, &s->l2_cache, l2off, &l2, true, true);
		if (ret < 0)
			return ret;
		for (uint32_t j = 0; j < s->l2_size; j++) {
			uint64_t e = qcow2_l2_entry(s, l2, j), ne = e;
			if (e & QCOW2_OFLAG_COMPRESSED) {
				if (addend) {
					uint64_t start, len;
					qcow2_compressed_decode(s, e, NULL, NULL, &start, &len);
					ret = qcow2_update_refcount(s, start, len, 1, addend < 0);
				}
				ne = e & ~QCOW2_OFLAG_COPIED;
			} else if (e & L2E_OFFSET_MASK) {
				uint64_t host = e & L2E_OFFSET_MASK;
				if (host & (s->cluster_size - 1)) {
					qcow2_cache_put(&s->l2_cache, l2);
					return qcow2_signal_corruption(s, "cluster allocation offset %#" PRIx64
								       " unaligned (L2 table %#" PRIx64 ")", host, l2off);
				}
				if (addend)
					ret = qcow2_update_refcount(s, host, s->cluster_size, 1, addend < 0);
				if (ret == 0)
					ret = qcow2_get_refcount(s, host >> s->cluster_bits, &rc);
				if (ret == 0)
					ne = rc == 1 ? (e | QCOW2_OFLAG_COPIED) : (e & ~QCOW2_OFLAG_COPIED);
			}
			if (ret < 0) {
				qcow2_cache_put(&s->l2_cache, l2);
				return ret;
			}
			if (ne != e) {
				if (!dirty && addend > 0) {
					ret = qcow2_l2_after_alloc(s);
					if (ret < 0) {
						qcow2_cache_put(&s->l2_cache, l2);
						return ret;
					}
				}
				st_be64(l2 + (size_t)j * s->l2_entry_size, ne);
				dirty = true;
			}
		}
		if (dirty)
			qcow2_cache_mark_dirty(&s->l2_cache, l2);
		qcow2_cache_put(&s->l2_cache, l2);
		if (addend) {
			ret = qcow2_update_refcount(s, l2off, s->cluster_size, 1, addend < 0);
			if (ret < 0)
				return ret;
		}
		ret = qcow2_get_refcount(s, l2off >> s->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		nl1e = rc == 1 ? (l2off | QCOW2_OFLAG_COPIED) : l2off;
		if (nl1e != l1e) {
			l1[i] = nl1e;
			l1_modified = true;
		}
	}
	if (active && l1_modified && addend >= 0) {
		/* COPIED flags of the active L1 go to disk after the L2/refcount updates they describe. */
		ret = qcow2_flush_metadata(s);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret == 0)
			ret = write_l1_table(s, s->l1_table_offset, l1, l1_size, QCOW2_OL_L1);
	}
	return ret;
}

static int find_snapshot(struct qcow2_state *s, const char *name_or_id)
{
	for (uint32_t i = 0; i < s->nb_snapshots; i++)
		if (!strcmp(s->snapshots[i].id, name_or_id))
			return (int)i;
	for (uint32_t i = 0; i < s->nb_snapshots; i++)
		if (!strcmp(s->snapshots[i].name, name_or_id))
			return (int)i;
	return -1;
}

static struct qcow2_snapshot *copy_table(const struct qcow2_snapshot *sn, uint32_t nb, uint32_t extra_slots)
{
	struct qcow2_snapshot *n = calloc(nb + extra_slots ? nb + extra_slots : 1, sizeof(*n));

	if (!n)
		return NULL;
	for (uint32_t i = 0; i < nb; i++) {
		n[i] = sn[i];
		n[i].id = strdup(sn[i].id);
		n[i].name = strdup(sn[i].name);
		n[i].extra_unknown = NULL;
		if (sn[i].extra_unknown_len) {
			n[i].extra_unknown = malloc(sn[i].extra_unknown_len);
			if (n[i].extra_unknown)
				memcpy(n[i].extra_unknown, sn[i].extra_unknown, sn[i].extra_unknown_len);
		}
		if (!n[i].id || !n[i].name || (sn[i].extra_unknown_len && !n[i].extra_unknown)) {
			qcow2_snapshots_free(n, i + 1);
			return NULL;
		}
	}
	return n;
}

int qcow2_snapshot_create(struct vd_bnode *bs, const char *name)
{
	struct qcow2_state *s = bs->opaque;
	struct qcow2_snapshot *nt = NULL, *p;
	uint64_t max_id = 0;
	int64_t l1off = 0;
	struct timespec ts;
	char idbuf[32];
	int ret;

	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is not writable");
	if (!name || !*name)
		return vd_error(EINVAL, "qcow2: snapshot name must not be empty");
	if (strlen(name) > 65535)
		return vd_error(EINVAL, "qcow2: snapshot name too long");
	if (s->nb_snapshots >= QCOW2_MAX_SNAPSHOTS)
		return vd_error(EFBIG, "qcow2: too many snapshots");
	vd_co_mutex_lock(&s->lock);
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		char *end;
		unsigned long long v = strtoull(s->snapshots[i].id, &end, 10);
		if (!strcmp(s->snapshots[i].name, name)) {
			ret = vd_error(EEXIST, "qcow2: a snapshot named '%s' already exists", name);
			goto out;
		}
		if (*end == '\0' && v > max_id)
			max_id = v;
	}
	snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)max_id + 1);
	ret = qcow2_flush_metadata(s);
	if (ret == 0)
		ret = check_increment(s, s->l1_table, s->l1_size);
	if (ret < 0)
		goto out;
	/* Copy of the active L1 table. */
	if (s->l1_size) {
		l1off = qcow2_alloc_clusters(s, ((uint64_t)s->l1_size * 8 + s->cluster_size - 1) >> s->cluster_bits);
		if (l1off < 0) {
			ret = (int)l1off;
			goto out;
		}
		ret = write_l1_table(s, (uint64_t)l1off, s->l1_table, s->l1_size, 0);
		if (ret < 0)
			goto out;
	}
	/* Everything the active L1 references gains a reference; COPIED flags drop. */
	ret = qcow2_update_l1_refcounts(s, s->l1_table, s->l1_size, 1, true);
	if (ret < 0)
		goto out; /* leaks at worst */
	nt = copy_table(s->snapshots, s->nb_snapshots, 1);
	if (!nt) {
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	p = &nt[s->nb_snapshots];
	memset(p, 0, sizeof(*p));
	p->l1_table_offset = (uint64_t)l1off;
	p->l1_size = s->l1_size;
	p->id = strdup(idbuf);
	p->name = strdup(name);
	clock_gettime(CLOCK_REALTIME, &ts);
	p->date_sec = (uint32_t)ts.tv_sec;
	p->date_nsec = (uint32_t)ts.tv_nsec;
	p->disk_size = bs->size;
	p->icount = UINT64_MAX;
	p->extra_size = SN_EXTRA_KNOWN;
	if (!p->id || !p->name) {
		qcow2_snapshots_free(nt, s->nb_snapshots + 1);
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	ret = qcow2_write_snapshots(s, nt, s->nb_snapshots + 1);
	if (ret < 0) {
		qcow2_snapshots_free(nt, s->nb_snapshots + 1);
		goto out;
	}
	qcow2_snapshots_free(s->snapshots, s->nb_snapshots - 1);
	s->snapshots = nt;
	ret = qcow2_flush_metadata(s);
out:
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_snapshot_list(struct vd_bnode *bs, struct vd_snapshot_info **list, int *count)
{
	struct qcow2_state *s = bs->opaque;
	struct vd_snapshot_info *l;

	*list = NULL;
	*count = 0;
	if (!s->nb_snapshots)
		return 0;
	l = calloc(s->nb_snapshots, sizeof(*l));
	if (!l)
		return vd_error(ENOMEM, "qcow2: out of memory");
	for (uint32_t i = 0; i < s->nb_snapshots; i++) {
		const struct qcow2_snapshot *p = &s->snapshots[i];
		snprintf(l[i].id, sizeof(l[i].id), "%s", p->id);
		snprintf(l[i].name, sizeof(l[i].name), "%s", p->name);
		l[i].vm_state_size = p->vm_state_size;
		l[i].date_sec = p->date_sec;
		l[i].date_nsec = p->date_nsec;
		l[i].vm_clock_nsec = p->vm_clock_nsec;
		l[i].icount = p->icount;
	}
	*list = l;
	*count = (int)s->nb_snapshots;
	return 0;
}

int qcow2_snapshot_goto(struct vd_bnode *bs, const char *name_or_id)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t *sn_l1 = NULL, *old_l1 = NULL, need_l1;
	uint32_t old_size;
	struct qcow2_snapshot *sn;
	int idx, ret;

	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is not writable");
	vd_co_mutex_lock(&s->lock);
	idx = find_snapshot(s, name_or_id);
	if (idx < 0) {
		ret = vd_error(ENOENT, "qcow2: no snapshot '%s'", name_or_id);
		goto out;
	}
	sn = &s->snapshots[idx];
	if (sn->vm_state_size) {
		/* The VM state lives past the disk size in the snapshot's clusters; we only restore the disk. */
	}
	/*
	 * The image takes the snapshot's disk size, so the L1 table must cover
	 * that as well as the snapshot's table, or the image would not open again.
	 */
	need_l1 = sn->l1_size;
	if (sn->disk_size) {
		uint64_t n = qcow2_size_to_l1(s->cluster_bits, s->l2_bits, sn->disk_size);
		if (n > s->max_l1_entries) {
			ret = vd_error(EFBIG, "qcow2: snapshot '%s': disk size %" PRIu64 " is too large", sn->name,
				       sn->disk_size);
			goto out;
		}
		if (n > need_l1)
			need_l1 = n;
	}
	ret = qcow2_flush_metadata(s);
	if (ret == 0)
		ret = read_l1(s, sn->l1_table_offset, sn->l1_size, &sn_l1);
	if (ret == 0)
		ret = check_increment(s, sn_l1, sn->l1_size);
	/* Whatever can fail without undoing anything comes before the increments. */
	if (ret == 0)
		ret = qcow2_grow_l1(s, need_l1);
	if (ret < 0)
		goto out;
	old_size = s->l1_size;
	old_l1 = malloc((size_t)(old_size ? old_size : 1) * 8);
	if (!old_l1) {
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	memcpy(old_l1, s->l1_table, (size_t)old_size * 8);
	/* The snapshot's clusters gain a reference for the active table. */
	ret = qcow2_update_l1_refcounts(s, sn_l1, sn->l1_size, 1, false);
	if (ret < 0)
		goto out;
	/* Increments on disk before the active table references the snapshot's tables. */
	ret = qcow2_flush_metadata(s);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0)
		goto out;
	memset(s->l1_table, 0, (size_t)s->l1_alloc * 8);
	memcpy(s->l1_table, sn_l1, (size_t)sn->l1_size * 8);
	for (uint32_t i = 0; i < s->l1_size; i++)
		s->l1_table[i] &= ~QCOW2_OFLAG_COPIED;
	ret = write_l1_table(s, s->l1_table_offset, s->l1_table, s->l1_size, QCOW2_OL_L1);
	if (ret == 0)
		ret = qcow2_file_flush(s);
	if (ret < 0) {
		memcpy(s->l1_table, old_l1, (size_t)old_size * 8);
		goto out;
	}
	/* The old active state loses its reference. */
	ret = qcow2_update_l1_refcounts(s, old_l1, old_size, -1, false);
	if (ret == 0)
		ret = qcow2_update_l1_refcounts(s, s->l1_table, s->l1_size, 0, true);
	if (ret == 0 && sn->disk_size && sn->disk_size != bs->size) {
		uint8_t b[8];
		st_be64(b, sn->disk_size);
		ret = qcow2_file_pwrite(s, QCOW2_HDR_SIZE_OFF, b, 8);
		if (ret == 0)
			ret = qcow2_file_flush(s);
		if (ret == 0)
			bs->size = sn->disk_size;
	}
	if (ret == 0)
		ret = qcow2_flush_metadata(s);
out:
	free(sn_l1);
	free(old_l1);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_snapshot_delete(struct vd_bnode *bs, const char *name_or_id)
{
	struct qcow2_state *s = bs->opaque;
	struct qcow2_snapshot victim, *nt = NULL;
	uint64_t *sn_l1 = NULL;
	int idx, ret;
	uint32_t j = 0;

	if (!s->writable)
		return vd_error(EACCES, "qcow2: image is not writable");
	vd_co_mutex_lock(&s->lock);
	idx = find_snapshot(s, name_or_id);
	if (idx < 0) {
		ret = vd_error(ENOENT, "qcow2: no snapshot '%s'", name_or_id);
		goto out;
	}
	victim = s->snapshots[idx];
	ret = read_l1(s, victim.l1_table_offset, victim.l1_size, &sn_l1);
	if (ret < 0)
		goto out;
	nt = calloc(s->nb_snapshots, sizeof(*nt));
	if (!nt) {
		ret = vd_error(ENOMEM, "qcow2: out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < s->nb_snapshots; i++)
		if ((int)i != idx)
			nt[j++] = s->snapshots[i];
	/* First the table without it: then nothing on disk references its L1 any more. */
	ret = qcow2_write_snapshots(s, nt, s->nb_snapshots - 1);
	if (ret < 0) {
		free(nt);
		goto out;
	}
	free(s->snapshots);
	s->snapshots = nt;
	free(victim.id);
	free(victim.name);
	free(victim.extra_unknown);
	ret = qcow2_update_l1_refcounts(s, sn_l1, victim.l1_size, -1, false);
	if (ret == 0 && victim.l1_size)
		ret = qcow2_free_clusters(s, victim.l1_table_offset, (uint64_t)victim.l1_size * 8);
	if (ret == 0)
		ret = qcow2_update_l1_refcounts(s, s->l1_table, s->l1_size, 0, true);
	if (ret == 0)
		ret = qcow2_flush_metadata(s);
out:
	free(sn_l1);
	vd_co_mutex_unlock(&s->lock);
	return ret;
}
