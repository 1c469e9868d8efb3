/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Metadata cache for L2 tables and refcount blocks.  Tables are kept in
 * on-disk (big-endian) form.  A table is pinned while a coroutine holds it
 * (ref > 0); modifications happen only with s->lock held.
 *
 * Eviction: a caller without the lock (a reader) only reuses clean,
 * unpinned slots; if there is none it adds an overflow slot, released again
 * when it is put back clean.  A caller with the lock may write back a dirty
 * table to make room.  Write-back honours the dependencies: if the cache
 * `depends` on another one, that one is written out first and the file is
 * flushed; `depends_on_flush` asks for just the flush.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

int qcow2_cache_init(struct qcow2_cache *c, const char *name, int limit, size_t table_size)
{
	memset(c, 0, sizeof(*c));
	c->name = name;
	c->limit = limit < 1 ? 1 : limit;
	c->table_size = table_size;
	c->cap = c->limit;
	c->e = calloc((size_t)c->cap, sizeof(*c->e));
	if (!c->e)
		return vd_error(ENOMEM, "qcow2: out of memory for the %s cache", name);
	vd_co_queue_init(&c->wq);
	return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
	if (!c->e)
		return;
	for (int i = 0; i < c->n; i++) {
		vd_blk_free(c->e[i]->table);
		free(c->e[i]);
	}
	free(c->e);
	c->e = NULL;
	c->last = NULL;
	c->n = c->cap = 0;
}

/* Lookups try the entry found last first: consecutive requests mostly hit the same table. */
static struct qcow2_cache_entry *find(struct qcow2_cache *c, uint64_t offset)
{
	if (c->last && c->last->offset == offset)
		return c->last;
	for (int i = 0; i < c->n; i++)
		if (c->e[i]->offset == offset)
			return c->last = c->e[i];
	return NULL;
}

static struct qcow2_cache_entry *find_table(struct qcow2_cache *c, const uint8_t *table)
{
	if (c->last && c->last->table == table)
		return c->last;
	for (int i = 0; i < c->n; i++)
		if (c->e[i]->table == table)
			return c->last = c->e[i];
	return NULL;
}

static struct qcow2_cache_entry *new_slot(struct qcow2_cache *c)
{
	struct qcow2_cache_entry *e;

	if (c->n == c->cap) {
		int ncap = c->cap * 2 + 4;
		struct qcow2_cache_entry **ne = realloc(c->e, (size_t)ncap * sizeof(*ne));
		if (!ne)
			return NULL;
		c->e = ne;
		c->cap = ncap;
	}
	e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->table = vd_blk_alloc(c->table_size);
	if (!e->table) {
		free(e);
		return NULL;
	}
	c->e[c->n++] = e;
	return e;
}

static void remove_slot(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
	for (int i = 0; i < c->n; i++) {
		if (c->e[i] == e) {
			c->e[i] = c->e[--c->n];
			if (c->last == e)
				c->last = NULL;
			vd_blk_free(e->table);
			free(e);
			return;
		}
	}
}

static struct qcow2_cache_entry *lru_victim(struct qcow2_cache *c, bool allow_dirty)
{
	struct qcow2_cache_entry *best = NULL;

	for (int i = 0; i < c->n; i++) {
		struct qcow2_cache_entry *e = c->e[i];
		if (e->ref || e->loading)
			continue;
		if (e->offset == 0)
			return e; /* free slot */
		if (e->dirty && !allow_dirty)
			continue;
		if (!best || e->lru < best->lru)
			best = e;
	}
	return best;
}

static int write_entry(struct qcow2_state *s, struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
	int ret;

	if (!e->dirty || !e->offset)
		return 0;
	if (s->bs->corrupt)
		return -EIO;
	if (c->depends) {
		ret = qcow2_cache_flush(s, c->depends);
		if (ret < 0)
			return ret;
		ret = qcow2_file_flush(s);
		if (ret < 0)
			return ret;
		c->depends = NULL;
		c->depends_on_flush = false;
	} else if (c->depends_on_flush) {
		ret = qcow2_file_flush(s);
		if (ret < 0)
			return ret;
		c->depends_on_flush = false;
	}
	if (!e->dirty || !e->offset)
		return 0; /* written meanwhile */
	ret = qcow2_overlap_check(s, c == &s->l2_cache ? QCOW2_OL_L2 : QCOW2_OL_REFBLOCK, e->offset, c->table_size);
	if (ret < 0)
		return ret;
	/* Pin the table while it is being written; no one modifies it (we hold the lock). */
	e->ref++;
	e->dirty = false;
	ret = qcow2_file_pwrite(s, e->offset, e->table, c->table_size);
	e->ref--;
	if (ret < 0) {
		e->dirty = true;
		s->metadata_error = true;
		return vd_error(-ret, "qcow2: could not write %s table at %#llx", c->name,
				(unsigned long long)e->offset);
	}
	return 0;
}

