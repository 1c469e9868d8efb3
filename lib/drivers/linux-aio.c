/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* linux-aio: placeholder until the driver lands (behaves like sync). */
#include "../vd-internal.h"

static int c(struct vdisk *v) { return vd_file_connect(v, "vdisk_connect: linux-aio"); }
static void d(struct vdisk *v) { vd_file_close(v); }
static int s(struct vdiskq *q, struct vd_request *r) { vd_req_complete(q, r, vd_file_execute(q->v, r)); return 0; }
static int rp(struct vdiskq *q, bool w, const struct timespec *dl) { return 0; }

const struct vd_driver vd_driver_linux_aio = {
	.name = "linux-aio", .connect = c, .destroy = d, .submit = s, .reap = rp,
};
