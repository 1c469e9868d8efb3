/* SPDX-License-Identifier: GPL-2.0-or-later */
/* vdiskd: error strings, typed command arguments, clocks. */
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "daemon.h"

int vdd_error(char **errp, const char *fmt, ...)
{
	va_list ap;
	char *msg;

	if (!errp || *errp)
		return -1;
	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	*errp = msg ? msg : strdup("out of memory");
	return -1;
}

void vdd_error_prefix(char **errp, const char *fmt, ...)
{
	char *prefix, *msg;
	va_list ap;

	if (!errp || !*errp)
		return;
	va_start(ap, fmt);
	if (vasprintf(&prefix, fmt, ap) < 0)
		prefix = NULL;
	va_end(ap);
	if (prefix && asprintf(&msg, "%s%s", prefix, *errp) >= 0) {
		free(*errp);
		*errp = msg;
	}
	free(prefix);
}

/* ---- arguments ---------------------------------------------------------------------- */

int vdd_arg_str(json_t *args, const char *key, bool required, const char *def, const char **out, char **errp)
{
	json_t *v = json_object_get(args, key);

	*out = def;
	if (!v || json_is_null(v)) {
		if (required)
			return vdd_error(errp, "Parameter '%s' is missing", key);
		return 0;
	}
	if (!json_is_string(v))
		return vdd_error(errp, "Invalid parameter type for '%s', expected: string", key);
	*out = json_string_value(v);
	return 0;
}

int vdd_arg_bool(json_t *args, const char *key, bool def, bool *out, char **errp)
{
	json_t *v = json_object_get(args, key);
	const char *s;

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_boolean(v)) {
		*out = json_is_true(v);
		return 0;
	}
	s = json_string_value(v); /* command-line options are strings */
	if (s && (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes"))) {
		*out = true;
		return 0;
	}
	if (s && (!strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no"))) {
		*out = false;
		return 0;
	}
	return vdd_error(errp, "Invalid parameter type for '%s', expected: boolean", key);
}

int vdd_arg_u64(json_t *args, const char *key, uint64_t def, uint64_t *out, char **errp)
{
	json_t *v = json_object_get(args, key);
	const char *s;

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_integer(v)) {
		if (json_integer_value(v) < 0)
			return vdd_error(errp, "Parameter '%s' must not be negative", key);
		*out = (uint64_t)json_integer_value(v);
		return 0;
	}
	s = json_string_value(v);
	if (!s || vd_parse_size(s, out) < 0)
		return vdd_error(errp, "Invalid parameter type for '%s', expected: integer", key);
	return 0;
}

int vdd_args_check(json_t *args, const char *const *known, const char *what, char **errp)
{
	const char *key;
	json_t *v;

	json_object_foreach(args, key, v) {
		bool ok = false;

		for (int i = 0; known[i] && !ok; i++)
			ok = !strcmp(key, known[i]);
		if (!ok)
			return vdd_error(errp, "%s: invalid parameter '%s'", what, key);
	}
	return 0;
}

json_t *vdd_parse_cli_opts(const char *str, char **errp)
{
	const char *s = str;
	json_t *o;

	while (*s == ' ' || *s == '\t')
		s++;
	if (*s == '{') {
		json_error_t jerr;

		o = json_loads(s, JSON_REJECT_DUPLICATES, &jerr);
		if (!o) {
			vdd_error(errp, "invalid JSON '%s': %s", str, jerr.text);
			return NULL;
		}
		if (!json_is_object(o)) {
			json_decref(o);
			vdd_error(errp, "invalid JSON '%s': expected an object", str);
			return NULL;
		}
		return o;
	}
	o = vd_opts_parse(str);
	if (!o)
		vdd_error(errp, "%s", vdisk_get_error_msg());
	return o;
}

/* ---- clocks ------------------------------------------------------------------------- */

uint64_t vdd_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A sched_yield() that took this long ran another thread: the CPU is wanted. */
#define YIELD_CONTENDED_NS 5000

bool vdd_yield_was_contended(void)
{
	uint64_t t0 = vdd_now_ns();

	sched_yield();
	return vdd_now_ns() - t0 > YIELD_CONTENDED_NS;
}

uint64_t vdd_poll_window_after_sleep(uint64_t window, uint64_t slept, uint64_t max)
{
	if (slept > max)
		return 0;
	if (slept <= window)
		return window;
	return window ? (window * 2 < max ? window * 2 : max) : 4000;
}

json_t *vdd_timestamp(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return json_pack("{s:I, s:I}", "seconds", (json_int_t)tv.tv_sec, "microseconds", (json_int_t)tv.tv_usec);
}
