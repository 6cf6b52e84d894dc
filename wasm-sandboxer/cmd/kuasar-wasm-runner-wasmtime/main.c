//go:build ignore

// The line above keeps this file out of this directory's Go package, the
// cgo test of config.c; make build compiles it with wasmtime.

// kuasar-wasm-runner-wasmtime is a wasm container's process for the
// wasmtime engine, without a Go runtime: wasmtime's C API (the static
// library that wasmtime-go ships in its Go module) and libc, linked
// statically: runc execs it inside the container's root, where no library
// of the host is. It speaks the protocol of package runner's run mode; the
// daemon (wasm-sandboxer, package wasmrt) has runc pass it, from fd 3 on:
//
//   - 3: the runner itself (runc execs /proc/self/fd/3);
//   - 4: the configuration, one JSON object (runner.RunConfig);
//   - 5: the status pipe: one JSON object (runner.Status) once the module
//     is instantiated and ready, or why it is not, then closed;
//   - 6: the module, read-only (read only when there is no cache entry);
//   - 7: with "cached": the module's cache entry, a read-only mount of
//     that directory, whose module.cwasm is the code the daemon's compile
//     child made. wasmtime_module_deserialize_file maps it: the code pages
//     are shared by every container of the module.
//
// runc has made the process what the container's spec says (root, mounts,
// namespaces, cgroup, user, capabilities, no_new_privs, seccomp); stdio
// are containerd's FIFOs. The engine has wasmtime's default configuration,
// the one the daemon compiles with (wasmtime-go's NewConfig); code compiled
// by another wasmtime version or configuration is refused by wasmtime,
// reported with "bad_cache" so that the daemon drops the entry (the next
// start compiles again). Without a cache entry it compiles the module
// itself, in the container's cgroup.
//
// Exit status: proc_exit's code; 0 when _start returns; 134 after a trap
// (printed on stderr as "wasm-sandboxer: wasm trap: ..."); 1 when it could
// not get ready. SIGTERM ends it (143), as it would end any process, also
// when it is its PID namespace's init.
// It is not meant to be run by hand.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <wasi.h>
#include <wasm.h>
#include <wasmtime.h>

#include "config.h"

#define BINARY_FD 3
#define CONFIG_FD 4
#define STATUS_FD 5
#define MODULE_FD 6
#define CACHE_FD 7
#define CACHE_CODE "/proc/self/fd/7/module.cwasm"
#define EXIT_TRAP 134
#define MAX_CONFIG (16 << 20)
#define RELEASE_AFTER_S 1

// ---- the status (runner.Status) -----------------------------------------

static void json_str(FILE *f, const char *s) {
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
		else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
		else fputc(*p, f);
	}
	fputc('"', f);
}

static int reported;

// report writes the status and closes the pipe. err NULL: ready.
static void report(const char *err, int invalid, int bad_cache, int cached) {
	if (reported) return;
	reported = 1;
	// The daemon may have gone (restarted) since: no reader is no error.
	struct sigaction ign = {0}, old;
	ign.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &ign, &old);
	FILE *f = fdopen(STATUS_FD, "w");
	if (!f) { close(STATUS_FD); sigaction(SIGPIPE, &old, NULL); return; }
	fputc('{', f);
	if (err) {
		fputs("\"error\":", f);
		json_str(f, err);
		if (invalid) fputs(",\"invalid\":true", f);
		if (bad_cache) fputs(",\"bad_cache\":true", f);
	} else if (cached) {
		fputs("\"cached\":true", f);
	}
	fputs("}\n", f);
	fclose(f);
	sigaction(SIGPIPE, &old, NULL);
}

