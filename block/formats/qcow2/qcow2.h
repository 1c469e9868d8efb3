/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 private header: on-disk layout constants, the parsed header, the
 * in-memory state of an open image, and the functions the qcow2 files share.
 *
 * Files:
 *   qcow2.c     probe, open (header + extensions), close, flush, header
 *               writes, info, amend, change-backing, the format table
 *   cache.c     the L2 / refcount-block metadata cache (write-back with
 *               dependencies between the two caches)
 *   io.c        guest reads, writes (allocation + copy-on-write), zeroes,
 *               discard, block status
 *   cluster.c   L1/L2 mapping: entry decoding, L2 table allocation and COW,
 *               L1 growth, cluster allocation for guest ranges
 *   refcount.c  refcount blocks of any width, cluster allocation, refcount
 *               table growth, pending host discards
 *   compress.c  zlib / zstd compressed clusters
 *   snapshot.c  internal snapshots
 *   check.c     consistency check and repair
 *   create.c    image creation, truncate/preallocation
 *
 * All functions taking a struct qcow2_state run in coroutine context.
 */
#ifndef VD_QCOW2_H
#define VD_QCOW2_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "block.h"
#include "coroutine.h"

/* ---- on-disk constants ------------------------------------------------------ */

#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_MIN_HEADER_LEN 104
#define QCOW2_V3_HEADER_LEN 112 /* what we write: up to compression_type + padding */

/* Implementation limits (the same as QEMU's, so we open what it opens). */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024
#define QCOW2_MAX_SNAPSHOT_TABLE_BYTES (64u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_BACKING_FMT 31
#define QCOW2_MAX_ID_LEN 63
#define QCOW2_MAX_NAME_LEN 255
#define QCOW2_SECTOR 512

/* Header extension types. */
#define QCOW2_EXT_END 0x00000000U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857U
#define QCOW2_EXT_BITMAPS 0x23852875U
#define QCOW2_EXT_CRYPTO 0x0537be77U
#define QCOW2_EXT_DATA_FILE 0x44415441U

/* Feature bits. */
#define QCOW2_INCOMPAT_DIRTY (UINT64_C(1) << 0)
#define QCOW2_INCOMPAT_CORRUPT (UINT64_C(1) << 1)
#define QCOW2_INCOMPAT_DATA_FILE (UINT64_C(1) << 2)
#define QCOW2_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define QCOW2_INCOMPAT_EXTL2 (UINT64_C(1) << 4)
#define QCOW2_INCOMPAT_KNOWN UINT64_C(0x1f)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (UINT64_C(1) << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (UINT64_C(1) << 1)

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Table entry bits. */
#define QCOW2_OFLAG_COPIED (UINT64_C(1) << 63)
#define QCOW2_OFLAG_COMPRESSED (UINT64_C(1) << 62)
#define QCOW2_OFLAG_ZERO (UINT64_C(1) << 0)
#define L1E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define L1E_RESERVED_MASK UINT64_C(0x7f000000000001ff)
#define L2E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define L2E_STD_RESERVED_MASK UINT64_C(0x3f000000000001fe)
#define REFT_OFFSET_MASK UINT64_C(0xfffffffffffffe00)
#define REFT_RESERVED_MASK UINT64_C(0x1ff)
#define L2_BITMAP_ALL_ALLOC UINT64_C(0x00000000ffffffff)
#define L2_BITMAP_ALL_ZERO UINT64_C(0xffffffff00000000)

/* Header field byte offsets (for partial header updates). */
#define QCOW2_HDR_SIZE_OFF 24
#define QCOW2_HDR_L1_SIZE_OFF 36
#define QCOW2_HDR_REFTABLE_OFF 48
#define QCOW2_HDR_NB_SNAPSHOTS_OFF 60
#define QCOW2_HDR_INCOMPAT_OFF 72

/* ---- byte order ------------------------------------------------------------- */

static inline uint64_t ld_be64(const void *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return be64toh(v);
}
static inline uint32_t ld_be32(const void *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return be32toh(v);
}
static inline uint16_t ld_be16(const void *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return be16toh(v);
}
static inline void st_be64(void *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, 8);
}
static inline void st_be32(void *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, 4);
}
static inline void st_be16(void *p, uint16_t v)
{
	v = htobe16(v);
	memcpy(p, &v, 2);
}

/* ---- parsed header ---------------------------------------------------------- */

