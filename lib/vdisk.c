/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Instance lifecycle: create, connect, start, destroy; the driver table. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vd-internal.h"

static const struct vd_driver *const drivers[] = {
	&vd_driver_io_uring, &vd_driver_linux_aio, &vd_driver_posix_aio,
	&vd_driver_threads,  &vd_driver_sync,      &vd_driver_null,
	&vd_driver_nbd,      &vd_driver_virtio_blk_vhost_user,
};
#define N_DRIVERS (sizeof(drivers) / sizeof(drivers[0]))

VD_EXPORT const char *const *vdisk_list_drivers(void)
{
	static const char *names[N_DRIVERS + 1];

	if (!names[0])
		for (size_t i = 0; i < N_DRIVERS; i++)
			names[i] = drivers[i]->name;
	return names;
}

static const struct vd_driver *find_driver(const char *name)
{
	for (size_t i = 0; i < N_DRIVERS; i++)
		if (strcmp(drivers[i]->name, name) == 0)
			return drivers[i];
	return NULL;
}

VD_EXPORT int vdisk_create(const char *driver, struct vdisk **out)
{
	const struct vd_driver *drv;
	struct vdisk *v;
	int ret;

	vd_error_clear();
	if (!out)
		return vd_error(EINVAL, "vdisk_create: out must not be NULL");
	*out = NULL;
	if (!driver)
		return vd_error(EINVAL, "vdisk_create: driver name must not be NULL");
	drv = find_driver(driver);
	if (!drv)
		return vd_error(ENOENT, "vdisk_create: unknown driver '%s'", driver);

	v = calloc(1, sizeof(*v));
	if (!v)
		return vd_error(ENOMEM, "vdisk_create: out of memory");
	v->drv = drv;
	v->state = VD_CREATED;
	v->fd = -1;
	v->dev_fd = -1;
	v->num_queues = 1;
	v->queue_size = 128;
	v->max_queues = 1;
	v->request_alignment = 1;
	v->buf_alignment = 1;
	v->optimal_io_alignment = 1;
	v->optimal_buf_alignment = 1;
	v->max_segments = 1024; /* IOV_MAX */
	v->max_mem_regions = 1024;
	v->mem_region_alignment = (uint64_t)sysconf(_SC_PAGESIZE);
	if (drv->priv_size) {
		v->priv = calloc(1, drv->priv_size);
		if (!v->priv) {
			free(v);
			return vd_error(ENOMEM, "vdisk_create: out of memory");
		}
	}
	if (drv->init) {
		ret = drv->init(v);
		if (ret < 0) {
			free(v->priv);
			free(v);
			return ret;
		}
	}
	*out = v;
	return 0;
}

VD_EXPORT int vdisk_connect(struct vdisk *v)
{
	int ret;

	vd_error_clear();
	if (!v)
		return vd_error(EINVAL, "vdisk_connect: instance is NULL");
	if (v->state != VD_CREATED)
		return vd_error(EINVAL, "vdisk_connect: already connected");
	ret = v->drv->connect(v);
	if (ret < 0)
		return ret;
	if (v->max_queues < 1)
		v->max_queues = 1;
	if (v->num_queues > v->max_queues)
		v->num_queues = v->max_queues;
	v->state = VD_CONNECTED;
	return 0;
}

static void free_queues(struct vdisk *v)
{
	for (int i = 0; v->queues && i < v->num_queues; i++)
		if (v->queues[i])
			vd_queue_free(v->queues[i]);
	for (int i = 0; v->poll_queues && i < v->num_poll_queues; i++)
		if (v->poll_queues[i])
			vd_queue_free(v->poll_queues[i]);
	free(v->queues);
	free(v->poll_queues);
	v->queues = NULL;
	v->poll_queues = NULL;
}

static int build_queues(struct vdisk *v)
{
	v->queues = calloc((size_t)v->num_queues + 1, sizeof(*v->queues));
	v->poll_queues = calloc((size_t)v->num_poll_queues + 1, sizeof(*v->poll_queues));
	if (!v->queues || !v->poll_queues)
		return vd_error(ENOMEM, "vdisk_start: out of memory");
	for (int i = 0; i < v->num_queues; i++) {
		v->queues[i] = vd_queue_new(v, i, false);
		if (!v->queues[i])
			return -errno;
	}
	for (int i = 0; i < v->num_poll_queues; i++) {
		v->poll_queues[i] = vd_queue_new(v, i, true);
		if (!v->poll_queues[i])
			return -errno;
	}
	return 0;
}

