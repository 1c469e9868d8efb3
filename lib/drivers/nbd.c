/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nbd: placeholder until the driver lands. */
#include "../vd-internal.h"

static int c(struct vdisk *v) { return vd_error(ENOTSUP, "vdisk_connect: nbd: not implemented yet"); }
static int s(struct vdiskq *q, struct vd_request *r) { return -ENOTSUP; }
static int rp(struct vdiskq *q, bool w, const struct timespec *dl) { return 0; }

const struct vd_driver vd_driver_nbd = {
	.name = "nbd", .connect = c, .submit = s, .reap = rp,
};
