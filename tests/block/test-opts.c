/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Option strings, JSON specs, typed getters, sizes and cache modes. */
#include "test-block-util.h"

static void assert_json(json_t *o, const char *expected)
{
	json_t *want = json_loads(expected, 0, NULL);

	assert_non_null(o);
	assert_non_null(want);
	if (!json_equal(o, want)) {
		char *got = json_dumps(o, JSON_SORT_KEYS);

		print_error("got %s, want %s\n", got, expected);
		free(got);
		fail();
	}
	json_decref(want);
	json_decref(o);
}

static void assert_parse_error(const char *str, const char *msg_part)
{
	json_t *o = vd_opts_parse(str);

	if (o)
		fail_msg("'%s' parsed, but should not", str);
	if (!strstr(vdisk_get_error_msg(), msg_part))
		fail_msg("'%s': message '%s' lacks '%s'", str, vdisk_get_error_msg(), msg_part);
}

static void dotted_keys_nest(void **state)
{
	(void)state;
	assert_json(vd_opts_parse("driver=qcow2,file.driver=file,file.filename=a.qcow2,backing.file.filename=b"),
		    "{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"a.qcow2\"},"
		    " \"backing\": {\"file\": {\"filename\": \"b\"}}}");
	assert_json(vd_opts_parse(""), "{}");
}

static void double_comma_escapes_a_comma(void **state)
{
	(void)state;
	assert_json(vd_opts_parse("filename=a,,b.img,node-name=x"), "{\"filename\": \"a,b.img\", \"node-name\": \"x\"}");
	assert_json(vd_opts_parse("a=x,,,b=y"), "{\"a\": \"x,\", \"b\": \"y\"}");
	assert_json(vd_opts_parse("a=1=2"), "{\"a\": \"1=2\"}"); /* '=' in a value is plain */
	assert_json(vd_opts_parse("a="), "{\"a\": \"\"}");
}

static void bad_syntax_is_reported(void **state)
{
	(void)state;
	assert_parse_error("a=1,a=2", "given twice");
	assert_parse_error("file=x,file.driver=file", "both a value and an object");
	assert_parse_error("file.driver=file,file=x", "given twice");
	assert_parse_error("a=1,", "empty option name");
	assert_parse_error(",a=1", "empty option name");
	assert_parse_error("a=1,b", "'b' has no value");
	assert_parse_error("a b=1", "bad option name 'a b'");
	assert_parse_error("file..x=1", "bad option name");
	assert_parse_error(".x=1", "bad option name");
}

static void json_specs_parse_and_flat_keys_nest(void **state)
{
	(void)state;
	assert_json(vd_opts_parse_spec("json:{\"driver\": \"raw\", \"file\": {\"filename\": \"x\"}}"),
		    "{\"driver\": \"raw\", \"file\": {\"filename\": \"x\"}}");
	assert_json(vd_opts_parse_spec("  {\"driver\": \"raw\", \"file.filename\": \"x\", \"file.aio\": \"sync\"}"),
		    "{\"driver\": \"raw\", \"file\": {\"filename\": \"x\", \"aio\": \"sync\"}}");
	assert_json(vd_opts_parse_spec("json:{\"file.aio\": \"sync\", \"file\": {\"filename\": \"x\"}}"),
		    "{\"file\": {\"filename\": \"x\", \"aio\": \"sync\"}}");
	assert_null(vd_opts_parse_spec("json:{\"driver\": "));
	assert_non_null(strstr(vdisk_get_error_msg(), "invalid JSON"));
	assert_null(vd_opts_parse_spec("json:[1]"));
	assert_non_null(strstr(vdisk_get_error_msg(), "expected an object"));
	assert_null(vd_opts_parse_spec("json:{\"a\": 1, \"a\": 2}"));
}

static void specs_tell_options_from_filenames(void **state)
{
	(void)state;
	assert_json(vd_opts_parse_spec("disk.img"), "{\"filename\": \"disk.img\"}");
	assert_json(vd_opts_parse_spec("/a/b=c,d.img"), "{\"filename\": \"/a/b=c,d.img\"}");
	assert_json(vd_opts_parse_spec("x=y.img"), "{\"filename\": \"x=y.img\"}");
	assert_json(vd_opts_parse_spec("driver=raw,file.filename=a"),
		    "{\"driver\": \"raw\", \"file\": {\"filename\": \"a\"}}");
	assert_json(vd_opts_parse_spec("node-name=n,driver=file,filename=a"),
		    "{\"node-name\": \"n\", \"driver\": \"file\", \"filename\": \"a\"}");
	/* Looks like options (names a driver) but is broken: an error, not a filename. */
	assert_null(vd_opts_parse_spec("driver=raw,driver=qcow2"));
	assert_non_null(strstr(vdisk_get_error_msg(), "given twice"));
	assert_null(vd_opts_parse_spec(""));
}

