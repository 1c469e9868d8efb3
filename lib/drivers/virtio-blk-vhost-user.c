/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* virtio-blk-vhost-user: placeholder until the driver lands. */
#include "../vd-internal.h"

static int c(struct vdisk *v) { return vd_error(ENOTSUP, "vdisk_connect: virtio-blk-vhost-user: not implemented yet"); }
static int s(struct vdiskq *q, struct vd_request *r) { return -ENOTSUP; }
static int rp(struct vdiskq *q, bool w, const struct timespec *dl) { return 0; }

const struct vd_driver vd_driver_virtio_blk_vhost_user = {
	.name = "virtio-blk-vhost-user", .connect = c, .submit = s, .reap = rp,
};
