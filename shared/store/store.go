// Package store keeps one state file per sandbox under a directory, written
// atomically, so that a restarted sandboxer finds the pods it was serving.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FormatVersion is written into every state file; a reader refuses newer formats.
const FormatVersion = 1

// State is where a sandbox is in its lifecycle.
type State string

const (
	StateCreated State = "created"
	StateRunning State = "running"
	StateStopped State = "stopped"
)

// Mount is a rootfs mount as containerd sends it.
type Mount struct {
	Type    string   `json:"type"`
	Source  string   `json:"source"`
	Target  string   `json:"target,omitempty"`
	Options []string `json:"options,omitempty"`
}

// Any is a protobuf Any kept as its type URL and bytes.
type Any struct {
	TypeURL string `json:"type_url"`
	Value   []byte `json:"value"`
}

// Sandbox is everything a sandboxer must remember about one pod. Family
// holds what only one sandbox family understands (holder PID, VM sockets);
// shared code treats it as opaque.
type Sandbox struct {
	Format      int               `json:"format"`
	ID          string            `json:"id"`
	Sandboxer   string            `json:"sandboxer,omitempty"`
	NetnsPath   string            `json:"netns_path,omitempty"`
	Rootfs      []Mount           `json:"rootfs,omitempty"`
	Options     *Any              `json:"options,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// Spec is containerd's types.Sandbox as protobuf bytes (kept for Update).
	Spec []byte `json:"spec,omitempty"`

	State      State     `json:"state"`
	Pid        uint32    `json:"pid,omitempty"`
	Address    string    `json:"address,omitempty"`
	Version    uint32    `json:"version,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
	StartedAt  time.Time `json:"started_at,omitzero"`
	ExitedAt   time.Time `json:"exited_at,omitzero"`
	ExitStatus uint32    `json:"exit_status,omitempty"`

	Family json.RawMessage `json:"family,omitempty"`
}

// Store is a directory of <id>.json files.
type Store struct {
	dir string
}

const suffix = ".json"

// Open creates dir (root-only) if needed and returns a store over it.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the directory the store writes to.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(id string) string { return filepath.Join(s.dir, id+suffix) }

// Save writes sb atomically: a reader sees the old file or the new one, never
// a torn write, even across a crash.
func (s *Store) Save(sb *Sandbox) error {
	if err := validate.ID("sandbox", sb.ID); err != nil {
		return err
	}
	sb.Format = FormatVersion
	data, err := json.Marshal(sb)
	if err != nil {
		return fmt.Errorf("encode sandbox %s: %w", sb.ID, err)
	}
	return WriteFileAtomic(s.path(sb.ID), data)
}

// Delete removes the state file of id; a missing file is not an error.
func (s *Store) Delete(id string) error {
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove state of sandbox %s: %w", id, err)
	}
	return nil
}

// LoadAll reads every state file. Unreadable files are reported in the
// returned error but do not hide the others.
func (s *Store) LoadAll() ([]*Sandbox, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("read state directory: %w", err)
	}
	var (
		out  []*Sandbox
		errs []error
	)
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, suffix) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sb, err := decode(name, data)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, sb)
	}
	return out, errors.Join(errs...)
}

// decode reads the state file name: InvalidArgument for what a restarted
// daemon cannot trust, NotImplemented for a newer format.
func decode(name string, data []byte) (*Sandbox, error) {
	var sb Sandbox
	if err := json.Unmarshal(data, &sb); err != nil {
		return nil, fmt.Errorf("decode %s: %v: %w", name, err, errdefs.ErrInvalidArgument)
	}
	if sb.Format > FormatVersion {
		return nil, fmt.Errorf("%s has format %d, newer than %d: %w", name, sb.Format, FormatVersion, errdefs.ErrNotImplemented)
	}
	if sb.ID+suffix != name {
		return nil, fmt.Errorf("%s holds sandbox %q: %w", name, sb.ID, errdefs.ErrInvalidArgument)
	}
	// ".json" and "..json" would otherwise load as sandboxes "" and
	// ".", whose directories are the daemon's own.
	if err := validate.ID("sandbox", sb.ID); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	switch sb.State {
	case StateCreated, StateRunning, StateStopped:
	default:
		// The controller would take any other for running and reattach.
		return nil, fmt.Errorf("%s: sandbox %s in unknown state %q: %w", name, sb.ID, sb.State, errdefs.ErrInvalidArgument)
	}
	if sb.NetnsPath != "" {
		if err := validate.AbsPath("netns", sb.NetnsPath); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	return &sb, nil
}

// WriteFileAtomic writes data to path through a root-only temporary file in
// the same directory, fsyncs it and renames it into place.
func WriteFileAtomic(path string, data []byte) (retErr error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if retErr != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// DecodeFamily decodes the family's state into v; v is left as it is when
// the sandbox has none yet.
func (sb *Sandbox) DecodeFamily(v any) error {
	if len(sb.Family) == 0 {
		return nil
	}
	if err := json.Unmarshal(sb.Family, v); err != nil {
		return fmt.Errorf("decode state of sandbox %s: %w", sb.ID, err)
	}
	return nil
}

// EncodeFamily stores v as the family's state.
func (sb *Sandbox) EncodeFamily(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode state of sandbox %s: %w", sb.ID, err)
	}
	sb.Family = b
	return nil
}
