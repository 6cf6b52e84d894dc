// A reader of runner.RunConfig as encoding/json writes it, which accepts
// nothing that encoding/json would read otherwise:
//
//   - the keys are RunConfig's, spelled exactly, each at most once
//     (encoding/json also matches keys without regard to case, Unicode's
//     folding included, and the last of two wins: refused here);
//   - strings are valid UTF-8 without control characters or NUL (a C
//     string cannot carry one); \u escapes as encoding/json reads them, a
//     lone surrogate being U+FFFD;
//   - memory_limit is an integer from 0 to INT64_MAX;
//   - nothing but white space follows the object.
//
// It reads no byte outside buf[0, len) and does not recurse (RunConfig has
// no nested object).
#include <stdlib.h>
#include <string.h>

#include "config.h"

struct json {
	const char *p, *end;
	const char *err; // why not, once something was wrong
};

static int fail(struct json *j, const char *why) {
	if (!j->err) j->err = why;
	return 0;
}

static void ws(struct json *j) {
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int expect(struct json *j, char c, const char *why) {
	ws(j);
	if (j->p < j->end && *j->p == c) {
		j->p++;
		return 1;
	}
	return fail(j, why);
}

// lit consumes word if it is what comes next.
static int lit(struct json *j, const char *word) {
	size_t n = strlen(word);
	if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0) return 0;
	j->p += n;
	return 1;
}

// more reads what follows a member or an element: 1 after a comma, 0
// after close or on an error.
static int more(struct json *j, char close) {
	ws(j);
	if (j->p < j->end && *j->p == ',') {
		j->p++;
		return 1;
	}
	if (j->p < j->end && *j->p == close) {
		j->p++;
		return 0;
	}
	return fail(j, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
}

static int hex4(const char *s, unsigned *out) {
	unsigned v = 0;
	for (int i = 0; i < 4; i++) {
		char c = s[i];
		v <<= 4;
		if (c >= '0' && c <= '9') v |= c - '0';
		else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
		else return 0;
	}
	*out = v;
	return 1;
}

static char *utf8(char *o, unsigned cp) {
	if (cp < 0x80) *o++ = cp;
	else if (cp < 0x800) { *o++ = 0xc0 | cp >> 6; *o++ = 0x80 | (cp & 0x3f); }
	else if (cp < 0x10000) { *o++ = 0xe0 | cp >> 12; *o++ = 0x80 | ((cp >> 6) & 0x3f); *o++ = 0x80 | (cp & 0x3f); }
	else { *o++ = 0xf0 | cp >> 18; *o++ = 0x80 | ((cp >> 12) & 0x3f); *o++ = 0x80 | ((cp >> 6) & 0x3f); *o++ = 0x80 | (cp & 0x3f); }
	return o;
}

// utf8_len is the length of the UTF-8 sequence that starts at s and ends
// before end, 0 when it is not valid UTF-8 (Go's utf8.DecodeRune: no
// overlong forms, surrogates or code points above U+10FFFF), which
// encoding/json would read as U+FFFD and never writes.
static size_t utf8_len(const unsigned char *s, const unsigned char *end) {
	unsigned char c = s[0], lo = 0x80, hi = 0xbf;
	size_t n;
	if (c < 0x80) return 1;
	if (c >= 0xc2 && c <= 0xdf) n = 2;
	else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		if (c == 0xe0) lo = 0xa0;
		else if (c == 0xed) hi = 0x9f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		if (c == 0xf0) lo = 0x90;
		else if (c == 0xf4) hi = 0x8f;
	} else return 0;
	if ((size_t)(end - s) < n || s[1] < lo || s[1] > hi) return 0;
	for (size_t i = 2; i < n; i++)
		if (s[i] < 0x80 || s[i] > 0xbf) return 0;
	return n;
}

// escape decodes the escape at j->p (a backslash) before e, the string's
// closing quote, into *o.
static int escape(struct json *j, const char *e, char **o) {
	const char *p = j->p, *q;
	unsigned cp, lo;
	if (e - p < 2) return fail(j, "bad escape in a string");
	switch (p[1]) {
	case '"': case '\\': case '/': *(*o)++ = p[1]; break;
	case 'b': *(*o)++ = '\b'; break;
	case 'f': *(*o)++ = '\f'; break;
	case 'n': *(*o)++ = '\n'; break;
	case 'r': *(*o)++ = '\r'; break;
	case 't': *(*o)++ = '\t'; break;
	case 'u':
		if (e - p < 6 || !hex4(p + 2, &cp)) return fail(j, "bad \\u escape in a string");
		q = p + 6;
		if (cp >= 0xd800 && cp < 0xe000) {
			// As encoding/json: a high then a low surrogate are one
			// code point, any other surrogate is U+FFFD.
			if (cp < 0xdc00 && e - q >= 6 && q[0] == '\\' && q[1] == 'u' && hex4(q + 2, &lo) && lo >= 0xdc00 &&
			    lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				q += 6;
			} else {
				cp = 0xfffd;
			}
		}
		if (cp == 0) return fail(j, "NUL in a string");
		*o = utf8(*o, cp);
		j->p = q;
		return 1;
	default:
		return fail(j, "bad escape in a string");
	}
	j->p = p + 2;
	return 1;
}

