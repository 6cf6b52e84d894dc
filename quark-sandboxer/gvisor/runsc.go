package gvisor

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	runc "github.com/containerd/go-runc"
)

// globalArgs are the flags go-runc puts before a runsc subcommand, for the
// calls made without go-runc (start with the container's stdio, wait).
func globalArgs(r *runc.Runc) []string {
	var out []string
	if r.Root != "" {
		out = append(out, "--root", r.Root)
	}
	if r.Log != "" {
		out = append(out, "--log", r.Log)
	}
	if r.LogFormat != "" {
		out = append(out, "--log-format", string(r.LogFormat))
	}
	return append(out, r.ExtraArgs...)
}

// lastError returns the last error runsc wrote to its JSON log (--log,
// --log-format=json), where it reports why a command failed.
func lastError(logPath string) string {
	f, err := os.Open(logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	var msg string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		var l struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Level == "error" {
			msg = strings.TrimSpace(l.Msg)
		}
	}
	return msg
}

// runtimeError names what failed and why, with runsc's own message.
func runtimeError(logPath string, err error, what string) error {
	if msg := lastError(logPath); msg != "" {
		return fmt.Errorf("%s: runsc: %s (%v)", what, msg, err)
	}
	return fmt.Errorf("%s: runsc: %w", what, err)
}

// notExist tells runsc's "no such container" errors.
func notExist(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "does not exist") || strings.Contains(err.Error(), "not found"))
}
