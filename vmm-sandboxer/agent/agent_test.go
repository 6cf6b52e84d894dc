package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		in   string
		want Options
	}{
		{"console=ttyS0 quiet", Options{PortName: DefaultPortName}},
		{"kuasar.port=pod.agent kuasar.debug", Options{PortName: "pod.agent", Debug: true}},
		{"kuasar.port= kuasar.debug=0", Options{PortName: DefaultPortName}},
		{"kuasar.debug=1 panic=-1", Options{PortName: DefaultPortName, Debug: true}},
	}
	for _, tc := range tests {
		if got := ParseCmdline(tc.in); got != tc.want {
			t.Errorf("ParseCmdline(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

func TestLoadModulesWarns(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "modules")
	os.WriteFile(list, []byte("# comment\n\n"+filepath.Join(dir, "missing.ko")+"\n"), 0o644)
	n, warnings, err := LoadModules(list)
	if err != nil || n != 0 || len(warnings) != 1 || !strings.Contains(warnings[0], "missing.ko") {
		t.Fatalf("loaded %d, warnings %q, err %v; want one warning naming missing.ko", n, warnings, err)
	}
	if n, w, err := LoadModules(filepath.Join(dir, "none")); n != 0 || w != nil || err != nil {
		t.Fatalf("no list: %d %q %v", n, w, err)
	}
}

func TestServiceSetupSandboxDNS(t *testing.T) {
	root := t.TempDir()
	s := &Service{Log: zaptest.NewLogger(t), Root: root}
	ctx := context.Background()
	tests := []struct {
		name string
		req  *vmmtask.SetupSandboxRequest
		want string
		code codes.Code
	}{
		{"servers, searches, options", &vmmtask.SetupSandboxRequest{
			DnsServers: []string{"10.0.0.53", "fd00::53"}, DnsSearches: []string{"svc.local", "local"}, DnsOptions: []string{"ndots:5"},
		}, "nameserver 10.0.0.53\nnameserver fd00::53\nsearch svc.local local\noptions ndots:5\n", codes.OK},
		{"a server that is no address", &vmmtask.SetupSandboxRequest{DnsServers: []string{"dns.example"}}, "", codes.Internal},
		{"clock within a second is left alone", &vmmtask.SetupSandboxRequest{TimeUnixNs: time.Now().UnixNano()}, "", codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(filepath.Join(root, "etc/resolv.conf"))
			_, err := s.SetupSandbox(ctx, tc.req)
			if status.Code(err) != tc.code {
				t.Fatalf("error %v, want code %s", err, tc.code)
			}
			if tc.want != "" {
				b, _ := os.ReadFile(filepath.Join(root, "etc/resolv.conf"))
				if string(b) != tc.want {
					t.Fatalf("resolv.conf %q, want %q", b, tc.want)
				}
			}
		})
	}
}

func TestServiceShutdownPowersOffOnce(t *testing.T) {
	calls := make(chan struct{}, 2)
	s := &Service{Log: zaptest.NewLogger(t), PowerOff: func() error { calls <- struct{}{}; return nil }}
	for i := 0; i < 2; i++ {
		if _, err := s.Shutdown(context.Background(), &vmmtask.ShutdownRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-calls:
	case <-time.After(5 * time.Second):
		t.Fatal("no power-off after Shutdown")
	}
	select {
	case <-calls:
		t.Fatal("powered off twice")
	case <-time.After(300 * time.Millisecond):
	}
}

func TestServicePingAndNoContainers(t *testing.T) {
	_, cerr := NewContainers(t.TempDir(), filepath.Join(t.TempDir(), "runc"), t.TempDir(), zaptest.NewLogger(t))
	if cerr == nil || !strings.Contains(cerr.Error(), "mkguest -runc") {
		t.Fatalf("containers without runc: %v, want an error naming mkguest -runc", cerr)
	}
	s := &Service{Log: zaptest.NewLogger(t), ServingSince: 1500 * time.Millisecond, ContainersErr: cerr}
	ctx := context.Background()
	p, err := s.Ping(ctx, &vmmtask.PingRequest{})
	if err != nil || p.BootToServeNs != int64(1500*time.Millisecond) || !strings.HasPrefix(p.Version, "vmm-task ") || p.UptimeNs <= 0 {
		t.Fatalf("ping %+v, %v", p, err)
	}
	if _, err := s.CreateContainer(ctx, &vmmtask.CreateContainerRequest{}); status.Code(err) != codes.FailedPrecondition ||
		!strings.Contains(err.Error(), "runc") {
		t.Fatalf("CreateContainer without runc: %v, want FailedPrecondition naming runc", err)
	}
	if _, err := s.Mount(ctx, &vmmtask.MountRequest{Target: "rel"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("relative mount target: %v", err)
	}
	s.AddWarnings("module x did not load")
	info, err := s.GuestInfo(ctx, &vmmtask.GuestInfoRequest{})
	if err != nil || info.KernelRelease == "" || len(info.Mounts) == 0 || len(info.BootWarnings) != 1 {
		t.Fatalf("guest info %+v, %v", info, err)
	}
}
