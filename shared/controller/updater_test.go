package controller

import (
	"context"
	"errors"
	"testing"
	"time"

	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kuasar-go/kuasar-go/shared/store"
)

// updatingFamily is a family that records updates and can refuse them.
type updatingFamily struct {
	refuse error
	got    []string
}

func (f *updatingFamily) Create(context.Context, *store.Sandbox) error { return nil }
func (f *updatingFamily) Start(context.Context, *store.Sandbox) (<-chan Exit, error) {
	return make(chan Exit), nil
}
func (f *updatingFamily) Stop(context.Context, *store.Sandbox, time.Duration) error { return nil }
func (f *updatingFamily) Shutdown(context.Context, *store.Sandbox) error            { return nil }
func (f *updatingFamily) Metrics(context.Context, *store.Sandbox) (*types.Metric, error) {
	return nil, errdefs.ErrNotImplemented
}
func (f *updatingFamily) Update(_ context.Context, sb *store.Sandbox, upd *types.Sandbox, fields []string) error {
	if f.refuse != nil {
		return f.refuse
	}
	f.got = append(f.got, upd.GetSandboxer())
	sb.Family = []byte(`{"updated":true}`)
	return nil
}

func TestUpdaterSeesUpdates(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fam := &updatingFamily{}
	srv, err := New(context.Background(), fam, st, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := srv.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "p1", Sandbox: &types.Sandbox{SandboxID: "p1", Sandboxer: "old"}}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		refuse   error
		code     codes.Code
		wantSpec string
	}{
		{name: "refused", refuse: errors.New("no: " + errdefs.ErrFailedPrecondition.Error()), code: codes.Unknown, wantSpec: "old"},
		{name: "refused with a code", refuse: errdefs.ErrInvalidArgument, code: codes.InvalidArgument, wantSpec: "old"},
		{name: "accepted", code: codes.OK, wantSpec: "new"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fam.refuse = tc.refuse
			_, err := srv.Update(ctx, &sandboxapi.ControllerUpdateRequest{SandboxID: "p1", Sandbox: &types.Sandbox{SandboxID: "p1", Sandboxer: "new"}, Fields: []string{"sandboxer"}})
			if status.Code(err) != tc.code {
				t.Fatalf("Update: %v, want %v", err, tc.code)
			}
			sb, err := srv.Sandbox("p1")
			if err != nil {
				t.Fatal(err)
			}
			var spec types.Sandbox
			if err := proto.Unmarshal(sb.Spec, &spec); err != nil {
				t.Fatal(err)
			}
			if spec.Sandboxer != tc.wantSpec {
				t.Errorf("stored sandboxer %q, want %q", spec.Sandboxer, tc.wantSpec)
			}
		})
	}
	if len(fam.got) != 1 || fam.got[0] != "new" {
		t.Errorf("family saw updates %v, want [new]", fam.got)
	}
	loaded, err := st.LoadAll()
	if err != nil || len(loaded) != 1 || string(loaded[0].Family) != `{"updated":true}` {
		t.Errorf("persisted family state %v, %v; want the family's change", loaded, err)
	}
}
