package testenv

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CallTimeout bounds each CRI call the helpers make.
var CallTimeout = 2 * time.Minute

func callCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), CallTimeout)
}

// PodConfig returns a minimal pod config with a unique name; RunPod fills
// the same defaults into a config of the caller's.
func (e *Env) PodConfig() *runtime.PodSandboxConfig {
	cfg := &runtime.PodSandboxConfig{}
	e.fillPod(cfg)
	return cfg
}

func (e *Env) fillPod(cfg *runtime.PodSandboxConfig) {
	if cfg.Metadata == nil {
		cfg.Metadata = &runtime.PodSandboxMetadata{}
	}
	m := cfg.Metadata
	if m.Name == "" {
		m.Name = "pod-" + randHex(8)
	}
	if m.Namespace == "" {
		m.Namespace = "default"
	}
	if m.Uid == "" {
		m.Uid = randHex(16)
	}
	if cfg.LogDirectory == "" {
		cfg.LogDirectory = filepath.Join(e.PodLogDir, m.Namespace+"_"+m.Name+"_"+m.Uid)
	}
	if cfg.Linux == nil {
		cfg.Linux = &runtime.LinuxPodSandboxConfig{}
	}
	if cfg.Linux.SecurityContext == nil {
		cfg.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{}
	}
	if cfg.Linux.SecurityContext.NamespaceOptions == nil {
		cfg.Linux.SecurityContext.NamespaceOptions = &runtime.NamespaceOption{}
	}
	if cfg.Labels == nil {
		cfg.Labels = map[string]string{}
	}
	cfg.Labels["kuasar-go.test"] = "true"
}

// RunPod fills missing metadata (unique name, uid, namespace "default"),
// log directory and Linux config into cfg (nil: a fresh one; the filled cfg
// is needed by CreateStartContainer and ReadLog), runs the pod with the
// runtime handler and returns its id.
func (e *Env) RunPod(t testing.TB, handler string, cfg *runtime.PodSandboxConfig) string {
	t.Helper()
	id, err := e.TryRunPod(handler, cfg)
	if err != nil {
		t.Fatalf("RunPodSandbox(%s): %v", handler, err)
	}
	return id
}

// TryRunPod is RunPod returning the error.
func (e *Env) TryRunPod(handler string, cfg *runtime.PodSandboxConfig) (string, error) {
	if cfg == nil {
		cfg = &runtime.PodSandboxConfig{} // defaults only; the caller cannot read logs
	}
	e.fillPod(cfg)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return "", err
	}
	ctx, cancel := callCtx()
	defer cancel()
	resp, err := e.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		return "", err
	}
	e.track(resp.PodSandboxId)
	return resp.PodSandboxId, nil
}

// ContainerConfig returns a busybox container config running args.
func ContainerConfig(name string, args ...string) *runtime.ContainerConfig {
	return &runtime.ContainerConfig{
		Metadata: &runtime.ContainerMetadata{Name: name},
		Image:    &runtime.ImageSpec{Image: BusyboxImage},
		Args:     args,
	}
}

func fillContainer(c *runtime.ContainerConfig) {
	if c.Metadata == nil {
		c.Metadata = &runtime.ContainerMetadata{}
	}
	if c.Metadata.Name == "" {
		c.Metadata.Name = "c-" + randHex(8)
	}
	if c.Image == nil || c.Image.Image == "" {
		c.Image = &runtime.ImageSpec{Image: BusyboxImage}
	}
	if c.LogPath == "" {
		c.LogPath = fmt.Sprintf("%s_%d.log", c.Metadata.Name, c.Metadata.Attempt)
	}
	if c.Linux == nil {
		c.Linux = &runtime.LinuxContainerConfig{}
	}
}

