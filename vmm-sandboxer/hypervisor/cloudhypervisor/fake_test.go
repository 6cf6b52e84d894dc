package cloudhypervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor/chapi"
)

// The fake cloud-hypervisor is this test binary run again by a script
// named cloud-hypervisor; these variables tell it so and how to behave.
const (
	fakeModeEnv = "KUASAR_FAKE_CH_MODE"
	fakeSpecEnv = "KUASAR_FAKE_CH_SPEC"
)

// Modes of the fake.
const (
	modeOK             = "ok"
	modeFailCreate     = "fail-create"     // vm.create answers 500
	modeFailBoot       = "fail-boot"       // vm.boot answers 500
	modeNoSocket       = "no-socket"       // never listens
	modeExitEarly      = "exit-early"      // complains and exits 1
	modeIgnoreShutdown = "ignore-shutdown" // vmm.shutdown answered, no exit
)

// The fake's error messages, which the driver's errors must carry.
const (
	msgCreate   = "Error creating VM: VmCreate(KernelFile(Os { code: 2, kind: NotFound }))"
	msgBoot     = "Error booting VM: VmBoot(ConfigureSystem(MissingKvm))"
	msgAddDisk  = "Error adding device to the VM: DeviceManager(Disk(OpenDisk(NotFound)))"
	msgNoKVM    = "Error: failed to open /dev/kvm: No such file or directory (os error 2)"
	journalName = "fake-ch.journal"
)

// exchange is one request the fake got and what it made of it; the fake
// appends them to its journal, one JSON object a line.
type exchange struct {
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Body   json.RawMessage `json:"body,omitempty"`
	FDs    []string        `json:"fds,omitempty"` // what the passed fds point at
	Status int             `json:"status"`
	// Invalid says how the request, or the fake's own answer, broke the
	// API description.
	Invalid string `json:"invalid,omitempty"`
}

// fakeCH serves the Cloud Hypervisor API on the socket named by
// --api-socket path=..., checking every exchange against the OpenAPI
// description. It returns the process's exit code.
func fakeCH(mode string, args []string) int {
	if len(args) != 2 || args[0] != "--api-socket" || !strings.HasPrefix(args[1], "path=") {
		fmt.Fprintf(os.Stderr, "fake cloud-hypervisor: want --api-socket path=SOCKET, got %q\n", args)
		return 2
	}
	sock := strings.TrimPrefix(args[1], "path=")
	switch mode {
	case modeExitEarly:
		fmt.Fprintln(os.Stderr, msgNoKVM)
		return 1
	case modeNoSocket:
		time.Sleep(fakeTimeout) // the driver must kill it before
		return 3
	}
	doc, err := openapi3.NewLoader().LoadFromFile(os.Getenv(fakeSpecEnv))
	if err == nil {
		err = doc.Validate(context.Background())
	}
	var router routers.Router
	if err == nil {
		router, err = gorillamux.NewRouter(doc)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor: API description:", err)
		return 2
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
		return 2
	}
	journal, err := os.OpenFile(filepath.Join(filepath.Dir(sock), journalName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
		return 2
	}
	f := &fakeVMM{mode: mode, router: router, journal: journal, quit: make(chan struct{})}
	srv := &http.Server{
		Handler:     f,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) },
	}
	go func() { _ = srv.Serve(&fdListener{l.(*net.UnixListener)}) }()
	select {
	case <-f.quit:
	case <-time.After(fakeTimeout):
		return 3
	}
	// Shutdown lets the vmm.shutdown answer go out before the exit.
	_ = srv.Shutdown(context.Background())
	return 0
}

type fakeVMM struct {
	mode    string
	router  routers.Router
	journal *os.File
	quit    chan struct{}

	mu      sync.Mutex
	state   chapi.VmState // "" before vm.create
	config  json.RawMessage
	devices map[string]bool
	quitted bool
}

