package mixednode

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestE2EMixedNode runs one pod of every family at the same time in one
// containerd: runc (a computation), wasm with wasmtime (the WASI test
// program with args, an allocation, a file of its image, exit code 3),
// gVisor (the computation, and dmesg shows gVisor's kernel) and a QEMU VM
// (the computation, and uname shows the guest's kernel). CRI lists every
// pod and container with its family's runtime handler; every pod has its
// own IP of the CNI subnet; the runc pod reaches the bridge and every other
// pod, the gVisor and VM pods reach the bridge and the runc pod. Then all is
// torn down and nothing is left.
func TestE2EMixedNode(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	fdsBefore := n.daemonFDs()

	t0 := time.Now()
	runs := n.runAll(t, "RunPods")
	tUp := time.Since(t0)
	byName := map[string]*podRun{}
	for _, r := range runs {
		byName[r.fam.name] = r
		t.Logf("%-6s pod %s: RunPodSandbox to the end of its work %v", r.fam.name, r.podID[:12], r.up.Round(time.Millisecond))
	}

	// CRI lists every pod and container with its family's handler.
	ctx := t.Context()
	pods, err := env.Runtime.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		t.Fatalf("ListPodSandbox: %v", err)
	}
	ctrs, err := env.Runtime.ListContainers(ctx, &runtime.ListContainersRequest{})
	if err != nil {
		t.Fatalf("ListContainers: %v", err)
	}
	if len(pods.Items) != len(runs) || len(ctrs.Containers) != len(runs) {
		t.Errorf("CRI lists %d pods and %d containers, want %d of each", len(pods.Items), len(ctrs.Containers), len(runs))
	}
	ips := map[string]string{}
	_, subnet, err := net.ParseCIDR(env.Subnet)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range runs {
		var listed *runtime.PodSandbox
		for _, p := range pods.Items {
			if p.Id == r.podID {
				listed = p
			}
		}
		switch {
		case listed == nil:
			t.Errorf("%s pod %s not listed by ListPodSandbox", r.fam.name, r.podID)
		case listed.RuntimeHandler != r.fam.handler || listed.State != runtime.PodSandboxState_SANDBOX_READY:
			t.Errorf("%s pod listed with handler %q, state %v; want %q, READY", r.fam.name, listed.RuntimeHandler, listed.State, r.fam.handler)
		}
		st := env.PodStatus(t, r.podID)
		if st.RuntimeHandler != r.fam.handler || st.State != runtime.PodSandboxState_SANDBOX_READY {
			t.Errorf("%s PodSandboxStatus: handler %q, state %v; want %q, READY", r.fam.name, st.RuntimeHandler, st.State, r.fam.handler)
		}
		ip := st.GetNetwork().GetIp()
		if !subnet.Contains(net.ParseIP(ip)) {
			t.Errorf("%s pod IP %q is not of the CNI subnet %s", r.fam.name, ip, env.Subnet)
		}
		if other, dup := ips[ip]; dup {
			t.Errorf("%s and %s pods share the IP %s", other, r.fam.name, ip)
		}
		ips[ip] = r.fam.name
		r.ip = ip
		var ctr *runtime.Container
		for _, c := range ctrs.Containers {
			if c.Id == r.ctrID {
				ctr = c
			}
		}
		wantState := runtime.ContainerState_CONTAINER_RUNNING
		if r.fam.exitCode >= 0 {
			wantState = runtime.ContainerState_CONTAINER_EXITED
		}
		if ctr == nil || ctr.PodSandboxId != r.podID || ctr.State != wantState {
			t.Errorf("%s container %s listed as %+v; want in pod %s, %v", r.fam.name, r.ctrID, ctr, r.podID, wantState)
		}
	}

	// Pods reach each other and the bridge. A TCP server on the bridge
	// answers with the caller's address: every busybox pod (runc, gVisor,
	// VM) connects to it from its own pod IP. The runc pod pings the bridge
	// and every other pod (the wasm pod's netns answers without a process
	// running); the VM pod pings the bridge and the runc pod. gVisor pods do
	// not ping: runsc gives them no raw sockets (its --net-raw is off by
	// default), so ping fails there with "permission denied".
	srv, err := net.Listen("tcp", net.JoinHostPort(env.Gateway, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	go func() {
		for {
			c, err := srv.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "hello %s\n", host)
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(srv.Addr().String())
	pings := map[string][]*podRun{"runc": nil, "vm": {byName["runc"]}}
	for _, r := range runs {
		if r.fam.name != "runc" {
			pings["runc"] = append(pings["runc"], r)
		}
	}
	for _, r := range runs {
		if !r.fam.busybox {
			continue
		}
		// One exec per pod: an exec into the VM costs seconds under TCG.
		script := fmt.Sprintf("ip -o -4 addr show eth0; echo \"tcp: $(nc -w 5 %s %s </dev/null)\"", env.Gateway, port)
		targets := []string{env.Gateway}
		if r.fam.name == "gvisor" {
			targets = nil
		}
		for _, p := range pings[r.fam.name] {
			targets = append(targets, p.ip)
		}
		for _, ip := range targets {
			script += fmt.Sprintf("; ping -c 1 -W 5 %s >/dev/null && echo ping-ok-%s || echo ping-failed-%s", ip, ip, ip)
		}
		out, stderr, code := env.ExecSync(t, r.ctrID, 60*time.Second, "sh", "-c", script)
		want := []string{r.ip + "/", "tcp: hello " + r.ip + "\n"}
		for _, ip := range targets {
			want = append(want, "ping-ok-"+ip+"\n")
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s pod (%s): network check lacks %q (eth0 carries the pod IP; TCP to the bridge from the pod IP; ping %v); exit %d, output:\n%s%s",
					r.fam.name, r.ip, w, targets, code, out, stderr)
			}
		}
	}

	t1 := time.Now()
	n.removeAll(t, "RemovePods", runs)
	tDown := time.Since(t1)
	if left := n.settle(before, fdsBefore, 30*time.Second); len(left) > 0 {
		t.Errorf("left behind after removing the pods:\n  %s", strings.Join(left, "\n  "))
	}
	t.Logf("4 pods (runc, wasm/wasmtime, gVisor/systrap, QEMU/TCG) up and working in %v; removed in %v; clean after %v",
		tUp.Round(time.Millisecond), tDown.Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
}

var (
	soakRounds   = flag.Int("soak.rounds", envInt("KUASAR_SOAK_ROUNDS", 3), "TestSoak: rounds of one pod per family (env KUASAR_SOAK_ROUNDS)")
	soakDuration = flag.Duration("soak.duration", envDuration("KUASAR_SOAK_DURATION", 0), "TestSoak: keep going for this long instead of -soak.rounds (env KUASAR_SOAK_DURATION)")
)

func envInt(key string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(key)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(key string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(key)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestSoak creates and removes one pod of every family per round, each
// with a container doing real work whose output is awaited, and checks
// after every round that the processes, mounts, netns, links (taps
// included), cgroups and files under each sandboxer's --dir are back to
// where they were before the first round, and that no daemon holds a
// namespace open (which would keep a removed pod's netns, and the taps in
// it, alive unseen). Its length: -soak.rounds / KUASAR_SOAK_ROUNDS (3), or
// -soak.duration / KUASAR_SOAK_DURATION.
func TestSoak(t *testing.T) {
	n := startNode(t)
	env := n.env
	baseline := env.Snapshot()
	fdsBase := n.daemonFDs()
	var deadline time.Time
	if *soakDuration > 0 {
		deadline = time.Now().Add(*soakDuration)
	}
	var (
		pods, leaks     int
		total, min, max time.Duration
		fdsFirst        daemonFDs
		rounds          int
	)
	t.Logf("soak: baseline daemon fds %v", fdsBase)
	for r := 1; ; r++ {
		if deadline.IsZero() && r > *soakRounds || !deadline.IsZero() && time.Now().After(deadline) {
			break
		}
		t0 := time.Now()
		runs := n.runAll(t, "Round"+strconv.Itoa(r)+"Up")
		tUp := time.Since(t0)
		created := baseline.Diff(env.Snapshot())
		created = append(created, n.daemonFDs().nsLeaks(fdsBase)...)
		created = append(created, n.ipamLeases()...)
		n.removeAll(t, "Round"+strconv.Itoa(r)+"Down", runs)
		left := n.settle(baseline, fdsBase, 30*time.Second)
		d := time.Since(t0)
		fds := n.daemonFDs()
		if r == 1 {
			fdsFirst = fds
		}
		rounds, pods, leaks = r, pods+len(runs), leaks+len(left)
		total += d
		if r == 1 || d < min {
			min = d
		}
		if d > max {
			max = d
		}
		var ups []string
		for _, run := range runs {
			ups = append(ups, fmt.Sprintf("%s %v", run.fam.name, run.up.Round(time.Millisecond)))
		}
		t.Logf("soak round %d: %d pods (%d containers) up and done in %v (%s), round %v; created %s; leaks found: %d; daemon fds %v (more than before round 1: %s)",
			r, len(runs), len(runs), tUp.Round(time.Millisecond), strings.Join(ups, ", "), d.Round(time.Millisecond), kinds(created), len(left), fds, fds.grown(fdsBase))
		if len(left) > 0 {
			t.Fatalf("round %d left behind:\n  %s", r, strings.Join(left, "\n  "))
		}
		// The daemons' open files settle after round 1 (connections, caches);
		// a kind that keeps growing is a leak per pod.
		if grown := fds.fdLeaks(fdsFirst, 2); len(grown) > 0 {
			leaks += len(grown)
			t.Errorf("round %d: daemons hold more files than after round 1:\n  %s", r, strings.Join(grown, "\n  "))
		}
	}
	if rounds > 0 {
		t.Logf("soak: %d rounds, %d pods (%d per round, one per family), leaks found: %d; round time min %v, mean %v, max %v; daemon fds after round 1 %v, at the end %v",
			rounds, pods, pods/rounds, leaks, min.Round(time.Millisecond), (total / time.Duration(rounds)).Round(time.Millisecond),
			max.Round(time.Millisecond), fdsFirst, n.daemonFDs())
	}
}