// CreateContainer fills defaults into ctrCfg (name, busybox image, log
// path, Linux config) and creates the container in the pod.
func (e *Env) CreateContainer(t testing.TB, podID string, podCfg *runtime.PodSandboxConfig, ctrCfg *runtime.ContainerConfig) string {
	t.Helper()
	fillContainer(ctrCfg)
	ctx, cancel := callCtx()
	defer cancel()
	resp, err := e.Runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: podID, Config: ctrCfg, SandboxConfig: podCfg,
	})
	if err != nil {
		t.Fatalf("CreateContainer(%s): %v", ctrCfg.Metadata.Name, err)
	}
	e.track(resp.ContainerId)
	return resp.ContainerId
}

// StartContainer starts a created container.
func (e *Env) StartContainer(t testing.TB, id string) {
	t.Helper()
	ctx, cancel := callCtx()
	defer cancel()
	if _, err := e.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("StartContainer(%s): %v", id, err)
	}
}

// CreateStartContainer is CreateContainer followed by StartContainer.
func (e *Env) CreateStartContainer(t testing.TB, podID string, podCfg *runtime.PodSandboxConfig, ctrCfg *runtime.ContainerConfig) string {
	t.Helper()
	id := e.CreateContainer(t, podID, podCfg, ctrCfg)
	e.StartContainer(t, id)
	return id
}

// StopRemovePod stops and removes a pod (and its containers).
func (e *Env) StopRemovePod(t testing.TB, podID string) {
	t.Helper()
	ctx, cancel := callCtx()
	defer cancel()
	if _, err := e.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatalf("StopPodSandbox(%s): %v", podID, err)
	}
	if _, err := e.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatalf("RemovePodSandbox(%s): %v", podID, err)
	}
}

// LogLine is one parsed CRI log line: "<RFC3339Nano> <stream> <P|F> <msg>".
type LogLine struct {
	Time    time.Time
	Stream  string // stdout or stderr
	Partial bool
	Msg     string
}

// ParseCRILog parses CRI container log bytes.
func ParseCRILog(b []byte) ([]LogLine, error) {
	var out []LogLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		l := sc.Text()
		if l == "" {
			continue
		}
		parts := strings.SplitN(l, " ", 4)
		if len(parts) < 3 {
			return out, fmt.Errorf("bad CRI log line %q", l)
		}
		ts, err := time.Parse(time.RFC3339Nano, parts[0])
		if err != nil {
			return out, fmt.Errorf("bad CRI log time in %q: %w", l, err)
		}
		msg := ""
		if len(parts) == 4 {
			msg = parts[3]
		}
		out = append(out, LogLine{Time: ts, Stream: parts[1], Partial: parts[2] == "P", Msg: msg})
	}
	return out, sc.Err()
}

