/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Typed properties.  Each property names a field of struct vdisk (or of the
 * driver's private state), its type, and the states in which it may be read
 * and written.  Every failure names the property and the rule it broke.
 */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vd-internal.h"

#define CORE(n, t, rd, wr, field, lo, hi, chk)                                                 \
	{ .name = n, .type = t, .read_states = rd, .write_states = wr, .in_driver = false,     \
	  .offset = offsetof(struct vdisk, field), .min = lo, .max = hi, .check = chk }

static int check_num_queues(struct vdisk *v, const struct vd_prop *p, uint64_t value)
{
	if ((int64_t)value > v->max_queues)
		return vd_error(EINVAL, "vdisk_set_int: property '%s' must be at most max-queues (%d), got %" PRId64, p->name,
				v->max_queues, (int64_t)value);
	return 0;
}

static int check_poll_queues(struct vdisk *v, const struct vd_prop *p, uint64_t value)
{
	if (value > 0 && !v->can_poll)
		return vd_error(ENOTSUP, "vdisk_set_int: property '%s': driver '%s' cannot poll this device; only 0 is allowed",
				p->name, v->drv->name);
	return check_num_queues(v, p, value);
}

static const struct vd_prop core_props[] = {
	CORE("path", VD_PROP_STR, VD_ANY_STATE, VD_CREATED, path, 0, 0, NULL),
	CORE("fd", VD_PROP_INT, VD_ANY_STATE, VD_CREATED, fd, -1, INT_MAX, NULL),
	CORE("read-only", VD_PROP_BOOL, VD_ANY_STATE, VD_CREATED, read_only, 0, 0, NULL),
	CORE("direct", VD_PROP_BOOL, VD_ANY_STATE, VD_CREATED, direct, 0, 0, NULL),
	CORE("capacity", VD_PROP_UINT64, VD_CONNECTED | VD_STARTED, VD_NEVER, capacity, 0, 0, NULL),
	CORE("request-alignment", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, request_alignment, 0, 0, NULL),
	CORE("buf-alignment", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, buf_alignment, 0, 0, NULL),
	CORE("optimal-io-alignment", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, optimal_io_alignment, 0, 0, NULL),
	CORE("optimal-io-size", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, optimal_io_size, 0, 0, NULL),
	CORE("optimal-buf-alignment", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, optimal_buf_alignment, 0, 0, NULL),
	CORE("max-transfer", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, max_transfer, 0, 0, NULL),
	CORE("max-segments", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, max_segments, 0, 0, NULL),
	CORE("max-queues", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_NEVER, max_queues, 0, 0, NULL),
	CORE("max-mem-regions", VD_PROP_UINT64, VD_CONNECTED | VD_STARTED, VD_NEVER, max_mem_regions, 0, 0, NULL),
	CORE("needs-mem-regions", VD_PROP_BOOL, VD_CONNECTED | VD_STARTED, VD_NEVER, needs_mem_regions, 0, 0, NULL),
	CORE("mem-region-alignment", VD_PROP_UINT64, VD_CONNECTED | VD_STARTED, VD_NEVER, mem_region_alignment, 0, 0, NULL),
	CORE("num-queues", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_CONNECTED, num_queues, 0, 4096, check_num_queues),
	CORE("num-poll-queues", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_CONNECTED, num_poll_queues, 0, 4096, check_poll_queues),
	CORE("queue-size", VD_PROP_INT, VD_CONNECTED | VD_STARTED, VD_CONNECTED, queue_size, 1, 65536, NULL),
	{ .name = NULL },
};

static const char *type_name(enum vd_prop_type t)
{
	switch (t) {
	case VD_PROP_BOOL: return "bool";
	case VD_PROP_INT: return "int";
	case VD_PROP_UINT64: return "uint64";
	case VD_PROP_STR: return "str";
	}
	return "?";
}

static const char *state_name(enum vd_state s)
{
	switch (s) {
	case VD_CREATED: return "created";
	case VD_CONNECTED: return "connected";
	case VD_STARTED: return "started";
	}
	return "?";
}

static void states_text(unsigned mask, char *buf, size_t size)
{
	buf[0] = '\0';
	if (mask == 0) {
		snprintf(buf, size, "never");
		return;
	}
	for (unsigned s = VD_CREATED; s <= VD_STARTED; s <<= 1) {
		if (!(mask & s))
			continue;
		if (buf[0])
			strncat(buf, "/", size - strlen(buf) - 1);
		strncat(buf, state_name((enum vd_state)s), size - strlen(buf) - 1);
	}
}

static const struct vd_prop *find_prop(struct vdisk *v, const char *name)
{
	/* "driver" is virtual: handled by the accessors. */
	for (const struct vd_prop *p = core_props; p->name; p++)
		if (strcmp(p->name, name) == 0)
			return p;
	for (const struct vd_prop *p = v->drv->props; p && p->name; p++)
		if (strcmp(p->name, name) == 0)
			return p;
	return NULL;
}

static void *field(struct vdisk *v, const struct vd_prop *p)
{
	return (char *)(p->in_driver ? v->priv : (void *)v) + p->offset;
}

/* Look up and check name, type and state; returns the property or NULL (error set). */
static const struct vd_prop *access_prop(struct vdisk *v, const char *func, const char *name,
					 enum vd_prop_type type, bool write, int *err)
{
	const struct vd_prop *p;
	unsigned states;
	char allowed[64];

	vd_error_clear();
	if (!v || !name) {
		*err = vd_error(EINVAL, "%s: instance and name must not be NULL", func);
		return NULL;
	}
	if (strcmp(name, "driver") == 0) {
		/* Virtual: only vdisk_get_str/vdisk_set_str handle it. */
		if (write)
			*err = vd_error(EACCES, "%s: property 'driver' is read-only", func);
		else
			*err = vd_error(ENOTTY, "%s: property 'driver' is of type str, not %s", func, type_name(type));
		return NULL;
	}
	p = find_prop(v, name);
	if (!p) {
		*err = vd_error(ENOENT, "%s: unknown property '%s' for driver '%s'", func, name, v->drv->name);
		return NULL;
	}
	if (p->type != type) {
		*err = vd_error(ENOTTY, "%s: property '%s' is of type %s, not %s", func, name,
				type_name(p->type), type_name(type));
		return NULL;
	}
	states = write ? p->write_states : p->read_states;
	if (write && states == VD_NEVER) {
		*err = vd_error(EACCES, "%s: property '%s' is read-only", func, name);
		return NULL;
	}
	if (!(states & v->state)) {
		states_text(states, allowed, sizeof(allowed));
		*err = vd_error(EBUSY, "%s: property '%s' may be %s only when %s (instance is %s)", func, name,
				write ? "set" : "read", allowed, state_name(v->state));
		return NULL;
	}
	return p;
}

static int check_range(struct vdisk *v, const char *func, const struct vd_prop *p, int64_t value)
{
	if (p->min != p->max && (value < p->min || value > p->max))
		return vd_error(EINVAL, "%s: property '%s' must be in [%" PRId64 ", %" PRId64 "], got %" PRId64, func,
				p->name, p->min, p->max, value);
	if (p->check)
		return p->check(v, p, (uint64_t)value);
	return 0;
}

VD_EXPORT int vdisk_get_bool(struct vdisk *v, const char *name, bool *value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_get_bool", name, VD_PROP_BOOL, false, &err);

	if (!p)
		return err;
	*value = *(bool *)field(v, p);
	return 0;
}

VD_EXPORT int vdisk_get_int(struct vdisk *v, const char *name, int *value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_get_int", name, VD_PROP_INT, false, &err);

	if (!p)
		return err;
	*value = *(int *)field(v, p);
	return 0;
}

VD_EXPORT int vdisk_get_uint64(struct vdisk *v, const char *name, uint64_t *value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_get_uint64", name, VD_PROP_UINT64, false, &err);

	if (!p)
		return err;
	*value = *(uint64_t *)field(v, p);
	return 0;
}

VD_EXPORT int vdisk_get_str(struct vdisk *v, const char *name, char **value)
{
	const struct vd_prop *p;
	const char *s;
	int err = 0;

	if (v && name && strcmp(name, "driver") == 0) {
		s = v->drv->name;
	} else {
		p = access_prop(v, "vdisk_get_str", name, VD_PROP_STR, false, &err);
		if (!p)
			return err;
		s = *(char **)field(v, p);
	}
	*value = strdup(s ? s : "");
	if (!*value)
		return vd_error(ENOMEM, "vdisk_get_str: out of memory");
	return 0;
}

VD_EXPORT int vdisk_set_bool(struct vdisk *v, const char *name, bool value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_set_bool", name, VD_PROP_BOOL, true, &err);

	if (!p)
		return err;
	if (p->check && (err = p->check(v, p, value)) < 0)
		return err;
	*(bool *)field(v, p) = value;
	return 0;
}

VD_EXPORT int vdisk_set_int(struct vdisk *v, const char *name, int value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_set_int", name, VD_PROP_INT, true, &err);

	if (!p)
		return err;
	err = check_range(v, "vdisk_set_int", p, value);
	if (err < 0)
		return err;
	*(int *)field(v, p) = value;
	return 0;
}

VD_EXPORT int vdisk_set_uint64(struct vdisk *v, const char *name, uint64_t value)
{
	int err = 0;
	const struct vd_prop *p = access_prop(v, "vdisk_set_uint64", name, VD_PROP_UINT64, true, &err);

	if (!p)
		return err;
	if (p->max > 0 && (value < (uint64_t)p->min || value > (uint64_t)p->max))
		return vd_error(EINVAL, "vdisk_set_uint64: property '%s' must be in [%" PRId64 ", %" PRId64 "], got %" PRIu64,
				p->name, p->min, p->max, value);
	if (p->check && (err = p->check(v, p, value)) < 0)
		return err;
	*(uint64_t *)field(v, p) = value;
	return 0;
}

VD_EXPORT int vdisk_set_str(struct vdisk *v, const char *name, const char *value)
{
	const struct vd_prop *p;
	char *copy;
	int err = 0;

	if (v && name && strcmp(name, "driver") == 0)
		return vd_error(EACCES, "vdisk_set_str: property 'driver' is read-only");
	p = access_prop(v, "vdisk_set_str", name, VD_PROP_STR, true, &err);
	if (!p)
		return err;
	if (!value)
		return vd_error(EINVAL, "vdisk_set_str: value for '%s' must not be NULL", name);
	if (p->check && (err = p->check(v, p, (uint64_t)(uintptr_t)value)) < 0)
		return err;
	copy = strdup(value);
	if (!copy)
		return vd_error(ENOMEM, "vdisk_set_str: out of memory");
	free(*(char **)field(v, p));
	*(char **)field(v, p) = copy;
	return 0;
}

VD_EXPORT const char *const *vdisk_list_properties(struct vdisk *v)
{
	size_t n = 1, i = 0;

	if (!v)
		return NULL;
	if (v->prop_names)
		return v->prop_names;
	for (const struct vd_prop *p = core_props; p->name; p++)
		n++;
	for (const struct vd_prop *p = v->drv->props; p && p->name; p++)
		n++;
	v->prop_names = calloc(n + 1, sizeof(char *));
	if (!v->prop_names)
		return NULL;
	v->prop_names[i++] = "driver";
	for (const struct vd_prop *p = core_props; p->name; p++)
		v->prop_names[i++] = p->name;
	for (const struct vd_prop *p = v->drv->props; p && p->name; p++)
		v->prop_names[i++] = p->name;
	return v->prop_names;
}
