/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Every common property follows the type, state and range rules documented
 * in vdisk.h: wrong name -ENOENT, wrong type -ENOTTY, out of range -EINVAL,
 * wrong state -EBUSY, read-only property -EACCES, and the error message
 * names the property (prefixed with the function name).
 */
#include "test-util.h"

enum ptype { T_BOOL, T_INT, T_U64, T_STR };
#define CR 1 /* created */
#define CO 2 /* connected */
#define ST 4 /* started */
#define ANY (CR | CO | ST)

struct pspec {
	const char *name;
	enum ptype type;
	unsigned rd, wr;
	int64_t good; /* a valid value to write (different from the default) */
	int64_t lo, hi; /* inclusive range for int properties (lo == hi: no range tested) */
};

static const struct pspec props[] = {
	{ "driver", T_STR, ANY, 0, 0, 0, 0 },
	{ "path", T_STR, ANY, CR, 0, 0, 0 },
	{ "fd", T_INT, ANY, CR, 7, -1, INT_MAX },
	{ "read-only", T_BOOL, ANY, CR, 1, 0, 0 },
	{ "direct", T_BOOL, ANY, CR, 1, 0, 0 },
	{ "capacity", T_U64, CO | ST, 0, 0, 0, 0 },
	{ "request-alignment", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "buf-alignment", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "optimal-io-alignment", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "optimal-io-size", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "optimal-buf-alignment", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "max-transfer", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "max-segments", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "max-queues", T_INT, CO | ST, 0, 0, 0, 0 },
	{ "max-mem-regions", T_U64, CO | ST, 0, 0, 0, 0 },
	{ "needs-mem-regions", T_BOOL, CO | ST, 0, 0, 0, 0 },
	{ "mem-region-alignment", T_U64, CO | ST, 0, 0, 0, 0 },
	{ "num-queues", T_INT, CO | ST, CO, 2, 0, -1 /* hi = max-queues */ },
	{ "num-poll-queues", T_INT, CO | ST, CO, 1, 0, -1 /* hi = max-queues */ },
	{ "queue-size", T_INT, CO | ST, CO, 77, 1, 65536 },
};
#define N_PROPS (sizeof(props) / sizeof(props[0]))

static const char *const getter_name[] = { "vdisk_get_bool", "vdisk_get_int", "vdisk_get_uint64", "vdisk_get_str" };
static const char *const setter_name[] = { "vdisk_set_bool", "vdisk_set_int", "vdisk_set_uint64", "vdisk_set_str" };

/* An instance of the null driver in the given state (1 MiB). */
static struct vdisk *instance_in(unsigned state)
{
	struct vdisk *v = NULL;

	assert_int_equal(vdisk_create("null", &v), 0);
	assert_int_equal(vdisk_set_uint64(v, "size", 1 << 20), 0);
	if (state >= CO)
		assert_int_equal(vdisk_connect(v), 0);
	if (state >= ST)
		assert_int_equal(vdisk_start(v), 0);
	return v;
}

static int get_as(struct vdisk *v, const char *name, enum ptype t, int64_t *out)
{
	bool b = false;
	int i = 0;
	uint64_t u = 0;
	char *s = NULL;
	int ret = -1;

	switch (t) {
	case T_BOOL: ret = vdisk_get_bool(v, name, &b); *out = b; break;
	case T_INT: ret = vdisk_get_int(v, name, &i); *out = i; break;
	case T_U64: ret = vdisk_get_uint64(v, name, &u); *out = (int64_t)u; break;
	case T_STR: ret = vdisk_get_str(v, name, &s); *out = 0; free(s); break;
	}
	return ret;
}

static int set_as(struct vdisk *v, const char *name, enum ptype t, int64_t value)
{
	switch (t) {
	case T_BOOL: return vdisk_set_bool(v, name, value != 0);
	case T_INT: return vdisk_set_int(v, name, (int)value);
	case T_U64: return vdisk_set_uint64(v, name, (uint64_t)value);
	case T_STR: return vdisk_set_str(v, name, "some-file.img");
	}
	return -1;
}

/* The message starts with "func:" and names the property. */
static void assert_msg_names(const char *func, const char *name)
{
	const char *m = vdisk_get_error_msg();

	if (strncmp(m, func, strlen(func)) != 0 || m[strlen(func)] != ':')
		fail_msg("error message '%s' is not prefixed with '%s:'", m, func);
	if (!strstr(m, name))
		fail_msg("error message '%s' does not name the property '%s'", m, name);
}

static void every_common_property_is_listed(void **state)
{
	struct vdisk *v = instance_in(CR);
	const char *const *names = vdisk_list_properties(v);

	assert_non_null(names);
	for (size_t i = 0; i < N_PROPS; i++) {
		bool found = false;

		for (int k = 0; names[k]; k++)
			found |= strcmp(names[k], props[i].name) == 0;
		if (!found)
			fail_msg("property '%s' missing from vdisk_list_properties()", props[i].name);
	}
	/* null adds its own. */
	for (const char *const *want = (const char *const[]){ "size", "read-zeroes", NULL }; *want; want++) {
		bool found = false;

		for (int k = 0; names[k]; k++)
			found |= strcmp(names[k], *want) == 0;
		if (!found)
			fail_msg("null property '%s' missing from vdisk_list_properties()", *want);
	}
	vdisk_destroy(&v);
}

