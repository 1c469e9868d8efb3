/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Block layer internals shared by the block layer sources (not by formats). */
#ifndef VD_BLOCK_INT_H
#define VD_BLOCK_INT_H

#include "block.h"
#include "coroutine.h"
#include "lib/vd-internal.h" /* vd_error(): the thread's error message, as libvdisk sets it */
#include "loop.h"

extern const struct vd_format vd_format_file;
extern const struct vd_format vd_format_raw;

/*
 * Re-raise the current thread error message with a prefix ("file 'a.img': "),
 * keeping the original text.  Returns -err.
 */
int vd_error_prefix(int err, const char *fmt, ...) VD_PRINTF(2, 3);

static inline uint64_t vd_align_down(uint64_t x, uint64_t align)
{
	return x - x % align;
}

static inline uint64_t vd_align_up(uint64_t x, uint64_t align)
{
	return vd_align_down(x + align - 1, align);
}

#endif
