/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Memory regions: memfd-backed buffers that every driver accepts, and the
 * table of regions mapped into the driver (io_uring registers them as fixed
 * buffers; vhost-user style drivers share them with their backend).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vd-internal.h"

VD_EXPORT int vdisk_alloc_mem_region(struct vdisk *v, struct vdisk_mem_region *region, size_t len)
{
	size_t align;
	void *addr;
	int fd;

	vd_error_clear();
	if (!v || !region)
		return vd_error(EINVAL, "vdisk_alloc_mem_region: instance and region must not be NULL");
	if (v->state == VD_CREATED)
		return vd_error(EBUSY, "vdisk_alloc_mem_region: instance must be connected");
	if (len == 0)
		return vd_error(EINVAL, "vdisk_alloc_mem_region: length must be > 0");
	align = (size_t)v->mem_region_alignment;
	if (len > SIZE_MAX - align)
		return vd_error(EINVAL, "vdisk_alloc_mem_region: length %zu too large", len);
	len = (len + align - 1) / align * align;
	fd = memfd_create("vdisk-mem-region", MFD_CLOEXEC);
	if (fd < 0)
		return vd_error(errno, "vdisk_alloc_mem_region: memfd_create: %s", strerror(errno));
	if (ftruncate(fd, (off_t)len) < 0) {
		int err = errno;

		close(fd);
		return vd_error(err, "vdisk_alloc_mem_region: ftruncate(%zu): %s", len, strerror(err));
	}
	/* mmap returns page-aligned memory, which satisfies any buf-alignment <= page size. */
	addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (addr == MAP_FAILED) {
		int err = errno;

		close(fd);
		return vd_error(err, "vdisk_alloc_mem_region: mmap(%zu): %s", len, strerror(err));
	}
	region->addr = addr;
	region->len = len;
	region->fd = fd;
	region->fd_offset = 0;
	return 0;
}

static int find_slot(struct vdisk *v, const struct vdisk_mem_region *region)
{
	for (int i = 0; i < v->n_regions_alloc; i++)
		if (v->regions[i].used && v->regions[i].r.addr == region->addr && v->regions[i].r.len == region->len)
			return i;
	return -1;
}

VD_EXPORT void vdisk_free_mem_region(struct vdisk *v, struct vdisk_mem_region *region)
{
	if (!region || !region->addr)
		return;
	if (v && find_slot(v, region) >= 0)
		vdisk_unmap_mem_region(v, region);
	munmap(region->addr, region->len);
	if (region->fd >= 0)
		close(region->fd);
	memset(region, 0, sizeof(*region));
	region->fd = -1;
}

int vd_mem_region_lookup(struct vdisk *v, const void *addr, size_t len)
{
	uintptr_t a = (uintptr_t)addr;

	for (int i = 0; i < v->n_regions_alloc; i++) {
		const struct vd_mapped_region *m = &v->regions[i];
		uintptr_t start = (uintptr_t)m->r.addr;

		if (m->used && a >= start && a - start <= m->r.len && len <= m->r.len - (a - start))
			return i;
	}
	return -1;
}

static bool overlaps_mapped(struct vdisk *v, const struct vdisk_mem_region *r)
{
	uintptr_t s = (uintptr_t)r->addr, e = s + r->len;

	for (int i = 0; i < v->n_regions_alloc; i++) {
		const struct vd_mapped_region *m = &v->regions[i];
		uintptr_t ms = (uintptr_t)m->r.addr, me = ms + m->r.len;

		if (m->used && s < me && ms < e)
			return true;
	}
	return false;
}

/*
 * The slot table is allocated once, at its final size, so that queue threads
 * reading it (vd_mem_region_lookup) never see it move.
 */
#define MAX_REGION_SLOTS 4096

static int free_slot(struct vdisk *v)
{
	if (!v->regions) {
		uint64_t n = v->max_mem_regions < MAX_REGION_SLOTS ? v->max_mem_regions : MAX_REGION_SLOTS;

		if (n == 0)
			return vd_error(ENOTSUP, "vdisk_map_mem_region: driver '%s' takes no memory regions", v->drv->name);
		v->regions = calloc(n, sizeof(*v->regions));
		if (!v->regions)
			return vd_error(ENOMEM, "vdisk_map_mem_region: out of memory");
		v->n_regions_alloc = (int)n;
	}
	for (int i = 0; i < v->n_regions_alloc; i++)
		if (!v->regions[i].used)
			return i;
	return vd_error(ENOSPC, "vdisk_map_mem_region: all %d memory region slots (max-mem-regions) are in use",
			v->n_regions_alloc);
}

VD_EXPORT int vdisk_map_mem_region(struct vdisk *v, const struct vdisk_mem_region *region)
{
	uint64_t align;
	int slot, ret;

	vd_error_clear();
	if (!v || !region || !region->addr || region->len == 0)
		return vd_error(EINVAL, "vdisk_map_mem_region: instance and a non-empty region are required");
	if (v->state == VD_CREATED)
		return vd_error(EBUSY, "vdisk_map_mem_region: instance must be connected");
	align = v->mem_region_alignment;
	if (((uintptr_t)region->addr | region->len) & (align - 1))
		return vd_error(EINVAL, "vdisk_map_mem_region: address and length must be multiples of mem-region-alignment (%llu)",
				(unsigned long long)align);
	if (overlaps_mapped(v, region))
		return vd_error(EINVAL, "vdisk_map_mem_region: region overlaps a mapped region");
	slot = free_slot(v);
	if (slot < 0)
		return slot;
	if (v->drv->map_mem_region) {
		ret = v->drv->map_mem_region(v, region, slot);
		if (ret < 0)
			return ret;
	}
	v->regions[slot].used = true;
	v->regions[slot].r = *region;
	return 0;
}

VD_EXPORT void vdisk_unmap_mem_region(struct vdisk *v, const struct vdisk_mem_region *region)
{
	int slot;

	if (!v || !region)
		return;
	slot = find_slot(v, region);
	if (slot < 0)
		return;
	if (v->drv->unmap_mem_region)
		v->drv->unmap_mem_region(v, &v->regions[slot].r, slot);
	v->regions[slot].used = false;
}