struct qcow2_header {
	uint32_t magic;
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
};

/* A header extension we do not interpret but must preserve on rewrite. */
struct qcow2_ext {
	uint32_t type;
	uint32_t len;
	uint8_t *data;
	struct qcow2_ext *next;
};

/* Feature name table entry (for readable errors about unknown features). */
struct qcow2_feature {
	uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	char name[47];
};

/* What the extension area told us. */
struct qcow2_ext_info {
	char backing_format[QCOW2_MAX_BACKING_FMT + 1];
	bool has_backing_format;
	bool has_data_file;
	char data_file[1024];
	bool has_bitmaps;
	uint32_t nb_bitmaps;
	uint64_t bitmap_dir_size;
	uint64_t bitmap_dir_offset;
	struct qcow2_feature *features;
	int nb_features;
	struct qcow2_ext *unknown; /* kept in order */
	uint32_t end_offset;       /* first byte after the extension area */
	/* Header fields past the ones we know (header_length > 112): preserved on rewrite. */
	uint8_t *hdr_extra;
	uint32_t hdr_extra_len;
};

/* ---- snapshots -------------------------------------------------------------- */

struct qcow2_snapshot {
	uint64_t l1_table_offset;
	uint32_t l1_size;
	char *id;
	char *name;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;
	uint64_t disk_size;
	uint64_t icount;
	uint32_t extra_size;        /* as read (we write at least 24) */
	uint8_t *extra_unknown;     /* bytes of extra data past the 24 we know */
	uint32_t extra_unknown_len;
};

/* ---- metadata cache --------------------------------------------------------- */

struct qcow2_cache_entry {
	uint64_t offset; /* host offset of the table; 0 = slot free */
	uint8_t *table;
	int ref;
	bool dirty;
	bool loading;
	uint64_t lru;
};

struct qcow2_cache {
	const char *name;
	size_t table_size;
	struct qcow2_cache_entry **e; /* entries are separately allocated: pointers stay valid */
	struct qcow2_cache_entry *last; /* found last (lookup shortcut), NULL after it is freed */
	int n;     /* slots in use (e[0..n)) */
	int cap;   /* allocated slots */
	int limit; /* target number of cached tables */
	uint64_t lru_clock;
	/* Before writing any dirty table of this cache: flush `depends`, then flush the file. */
	struct qcow2_cache *depends;
	bool depends_on_flush;
	struct vd_co_queue wq; /* waiters for a table being loaded */
};

/* ---- in-flight work --------------------------------------------------------- */

/* A guest cluster range whose L2 entries an allocating write is about to change. */
struct qcow2_inflight {
	uint64_t start, end; /* guest cluster indices [start, end) */
	struct qcow2_inflight *next;
};

/* A host byte range being written without the lock (its clusters must not be reused). */
struct qcow2_host_io {
	uint64_t start, end;
	struct qcow2_host_io *next, **pprev;
};

/* A host range freed whose discard is deferred until the metadata is on disk. */
struct qcow2_discard {
	uint64_t start, end;
	struct qcow2_discard *next;
};

/* ---- the open image ---------------------------------------------------------- */

struct qcow2_state {
	struct vd_bnode *bs;

	/* Header (host byte order). */
	struct qcow2_header hdr;
	uint32_t version;
	uint32_t cluster_bits;
	uint32_t cluster_size;
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint64_t snapshots_offset;
	uint32_t nb_snapshots;
	uint64_t snapshots_size; /* bytes of the snapshot table */
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
	struct qcow2_ext_info ext;

	/* Derived geometry. */
	bool extl2;
	uint32_t l2_entry_size; /* 8 or 16 */
	uint32_t l2_bits;       /* log2 entries per L2 table */
	uint32_t l2_size;       /* entries per L2 table */
	uint32_t sc_bits;       /* log2 subcluster size (= cluster_bits without extl2) */
	uint32_t sc_per_cluster;
	uint32_t csize_shift;
	uint64_t csize_mask;
	uint64_t cluster_offset_mask; /* compressed host offset mask */
	uint32_t refcount_bits;
	uint64_t refcount_max;
	uint32_t refblock_bits; /* log2 refcounts per block */
	uint32_t max_l1_entries;