// LogText joins log lines back into text: full lines end with "\n",
// partial ones are continued.
func LogText(lines []LogLine, stream string) string {
	var b strings.Builder
	for _, l := range lines {
		if stream != "" && l.Stream != stream {
			continue
		}
		b.WriteString(l.Msg)
		if !l.Partial {
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// LogFile returns the host path of a container's CRI log.
func LogFile(podCfg *runtime.PodSandboxConfig, ctrCfg *runtime.ContainerConfig) string {
	return filepath.Join(podCfg.GetLogDirectory(), ctrCfg.GetLogPath())
}

// ReadLog returns a container's log text, stdout and stderr interleaved as
// written ("" when the file does not exist yet).
func (e *Env) ReadLog(t testing.TB, podCfg *runtime.PodSandboxConfig, ctrCfg *runtime.ContainerConfig) string {
	t.Helper()
	b, err := os.ReadFile(LogFile(podCfg, ctrCfg))
	if err != nil {
		if os.IsNotExist(err) {
			return ""
		}
		t.Fatalf("read container log: %v", err)
	}
	lines, err := ParseCRILog(b)
	if err != nil {
		t.Fatalf("container log %s: %v", LogFile(podCfg, ctrCfg), err)
	}
	return LogText(lines, "")
}

// WaitLog waits until the container's log contains substr and returns the log.
func (e *Env) WaitLog(t testing.TB, podCfg *runtime.PodSandboxConfig, ctrCfg *runtime.ContainerConfig, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := e.ReadLog(t, podCfg, ctrCfg)
		if strings.Contains(s, substr) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("container log %s: %q not seen within %v; log so far:\n%s",
				LogFile(podCfg, ctrCfg), substr, timeout, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ExecSync runs cmd in a container and returns stdout, stderr and the exit code.
func (e *Env) ExecSync(t testing.TB, id string, timeout time.Duration, cmd ...string) (stdout, stderr string, exitCode int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+30*time.Second)
	defer cancel()
	resp, err := e.Runtime.ExecSync(ctx, &runtime.ExecSyncRequest{
		ContainerId: id, Cmd: cmd, Timeout: int64(timeout / time.Second),
	})
	if err != nil {
		t.Fatalf("ExecSync(%s, %q): %v", id, cmd, err)
	}
	return string(resp.Stdout), string(resp.Stderr), resp.ExitCode
}

// ContainerStatus returns a container's status.
func (e *Env) ContainerStatus(t testing.TB, id string) *runtime.ContainerStatus {
	t.Helper()
	ctx, cancel := callCtx()
	defer cancel()
	resp, err := e.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("ContainerStatus(%s): %v", id, err)
	}
	return resp.Status
}

// WaitContainerExited waits until the container has exited and returns its
// exit code.
func (e *Env) WaitContainerExited(t testing.TB, id string, timeout time.Duration) int32 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := e.ContainerStatus(t, id)
		if st.State == runtime.ContainerState_CONTAINER_EXITED {
			return st.ExitCode
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s still %v after %v", id, st.State, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// PodStatus returns a pod's status.
func (e *Env) PodStatus(t testing.TB, podID string) *runtime.PodSandboxStatus {
	t.Helper()
	ctx, cancel := callCtx()
	defer cancel()
	resp, err := e.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID})
	if err != nil {
		t.Fatalf("PodSandboxStatus(%s): %v", podID, err)
	}
	return resp.Status
}

// WaitPodReady waits until the pod is ready, as kubelet would retry after
// a sandboxer's restart: containerd redials a sandbox controller only after
// its connection backoff (up to a few seconds).
func (e *Env) WaitPodReady(t testing.TB, podID string, timeout time.Duration) {
	t.Helper()
	var (
		resp *runtime.PodSandboxStatusResponse
		err  error
	)
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		ctx, cancel := callCtx()
		resp, err = e.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID})
		cancel()
		if err == nil && resp.Status.State == runtime.PodSandboxState_SANDBOX_READY {
			return
		}
	}
	t.Fatalf("pod %s not ready within %v: %v, %v", podID, timeout, resp.GetStatus().GetState(), err)
}

// PodIP returns the pod's primary IP address.
func (e *Env) PodIP(t testing.TB, podID string) string {
	t.Helper()
	ip := e.PodStatus(t, podID).GetNetwork().GetIp()
	if ip == "" {
		t.Fatalf("pod %s has no IP", podID)
	}
	return ip
}

// CheckPodNetwork checks that the pod got an IP of the env's subnet and
// that eth0, as container ctrID sees it, carries it. It returns the IP.
func (e *Env) CheckPodNetwork(t testing.TB, podID, ctrID string) string {
	t.Helper()
	ip := e.PodIP(t, podID)
	_, subnet, err := net.ParseCIDR(e.Subnet)
	if err != nil {
		t.Fatal(err)
	}
	if !subnet.Contains(net.ParseIP(ip)) {
		t.Errorf("pod IP %q not in %s", ip, e.Subnet)
	}
	if out, _, code := e.ExecSync(t, ctrID, 10*time.Second, "ip", "-o", "-4", "addr", "show", "eth0"); code != 0 || !strings.Contains(out, ip+"/") {
		t.Errorf("eth0 of container %s does not carry the pod IP %s: %q (exit %d)", ctrID, ip, out, code)
	}
	return ip
}
