package daemon

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/types/known/emptypb"
)

// A handler that panics fails its request with Internal; the server goes
// on serving the next one.
func TestRecoverTTRPC(t *testing.T) {
	srv, err := ttrpc.NewServer(RecoverTTRPC(zaptest.NewLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	calls := 0
	srv.RegisterService("test.Svc", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Call": func(ctx context.Context, unmarshal func(any) error) (any, error) {
			calls++
			if calls == 1 {
				var m map[string]int
				m["boom"]++ // nil map: panics
			}
			return &emptypb.Empty{}, nil
		},
	}})
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c := ttrpc.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	err = c.Call(context.Background(), "test.Svc", "Call", &emptypb.Empty{}, &emptypb.Empty{})
	if !errdefs.IsInternal(errgrpc.ToNative(err)) {
		t.Fatalf("panicking call: %v, want Internal", err)
	}
	if err := c.Call(context.Background(), "test.Svc", "Call", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		t.Fatalf("call after the panic: %v", err)
	}
}