	/* Tables in memory (host byte order). */
	uint64_t *l1_table;     /* l1_alloc entries, l1_size used */
	uint32_t l1_alloc;
	uint64_t *refcount_table;
	uint64_t refcount_table_size; /* entries */
	uint64_t reftable_used;       /* entries up to the last non-zero one (overlap checks scan only these) */

	struct qcow2_snapshot *snapshots;

	struct qcow2_cache l2_cache;
	struct qcow2_cache rc_cache;

	/* Serialises metadata updates and cluster allocation. */
	struct vd_co_mutex lock;
	struct qcow2_inflight *inflight;
	struct vd_co_queue inflight_wq;
	struct qcow2_host_io *host_io;
	struct qcow2_discard *discards;
	int nb_discards;

	uint64_t free_cluster_index;
	uint64_t free_byte_offset; /* compressed-cluster packing; 0 = none */
	uint64_t host_end;         /* highest host byte we have written or the file size at open */
	uint64_t alloc_end;        /* end of the highest cluster allocated in this session */
	uint64_t fresh_start;      /* host bytes from here on were never allocated: they read as zeroes */
	uint64_t size_at_open;     /* file size when opened */
	bool file_grown;           /* we extended the file ahead of allocations (trimmed at close) */
	bool no_fast_zero;         /* the file cannot zero a range without writing (fallocate failed) */

	/* Modes. */
	bool writable;
	bool lazy_refcounts;     /* compatible bit set */
	bool dirty_marked;       /* the dirty bit is set on disk by us */
	int8_t sparse_data;      /* -1 not yet known; 1: data clusters look partly sparse in the file */
	bool needs_repair;       /* dirty at open and not repaired: never clear the dirty bit */
	bool discard_passthrough;
	bool compress_writes;    /* open option: compress full-cluster writes */
	bool in_check;           /* check/repair: allocation consults check_refs */
	uint64_t *check_refs;    /* computed refcounts while repairing (per cluster) */
	uint64_t check_refs_n;
	bool metadata_error;     /* a metadata write failed: flushes keep failing */
	uint8_t *compress_buf;   /* compressed writes: a spare buffer (compress.c), freed at close */
};

/* ---- geometry helpers --------------------------------------------------------- */

static inline uint64_t qcow2_offset_into_cluster(const struct qcow2_state *s, uint64_t off)
{
	return off & (s->cluster_size - 1);
}
static inline uint64_t qcow2_start_of_cluster(const struct qcow2_state *s, uint64_t off)
{
	return off & ~((uint64_t)s->cluster_size - 1);
}
static inline uint64_t qcow2_size_to_clusters(const struct qcow2_state *s, uint64_t size)
{
	return (size + s->cluster_size - 1) >> s->cluster_bits;
}
static inline uint64_t qcow2_l1_index(const struct qcow2_state *s, uint64_t guest_off)
{
	return guest_off >> (s->cluster_bits + s->l2_bits);
}
static inline uint32_t qcow2_l2_index(const struct qcow2_state *s, uint64_t guest_off)
{
	return (guest_off >> s->cluster_bits) & (s->l2_size - 1);
}
static inline uint32_t qcow2_sc_index(const struct qcow2_state *s, uint64_t guest_off)
{
	return (uint32_t)(qcow2_offset_into_cluster(s, guest_off) >> s->sc_bits);
}
/* L1 entries needed for a virtual size. */
uint64_t qcow2_size_to_l1(uint32_t cluster_bits, uint32_t l2_bits, uint64_t size);

/* ---- refcount entries of any width (pure) -------------------------------------- */

uint64_t qcow2_rc_get(const uint8_t *block, uint32_t order, uint64_t index);
void qcow2_rc_set(uint8_t *block, uint32_t order, uint64_t index, uint64_t value);

/* ---- L2 entry classification (pure) --------------------------------------------- */

enum qcow2_sc_type {
	QCOW2_SC_NORMAL,        /* data at host offset */
	QCOW2_SC_COMPRESSED,    /* whole cluster compressed */
	QCOW2_SC_ZERO_PLAIN,    /* reads zero, no host cluster */
	QCOW2_SC_ZERO_ALLOC,    /* reads zero, host cluster preallocated */
	QCOW2_SC_UNALLOC_PLAIN, /* backing (or zero), no host cluster */
	QCOW2_SC_UNALLOC_ALLOC, /* backing (or zero), host cluster exists (extended L2) */
	QCOW2_SC_INVALID,
};

