/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Node options, QEMU style.
 *
 * Dotted strings ("driver=qcow2,file.filename=a.qcow2") become nested JSON
 * objects ({"driver": "qcow2", "file": {"filename": "a.qcow2"}}); values stay
 * strings, and the typed getters below convert them ("on", "64k", ...), so
 * options given as JSON (real booleans and numbers) read the same way.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "block-int.h"

#define MAX_KEY_LEN 256

/* ---- dotted keys ---------------------------------------------------------------- */

static bool is_key_char(char c)
{
	return isalnum((unsigned char)c) || c == '-' || c == '_';
}

/* "a.b-c.d": fragments of [A-Za-z0-9_-], separated by single dots. */
static bool key_is_valid(const char *key)
{
	bool fragment_start = true;

	if (!*key)
		return false;
	for (const char *p = key; *p; p++) {
		if (*p == '.') {
			if (fragment_start)
				return false;
			fragment_start = true;
		} else if (is_key_char(*p)) {
			fragment_start = false;
		} else {
			return false;
		}
	}
	return !fragment_start;
}

static int set_dotted(json_t *root, const char *key, json_t *value, const char *what);

/* {"file": {...}} given after "file.x" keys: merge, still refusing duplicates. */
static int merge_objects(json_t *dst, json_t *src, const char *what)
{
	const char *k;
	json_t *v;
	int ret = 0;

	json_object_foreach(src, k, v) {
		ret = set_dotted(dst, k, json_incref(v), what);
		if (ret < 0)
			break;
	}
	json_decref(src);
	return ret;
}

/*
 * Store value under the dotted key in root, creating intermediate objects.
 * A key set twice, or used both as a value and as an object, is an error.
 */
static int set_dotted(json_t *root, const char *key, json_t *value, const char *what)
{
	char frag[MAX_KEY_LEN];
	json_t *obj = root;
	const char *p = key;

	for (;;) {
		const char *dot = strchr(p, '.');
		size_t n = dot ? (size_t)(dot - p) : strlen(p);
		json_t *child;

		if (n >= sizeof(frag)) {
			json_decref(value);
			return vd_error(EINVAL, "%s: option name '%s' is too long", what, key);
		}
		memcpy(frag, p, n);
		frag[n] = '\0';
		child = json_object_get(obj, frag);
		if (!dot) {
			if (child && json_is_object(child) && json_is_object(value))
				return merge_objects(child, value, what);
			if (child) {
				json_decref(value);
				return vd_error(EINVAL, "%s: option '%s' is given twice%s", what, key,
						json_is_object(child) ? " (also as an object)" : "");
			}
			json_object_set_new(obj, frag, value);
			return 0;
		}
		if (!child) {
			child = json_object();
			json_object_set_new(obj, frag, child);
		} else if (!json_is_object(child)) {
			json_decref(value);
			return vd_error(EINVAL, "%s: option '%.*s' is both a value and an object (in '%s')", what,
					(int)(dot - key), key, key);
		}
		obj = child;
		p = dot + 1;
	}
}

/* ---- the dotted parser ------------------------------------------------------------ */

/* Read a value up to an unescaped ',' (",," is a literal comma); *end after it. */
static char *read_value(const char *s, const char **end)
{
	size_t cap = strlen(s) + 1, n = 0;
	char *v = malloc(cap);

	if (!v)
		return NULL;
	while (*s) {
		if (*s == ',') {
			if (s[1] != ',')
				break;
			s++; /* ",," -> "," */
		}
		v[n++] = *s++;
	}
	v[n] = '\0';
	*end = s;
	return v;
}

/* One "key=value" item at *pos; advances *pos past it (and its comma). */
static int parse_item(json_t *root, const char *str, const char **pos)
{
	const char *p = *pos, *eq = p;
	char key[MAX_KEY_LEN];
	char *value;
	int ret;

	while (*eq && *eq != '=' && *eq != ',')
		eq++;
	if (eq == p)
		return vd_error(EINVAL, "invalid options '%s': empty option name at position %d", str, (int)(p - str));
	if (*eq != '=')
		return vd_error(EINVAL, "invalid options '%s': '%.*s' has no value (expected key=value)", str,
				(int)(eq - p), p);
	if ((size_t)(eq - p) >= sizeof(key))
		return vd_error(EINVAL, "invalid options '%s': option name at position %d is too long", str,
				(int)(p - str));
	memcpy(key, p, (size_t)(eq - p));
	key[eq - p] = '\0';
	if (!key_is_valid(key))
		return vd_error(EINVAL, "invalid options '%s': bad option name '%s' (letters, digits, '-', '_', "
				"dots between parts)", str, key);
	value = read_value(eq + 1, &p);
	if (!value)
		return vd_error(ENOMEM, "invalid options '%s': out of memory", str);
	/* Step over the separator; a trailing one stays, for the caller to reject. */
	*pos = *p == ',' && p[1] ? p + 1 : p;
	ret = set_dotted(root, key, json_string(value), "invalid options");
	free(value);
	return ret;
}

