// Package compile fills wasm-sandboxer's compiled-module cache: a module
// is compiled by a child process (the daemon's binary re-executed as a
// compiler, package runner), in a cgroup of its own with memory and pids
// limits and under a deadline, from the descriptor the daemon opened the
// module with. Compiling takes several times the memory of running (about
// 110 MiB for a 3 MB Go program) and is done outside the container, so
// that a container's limit need not fit it; the limits here keep a
// tenant's module from taking the node's memory or time instead.
//
// The child fills a temporary directory and reports the key of the bytes
// it compiled; the daemon checks it against the key it read, makes the
// directory readable by every user (the container's process reads it
// through a read-only mount, as whatever user it runs as) and renames it
// into place as the module's entry (engine.EntryDir). So an entry holds
// only code the trusted compiler made of the very bytes its key names.
package compile

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/modfile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// Limits bound the compiles.
type Limits struct {
	// Memory is each compile's memory limit in bytes.
	Memory int64
	// Pids bounds each compile's processes and threads.
	Pids int64
	// Timeout is each compile's deadline.
	Timeout time.Duration
	// Concurrent is how many compiles run at once; more wait.
	Concurrent int
	// MaxModuleSize bounds the module a compile reads.
	MaxModuleSize int64
}

// CgroupParent holds the compiles' cgroups, one per compile.
const CgroupParent = cgroup.OwnRoot + "/wasm-compile"

// tmpPrefix names the directories compiles fill before they are entries.
const tmpPrefix = ".tmp-"

// Compiler fills one cache directory.
type Compiler struct {
	binary   string
	cacheDir string
	limits   Limits
	log      *zap.Logger
	slots    chan struct{}
	seq      atomic.Uint64
	// cgMu orders making a compile's cgroup (and CgroupParent with it)
	// with removing CgroupParent once no compile has a cgroup there.
	cgMu sync.Mutex

	mu       sync.Mutex
	inflight map[string]*call
}

// call is a compile that other requests for the same module wait for.
type call struct {
	done chan struct{}
	err  error
}

// New returns a compiler that runs binary (a program whose runner.Main
// compiles) for cacheDir, and removes what compiles cut short by an
// earlier daemon instance left there.
func New(binary, cacheDir string, limits Limits, log *zap.Logger) (*Compiler, error) {
	if limits.Memory <= 0 || limits.Pids <= 0 || limits.Timeout <= 0 || limits.Concurrent <= 0 || limits.MaxModuleSize <= 0 {
		return nil, fmt.Errorf("compile limits must be positive: %+v", limits)
	}
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	stale, _ := filepath.Glob(filepath.Join(cacheDir, "*", tmpPrefix+"*"))
	for _, d := range stale {
		os.RemoveAll(d)
	}
	return &Compiler{
		binary: binary, cacheDir: cacheDir, limits: limits, log: log,
		slots:    make(chan struct{}, limits.Concurrent),
		inflight: map[string]*call{},
	}, nil
}