enum qcow2_sc_type qcow2_sc_type(bool extl2, uint64_t entry, uint64_t bitmap, uint32_t sc);
static inline bool qcow2_sc_type_is_zero(enum qcow2_sc_type t)
{
	return t == QCOW2_SC_ZERO_PLAIN || t == QCOW2_SC_ZERO_ALLOC;
}
static inline bool qcow2_sc_type_is_unalloc(enum qcow2_sc_type t)
{
	return t == QCOW2_SC_UNALLOC_PLAIN || t == QCOW2_SC_UNALLOC_ALLOC;
}
/* Host cluster referenced by a standard (non-compressed) entry, 0 if none. */
static inline uint64_t qcow2_entry_host(uint64_t entry)
{
	return (entry & QCOW2_OFLAG_COMPRESSED) ? 0 : (entry & L2E_OFFSET_MASK);
}

/* Compressed descriptor <-> (host offset, sectors). */
void qcow2_compressed_decode(const struct qcow2_state *s, uint64_t entry, uint64_t *coffset, uint64_t *csize,
			     uint64_t *range_start, uint64_t *range_len);
uint64_t qcow2_compressed_encode(const struct qcow2_state *s, uint64_t coffset, uint64_t clen);

/* Read entry / bitmap `idx` from a raw (big-endian) L2 table. */
static inline uint64_t qcow2_l2_entry(const struct qcow2_state *s, const uint8_t *l2, uint32_t idx)
{
	return ld_be64(l2 + (size_t)idx * s->l2_entry_size);
}
static inline uint64_t qcow2_l2_bitmap(const struct qcow2_state *s, const uint8_t *l2, uint32_t idx)
{
	return s->extl2 ? ld_be64(l2 + (size_t)idx * 16 + 8) : 0;
}
static inline void qcow2_l2_set(const struct qcow2_state *s, uint8_t *l2, uint32_t idx, uint64_t entry,
				uint64_t bitmap)
{
	st_be64(l2 + (size_t)idx * s->l2_entry_size, entry);
	if (s->extl2)
		st_be64(l2 + (size_t)idx * 16 + 8, bitmap);
}

/* ---- header parsing (pure; unit tested) ------------------------------------------ */

int qcow2_parse_header(const uint8_t *buf, size_t len, struct qcow2_header *h);
int qcow2_parse_extensions(const uint8_t *buf, size_t len, const struct qcow2_header *h, struct qcow2_ext_info *x);
void qcow2_ext_info_free(struct qcow2_ext_info *x);
/* Check fields against each other and the file size (names the field on error). */
int qcow2_validate_header(const struct qcow2_header *h, uint64_t file_size);
/* Serialise a complete header cluster (header, extensions, backing name); -errno if it does not fit. */
int qcow2_build_header(const struct qcow2_header *h, const struct qcow2_ext_info *x, const char *backing_file,
		       const char *backing_format, uint8_t *buf, size_t cluster_size);
/* Snapshot table parse/serialise (pure). */
int qcow2_parse_snapshots(const uint8_t *buf, size_t len, uint32_t nb, uint32_t version, uint32_t cluster_bits,
			  struct qcow2_snapshot **out, uint64_t *used);
size_t qcow2_snapshot_table_size(const struct qcow2_snapshot *sn, uint32_t nb);
void qcow2_serialize_snapshots(const struct qcow2_snapshot *sn, uint32_t nb, uint8_t *buf);
void qcow2_snapshots_free(struct qcow2_snapshot *sn, uint32_t nb);

/* ---- error helpers ------------------------------------------------------------------ */

/* Record corruption: message, corrupt bit on disk (v3, writable), bs->corrupt; returns -EIO. */
int qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Run fn(arg) in a coroutine (directly when already in one). */
int qcow2_run_co(int (*fn)(void *), void *arg);

/* ---- qcow2.c -------------------------------------------------------------------------- */