json_t *vd_opts_parse(const char *str)
{
	json_t *root = json_object();
	const char *p = str;

	if (!root) {
		vd_error(ENOMEM, "vd_opts_parse: out of memory");
		return NULL;
	}
	while (*p) {
		if (parse_item(root, str, &p) < 0) {
			json_decref(root);
			return NULL;
		}
		if (*p == ',') {
			vd_error(EINVAL, "invalid options '%s': empty option name at the end", str);
			json_decref(root);
			return NULL;
		}
	}
	return root;
}

/* ---- JSON specs --------------------------------------------------------------------- */

/*
 * json: specs may use flat dotted keys ({"file.filename": "a"}) as QEMU
 * accepts them; turn those into nested objects so lookups see one shape.
 */
static json_t *unflatten(json_t *in, const char *what)
{
	json_t *out = json_object();
	const char *key;
	json_t *value;

	json_object_foreach(in, key, value) {
		json_t *v = json_is_object(value) ? unflatten(value, what) : json_incref(value);

		if (!v || set_dotted(out, key, v, what) < 0) {
			json_decref(out);
			return NULL;
		}
	}
	return out;
}

bool vd_json_too_deep(const char *text, size_t len, unsigned max)
{
	bool in_str = false;
	unsigned depth = 0;

	for (size_t i = 0; i < len; i++) {
		char ch = text[i];

		if (in_str) {
			if (ch == '\\')
				i++;
			else if (ch == '"')
				in_str = false;
		} else if (ch == '"') {
			in_str = true;
		} else if (ch == '[' || ch == '{') {
			if (++depth > max)
				return true;
		} else if ((ch == ']' || ch == '}') && depth) {
			depth--;
		}
	}
	return false;
}

static json_t *parse_json_spec(const char *text, const char *spec)
{
	json_error_t jerr;
	json_t *j, *out;

	/* Specs come from images too (backing files) and may be opened on a coroutine's small stack. */
	if (vd_json_too_deep(text, strlen(text), VD_JSON_MAX_NESTING)) {
		vd_error(EINVAL, "invalid JSON options '%.64s...': nested too deep", spec);
		return NULL;
	}
	j = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
	if (!j) {
		vd_error(EINVAL, "invalid JSON options '%s': %s (at column %d)", spec, jerr.text, jerr.column);
		return NULL;
	}
	if (!json_is_object(j)) {
		json_decref(j);
		vd_error(EINVAL, "invalid JSON options '%s': expected an object", spec);
		return NULL;
	}
	out = unflatten(j, "invalid JSON options");
	json_decref(j);
	return out;
}

/* First key of a dotted spec, if the spec starts with "key=". */
static bool first_key(const char *spec, char *key, size_t size)
{
	const char *eq = spec;

	while (*eq && *eq != '=' && *eq != ',')
		eq++;
	if (*eq != '=' || eq == spec || (size_t)(eq - spec) >= size)
		return false;
	memcpy(key, spec, (size_t)(eq - spec));
	key[eq - spec] = '\0';
	return key_is_valid(key);
}

static bool is_node_key(const char *key)
{
	return !strcmp(key, "driver") || !strcmp(key, "file") || !strcmp(key, "filename") ||
	       !strcmp(key, "node-name") || !strncmp(key, "file.", 5);
}

static json_t *filename_spec(const char *spec)
{
	json_t *o = json_pack("{s:s}", "filename", spec);

	if (!o)
		vd_error(ENOMEM, "vd_opts_parse_spec: out of memory");
	return o;
}

/*
 * A spec is JSON ("json:{...}" or "{...}"), dotted options, or a filename.
 * Filenames may contain '=' and ',', so a string counts as dotted options
 * only when it starts with "key=" and names the node (driver, file,
 * filename, ...); a parse error is reported only when its first key is one
 * of those, otherwise the string is taken as a filename.
 */
json_t *vd_opts_parse_spec(const char *spec)
{
	char key[MAX_KEY_LEN];
	const char *s = spec;
	json_t *o;

	if (!spec || !*spec) {
		vd_error(EINVAL, "empty image specification");
		return NULL;
	}
	if (!strncmp(spec, "json:", 5))
		return parse_json_spec(spec + 5, spec);
	while (isspace((unsigned char)*s))
		s++;
	if (*s == '{')
		return parse_json_spec(s, spec);
	if (!first_key(spec, key, sizeof(key)))
		return filename_spec(spec);
	if (is_node_key(key))
		return vd_opts_parse(spec);
	o = vd_opts_parse(spec);
	if (o && (json_object_get(o, "driver") || json_object_get(o, "file") || json_object_get(o, "filename")))
		return o;
	json_decref(o);
	return filename_spec(spec);
}

/* ---- typed getters ---------------------------------------------------------------------- */

/*
 * Look up a possibly dotted key ("cache.direct") in nested objects; an exact
 * flat key ("cache.direct" itself) is accepted too.
 */
