#include <stdlib.h>
#include <string.h>

#include "config.h"

// A JSON reader for the flat object the daemon writes (encoding/json).
struct json {
	const char *p, *end;
	int err;
};

static void ws(struct json *j) {
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int expect(struct json *j, char c) {
	ws(j);
	if (j->p < j->end && *j->p == c) {
		j->p++;
		return 1;
	}
	j->err = 1;
	return 0;
}

static int peek(struct json *j, char c) {
	ws(j);
	return j->p < j->end && *j->p == c;
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

// str reads a string (or null, as NULL). A NUL inside is an error: C
// strings cannot carry it.
static char *str(struct json *j) {
	ws(j);
	if (j->end - j->p >= 4 && memcmp(j->p, "null", 4) == 0) {
		j->p += 4;
		return NULL;
	}
	if (!expect(j, '"')) return NULL;
	const char *s = j->p;
	while (j->p < j->end && *j->p != '"') {
		if (*j->p == '\\') j->p++;
		j->p++;
	}
	if (j->p >= j->end) { j->err = 1; return NULL; }
	char *out = malloc(j->p - s + 1), *o = out;
	if (!out) { j->err = 1; return NULL; }
	for (const char *q = s; q < j->p; q++) {
		if (*q != '\\') { *o++ = *q; continue; }
		q++;
		switch (*q) {
		case '"': case '\\': case '/': *o++ = *q; break;
		case 'b': *o++ = '\b'; break;
		case 'f': *o++ = '\f'; break;
		case 'n': *o++ = '\n'; break;
		case 'r': *o++ = '\r'; break;
		case 't': *o++ = '\t'; break;
		case 'u': {
			unsigned cp, lo;
			if (j->p - q < 5 || !hex4(q + 1, &cp)) { j->err = 1; break; }
			q += 4;
			if (cp >= 0xd800 && cp < 0xdc00 && j->p - q >= 7 && q[1] == '\\' && q[2] == 'u' &&
			    hex4(q + 3, &lo) && lo >= 0xdc00 && lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				q += 6;
			} else if (cp >= 0xd800 && cp < 0xe000) {
				cp = 0xfffd;
			}
			if (cp == 0) { j->err = 1; break; }
			o = utf8(o, cp);
			break;
		}
		default: j->err = 1;
		}
	}
	*o = 0;
	j->p++; // closing quote
	return out;
}

static uint64_t num(struct json *j) {
	ws(j);
	uint64_t v = 0;
	const char *s = j->p;
	while (j->p < j->end && *j->p >= '0' && *j->p <= '9') v = v * 10 + (*j->p++ - '0');
	if (j->p == s) j->err = 1;
	return v;
}

// skip passes over any value (keys this runner does not use).
static void skip(struct json *j) {
	ws(j);
	if (j->p >= j->end) { j->err = 1; return; }
	if (*j->p == '"') { free(str(j)); return; }
	if (*j->p == '[' || *j->p == '{') {
		char close = *j->p == '[' ? ']' : '}';
		j->p++;
		if (peek(j, close)) { j->p++; return; }
		for (;;) {
			if (close == '}') { free(str(j)); expect(j, ':'); }
			skip(j);
			if (j->err) return;
			if (peek(j, ',')) { j->p++; continue; }
			expect(j, close);
			return;
		}
	}
	while (j->p < j->end && !strchr(",]} \t\r\n", *j->p)) j->p++;
}

static struct strv strs(struct json *j) {
	struct strv sv = {0};
	ws(j);
	if (j->end - j->p >= 4 && memcmp(j->p, "null", 4) == 0) { j->p += 4; return sv; }
	if (!expect(j, '[')) return sv;
	if (peek(j, ']')) { j->p++; return sv; }
	for (;;) {
		char *s = str(j);
		if (j->err || !s) { j->err = 1; return sv; }
		char **nv = realloc(sv.v, (sv.n + 2) * sizeof *nv);
		if (!nv) { j->err = 1; return sv; }
		sv.v = nv;
		sv.v[sv.n++] = s;
		sv.v[sv.n] = NULL;
		if (peek(j, ',')) { j->p++; continue; }
		expect(j, ']');
		return sv;
	}
}

int parse_config(const char *line, size_t len, struct config *c) {
	struct json j = {line, line + len, 0};
	memset(c, 0, sizeof *c);
	if (!expect(&j, '{')) return -1;
	if (peek(&j, '}')) return 0;
	for (;;) {
		char *k = str(&j);
		if (j.err || !k || !expect(&j, ':')) { free(k); return -1; }
		if (!strcmp(k, "engine")) c->engine = str(&j);
		else if (!strcmp(k, "cached")) {
			ws(&j);
			if (j.end - j.p >= 4 && !memcmp(j.p, "true", 4)) { c->cached = 1; j.p += 4; }
			else skip(&j);
		} else if (!strcmp(k, "args")) c->args = strs(&j);
		else if (!strcmp(k, "env")) c->env = strs(&j);
		else if (!strcmp(k, "memory_limit")) c->memory_limit = num(&j);
		else skip(&j);
		free(k);
		if (j.err) return -1;
		if (peek(&j, ',')) { j.p++; continue; }
		return expect(&j, '}') ? 0 : -1;
	}
}