int qcow2_cache_get(struct qcow2_state *s, struct qcow2_cache *c, uint64_t offset, uint8_t **table, bool read,
		    bool locked)
{
	struct qcow2_cache_entry *e;
	int ret;

	for (;;) {
		e = find(c, offset);
		if (e) {
			if (e->loading) {
				vd_co_queue_wait(&c->wq, NULL);
				continue;
			}
			e->ref++;
			e->lru = ++c->lru_clock;
			if (!read)
				memset(e->table, 0, c->table_size);
			*table = e->table;
			return 0;
		}
		e = NULL;
		if (c->n < c->limit) {
			e = new_slot(c);
		} else {
			e = lru_victim(c, false);
			if (!e && locked) {
				struct qcow2_cache_entry *d = lru_victim(c, true);
				if (d) {
					ret = write_entry(s, c, d);
					if (ret < 0)
						return ret;
					continue; /* the world may have changed while writing */
				}
			}
			if (!e)
				e = new_slot(c); /* overflow slot, released when put back clean */
		}
		if (!e)
			return vd_error(ENOMEM, "qcow2: out of memory in the %s cache", c->name);
		break;
	}
	e->offset = offset;
	e->ref = 1;
	e->dirty = false;
	e->lru = ++c->lru_clock;
	if (!read) {
		memset(e->table, 0, c->table_size);
		*table = e->table;
		return 0;
	}
	e->loading = true;
	ret = qcow2_file_pread(s, offset, e->table, c->table_size);
	e->loading = false;
	vd_co_queue_wake_all(&c->wq);
	if (ret < 0) {
		e->offset = 0;
		e->ref = 0;
		return vd_error(-ret, "qcow2: could not read %s table at %#llx", c->name, (unsigned long long)offset);
	}
	*table = e->table;
	return 0;
}

void qcow2_cache_put(struct qcow2_cache *c, uint8_t *table)
{
	struct qcow2_cache_entry *e = find_table(c, table);

	if (!e)
		return;
	if (e->ref > 0)
		e->ref--;
	if (e->ref == 0 && !e->dirty && !e->loading && c->n > c->limit)
		remove_slot(c, e);
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint8_t *table)
{
	struct qcow2_cache_entry *e = find_table(c, table);

	if (e && e->offset)
		e->dirty = true;
}

int qcow2_cache_flush(struct qcow2_state *s, struct qcow2_cache *c)
{
	int ret;

	for (;;) {
		struct qcow2_cache_entry *d = NULL;
		for (int i = 0; i < c->n; i++) {
			struct qcow2_cache_entry *e = c->e[i];
			if (e->dirty && e->offset && !e->loading && (!d || e->offset < d->offset))
				d = e;
		}
		if (!d)
			break;
		ret = write_entry(s, c, d);
		if (ret < 0)
			return ret;
	}
	/* Nothing of ours is dirty: whoever depended on us only needs what is already issued. */
	return 0;
}

int qcow2_cache_set_dependency(struct qcow2_state *s, struct qcow2_cache *c, struct qcow2_cache *dep)
{
	int ret;

	if (c->depends == dep)
		return 0;
	/* Break chains: a cache that depends on something is written out first. */
	if (dep->depends) {
		ret = qcow2_cache_flush(s, dep);
		if (ret < 0)
			return ret;
		/* dep had nothing dirty left, but its dependency marker may linger */
		dep->depends = NULL;
	}
	if (c->depends && c->depends != dep) {
		ret = qcow2_cache_flush(s, c);
		if (ret < 0)
			return ret;
	}
	c->depends = dep;
	return 0;
}

void qcow2_cache_depends_on_flush(struct qcow2_cache *c)
{
	c->depends_on_flush = true;
}

void qcow2_cache_discard(struct qcow2_cache *c, uint64_t offset)
{
	struct qcow2_cache_entry *e = find(c, offset);

	if (e && !e->loading) {
		e->offset = 0;
		e->dirty = false;
	}
}

bool qcow2_cache_contains(const struct qcow2_cache *c, uint64_t off, uint64_t len)
{
	for (int i = 0; i < c->n; i++) {
		const struct qcow2_cache_entry *e = c->e[i];
		if (e->offset && off < e->offset + c->table_size && e->offset < off + len)
			return true;
	}
	return false;
}

void qcow2_cache_drop_all(struct qcow2_cache *c)
{
	for (int i = 0; i < c->n; i++) {
		struct qcow2_cache_entry *e = c->e[i];
		if (!e->loading) {
			e->offset = 0;
			e->dirty = false;
		}
	}
	c->depends = NULL;
	c->depends_on_flush = false;
}