int qcow2_write_header(struct qcow2_state *s);           /* whole header cluster */
int qcow2_write_incompat(struct qcow2_state *s);         /* just the feature word, synced */
int qcow2_mark_dirty(struct qcow2_state *s);             /* lazy refcounts: before first metadata change */
int qcow2_mark_clean(struct qcow2_state *s);             /* flush everything, clear the dirty bit */
int qcow2_flush_metadata(struct qcow2_state *s);         /* write caches back, flush file, process discards; lock held */
int qcow2_file_flush(struct qcow2_state *s);
int qcow2_file_pread(struct qcow2_state *s, uint64_t off, void *buf, size_t len);
int qcow2_file_pwrite(struct qcow2_state *s, uint64_t off, const void *buf, size_t len);
/* Overlap check before writing host [off, off+len): -EIO and corrupt if it would hit metadata. */
enum {
	QCOW2_OL_HEADER = 1 << 0,
	QCOW2_OL_L1 = 1 << 1,
	QCOW2_OL_REFTABLE = 1 << 2,
	QCOW2_OL_REFBLOCK = 1 << 3,
	QCOW2_OL_L2 = 1 << 4,
	QCOW2_OL_SNAPSHOTS = 1 << 5,
	QCOW2_OL_SNAPSHOT_L1 = 1 << 6,
	QCOW2_OL_ALL = 0x7f,
};
int qcow2_overlap_check(struct qcow2_state *s, int ignore, uint64_t off, uint64_t len);

/* ---- cache.c ---------------------------------------------------------------------------- */

int qcow2_cache_init(struct qcow2_cache *c, const char *name, int limit, size_t table_size);
void qcow2_cache_destroy(struct qcow2_cache *c);
/* Get table at host offset (read it unless !read; then zero-filled).  locked: caller holds s->lock. */
int qcow2_cache_get(struct qcow2_state *s, struct qcow2_cache *c, uint64_t offset, uint8_t **table, bool read,
		    bool locked);
void qcow2_cache_put(struct qcow2_cache *c, uint8_t *table);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint8_t *table);
int qcow2_cache_flush(struct qcow2_state *s, struct qcow2_cache *c);
int qcow2_cache_set_dependency(struct qcow2_state *s, struct qcow2_cache *c, struct qcow2_cache *dep);
void qcow2_cache_depends_on_flush(struct qcow2_cache *c);
void qcow2_cache_discard(struct qcow2_cache *c, uint64_t offset);
bool qcow2_cache_contains(const struct qcow2_cache *c, uint64_t off, uint64_t len); /* overlap with cached tables */
void qcow2_cache_drop_all(struct qcow2_cache *c); /* forget clean and dirty tables (snapshot goto) */

/* ---- refcount.c --------------------------------------------------------------------------- */

int qcow2_refcount_init(struct qcow2_state *s); /* load the refcount table */
void qcow2_reftable_rescan(struct qcow2_state *s); /* recompute reftable_used after replacing the table */
int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster, uint64_t *rc);
/* Add (decrease=false) or subtract `addend` on every cluster touched by host [off, off+len). */
int qcow2_update_refcount(struct qcow2_state *s, uint64_t off, uint64_t len, uint64_t addend, bool decrease);
/* Allocate n contiguous clusters (refcount 1).  Returns host offset or -errno. */
int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n);
/* Bytes for a compressed cluster, packed after the previous one. */
int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t len);
/* Drop one reference on each cluster of a standard / compressed L2 entry. */
int qcow2_free_entry_cluster(struct qcow2_state *s, uint64_t entry);
int qcow2_free_clusters(struct qcow2_state *s, uint64_t off, uint64_t len);
void qcow2_queue_discard(struct qcow2_state *s, uint64_t off, uint64_t len);
void qcow2_unqueue_discard(struct qcow2_state *s, uint64_t off, uint64_t len);
int qcow2_process_discards(struct qcow2_state *s);
void qcow2_free_discards(struct qcow2_state *s);
/* Is host cluster busy with unlocked I/O? */
bool qcow2_host_io_busy(struct qcow2_state *s, uint64_t off, uint64_t len);
void qcow2_host_io_begin(struct qcow2_state *s, struct qcow2_host_io *io, uint64_t off, uint64_t len);
void qcow2_host_io_end(struct qcow2_state *s, struct qcow2_host_io *io);
/*
 * The file node cannot be written past its end: grow it (geometrically, in
 * advance) so that [0, end) exists.  Lock held.
 */
int qcow2_ensure_file(struct qcow2_state *s, uint64_t end);
/* Number of refcount-table entries needed to cover `clusters` clusters. */
uint64_t qcow2_reftable_entries_for(const struct qcow2_state *s, uint64_t clusters);

/* ---- cluster.c ------------------------------------------------------------------------------ */