// Entry makes sure the cache has m's entry for the engine called name,
// compiling m if it has not, and returns the entry's path. Concurrent
// requests for one module compile it once.
func (c *Compiler) Entry(ctx context.Context, name string, m *modfile.Module) (string, error) {
	entry := engine.EntryDir(c.cacheDir, name, m.Key)
	if engine.InCache(c.cacheDir, name, m.Key) {
		return entry, nil
	}
	id := name + "/" + m.Key
	c.mu.Lock()
	cl, running := c.inflight[id]
	if !running {
		cl = &call{done: make(chan struct{})}
		c.inflight[id] = cl
	}
	c.mu.Unlock()
	if running {
		select {
		case <-cl.done:
			return entry, cl.err
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	cl.err = c.compile(ctx, name, m, entry)
	c.mu.Lock()
	delete(c.inflight, id)
	c.mu.Unlock()
	close(cl.done)
	return entry, cl.err
}

func (c *Compiler) compile(ctx context.Context, name string, m *modfile.Module, entry string) error {
	select {
	case c.slots <- struct{}{}:
		defer func() { <-c.slots }()
	case <-ctx.Done():
		return fmt.Errorf("wait to compile %s: %w", m.Guest, ctx.Err())
	}
	if engine.InCache(c.cacheDir, name, m.Key) {
		return nil // compiled by the daemon instance before, meanwhile
	}
	if err := os.MkdirAll(filepath.Dir(entry), 0o700); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(entry), tmpPrefix)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // gone once renamed
	t0 := time.Now()
	key, err := c.run(ctx, name, m, tmp)
	if err != nil {
		return err
	}
	if key != m.Key {
		return fmt.Errorf("module %s changed while it was compiled: %w", m.Guest, errdefs.ErrAborted)
	}
	if err := publish(tmp, entry); err != nil {
		return fmt.Errorf("cache entry %s: %w", entry, err)
	}
	c.log.Info("module compiled", zap.String("engine", name), zap.String("module", m.Guest),
		zap.String("key", m.Key), zap.Int64("bytes", m.Size), zap.Duration("took", time.Since(t0)))
	return nil
}

// run runs one compile child into dir and returns the key it reports.
func (c *Compiler) run(ctx context.Context, name string, m *modfile.Module, dir string) (string, error) {
	cgPath := path.Join(CgroupParent, strconv.FormatUint(c.seq.Add(1), 10))
	mem, pids := c.limits.Memory, c.limits.Pids
	c.cgMu.Lock()
	cg, err := cgroup.NewLimited(cgPath, &specs.LinuxResources{
		Memory: &specs.LinuxMemory{Limit: &mem},
		Pids:   &specs.LinuxPids{Limit: &pids},
	})
	c.cgMu.Unlock()
	if err != nil {
		return "", fmt.Errorf("compile cgroup: %w", err)
	}
	defer c.removeCgroup(cgPath)
	req, err := json.Marshal(runner.CompileRequest{Engine: name, Entry: dir, MaxSize: c.limits.MaxModuleSize})
	if err != nil {
		return "", err
	}
	// The child reads its request once it is in the cgroup: before, it
	// does nothing worth bounding.
	reqR, reqW, err := os.Pipe()
	if err != nil {
		return "", err
	}
	defer reqW.Close()
	cctx, cancel := context.WithTimeout(ctx, c.limits.Timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, c.binary)
	cmd.Args = []string{"kuasar-wasm-compile", m.Guest}
	cmd.Env = []string{runner.EnvMode + "=" + runner.ModeCompile}
	cmd.Dir = "/"
	cmd.Stdin = reqR
	stdout, stderr := &tail{max: 4 << 10}, &tail{max: 4 << 10}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = []*os.File{m.File} // runner.CompileModuleFD
	ec, err := reap.Monitor.Start(cmd)
	reqR.Close()
	if err != nil {
		return "", fmt.Errorf("start the compiler: %w", err)
	}
	what := fmt.Sprintf("compile %s with %s", m.Guest, name)
	if err := cg.Add(cmd.Process.Pid); err != nil {
		_ = cmd.Process.Kill()
		reap.Monitor.Wait(cmd, ec)
		if cerr := c.deadline(ctx, cctx, what); cerr != nil {
			return "", cerr
		}
		return "", fmt.Errorf("place the compiler in its cgroup: %w", err)
	}
	// A child that died already: its exit says why.
	_, _ = reqW.Write(req)
	reqW.Close()
	status, err := reap.Monitor.Wait(cmd, ec)
	if err != nil && status == 0 {
		return "", fmt.Errorf("compiler: %w", err)
	}
	if status == 0 {
		var res runner.CompileResult
		if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
			return "", fmt.Errorf("%s: compiler said %q: %w", what, stdout.Bytes(), err)
		}
		return res.Key, nil
	}
	if err := c.deadline(ctx, cctx, what); err != nil {
		return "", err
	}
	if status == runner.ExitInvalidModule {
		return "", fmt.Errorf("%s: %s: %w", what, strings.TrimSpace(stderr.String()), errdefs.ErrInvalidArgument)
	}
	if n, err := cg.OOMKills(); err == nil && n > 0 {
		return "", fmt.Errorf("%s: needs more than %d MiB of memory (wasm.compile_memory_mib): %w", what, c.limits.Memory>>20, errdefs.ErrResourceExhausted)
	}
	return "", fmt.Errorf("%s: compiler exit status %d: %s", what, status, strings.TrimSpace(stderr.String()))
}

// removeCgroup removes a compile's cgroup, and CgroupParent when no other
// compile has one there: nothing of the compiles stays.
func (c *Compiler) removeCgroup(p string) {
	if err := cgroup.Remove(p); err != nil {
		c.log.Warn("remove compile cgroup", zap.String("cgroup", p), zap.Error(err))
		return
	}
	c.cgMu.Lock()
	defer c.cgMu.Unlock()
	if parent, err := cgroup.Load(CgroupParent); err == nil {
		_ = parent.Delete() // fails while another compile's cgroup is there
	}
}

// deadline is why a compile that ctx or the compile deadline (cctx) ended
// failed, or nil.
func (c *Compiler) deadline(ctx, cctx context.Context, what string) error {
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("%s: %w", what, ctx.Err())
	case errors.Is(cctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("%s: took longer than %s (wasm.compile_timeout_seconds): %w", what, c.limits.Timeout, errdefs.ErrResourceExhausted)
	}
	return nil
}

// publish makes dir, a compile's output, the entry: readable (never
// writable) by every user, owned by root, then renamed into place. An entry
// another compile put there first is kept.
func publish(dir, entry string) error {
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := os.FileMode(0o444)
		if d.IsDir() {
			mode = 0o555
		} else if !d.Type().IsRegular() {
			return fmt.Errorf("%s is not a regular file", p)
		}
		if err := os.Lchown(p, 0, 0); err != nil {
			return err
		}
		return os.Chmod(p, mode)
	})
	if err != nil {
		return err
	}
	if err := os.Rename(dir, entry); err != nil && !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.ENOTEMPTY) {
		return err
	}
	return nil
}

// tail keeps the last max bytes written to it.
type tail struct {
	max int
	b   bytes.Buffer
}

func (t *tail) Write(p []byte) (int, error) {
	t.b.Write(p)
	if over := t.b.Len() - t.max; over > 0 {
		t.b.Next(over)
	}
	return len(p), nil
}

func (t *tail) Bytes() []byte  { return t.b.Bytes() }
func (t *tail) String() string { return t.b.String() }