static void typed_getters_convert(void **state)
{
	json_t *o = vd_opts_parse("a=on,b=off,c=true,d=false,e=64k,f=1G,g=0x1000,h=maybe,i=12x,cache.direct=on");
	json_t *j = json_loads("{\"t\": true, \"n\": 4096, \"neg\": -1, \"s\": \"str\"}", 0, NULL);
	bool b;
	uint64_t u;

	(void)state;
	assert_int_equal(vd_opt_bool(o, "a", false, &b), 0);
	assert_true(b);
	assert_int_equal(vd_opt_bool(o, "b", true, &b), 0);
	assert_false(b);
	assert_int_equal(vd_opt_bool(o, "c", false, &b), 0);
	assert_true(b);
	assert_int_equal(vd_opt_bool(o, "d", true, &b), 0);
	assert_false(b);
	assert_int_equal(vd_opt_bool(o, "missing", true, &b), 0);
	assert_true(b);
	assert_int_equal(vd_opt_bool(o, "cache.direct", false, &b), 0);
	assert_true(b);
	assert_int_equal(vd_opt_bool(o, "h", false, &b), -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "'h'"));
	assert_int_equal(vd_opt_u64(o, "e", 0, &u), 0);
	assert_int_equal(u, 65536);
	assert_int_equal(vd_opt_u64(o, "f", 0, &u), 0);
	assert_int_equal(u, 1ull << 30);
	assert_int_equal(vd_opt_u64(o, "g", 0, &u), 0);
	assert_int_equal(u, 4096);
	assert_int_equal(vd_opt_u64(o, "missing", 7, &u), 0);
	assert_int_equal(u, 7);
	assert_int_equal(vd_opt_u64(o, "i", 0, &u), -EINVAL);
	assert_string_equal(vd_opt_str(o, "cache.direct", NULL), "on");
	assert_string_equal(vd_opt_str(o, "nope", "def"), "def");
	assert_int_equal(vd_opt_bool(j, "t", false, &b), 0);
	assert_true(b);
	assert_int_equal(vd_opt_u64(j, "n", 0, &u), 0);
	assert_int_equal(u, 4096);
	assert_int_equal(vd_opt_u64(j, "neg", 0, &u), -EINVAL);
	assert_int_equal(vd_opt_u64(j, "s", 0, &u), -EINVAL);
	json_decref(o);
	json_decref(j);
}

static void sizes_parse_with_suffixes(void **state)
{
	static const struct {
		const char *s;
		uint64_t v;
	} good[] = {
		{ "0", 0 }, { "512", 512 }, { "1k", 1024 }, { "1K", 1024 }, { "2M", 2u << 20 }, { "3G", 3ull << 30 },
		{ "1T", 1ull << 40 }, { "1.5M", 3u << 19 }, { "4KiB", 4096 }, { "10B", 10 }, { "0x10", 16 },
	};
	static const char *const bad[] = { "", "-1", " 1", "1x", "1.5", "k", "0x", "1kk", "99999999999999999999" };
	uint64_t v;

	(void)state;
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		assert_int_equal(vd_parse_size(good[i].s, &v), 0);
		assert_int_equal(v, good[i].v);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (vd_parse_size(bad[i], &v) == 0)
			fail_msg("'%s' parsed as a size", bad[i]);
	assert_int_equal(vd_parse_size("20E", &v), -ERANGE);
}

static void cache_modes_mean_what_qemu_means(void **state)
{
	struct vd_cache_mode m;

	(void)state;
	assert_int_equal(vd_cache_mode_parse("none", &m), 0);
	assert_true(m.writeback && m.direct && !m.no_flush);
	assert_int_equal(vd_cache_mode_parse("writeback", &m), 0);
	assert_true(m.writeback && !m.direct && !m.no_flush);
	assert_int_equal(vd_cache_mode_parse("writethrough", &m), 0);
	assert_true(!m.writeback && !m.direct && !m.no_flush);
	assert_int_equal(vd_cache_mode_parse("directsync", &m), 0);
	assert_true(!m.writeback && m.direct && !m.no_flush);
	assert_int_equal(vd_cache_mode_parse("unsafe", &m), 0);
	assert_true(m.writeback && !m.direct && m.no_flush);
	assert_int_equal(vd_cache_mode_parse("fast", &m), -EINVAL);
	assert_non_null(strstr(vdisk_get_error_msg(), "'fast'"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(dotted_keys_nest),
		cmocka_unit_test(double_comma_escapes_a_comma),
		cmocka_unit_test(bad_syntax_is_reported),
		cmocka_unit_test(json_specs_parse_and_flat_keys_nest),
		cmocka_unit_test(specs_tell_options_from_filenames),
		cmocka_unit_test(typed_getters_convert),
		cmocka_unit_test(sizes_parse_with_suffixes),
		cmocka_unit_test(cache_modes_mean_what_qemu_means),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
