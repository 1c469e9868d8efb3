/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * null: a device of `size` bytes that stores nothing.  Reads return zeroes
 * (unless read-zeroes=false, which leaves buffers untouched as fio's null
 * engine does), writes are dropped.  For measuring the library's overhead.
 */
#include <stddef.h>
#include <string.h>

#include "../vd-internal.h"

struct null_state {
	uint64_t size;
	bool read_zeroes;
};

static const struct vd_prop null_props[] = {
	{ .name = "size", .type = VD_PROP_UINT64, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct null_state, size) },
	{ .name = "read-zeroes", .type = VD_PROP_BOOL, .read_states = VD_ANY_STATE, .write_states = VD_CREATED,
	  .in_driver = true, .offset = offsetof(struct null_state, read_zeroes) },
	{ .name = NULL },
};

static int null_init(struct vdisk *v)
{
	struct null_state *s = vd_priv(v);

	s->read_zeroes = true;
	return 0;
}

static int null_connect(struct vdisk *v)
{
	struct null_state *s = vd_priv(v);

	if (s->size == 0)
		return vd_error(EINVAL, "vdisk_connect: null driver: property 'size' must be set (> 0)");
	v->capacity = s->size;
	v->max_queues = 256;
	v->can_poll = true;
	v->optimal_io_size = 4096;
	v->optimal_io_alignment = 4096;
	return 0;
}

static int null_submit(struct vdiskq *q, struct vd_request *r)
{
	struct null_state *s = vd_priv(q->v);

	if (r->op == VD_OP_READ && s->read_zeroes)
		for (int i = 0; i < r->iovcnt; i++)
			memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
	vd_req_complete(q, r, 0);
	return 0;
}

static int null_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	(void)q;
	(void)wait;
	(void)deadline;
	return 0; /* everything completed at submit */
}

const struct vd_driver vd_driver_null = {
	.name = "null",
	.priv_size = sizeof(struct null_state),
	.props = null_props,
	.init = null_init,
	.connect = null_connect,
	.submit = null_submit,
	.reap = null_reap,
};
