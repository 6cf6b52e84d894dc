package agentclient

import "testing"

func TestShareGuestPath(t *testing.T) {
	s := Share{HostDir: "/var/lib/vm/shared", GuestDir: "/run/kuasar/shared"}
	for in, want := range map[string]string{
		"/var/lib/vm/shared/c1/rootfs": "/run/kuasar/shared/c1/rootfs",
		"/var/lib/vm/shared":           "/run/kuasar/shared",
		"/var/lib/vm/other":            "",
		"/var/lib/vm/shared/../x":      "",
	} {
		got, err := s.GuestPath(in)
		if (err != nil) != (want == "") || got != want {
			t.Errorf("GuestPath(%s) = %q, %v; want %q", in, got, err, want)
		}
	}
}
