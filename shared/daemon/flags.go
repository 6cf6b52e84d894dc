// Package daemon is the plumbing every sandboxer shares: flags, TOML
// config, zap logging, root-only sockets, the controller (gRPC) and task
// (ttrpc) servers, systemd notification and graceful shutdown.
package daemon

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Flags are the command-line flags of every sandboxer.
type Flags struct {
	Listen            string
	Dir               string
	Config            string
	LogLevel          string
	ContainerdAddress string
	Version           bool

	configSet bool
}

// DefaultContainerdAddress is containerd's ttrpc socket, where task events go.
const DefaultContainerdAddress = "/run/containerd/containerd.sock.ttrpc"

// ParseFlags parses args (without the program name) for the sandboxer
// called name; defaults follow the name, e.g. /run/kuasar-go/runc-sandboxer.sock.
func ParseFlags(name string, args []string, stderr io.Writer) (Flags, error) {
	var f Flags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.Listen, "listen", "/run/kuasar-go/"+name+".sock", "unix socket of the sandbox controller (gRPC)")
	fs.StringVar(&f.Dir, "dir", "/run/kuasar-go/"+name, "state directory: sandbox state, task socket, runtime state")
	fs.StringVar(&f.Config, "config", "/etc/kuasar-go/"+name+".toml", "TOML configuration file (a missing default file means defaults)")
	fs.StringVar(&f.LogLevel, "log-level", "", "debug, info, warn or error (overrides the config file)")
	fs.StringVar(&f.ContainerdAddress, "containerd-address", DefaultContainerdAddress, "containerd's ttrpc socket, for task events")
	fs.BoolVar(&f.Version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "config" {
			f.configSet = true
		}
	})
	return f, nil
}

// LoadConfig decodes the TOML file named by the flags into cfg, which holds
// the defaults on entry. Unknown keys are errors that name the key. A
// missing file is an error only when --config was given explicitly.
func (f Flags) LoadConfig(cfg any) error {
	data, err := os.ReadFile(f.Config)
	if errors.Is(err, os.ErrNotExist) && !f.configSet {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			return fmt.Errorf("config %s: unknown key: %s", f.Config, strict.String())
		}
		var derr *toml.DecodeError
		if errors.As(err, &derr) {
			row, col := derr.Position()
			return fmt.Errorf("config %s:%d:%d: %q: %s", f.Config, row, col, lineAt(data, row), derr.Error())
		}
		return fmt.Errorf("config %s: %w", f.Config, err)
	}
	return nil
}

// lineAt returns line row (1-based) of data, trimmed, to show the key an
// error is about.
func lineAt(data []byte, row int) string {
	lines := strings.Split(string(data), "\n")
	if row < 1 || row > len(lines) {
		return ""
	}
	return strings.TrimSpace(lines[row-1])
}
