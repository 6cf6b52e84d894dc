package oci

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-go/kuasar-go/shared/store"
)

// Hook adapts a container's processes before runc sees them: the wasm
// family replaces each by its module runner, which gets what it runs as
// file descriptors. The Runtime calls it with the rootfs mounted.
type Hook interface {
	// Init adapts the container's spec, read from the bundle's config.json
	// and written back when Init succeeds (runc create reads it there).
	Init(ctx context.Context, bundle string, spec *specs.Spec) (*Prepared, error)
	// Exec adapts an exec'd process of the container whose spec is given,
	// each time it is started (after a daemon restart too): ps is a copy,
	// the container's record keeps the process as containerd asked for it.
	Exec(ctx context.Context, bundle string, spec *specs.Spec, ps *specs.Process) (*Prepared, error)
}

// Prepared is what a Hook prepared for one process.
type Prepared struct {
	// Files are passed to the process from descriptor 3 on (runc
	// --preserve-fds); the Runtime closes them once runc has them.
	Files []*os.File
	// Ready, if set, is called once the process runs (after runc start or
	// runc exec): it waits until the process is ready and says why not.
	Ready func(ctx context.Context) error
	// Release, if set, frees what the hook keeps for the process; called
	// once, after Ready or when the process will not run.
	Release func()
}

// Option configures a Runtime.
type Option func(*Runtime)

// WithHook makes h adapt every process before runc creates or execs it.
func WithHook(h Hook) Option { return func(rt *Runtime) { rt.hook = h } }

func (p *Prepared) closeFiles() {
	if p == nil {
		return
	}
	for _, f := range p.Files {
		f.Close()
	}
	p.Files = nil
}

// ready waits for the process (see Prepared.Ready) and releases p.
func (p *Prepared) ready(ctx context.Context) error {
	if p == nil {
		return nil
	}
	defer p.release()
	if p.Ready == nil {
		return nil
	}
	return p.Ready(ctx)
}

func (p *Prepared) release() {
	if p == nil {
		return
	}
	p.closeFiles()
	if p.Release != nil {
		p.Release()
		p.Release = nil
	}
}

// specPath is the bundle's OCI spec, which runc create reads.
func specPath(bundle string) string { return filepath.Join(bundle, "config.json") }

func readSpec(bundle string) (*specs.Spec, error) {
	data, err := os.ReadFile(specPath(bundle))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, fmt.Errorf("bundle %s: config.json: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || spec.Root == nil {
		return nil, fmt.Errorf("bundle %s: config.json has no process or root: %w", bundle, errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// prepareInit runs the hook on the bundle's spec and writes the result
// back for runc create.
func (rt *Runtime) prepareInit(ctx context.Context, bundle string) (*Prepared, error) {
	spec, err := readSpec(bundle)
	if err != nil {
		return nil, err
	}
	prep, err := rt.hook.Init(ctx, bundle, spec)
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(spec)
	if err == nil {
		err = store.WriteFileAtomic(specPath(bundle), data)
	}
	if err != nil {
		prep.release()
		return nil, fmt.Errorf("write the prepared spec: %w", err)
	}
	return prep, nil
}

// prepareExec runs the hook on a copy of an exec's process.
func (rt *Runtime) prepareExec(ctx context.Context, bundle string, ps specs.Process) (specs.Process, *Prepared, error) {
	spec, err := readSpec(bundle)
	if err != nil {
		return ps, nil, err
	}
	// The hook may change what the slices hold: copy them.
	ps.Args = append([]string(nil), ps.Args...)
	ps.Env = append([]string(nil), ps.Env...)
	prep, err := rt.hook.Exec(ctx, bundle, spec, &ps)
	return ps, prep, err
}

// withFiles is a go-runc IO that also passes files to the process runc
// exec starts (go-runc's ExecOpts have no ExtraFiles; runc passes them
// on with --preserve-fds).
type withFiles struct {
	runc.IO
	files []*os.File
}

func (w withFiles) Set(cmd *exec.Cmd) {
	if w.IO != nil {
		w.IO.Set(cmd)
	}
	cmd.ExtraFiles = w.files
}

func preserveFds(files []*os.File) []string {
	return []string{"--preserve-fds", strconv.Itoa(len(files))}
}