static void unknown_name_is_enoent(void **state)
{
	for (unsigned st = CR; st <= ST; st <<= 1) {
		struct vdisk *v = instance_in(st);
		int64_t x;

		for (int t = T_BOOL; t <= T_STR; t++) {
			assert_int_equal(get_as(v, "no-such-property", (enum ptype)t, &x), -ENOENT);
			assert_msg_names(getter_name[t], "no-such-property");
			assert_int_equal(set_as(v, "no-such-property", (enum ptype)t, 1), -ENOENT);
			assert_msg_names(setter_name[t], "no-such-property");
		}
		vdisk_destroy(&v);
	}
}

static void null_arguments_are_einval(void **state)
{
	struct vdisk *v = instance_in(CR);
	int i;

	assert_int_equal(vdisk_get_int(NULL, "queue-size", &i), -EINVAL);
	assert_int_equal(vdisk_get_int(v, NULL, &i), -EINVAL);
	assert_int_equal(vdisk_set_str(v, "path", NULL), -EINVAL);
	assert_msg_contains("path");
	vdisk_destroy(&v);
}

static void wrong_type_is_enotty(void **state)
{
	for (unsigned st = CR; st <= ST; st <<= 1) {
		struct vdisk *v = instance_in(st);

		for (size_t i = 0; i < N_PROPS; i++) {
			const struct pspec *p = &props[i];

			if (!strcmp(p->name, "driver"))
				continue; /* driver_property_wrong_type_is_enotty */
			for (int t = T_BOOL; t <= T_STR; t++) {
				int64_t x;
				int ret;

				if ((enum ptype)t == p->type)
					continue;
				ret = get_as(v, p->name, (enum ptype)t, &x);
				if (ret != -ENOTTY)
					fail_msg("%s('%s') with the wrong type returned %d, expected -ENOTTY", getter_name[t],
						 p->name, ret);
				assert_msg_names(getter_name[t], p->name);
				if (p->wr && (p->wr & st)) {
					ret = set_as(v, p->name, (enum ptype)t, 1);
					if (ret != -ENOTTY)
						fail_msg("%s('%s') with the wrong type returned %d, expected -ENOTTY",
							 setter_name[t], p->name, ret);
					assert_msg_names(setter_name[t], p->name);
				}
			}
		}
		vdisk_destroy(&v);
	}
}

static void read_state_rules(void **state)
{
	for (unsigned st = CR; st <= ST; st <<= 1) {
		struct vdisk *v = instance_in(st);

		for (size_t i = 0; i < N_PROPS; i++) {
			const struct pspec *p = &props[i];
			int64_t x;
			int ret = get_as(v, p->name, p->type, &x);

			if (p->rd & st) {
				if (ret != 0)
					fail_msg("reading '%s' in state %u returned %d: %s", p->name, st, ret,
						 vdisk_get_error_msg());
			} else {
				if (ret != -EBUSY)
					fail_msg("reading '%s' in state %u returned %d, expected -EBUSY", p->name, st, ret);
				assert_msg_names(getter_name[p->type], p->name);
			}
		}
		vdisk_destroy(&v);
	}
}

static void write_state_rules(void **state)
{
	for (size_t i = 0; i < N_PROPS; i++) {
		const struct pspec *p = &props[i];

		for (unsigned st = CR; st <= ST; st <<= 1) {
			struct vdisk *v = instance_in(st);
			int ret = set_as(v, p->name, p->type, p->good);

			if (!p->wr) {
				if (ret != -EACCES)
					fail_msg("writing read-only '%s' in state %u returned %d, expected -EACCES", p->name,
						 st, ret);
				assert_msg_names(setter_name[p->type], p->name);
			} else if (p->wr & st) {
				int64_t back;

				if (ret != 0)
					fail_msg("writing '%s' in state %u returned %d: %s", p->name, st, ret,
						 vdisk_get_error_msg());
				assert_int_equal(get_as(v, p->name, p->type, &back), 0);
				if (p->type != T_STR)
					assert_int_equal(back, p->good);
			} else {
				if (ret != -EBUSY)
					fail_msg("writing '%s' in state %u returned %d, expected -EBUSY", p->name, st, ret);
				assert_msg_names(setter_name[p->type], p->name);
			}
			vdisk_destroy(&v);
		}
	}
}

static void string_values_round_trip(void **state)
{
	struct vdisk *v = instance_in(CR);
	char *s = NULL;

	assert_int_equal(vdisk_get_str(v, "driver", &s), 0);
	assert_string_equal(s, "null");
	free(s);
	assert_int_equal(vdisk_set_str(v, "path", "/some/where.img"), 0);
	assert_int_equal(vdisk_get_str(v, "path", &s), 0);
	assert_string_equal(s, "/some/where.img");
	free(s);
	vdisk_destroy(&v);
}

