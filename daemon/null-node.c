/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * "null-co": a protocol node that stores nothing (QEMU's null-co), for
 * measuring the daemon and its exports without storage underneath.
 * Options: size (default 1G), read-zeroes (default on: reads fill the
 * buffer with zeroes; off skips even that, and reads return whatever the
 * buffer held), latency-ns (delay every request).
 *
 * It belongs in block/formats/ eventually; the daemon registers it with
 * vd_format_register() until then.
 */
#include <errno.h>
#include <string.h>

#include "daemon.h"
#include "lib/vd-internal.h"

struct null_state {
	bool read_zeroes;
	uint64_t latency_ns;
};

static int null_open(struct vd_bnode *bs, json_t *opts, int flags)
{
	struct null_state *s = bs->opaque;
	int ret = vd_opt_u64(opts, "size", 1ull << 30, &bs->size);

	(void)flags;
	if (ret == 0)
		ret = vd_opt_bool(opts, "read-zeroes", true, &s->read_zeroes);
	if (ret == 0)
		ret = vd_opt_u64(opts, "latency-ns", 0, &s->latency_ns);
	return ret;
}

static void delay(struct vd_bnode *bs)
{
	struct null_state *s = bs->opaque;

	if (s->latency_ns)
		vdd_co_sleep_ns(s->latency_ns);
}

static int null_preadv(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
		       int flags)
{
	struct null_state *s = bs->opaque;

	(void)off;
	(void)flags;
	delay(bs);
	if (s->read_zeroes)
		vd_qiov_memset(qiov, qiov_off, 0, len);
	return 0;
}

static int null_pwritev(struct vd_bnode *bs, uint64_t off, uint64_t len, struct vd_qiov *qiov, size_t qiov_off,
			int flags)
{
	(void)off, (void)len, (void)qiov, (void)qiov_off, (void)flags;
	delay(bs);
	return 0;
}

static int null_pwrite_zeroes(struct vd_bnode *bs, uint64_t off, uint64_t len, int flags)
{
	(void)off, (void)len, (void)flags;
	delay(bs);
	return 0;
}

static int null_pdiscard(struct vd_bnode *bs, uint64_t off, uint64_t len)
{
	(void)off, (void)len;
	delay(bs);
	return 0;
}

static int null_flush(struct vd_bnode *bs)
{
	delay(bs);
	return 0;
}

static int null_block_status(struct vd_bnode *bs, uint64_t off, uint64_t len, uint64_t *pnum, uint64_t *map,
			     struct vd_bnode **file)
{
	struct null_state *s = bs->opaque;

	*pnum = len;
	*map = off;
	*file = bs;
	return VD_BS_OFFSET_VALID | (s->read_zeroes ? VD_BS_ZERO : VD_BS_DATA);
}

static int null_truncate(struct vd_bnode *bs, uint64_t size, bool exact, const char *prealloc)
{
	(void)exact, (void)prealloc;
	vd_bnode_set_size(bs, size);
	return 0;
}

static const char *const null_options[] = { "size", "read-zeroes", "latency-ns", NULL };

const struct vd_format vdd_format_null = {
	.name = "null-co",
	.state_size = sizeof(struct null_state),
	.options = null_options,
	.is_protocol = true,
	.multiqueue = true, /* stateless; the sleep timer is per thread */
	.supports_fua = true,
	.open = null_open,
	.co_preadv = null_preadv,
	.co_pwritev = null_pwritev,
	.co_pwrite_zeroes = null_pwrite_zeroes,
	.co_pdiscard = null_pdiscard,
	.co_flush = null_flush,
	.co_block_status = null_block_status,
	.co_truncate = null_truncate,
};

int vdd_formats_register(char **errp)
{
	if (vd_format_register(&vdd_format_null) < 0 || vd_format_register(&vdd_format_node_ref) < 0)
		return vdd_error(errp, "%s", vdisk_get_error_msg());
	return 0;
}