static json_t *opt_lookup(json_t *o, const char *key)
{
	char frag[MAX_KEY_LEN];
	const char *dot;
	json_t *v;

	if (!json_is_object(o))
		return NULL;
	v = json_object_get(o, key);
	if (v)
		return v;
	dot = strchr(key, '.');
	if (!dot || (size_t)(dot - key) >= sizeof(frag))
		return NULL;
	memcpy(frag, key, (size_t)(dot - key));
	frag[dot - key] = '\0';
	return opt_lookup(json_object_get(o, frag), dot + 1);
}

const char *vd_opt_str(json_t *o, const char *key, const char *def)
{
	json_t *v = opt_lookup(o, key);

	return json_is_string(v) ? json_string_value(v) : def;
}

int vd_opt_bool(json_t *o, const char *key, bool def, bool *out)
{
	json_t *v = opt_lookup(o, key);
	const char *s;

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_boolean(v)) {
		*out = json_is_true(v);
		return 0;
	}
	if (json_is_integer(v) && (json_integer_value(v) == 0 || json_integer_value(v) == 1)) {
		*out = json_integer_value(v) == 1;
		return 0;
	}
	s = json_string_value(v);
	if (s && (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes") || !strcmp(s, "1"))) {
		*out = true;
		return 0;
	}
	if (s && (!strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no") || !strcmp(s, "0"))) {
		*out = false;
		return 0;
	}
	return vd_error(EINVAL, "option '%s': expected on/off/true/false, got '%s'", key, s ? s : "(not a string)");
}

/* Multiplier of a size suffix: "", "B", "k"/"K", "M", ... "E", optionally + "B"/"iB"; 0 if invalid. */
static uint64_t suffix_multiplier(const char *s)
{
	static const char units[] = "kmgtpe";
	const char *unit;

	if (!*s || !strcasecmp(s, "b"))
		return 1;
	unit = strchr(units, tolower((unsigned char)*s));
	if (!unit || !*unit)
		return 0;
	if (s[1] && strcasecmp(s + 1, "b") && strcasecmp(s + 1, "ib"))
		return 0;
	return 1ull << (10 * (unsigned)(unit - units + 1));
}

int vd_parse_size(const char *s, uint64_t *out)
{
	bool hex = s && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
	unsigned long long n;
	double frac = 0;
	uint64_t mult;
	char *end;

	/* strtoull would accept leading blanks, signs and octal: sizes do not. */
	if (!s || !isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	n = strtoull(s, &end, hex ? 16 : 10);
	if (errno == ERANGE)
		return -ERANGE;
	if (errno || end == s || (hex && end == s + 2))
		return -EINVAL;
	if (*end == '.' && !hex) {
		char *fend;

		frac = strtod(end, &fend);
		if (fend == end + 1)
			return -EINVAL;
		end = fend;
	}
	mult = suffix_multiplier(end);
	if (!mult || (frac != 0 && mult == 1))
		return -EINVAL; /* "1.5" bytes makes no sense */
	if (n > UINT64_MAX / mult)
		return -ERANGE;
	*out = (uint64_t)n * mult + (uint64_t)(frac * (double)mult);
	return 0;
}

int vd_opt_u64(json_t *o, const char *key, uint64_t def, uint64_t *out)
{
	json_t *v = opt_lookup(o, key);
	const char *s;
	int ret;

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_integer(v)) {
		if (json_integer_value(v) < 0)
			return vd_error(EINVAL, "option '%s': must not be negative", key);
		*out = (uint64_t)json_integer_value(v);
		return 0;
	}
	s = json_string_value(v);
	if (!s)
		return vd_error(EINVAL, "option '%s': expected a number", key);
	ret = vd_parse_size(s, out);
	if (ret == -ERANGE)
		return vd_error(ERANGE, "option '%s': '%s' is too large", key, s);
	if (ret < 0)
		return vd_error(EINVAL, "option '%s': '%s' is not a number (suffixes k, M, G, T, P, E allowed)", key, s);
	return 0;
}

/* ---- cache modes ------------------------------------------------------------------------ */

int vd_cache_mode_parse(const char *name, struct vd_cache_mode *out)
{
	static const struct {
		const char *name;
		struct vd_cache_mode mode;
	} modes[] = {
		/* Same meaning as QEMU's cache= */
		{ "none", { .writeback = true, .direct = true, .no_flush = false } },
		{ "writeback", { .writeback = true, .direct = false, .no_flush = false } },
		{ "writethrough", { .writeback = false, .direct = false, .no_flush = false } },
		{ "directsync", { .writeback = false, .direct = true, .no_flush = false } },
		{ "unsafe", { .writeback = true, .direct = false, .no_flush = true } },
	};

	for (size_t i = 0; name && i < sizeof(modes) / sizeof(modes[0]); i++) {
		if (!strcmp(name, modes[i].name)) {
			*out = modes[i].mode;
			return 0;
		}
	}
	return vd_error(EINVAL, "invalid cache mode '%s' (none, writeback, writethrough, directsync, unsafe)",
			name ? name : "(null)");
}