static void out_of_range_is_einval_and_keeps_value(void **state)
{
	for (size_t i = 0; i < N_PROPS; i++) {
		const struct pspec *p = &props[i];
		struct vdisk *v;
		int64_t hi = p->hi, before, after;

		if (p->type != T_INT || !p->wr || p->lo == p->hi)
			continue;
		v = instance_in(p->wr & CR ? CR : CO);
		if (hi < 0) {
			int mq;

			assert_int_equal(vdisk_get_int(v, "max-queues", &mq), 0);
			hi = mq;
		}
		assert_int_equal(get_as(v, p->name, p->type, &before), 0);
		/* Just outside each end. */
		if (p->lo > INT_MIN) {
			assert_int_equal(vdisk_set_int(v, p->name, (int)(p->lo - 1)), -EINVAL);
			assert_msg_names("vdisk_set_int", p->name);
		}
		if (hi < INT_MAX) {
			assert_int_equal(vdisk_set_int(v, p->name, (int)(hi + 1)), -EINVAL);
			assert_msg_names("vdisk_set_int", p->name);
		}
		assert_int_equal(vdisk_set_int(v, p->name, INT_MIN), -EINVAL);
		assert_int_equal(get_as(v, p->name, p->type, &after), 0);
		assert_int_equal(before, after);
		/* Both ends are accepted. */
		assert_int_equal(vdisk_set_int(v, p->name, (int)p->lo), 0);
		assert_int_equal(get_as(v, p->name, p->type, &after), 0);
		assert_int_equal(after, p->lo);
		if (vdisk_set_int(v, p->name, (int)hi) != 0)
			fail_msg("setting '%s' to its maximum %" PRId64 " failed: %s", p->name, hi, vdisk_get_error_msg());
		assert_int_equal(get_as(v, p->name, p->type, &after), 0);
		assert_int_equal(after, hi);
		vdisk_destroy(&v);
	}
}

static void num_queues_bounded_by_max_queues_at_start(void **state)
{
	struct vdisk *v = instance_in(CO);
	int mq;

	assert_int_equal(vdisk_get_int(v, "max-queues", &mq), 0);
	assert_true(mq >= 1);
	/* Each may reach max-queues, but not together. */
	assert_int_equal(vdisk_set_int(v, "num-queues", mq), 0);
	assert_int_equal(vdisk_set_int(v, "num-poll-queues", 1), 0);
	assert_int_equal(vdisk_start(v), -EINVAL);
	assert_msg_contains("max-queues");
	/* And no queues at all is refused too. */
	assert_int_equal(vdisk_set_int(v, "num-queues", 0), 0);
	assert_int_equal(vdisk_set_int(v, "num-poll-queues", 0), 0);
	assert_int_equal(vdisk_start(v), -EINVAL);
	assert_int_equal(vdisk_set_int(v, "num-queues", 2), 0);
	assert_int_equal(vdisk_start(v), 0);
	assert_non_null(vdisk_get_queue(v, 1));
	assert_null(vdisk_get_queue(v, 2));
	vdisk_destroy(&v);
}

static void read_only_properties_are_eacces_in_every_state(void **state)
{
	/* "driver" is str and may never be written, whatever the type used. */
	for (unsigned st = CR; st <= ST; st <<= 1) {
		struct vdisk *v = instance_in(st);

		assert_int_equal(vdisk_set_str(v, "driver", "sync"), -EACCES);
		assert_msg_names("vdisk_set_str", "driver");
		assert_int_equal(vdisk_set_uint64(v, "capacity", 4096), -EACCES);
		assert_msg_names("vdisk_set_uint64", "capacity");
		vdisk_destroy(&v);
	}
}

/* "driver" is a str property like any other: the wrong type is -ENOTTY, not -ENOENT. */
static void driver_property_wrong_type_is_enotty(void **state)
{
	struct vdisk *v = instance_in(CR);
	int i;
	bool b;

	assert_int_equal(vdisk_get_int(v, "driver", &i), -ENOTTY);
	assert_msg_names("vdisk_get_int", "driver");
	assert_int_equal(vdisk_get_bool(v, "driver", &b), -ENOTTY);
	assert_msg_names("vdisk_get_bool", "driver");
	vdisk_destroy(&v);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(every_common_property_is_listed),
		cmocka_unit_test(unknown_name_is_enoent),
		cmocka_unit_test(null_arguments_are_einval),
		cmocka_unit_test(wrong_type_is_enotty),
		cmocka_unit_test(read_state_rules),
		cmocka_unit_test(write_state_rules),
		cmocka_unit_test(string_values_round_trip),
		cmocka_unit_test(out_of_range_is_einval_and_keeps_value),
		cmocka_unit_test(num_queues_bounded_by_max_queues_at_start),
		cmocka_unit_test(read_only_properties_are_eacces_in_every_state),
		cmocka_unit_test(driver_property_wrong_type_is_enotty),
	};

	return cmocka_run_group_tests_name("properties-common", tests, NULL, NULL);
}
