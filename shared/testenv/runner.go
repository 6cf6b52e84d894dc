package testenv

import (
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
)

// Runner lets programs (the demo, the benchmark) use the harness, which is
// written against testing.TB: Fatal unwinds to Run, Cleanup functions run
// when Run returns, logs go to a writer.
type Runner struct {
	// testing.TB is embedded (nil) only to satisfy the interface's private
	// method; every method the harness calls is implemented below.
	testing.TB

	name string
	out  io.Writer

	mu       sync.Mutex
	failed   bool
	cleanups []func()
	tempDirs []string
}

// NewRunner returns a Runner that logs to out.
func NewRunner(name string, out io.Writer) *Runner {
	return &Runner{name: name, out: out}
}

type fatal struct{}

// Run calls fn, then the registered cleanups (last first). It returns an
// error when fn failed or was stopped by Fatal or Skip.
func (r *Runner) Run(fn func(tb testing.TB)) (err error) {
	defer func() {
		if p := recover(); p != nil {
			if _, ok := p.(fatal); !ok {
				r.cleanup()
				panic(p)
			}
		}
		r.cleanup()
		if r.Failed() {
			err = fmt.Errorf("%s failed", r.name)
		}
	}()
	fn(r)
	return nil
}

func (r *Runner) cleanup() {
	r.mu.Lock()
	fns := r.cleanups
	r.cleanups = nil
	dirs := r.tempDirs
	r.tempDirs = nil
	r.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
	for _, d := range dirs {
		os.RemoveAll(d)
	}
}

func (r *Runner) Helper()      {}
func (r *Runner) Name() string { return r.name }
func (r *Runner) Cleanup(fn func()) {
	r.mu.Lock()
	r.cleanups = append(r.cleanups, fn)
	r.mu.Unlock()
}
func (r *Runner) Log(args ...any) { fmt.Fprintln(r.out, args...) }
func (r *Runner) Logf(format string, args ...any) {
	fmt.Fprintf(r.out, format+"\n", args...)
}
func (r *Runner) Fail() {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
}
func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}
func (r *Runner) Error(args ...any)                 { r.Log(args...); r.Fail() }
func (r *Runner) Errorf(format string, args ...any) { r.Logf(format, args...); r.Fail() }
func (r *Runner) FailNow()                          { r.Fail(); panic(fatal{}) }
func (r *Runner) Fatal(args ...any)                 { r.Error(args...); panic(fatal{}) }
func (r *Runner) Fatalf(format string, args ...any) { r.Errorf(format, args...); panic(fatal{}) }
func (r *Runner) SkipNow()                          { r.Fail(); panic(fatal{}) }
func (r *Runner) Skip(args ...any)                  { r.Error(args...); panic(fatal{}) }
func (r *Runner) Skipf(format string, args ...any)  { r.Errorf(format, args...); panic(fatal{}) }
func (r *Runner) Skipped() bool                     { return false }
func (r *Runner) TempDir() string {
	d, err := os.MkdirTemp("", "kg-run-")
	if err != nil {
		r.Fatalf("temp dir: %v", err)
	}
	r.mu.Lock()
	r.tempDirs = append(r.tempDirs, d)
	r.mu.Unlock()
	return d
}