func (f *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	ex := exchange{Method: r.Method, Path: r.URL.Path, FDs: takeFDs(r.Context())}
	if len(body) > 0 {
		ex.Body = body
	}
	// The router matches the server URL of the description, host included.
	r.URL.Scheme, r.URL.Host = "http", r.Host
	r.Body = io.NopCloser(bytes.NewReader(body))
	in := &openapi3filter.RequestValidationInput{Request: r}
	var status int
	var answer []byte
	route, params, err := f.router.FindRoute(r)
	if err == nil {
		in.Route, in.PathParams = route, params
		err = openapi3filter.ValidateRequest(r.Context(), in)
	}
	if err != nil {
		ex.Invalid = "request: " + err.Error()
		status, answer = http.StatusBadRequest, []byte(ex.Invalid)
	} else {
		status, answer = f.handle(r.URL.Path, body, len(ex.FDs))
		// Error answers are Cloud Hypervisor's own text, which the
		// description does not cover; successes must follow it.
		if status/100 == 2 {
			h := http.Header{}
			if len(answer) > 0 {
				h.Set("Content-Type", "application/json")
			}
			err := openapi3filter.ValidateResponse(r.Context(), &openapi3filter.ResponseValidationInput{
				RequestValidationInput: in, Status: status, Header: h,
				Body: io.NopCloser(bytes.NewReader(answer)), Options: &openapi3filter.Options{IncludeResponseStatus: true},
			})
			if err != nil {
				ex.Invalid = "fake's response: " + err.Error()
				status, answer = http.StatusInternalServerError, []byte(ex.Invalid)
			}
		}
	}
	ex.Status = status
	line, _ := json.Marshal(ex)
	f.mu.Lock()
	_, _ = f.journal.Write(append(line, '\n'))
	f.mu.Unlock()
	if len(answer) > 0 && status/100 == 2 {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(status)
	_, _ = w.Write(answer)
	if r.URL.Path == "/api/v1/vmm.shutdown" && f.mode != modeIgnoreShutdown {
		f.mu.Lock()
		if !f.quitted {
			f.quitted = true
			close(f.quit)
		}
		f.mu.Unlock()
	}
}

// handle is the VMM's state machine, enough for the driver's calls.
func (f *fakeVMM) handle(path string, body []byte, fds int) (int, []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	op := strings.TrimPrefix(path, "/api/v1/")
	switch op {
	case "vmm.ping":
		return 200, []byte(`{"version":"v53.0","pid":` + fmt.Sprint(os.Getpid()) + `}`)
	case "vmm.shutdown":
		return 204, nil
	case "vm.create":
		if f.mode == modeFailCreate {
			return 500, []byte(msgCreate)
		}
		if f.state != "" {
			return 500, []byte("Error creating VM: VmAlreadyCreated")
		}
		f.state, f.config, f.devices = chapi.Created, body, map[string]bool{}
		return 204, nil
	case "vm.boot":
		switch {
		case f.state == "":
			return 404, []byte("VM is not created")
		case f.mode == modeFailBoot:
			return 500, []byte(msgBoot)
		}
		f.state = chapi.Running
		return 204, nil
	case "vm.info":
		if f.state == "" {
			return 500, []byte("Error getting VM info: VmNotCreated")
		}
		b, _ := json.Marshal(map[string]any{"config": f.config, "state": f.state})
		return 200, b
	case "vm.shutdown":
		if f.state != chapi.Running {
			return 405, []byte("VM is not running")
		}
		f.state = chapi.Shutdown
		return 204, nil
	case "vm.add-disk", "vm.add-fs", "vm.add-net", "vm.add-vsock":
		var d struct {
			ID   string `json:"id"`
			Path string `json:"path"`
		}
		_ = json.Unmarshal(body, &d)
		switch {
		case f.state == "":
			return 500, []byte("VM is not created")
		case strings.Contains(d.Path, "missing"):
			return 500, []byte(msgAddDisk)
		case op == "vm.add-net" && fds == 0 && !strings.Contains(string(body), `"tap"`):
			return 500, []byte("Error adding device to the VM: no tap name and no fds")
		}
		f.devices[d.ID] = true
		if f.state != chapi.Running {
			return 204, nil // cold-plugged
		}
		b, _ := json.Marshal(chapi.PciDeviceInfo{Id: d.ID, Bdf: "0000:00:07.0"})
		return 200, b
	case "vm.remove-device":
		var d chapi.VmRemoveDevice
		_ = json.Unmarshal(body, &d)
		if d.Id == nil || !f.devices[*d.Id] {
			return 404, []byte("Error removing device: NoSuchDevice")
		}
		delete(f.devices, *d.Id)
		return 204, nil
	}
	return 500, []byte("fake cloud-hypervisor does not do " + op)
}

type connKey struct{}

// fdListener's connections keep the fds that come with their bytes.
type fdListener struct{ *net.UnixListener }

func (l *fdListener) Accept() (net.Conn, error) {
	c, err := l.AcceptUnix()
	if err != nil {
		return nil, err
	}
	return &fdConn{UnixConn: c}, nil
}

type fdConn struct {
	*net.UnixConn
	mu    sync.Mutex
	files []*os.File
}

func (c *fdConn) Read(b []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(8*4))
	n, oobn, _, _, err := c.ReadMsgUnix(b, oob)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			fds, ferr := unix.ParseUnixRights(&m)
			perr = errors.Join(perr, ferr)
			c.mu.Lock()
			for _, fd := range fds {
				c.files = append(c.files, os.NewFile(uintptr(fd), "passed"))
			}
			c.mu.Unlock()
		}
		if perr != nil {
			return n, perr
		}
	}
	return n, err
}

// takeFDs names, and closes, the fds the request's connection brought.
func takeFDs(ctx context.Context) []string {
	c, ok := ctx.Value(connKey{}).(*fdConn)
	if !ok {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var names []string
	for _, f := range c.files {
		target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
		if err != nil {
			target = err.Error()
		}
		names = append(names, target)
		f.Close()
	}
	c.files = nil
	return names
}

// readJournal is what the fake in dir has been asked so far.
func readJournal(dir string) ([]exchange, error) {
	b, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		return nil, err
	}
	var exs []exchange
	for l := range bytes.Lines(b) {
		var ex exchange
		if err := json.Unmarshal(l, &ex); err != nil {
			return nil, fmt.Errorf("journal line %q: %w", l, err)
		}
		exs = append(exs, ex)
	}
	return exs, nil
}

// fakeTimeout bounds how long a fake waits for anything, so a broken test
// does not leave it behind.
const fakeTimeout = time.Minute
