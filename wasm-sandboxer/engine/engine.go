// Package engine runs WASI command modules (wasip1, "preview 1") behind one
// interface, whichever WebAssembly runtime does the work: wazero (pure Go),
// wasmtime (cgo, its static library ships with wasmtime-go) and WasmEdge
// (build tag wasmedge, needs libwasmedge). Engines register themselves by
// name; which are present depends on the build.
package engine

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// Options configure an engine.
type Options struct {
	// Cache is the module's entry in a compiled-module cache (EntryDir): a
	// directory of one module's compiled code for the engine, which
	// Compile fills when it compiles and loads from when it holds the
	// code. Empty compiles without a cache.
	Cache string
	// MaxMemoryBytes caps each instance's linear memory; 0 keeps the
	// engine's default (4 GiB for wasm32).
	MaxMemoryBytes uint64
}

// RunConfig is what a module sees of the world through WASI.
type RunConfig struct {
	// Args are the WASI arguments, args[0] included.
	Args []string
	// Env holds KEY=VALUE pairs.
	Env []string
	// Root is the host directory pre-opened as "/".
	Root string
	// Stdin, Stdout and Stderr are the process's standard streams
	// (engines that cannot take streams inherit the process's 0, 1, 2,
	// so callers pass os.Stdin, os.Stdout, os.Stderr).
	Stdin, Stdout, Stderr *os.File
}

// Engine compiles modules. An Engine is used by one process, the one that
// runs the module; it is not meant to be shared between goroutines.
type Engine interface {
	// Name is the name the engine registered under.
	Name() string
	// Compile validates and compiles a module, from the cache when it holds
	// it. Invalid modules give an error wrapping ErrInvalidModule.
	Compile(ctx context.Context, wasm []byte) (Module, error)
	Close(ctx context.Context) error
}

// Module is a compiled module.
type Module interface {
	// Cached reports whether the compiled code came from the cache.
	Cached() bool
	// Instantiate links the module with WASI as cfg says, without running
	// it. A module whose imports the engine cannot satisfy, or that is not
	// a WASI command (no _start), gives an error wrapping ErrLink.
	Instantiate(ctx context.Context, cfg RunConfig) (Instance, error)
	Close(ctx context.Context) error
}

// Instance is an instantiated module, ready to run.
type Instance interface {
	// Run calls _start once. It returns the exit code (proc_exit's, or 0
	// when _start returns) or an error wrapping ErrTrap when the module
	// trapped.
	Run(ctx context.Context) (exitCode int, err error)
	Close(ctx context.Context) error
}

// DecodedReleaser is an Instance whose engine keeps parts of the decoded
// module that only compiling or instantiating again would need (wazero).
// A process that runs one instance of its module calls ReleaseDecoded
// after instantiation; the Module must not be instantiated again. It
// reports whether anything was released.
type DecodedReleaser interface {
	ReleaseDecoded() bool
}

var (
	// ErrUnknownEngine is returned by New for a name no engine registered.
	ErrUnknownEngine = errors.New("unknown wasm engine")
	// ErrInvalidModule marks bytes that are not a valid module.
	ErrInvalidModule = errors.New("invalid wasm module")
	// ErrLink marks a module whose imports the engine cannot satisfy.
	ErrLink = errors.New("cannot instantiate wasm module")
	// ErrTrap marks a module that trapped.
	ErrTrap = errors.New("wasm trap")
)

// Factory makes an engine.
type Factory func(opts Options) (Engine, error)

type registration struct {
	version string
	factory Factory
}

var (
	mu        sync.Mutex
	factories = map[string]registration{}
)

// Register makes an engine available under name; engines call it from
// init. version names the engine's cache directory: code compiled by
// another version is never looked at.
func Register(name, version string, f Factory) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := factories[name]; dup {
		panic("engine registered twice: " + name)
	}
	factories[name] = registration{version: version, factory: f}
}

// Version returns the version an engine registered with ("" if unknown).
func Version(name string) string {
	mu.Lock()
	defer mu.Unlock()
	return factories[name].version
}

// A compiled-module cache holds one directory per engine and engine
// version, and in it one entry per module, named after the module's key:
// <cache>/<engine>-<version>/<key>/. An entry is complete once it has its
// name (it is filled under a temporary name and renamed), and holds one
// module's code only, so that the process running the module can be
// given that entry and nothing else of the cache.

// EntryDir is the cache entry of the module whose key is key for the
// engine called name.
func EntryDir(cacheDir, name, key string) string {
	return filepath.Join(cacheDir, name+"-"+Version(name), key)
}

// InCache reports whether cacheDir has the entry of key for the engine.
func InCache(cacheDir, name, key string) bool {
	fi, err := os.Stat(EntryDir(cacheDir, name, key))
	return err == nil && fi.IsDir()
}

// Uncache removes the entry of key for the engine (code that could not be
// loaded), so that the next start compiles the module again.
func Uncache(cacheDir, name, key string) error {
	return os.RemoveAll(EntryDir(cacheDir, name, key))
}

// WasmtimeCodeFile is the file of a wasmtime cache entry that holds the
// module's serialized code (what kuasar-wasm-runner-wasmtime maps).
const WasmtimeCodeFile = "module.cwasm"

// Names lists the engines this build has, sorted.
func Names() []string {
	mu.Lock()
	defer mu.Unlock()
	names := make([]string, 0, len(factories))
	for n := range factories {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Check returns an error wrapping ErrUnknownEngine unless name is built in.
func Check(name string) error {
	mu.Lock()
	_, ok := factories[name]
	mu.Unlock()
	if !ok {
		return fmt.Errorf("%w %q (this build has: %s)", ErrUnknownEngine, name, strings.Join(Names(), ", "))
	}
	return nil
}

// New makes the engine called name.
func New(name string, opts Options) (Engine, error) {
	if err := Check(name); err != nil {
		return nil, err
	}
	mu.Lock()
	r := factories[name]
	mu.Unlock()
	return r.factory(opts)
}

// magic is the start of every binary module (and component): "\0asm".
var magic = []byte{0x00, 0x61, 0x73, 0x6d}

// IsWasm reports whether b starts like a binary WebAssembly module.
func IsWasm(b []byte) bool { return len(b) >= 8 && bytes.Equal(b[:4], magic) }

// Key is the cache key of a module: the hex SHA-256 of its bytes.
func Key(wasm []byte) string {
	k, _ := KeyOf(bytes.NewReader(wasm))
	return k
}

// KeyOf is the cache key of the module r reads, read a buffer at a time.
func KeyOf(r io.Reader) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// cacheFile writes data to path atomically (a temporary file renamed), so
// that concurrent processes compiling the same module never see half a file.
func cacheFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
