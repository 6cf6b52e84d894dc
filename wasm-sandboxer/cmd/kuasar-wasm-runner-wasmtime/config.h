// The configuration of kuasar-wasm-runner-wasmtime (runner.RunConfig, one
// JSON object the daemon writes with encoding/json) and its reader, without
// wasmtime: main.c and the Go test of the reader (config.go) both build
// config.c.
#ifndef KUASAR_WASM_RUNNER_CONFIG_H
#define KUASAR_WASM_RUNNER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

// A list of strings; v[n] is NULL (v itself is NULL when n is 0).
struct strv {
	char **v;
	size_t n;
};

struct config {
	char *engine; // NULL when absent or null
	int cached;
	struct strv args, env;
	uint64_t memory_limit; // at most INT64_MAX
};

// parse_config decodes the len bytes at buf into c. It returns NULL when
// it could, else why not, with *at the offset in buf where it stopped and
// c holding nothing.
const char *parse_config(const char *buf, size_t len, struct config *c, size_t *at);

// free_config frees what parse_config put in c.
void free_config(struct config *c);

#endif