// str reads a string into *out, a new C string.
static int str(struct json *j, char **out) {
	*out = NULL;
	if (!expect(j, '"', "expected a string")) return 0;
	// The closing quote first: no string is longer decoded than in JSON.
	const char *e = j->p;
	while (e < j->end && *e != '"') e += *e == '\\' && j->end - e > 1 ? 2 : 1;
	if (e >= j->end) return fail(j, "unterminated string");
	char *s = malloc(e - j->p + 1), *o = s;
	if (!s) return fail(j, "out of memory");
	while (j->p < e) {
		const unsigned char c = *j->p;
		size_t n;
		if (c == '\\') {
			if (!escape(j, e, &o)) goto bad;
		} else if (c < 0x20) {
			fail(j, "control character in a string");
			goto bad;
		} else if ((n = utf8_len((const unsigned char *)j->p, (const unsigned char *)e)) == 0) {
			fail(j, "invalid UTF-8 in a string");
			goto bad;
		} else {
			memcpy(o, j->p, n);
			o += n;
			j->p += n;
		}
	}
	*o = 0;
	j->p = e + 1;
	*out = s;
	return 1;
bad:
	free(s);
	return 0;
}

// nstr reads a string or null (*out stays NULL).
static int nstr(struct json *j, char **out) {
	ws(j);
	return lit(j, "null") || str(j, out);
}

// strs reads an array of strings, or null, into sv.
static int strs(struct json *j, struct strv *sv) {
	size_t cap = 0;
	ws(j);
	if (lit(j, "null")) return 1;
	if (!expect(j, '[', "expected an array of strings")) return 0;
	ws(j);
	if (lit(j, "]")) return 1;
	do {
		char *s;
		if (!str(j, &s)) return 0;
		if (sv->n + 1 >= cap) { // room for s and the NULL after it
			size_t ncap = cap ? 2 * cap : 8;
			char **nv = realloc(sv->v, ncap * sizeof *nv);
			if (!nv) {
				free(s);
				return fail(j, "out of memory");
			}
			sv->v = nv;
			cap = ncap;
		}
		sv->v[sv->n++] = s;
		sv->v[sv->n] = NULL;
	} while (more(j, ']'));
	return !j->err;
}

static int boolean(struct json *j, int *v) {
	ws(j);
	if (lit(j, "true")) {
		*v = 1;
		return 1;
	}
	return lit(j, "false") || lit(j, "null") || fail(j, "expected true or false");
}

// uint reads an integer from 0 to INT64_MAX (the daemon's limits are
// int64), or null.
static int integer(struct json *j, uint64_t *v) {
	uint64_t n = 0;
	ws(j);
	if (lit(j, "null")) return 1;
	const char *s = j->p;
	for (; j->p < j->end && *j->p >= '0' && *j->p <= '9'; j->p++) {
		unsigned d = *j->p - '0';
		if (n > (uint64_t)(INT64_MAX - d) / 10) return fail(j, "number out of range");
		n = 10 * n + d;
	}
	if (j->p == s || (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E')))
		return fail(j, "expected an integer from 0");
	if (*s == '0' && j->p - s > 1) return fail(j, "number with a leading zero");
	*v = n;
	return 1;
}

enum { K_ENGINE, K_KEY, K_CACHED, K_ARGS, K_ENV, K_MEMORY_LIMIT, NKEYS };
// RunConfig's keys: runner.RunConfig's json tags.
static const char *const keys[NKEYS] = {"engine", "key", "cached", "args", "env", "memory_limit"};

const char *parse_config(const char *buf, size_t len, struct config *c, size_t *at) {
	struct json j = {buf, buf + len, NULL};
	unsigned seen = 0;
	memset(c, 0, sizeof *c);
	expect(&j, '{', "expected an object");
	ws(&j);
	if (!j.err && !lit(&j, "}")) {
		do {
			ws(&j);
			const char *kp = j.p;
			char *k, *key = NULL;
			int i = 0;
			if (!str(&j, &k)) break;
			while (i < NKEYS && strcmp(k, keys[i]) != 0) i++;
			free(k);
			if (i == NKEYS || seen & 1u << i) {
				j.p = kp;
				fail(&j, i == NKEYS ? "unknown key" : "duplicate key");
				break;
			}
			seen |= 1u << i;
			if (!expect(&j, ':', "expected ':'")) break;
			switch (i) {
			case K_ENGINE: nstr(&j, &c->engine); break;
			case K_KEY: nstr(&j, &key); free(key); break; // not used by this runner
			case K_CACHED: boolean(&j, &c->cached); break;
			case K_ARGS: strs(&j, &c->args); break;
			case K_ENV: strs(&j, &c->env); break;
			case K_MEMORY_LIMIT: integer(&j, &c->memory_limit); break;
			}
		} while (!j.err && more(&j, '}'));
	}
	ws(&j);
	if (!j.err && j.p < j.end) fail(&j, "data after the object");
	if (j.err) {
		free_config(c);
		*at = j.p - buf;
	}
	return j.err;
}

static void free_strv(struct strv *sv) {
	for (size_t i = 0; i < sv->n; i++) free(sv->v[i]);
	free(sv->v);
}

void free_config(struct config *c) {
	free(c->engine);
	free_strv(&c->args);
	free_strv(&c->env);
	memset(c, 0, sizeof *c);
}
