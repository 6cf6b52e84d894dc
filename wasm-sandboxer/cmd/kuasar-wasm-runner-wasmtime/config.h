// The configuration of kuasar-wasm-runner-wasmtime (runner.RunConfig, one
// JSON object the daemon writes with encoding/json) and its reader, without
// wasmtime: main.c and the Go test of the reader both build config.c.
#ifndef KUASAR_WASM_RUNNER_CONFIG_H
#define KUASAR_WASM_RUNNER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

struct strv {
	char **v;
	size_t n;
};

struct config {
	char *engine;
	int cached;
	struct strv args, env;
	uint64_t memory_limit;
};

int parse_config(const char *line, size_t len, struct config *c);

#endif