static int fail(int invalid, int bad_cache, const char *fmt, ...) {
	char buf[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	report(buf, invalid, bad_cache, 0);
	return 1;
}

// A wasmtime error's message, in buf (the error is deleted).
static const char *errmsg(wasmtime_error_t *e, wasm_trap_t *t, char *buf, size_t size) {
	wasm_byte_vec_t m = {0};
	if (e) {
		wasmtime_error_message(e, &m);
		wasmtime_error_delete(e);
	} else if (t) {
		wasm_trap_message(t, &m);
		wasm_trap_delete(t);
	}
	size_t n = m.size;
	if (n > 0 && m.data[n - 1] == 0) n--; // trap messages end with NUL
	if (n >= size) n = size - 1;
	if (n) memcpy(buf, m.data, n);
	buf[n] = 0;
	if (m.data) wasm_byte_vec_delete(&m);
	return buf;
}

// ---- releasing start-up file pages (runner/release_linux.go) ----------

// release drops, from this process's page tables only, the private,
// read-only, never-written file mappings that starting faulted in (the
// binary's text, the compiled module's code): the pages stay in the page
// cache and come back on access. See releaseStartupPages in package runner.
static void release(int procfd) {
	if (procfd < 0) return;
	int fd = openat(procfd, "smaps", O_RDONLY | O_CLOEXEC);
	if (fd < 0) return;
	enum { MAXR = 128 };
	uintptr_t rs[MAXR], re[MAXR];
	int n = 0, have = 0, dirty = 0;
	uintptr_t cs = 0, ce = 0;
	char buf[8192], line[512];
	size_t ll = 0;
	ssize_t got;
	int done = 0;
	while (!done) {
		got = read(fd, buf, sizeof buf);
		if (got <= 0) { done = 1; got = 0; if (ll == 0) break; buf[got++] = '\n'; }
		for (ssize_t i = 0; i < got; i++) {
			if (buf[i] != '\n') {
				if (ll < sizeof line - 1) line[ll++] = buf[i];
				continue;
			}
			line[ll] = 0;
			char *sp = strchr(line, ' ');
			if (sp && sp > line && sp[-1] == ':') {
				if (have && (!strncmp(line, "Anonymous:", 10) || !strncmp(line, "Swap:", 5))) {
					char *v = sp;
					while (*v == ' ') v++;
					if (strncmp(v, "0 kB", 4) != 0) dirty = 1;
				}
			} else if (sp) {
				if (have && !dirty && n < MAXR) { rs[n] = cs; re[n] = ce; n++; }
				have = dirty = 0;
				const char *perm = sp + 1;
				if (strlen(perm) >= 5 && perm[4] == ' ' && perm[1] != 'w' && perm[3] == 'p' && strchr(perm, '/')) {
					char *e;
					unsigned long lo = strtoul(line, &e, 16), hi;
					if (*e == '-') {
						hi = strtoul(e + 1, &e, 16);
						if (e == sp && hi > lo) { cs = lo; ce = hi; have = 1; }
					}
				}
			}
			ll = 0;
		}
	}
	if (have && !dirty && n < MAXR) { rs[n] = cs; re[n] = ce; n++; }
	close(fd);
	for (int i = 0; i < n; i++) madvise((void *)rs[i], re[i] - rs[i], MADV_DONTNEED);
}

static void *release_later(void *arg) {
	sleep(RELEASE_AFTER_S);
	release((int)(intptr_t)arg);
	return NULL;
}

// ---- main -------------------------------------------------------------

static void die_of(int sig) { _exit(128 + sig); }

// exit_on_signals_as_init makes SIGTERM, SIGINT and SIGHUP end the process
// as they end any other one (exit status 128 + the signal) when it is its
// PID namespace's init (a container with a PID namespace of its own), to
// which the kernel sends no signal it has no handler for: a WASI module
// cannot handle signals, so the runner does what their default would.
static void exit_on_signals_as_init(void) {
	if (getpid() != 1) return;
	struct sigaction sa = {0};
	sa.sa_handler = die_of;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
}

// read_fd reads what fd holds from its start (pread: the file's offset is
// not the runner's to rely on), at most max bytes (NULL beyond).
static uint8_t *read_fd(int fd, size_t max, size_t *len) {
	size_t cap = 64 << 10, n = 0;
	uint8_t *b = malloc(cap);
	while (b) {
		if (n == cap) {
			if (cap >= max) { free(b); errno = EFBIG; return NULL; }
			uint8_t *nb = realloc(b, cap *= 2);
			if (!nb) { free(b); return NULL; }
			b = nb;
		}
		ssize_t r = pread(fd, b + n, cap - n, (off_t)n);
		if (r < 0 && errno == EINTR) continue;
		if (r < 0) { free(b); return NULL; }
		if (r == 0) { *len = n; return b; }
		n += r;
	}
	return NULL;
}

int main(int argc, char **argv) {
	(void)argc;
	(void)argv;
	const char *mode = getenv("KUASAR_GO_WASM_CHILD");
	if (!mode || strcmp(mode, "run") != 0) {
		fprintf(stderr, "kuasar-wasm-runner-wasmtime runs wasm-sandboxer's wasmtime module processes; it is started by wasm-sandboxer\n");
		return 2;
	}
	// What ps shows, rather than the descriptor runc exec'd ("3").
	prctl(PR_SET_NAME, "kuasar-wasm", 0, 0, 0);
	exit_on_signals_as_init();
	close(BINARY_FD);
	// One malloc arena (the module runs on one thread; wasmtime's WASI
	// adds one tokio worker), and free memory at the top of the heap goes
	// back to the kernel: -0.06 MiB per container.
	mallopt(M_ARENA_MAX, 1);
	mallopt(M_TOP_PAD, 0);
	mallopt(M_TRIM_THRESHOLD, 0);
	size_t len;
	char *line = (char *)read_fd(CONFIG_FD, MAX_CONFIG, &len);
	close(CONFIG_FD);
	if (!line) return fail(0, 0, "read config: %s", strerror(errno));
	struct config cfg;
	size_t at;
	const char *why = parse_config(line, len, &cfg, &at);
	free(line);
	if (why) return fail(0, 0, "decode config: %s at byte %zu", why, at);
	if (cfg.engine && strcmp(cfg.engine, "wasmtime") != 0)
		return fail(0, 0, "kuasar-wasm-runner-wasmtime runs the wasmtime engine only, not %s", cfg.engine);

	int procfd = open("/proc/self", O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	// wasmtime's default configuration: the daemon's compile child uses
	// wasmtime-go's NewConfig, which is wasm_config_new as well.
	wasm_engine_t *engine = wasm_engine_new_with_config(wasm_config_new());
	if (!engine) return fail(0, 0, "wasmtime: cannot create the engine");
	wasmtime_module_t *module = NULL;
	wasmtime_error_t *err;
	char msg[2048];
	if (cfg.cached) {
		err = wasmtime_module_deserialize_file(engine, CACHE_CODE, &module);
		close(CACHE_FD);
		if (err)
			return fail(0, 1,
				    "wasmtime: cannot load the compiled module: %s "
				    "(kuasar-wasm-runner-wasmtime must be built with the daemon's wasmtime, v39.0.1, and its settings)",
				    errmsg(err, NULL, msg, sizeof msg));
	} else {
		size_t n;
		uint8_t *wasm = read_fd(MODULE_FD, (size_t)1 << 40, &n);
		if (!wasm) return fail(0, 0, "read the module: %s", strerror(errno));
		if (n < 8 || memcmp(wasm, "\0asm", 4) != 0) return fail(1, 0, "invalid wasm module: no \\0asm header");
		err = wasmtime_module_new(engine, wasm, n, &module);
		free(wasm);
		if (err) return fail(1, 0, "invalid wasm module: %s", errmsg(err, NULL, msg, sizeof msg));
	}
	close(MODULE_FD);

	wasmtime_linker_t *linker = wasmtime_linker_new(engine);
	if ((err = wasmtime_linker_define_wasi(linker)))
		return fail(0, 0, "wasmtime: define WASI: %s", errmsg(err, NULL, msg, sizeof msg));
	wasmtime_store_t *store = wasmtime_store_new(engine, NULL, NULL);
	wasmtime_context_t *ctx = wasmtime_store_context(store);
	if (cfg.memory_limit > 0) wasmtime_store_limiter(store, (int64_t)cfg.memory_limit, -1, -1, -1, -1);

	wasi_config_t *wasi = wasi_config_new();
	if (!wasi_config_set_argv(wasi, cfg.args.n, (const char **)cfg.args.v))
		return fail(0, 0, "wasmtime: WASI arguments");
	const char **keys = calloc(cfg.env.n + 1, sizeof *keys), **vals = calloc(cfg.env.n + 1, sizeof *vals);
	for (size_t i = 0; i < cfg.env.n; i++) {
		char *eq = strchr(cfg.env.v[i], '=');
		keys[i] = cfg.env.v[i];
		vals[i] = "";
		if (eq) { *eq = 0; vals[i] = eq + 1; }
	}
	if (!wasi_config_set_env(wasi, cfg.env.n, keys, vals)) return fail(0, 0, "wasmtime: WASI environment");
	wasi_config_inherit_stdin(wasi);
	wasi_config_inherit_stdout(wasi);
	wasi_config_inherit_stderr(wasi);
	// "/" is the container's root: runc has pivoted into it.
	if (!wasi_config_preopen_dir(wasi, "/", "/", WASMTIME_WASI_DIR_PERMS_READ | WASMTIME_WASI_DIR_PERMS_WRITE,
				     WASMTIME_WASI_FILE_PERMS_READ | WASMTIME_WASI_FILE_PERMS_WRITE))
		return fail(0, 0, "wasmtime: pre-open /: failed to preopen directory");
	if ((err = wasmtime_context_set_wasi(ctx, wasi)))
		return fail(0, 0, "wasmtime: WASI: %s", errmsg(err, NULL, msg, sizeof msg));
	free(keys);
	free(vals);

	wasmtime_instance_t instance;
	wasm_trap_t *trap = NULL;
	err = wasmtime_linker_instantiate(linker, ctx, module, &instance, &trap);
	if (err || trap) return fail(1, 0, "cannot instantiate wasm module: %s", errmsg(err, trap, msg, sizeof msg));
	wasmtime_extern_t start;
	if (!wasmtime_instance_export_get(ctx, &instance, "_start", 6, &start) || start.kind != WASMTIME_EXTERN_FUNC)
		return fail(1, 0, "cannot instantiate wasm module: the module exports no _start (not a WASI command)");

	report(NULL, 0, 0, cfg.cached);
	// What loading and instantiating left: file pages out of the page
	// tables, free heap back to the kernel.
	release(procfd);
	malloc_trim(0);
	if (procfd >= 0) {
		// Once more when the module has initialised itself.
		pthread_attr_t at;
		pthread_t th;
		pthread_attr_init(&at);
		pthread_attr_setstacksize(&at, 64 << 10);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		pthread_create(&th, &at, release_later, (void *)(intptr_t)procfd);
		pthread_attr_destroy(&at);
	}

	// runc start was the start: run.
	trap = NULL;
	err = wasmtime_func_call(ctx, &start.of.func, NULL, 0, NULL, 0, &trap);
	if (err) {
		int status;
		if (wasmtime_error_exit_status(err, &status)) {
			wasmtime_error_delete(err);
			exit(status);
		}
	}
	if (err || trap) {
		fprintf(stderr, "wasm-sandboxer: wasm trap: %s\n", errmsg(err, trap, msg, sizeof msg));
		exit(EXIT_TRAP);
	}
	exit(0);
}
