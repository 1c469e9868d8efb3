/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * sync: plain preadv2/pwritev2/fdatasync/fallocate in the caller's thread,
 * during vdiskq_do_io().  The baseline every other driver is measured against.
 */
#include "../vd-internal.h"

static int sync_connect(struct vdisk *v)
{
	int ret = vd_file_connect(v, "vdisk_connect: sync");

	v->can_poll = true; /* completion is synchronous, so "polling" is trivially supported */
	return ret;
}

static void sync_destroy(struct vdisk *v)
{
	vd_file_close(v);
}

static int sync_submit(struct vdiskq *q, struct vd_request *r)
{
	int ret = vd_file_execute(q->v, r);

	vd_req_complete(q, r, ret);
	return 0;
}

static int sync_reap(struct vdiskq *q, bool wait, const struct timespec *deadline)
{
	(void)q;
	(void)wait;
	(void)deadline;
	return 0; /* everything completed at submit */
}

const struct vd_driver vd_driver_sync = {
	.name = "sync",
	.connect = sync_connect,
	.destroy = sync_destroy,
	.submit = sync_submit,
	.reap = sync_reap,
};