/* L2 table for reading (NULL table when the L1 entry is empty).  Caller puts it. */
int qcow2_get_l2_read(struct qcow2_state *s, uint64_t guest_off, uint8_t **l2, bool locked);
/* L2 table for modification (allocated / copied on write as needed).  Lock held. */
int qcow2_get_l2_write(struct qcow2_state *s, uint64_t guest_off, uint8_t **l2);
/* Grow the active L1 table to at least min_size entries.  Lock held. */
int qcow2_grow_l1(struct qcow2_state *s, uint64_t min_size);
int qcow2_write_l1_entry(struct qcow2_state *s, uint64_t index);
/* L2 dependencies after a change in the L2 cache referencing newly allocated clusters. */
int qcow2_l2_after_alloc(struct qcow2_state *s);
/* Refcount decrements after L2 changes that dropped references. */
int qcow2_rc_after_unref(struct qcow2_state *s);

/* ---- io.c ------------------------------------------------------------------------------------- */

int qcow2_co_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags);
int qcow2_co_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags);
int qcow2_co_pwritev_ordered(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff,
			     int flags, struct vd_write_order *ord);
int qcow2_co_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags);
int qcow2_co_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len);
/* Drop every active cluster (full discard: unallocated, not zero); snapshots keep theirs. */
int qcow2_co_make_empty(struct vd_bnode *bs);
int qcow2_co_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			  struct vd_bnode **file);
/* Internal read of guest range (for COW): reads through backing / zero / compressed. */
int qcow2_read_guest(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff);
/* Guest write without compression/FUA handling (in place or allocating).  Lock not held. */
int qcow2_do_pwritev(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff, int flags,
		     struct vd_write_order *ord);
/*
 * Zero / discard guest clusters [off, off+len): zero needs (sub)cluster alignment, discard whole
 * clusters (the last one may end the image).  Lock held by the caller.  Zero returns -ENOTSUP
 * for a partial range of a compressed cluster (nothing changed then).
 */
int qcow2_zero_clusters(struct qcow2_state *s, uint64_t off, uint64_t len, bool unmap);
int qcow2_discard_clusters(struct qcow2_state *s, uint64_t off, uint64_t len, bool full_discard);
/* Wait until no in-flight allocation touches guest clusters [c0, c1); true if it had to wait.  Lock held. */
bool qcow2_wait_inflight(struct qcow2_state *s, uint64_t c0, uint64_t c1);

/* ---- compress.c -------------------------------------------------------------------------------- */

/* Returns compressed length (< dst_cap) or -ENOSPC if it would not be smaller, other -errno on error. */
long qcow2_compress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_cap);
/* Decompress into exactly dst_len bytes. */
int qcow2_decompress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_len);
int qcow2_read_compressed(struct qcow2_state *s, uint64_t entry, uint8_t *cluster_buf);
int qcow2_co_pwrite_compressed(struct qcow2_state *s, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qoff);

/* ---- snapshot.c ---------------------------------------------------------------------------------- */

int qcow2_read_snapshots(struct qcow2_state *s);
int qcow2_write_snapshots(struct qcow2_state *s, struct qcow2_snapshot *sn, uint32_t nb);
/* Add `addend` (+1/-1/0) to everything an L1 table references; recompute COPIED flags. */
int qcow2_update_l1_refcounts(struct qcow2_state *s, uint64_t *l1, uint32_t l1_size, int addend, bool active);
int qcow2_snapshot_create(struct vd_bnode *bs, const char *name);
int qcow2_snapshot_list(struct vd_bnode *bs, struct vd_snapshot_info **list, int *count);
int qcow2_snapshot_goto(struct vd_bnode *bs, const char *name_or_id);
int qcow2_snapshot_delete(struct vd_bnode *bs, const char *name_or_id);

/* ---- check.c ------------------------------------------------------------------------------------- */

int qcow2_co_check(struct vd_bnode *bs, struct vd_check_result *res, int fix);
int qcow2_check_locked(struct qcow2_state *s, struct vd_check_result *res, int fix);

/* ---- create.c ------------------------------------------------------------------------------------ */

int qcow2_create(const struct vd_create_opts *o);
int qcow2_co_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc);
/* Preallocate guest [start, end): "metadata", "falloc" or "full".  Lock held. */
int qcow2_preallocate(struct qcow2_state *s, uint64_t start, uint64_t end, const char *mode);

#endif