VD_EXPORT int vdisk_start(struct vdisk *v)
{
	int ret;

	vd_error_clear();
	if (!v)
		return vd_error(EINVAL, "vdisk_start: instance is NULL");
	if (v->state != VD_CONNECTED)
		return vd_error(EINVAL, "vdisk_start: instance must be connected and not started");
	if (v->num_queues + v->num_poll_queues < 1)
		return vd_error(EINVAL, "vdisk_start: num-queues + num-poll-queues must be at least 1");
	if (v->num_queues + v->num_poll_queues > v->max_queues)
		return vd_error(EINVAL, "vdisk_start: num-queues + num-poll-queues (%d) exceeds max-queues (%d)",
				v->num_queues + v->num_poll_queues, v->max_queues);
	if (v->num_poll_queues > 0 && !v->can_poll)
		return vd_error(ENOTSUP, "vdisk_start: driver '%s' cannot poll this device (num-poll-queues must be 0)",
				v->drv->name);
	if (v->drv->start) {
		ret = v->drv->start(v);
		if (ret < 0)
			return ret;
	}
	ret = build_queues(v);
	if (ret < 0) {
		char msg[512];

		snprintf(msg, sizeof(msg), "%s", vdisk_get_error_msg());
		free_queues(v);
		vd_error(-ret, "%s", msg);
		return ret;
	}
	v->state = VD_STARTED;
	return 0;
}

VD_EXPORT void vdisk_destroy(struct vdisk **vp)
{
	struct vdisk *v;

	if (!vp || !*vp)
		return;
	v = *vp;
	free_queues(v);
	if (v->regions) {
		for (int i = 0; i < v->n_regions_alloc; i++)
			if (v->regions[i].used && v->drv->unmap_mem_region && v->state != VD_CREATED)
				v->drv->unmap_mem_region(v, &v->regions[i].r, i);
		free(v->regions);
	}
	if (v->drv->destroy && v->state != VD_CREATED)
		v->drv->destroy(v);
	/* Driver string properties are owned here (a driver may free and NULL them first). */
	for (const struct vd_prop *p = v->drv->props; p && p->name; p++)
		if (p->type == VD_PROP_STR && p->in_driver && v->priv)
			free(*(char **)((char *)v->priv + p->offset));
	free(v->path);
	free(v->prop_names);
	free(v->priv);
	free(v);
	*vp = NULL;
}

VD_EXPORT int vdisk_refresh_capacity(struct vdisk *v)
{
	static const char who[] = "vdisk_refresh_capacity";
	uint64_t size;
	int ret;

	if (!v || (v->state != VD_CONNECTED && v->state != VD_STARTED))
		return vd_error(EINVAL, "%s: the instance is not connected", who);
	if (v->dev_fd < 0)
		return vd_error(ENOTSUP, "%s: driver '%s' has no local file whose size could change", who,
				v->drv->name);
	ret = vd_file_size(v, who, &size);
	if (ret < 0)
		return ret;
	if (size < v->capacity)
		return vd_error(EINVAL, "%s: the size shrank from %" PRIu64 " to %" PRIu64 " bytes (requests in flight "
				"may be past the new end: start a new instance)", who, v->capacity, size);
	/* Queue threads read capacity when they validate a request. */
	__atomic_store_n(&v->capacity, size, __ATOMIC_RELEASE);
	return 0;
}

VD_EXPORT struct vdiskq *vdisk_get_queue(struct vdisk *v, int index)
{
	if (!v || v->state != VD_STARTED || index < 0 || index >= v->num_queues) {
		vd_error(EINVAL, "vdisk_get_queue: no queue %d (started: %s)", index,
			 v && v->state == VD_STARTED ? "yes" : "no");
		return NULL;
	}
	return v->queues[index];
}

VD_EXPORT struct vdiskq *vdisk_get_poll_queue(struct vdisk *v, int index)
{
	if (!v || v->state != VD_STARTED || index < 0 || index >= v->num_poll_queues) {
		vd_error(EINVAL, "vdisk_get_poll_queue: no poll queue %d (started: %s)", index,
			 v && v->state == VD_STARTED ? "yes" : "no");
		return NULL;
	}
	return v->poll_queues[index];
}
