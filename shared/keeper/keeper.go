// Package keeper runs the small process that outlives a sandboxer daemon:
// it owns the task sockets containerd connects to and forwards them to the
// daemon (package ttrpcproxy), so that a daemon restart, planned or kill -9,
// does not break containerd's connections. containerd dials a task address
// once per container and never again; without the keeper it would report
// every container of the node exited when a daemon restarts.
//
// The keeper is the sandboxer binary itself, re-executed with a marker in
// its environment, one per state directory. The daemon finds it through a
// control socket in --dir, starts it when none answers, and tells it to exit
// when it stops with no pod left.
package keeper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/spawn"
	"github.com/kuasar-go/kuasar-go/shared/ttrpcproxy"
	"github.com/kuasar-go/kuasar-go/shared/unixsock"
)

const (
	// envMarker holds the state directory of a re-executed sandboxer binary
	// that is to act as keeper.
	envMarker = "KUASAR_GO_KEEPER_DIR"
	// SocketName is the control socket, in the state directory.
	SocketName = "keeper.sock"
	// SpawnSocketName is where the keeper starts processes for the daemon
	// (package spawn), in the state directory.
	SpawnSocketName = "spawn.sock"
	// LogName is the keeper's log file, in the state directory: the keeper
	// must not hold the daemon's stderr, which may be a pipe someone waits
	// to see closed.
	LogName = "keeper.log"
)

// IsKeeper reports whether this process was started as a keeper.
func IsKeeper() bool { return os.Getenv(envMarker) != "" }

// request is one control call; one per connection.
type request struct {
	Op string `json:"op"`
	// Address is the socket containerd dials (listen, close).
	Address string `json:"address,omitempty"`
	// Backend is the daemon's socket behind Address (listen).
	Backend string `json:"backend,omitempty"`
}

type response struct {
	Error string `json:"error,omitempty"`
	Pid   int    `json:"pid,omitempty"`
}

// maxMessage bounds a control message either way: a request names two
// socket paths, a response a PID or an error.
const maxMessage = 64 << 10

// readRequest reads the request of a control connection.
func readRequest(r io.Reader) (request, error) {
	var req request
	if err := decode(r, &req); err != nil {
		return request{}, err
	}
	return req, nil
}

// readResponse reads the keeper's answer to an op request; an answer that
// carries an error is that error.
func readResponse(r io.Reader, op string) (response, error) {
	var resp response
	if err := decode(r, &resp); err != nil {
		return response{}, err
	}
	if resp.Error != "" {
		return resp, errors.New(resp.Error)
	}
	// The daemon waits for this PID to be gone when it stops the keeper:
	// kill(0 or -1, 0) would never tell it so.
	if op == opHello && resp.Pid <= 0 {
		return response{}, fmt.Errorf("keeper says its pid is %d", resp.Pid)
	}
	return resp, nil
}

// decode reads one JSON message of at most maxMessage bytes into v.
func decode(r io.Reader, v any) error {
	lr := &io.LimitedReader{R: r, N: maxMessage + 1}
	if err := json.NewDecoder(lr).Decode(v); err != nil {
		if lr.N <= 0 {
			return fmt.Errorf("control message longer than %d bytes", maxMessage)
		}
		return fmt.Errorf("control message: %w", err)
	}
	return nil
}

const (
	opHello  = "hello"
	opListen = "listen"
	opClose  = "close"
	opExit   = "exit"
)

// proxied is one task socket the keeper serves.
type proxied struct {
	backend string
	proxy   *ttrpcproxy.Proxy
	l       net.Listener
}

type keeper struct {
	dir     string
	log     *zap.Logger
	mu      sync.Mutex
	proxies map[string]*proxied
	done    chan struct{}
	once    sync.Once
}

// Main is the keeper's whole life. Call it first in main when IsKeeper; it
// does not return.
func Main() {
	dir := os.Getenv(envMarker)
	log, err := newLogger(filepath.Join(dir, LogName))
	if err != nil {
		fmt.Fprintf(os.Stderr, "keeper: %v\n", err)
		os.Exit(1)
	}
	if err := run(dir, log); err != nil {
		log.Error("exiting", zap.Error(err))
		log.Sync()
		os.Exit(1)
	}
	log.Sync()
	os.Exit(0)
}

func newLogger(path string) (*zap.Logger, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(f), zapcore.InfoLevel)
	return zap.New(core).Named("keeper"), nil
}

func run(dir string, log *zap.Logger) error {
	// Container processes the daemon has the keeper start are orphaned to
	// it when the runtime CLI exits; it records their exits for whichever
	// daemon instance asks.
	spawner, err := spawn.NewServer(log.Named("spawn"), 0)
	if err != nil {
		return err
	}
	defer spawner.Close()
	sl, err := unixsock.Listen(filepath.Join(dir, SpawnSocketName))
	if err != nil {
		return fmt.Errorf("spawn socket: %w", err)
	}
	defer os.Remove(filepath.Join(dir, SpawnSocketName))
	go spawner.Serve(sl)
	l, err := unixsock.Listen(filepath.Join(dir, SocketName))
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	k := &keeper{dir: dir, log: log, proxies: map[string]*proxied{}, done: make(chan struct{})}
	go k.serve(l)
	log.Info("serving", zap.Int("pid", os.Getpid()), zap.String("dir", dir))
	sigs := make(chan os.Signal, 1)
	// SIGTERM ends the keeper (and so every connection containerd has to
	// the daemon's tasks); SIGINT and SIGHUP from a terminal the daemon was
	// started in must not.
	signal.Notify(sigs, unix.SIGTERM)
	signal.Ignore(unix.SIGINT, unix.SIGHUP, unix.SIGPIPE)
	select {
	case <-k.done:
	case sig := <-sigs:
		log.Info("shutting down", zap.String("signal", sig.String()))
	}
	l.Close()
	os.Remove(filepath.Join(dir, SocketName))
	k.closeAll()
	return nil
}

func (k *keeper) serve(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go k.handle(c)
	}
}

func (k *keeper) handle(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req, err := readRequest(c)
	if err != nil {
		// A daemon checking whether a keeper answers connects and closes.
		if !errors.Is(err, io.EOF) {
			k.log.Warn("control request", zap.Error(err))
		}
		return
	}
	var resp response
	if err := k.do(req, &resp); err != nil {
		resp.Error = err.Error()
	}
	json.NewEncoder(c).Encode(resp)
	if req.Op == opExit {
		k.once.Do(func() { close(k.done) })
	}
}

func (k *keeper) do(req request, resp *response) error {
	switch req.Op {
	case opHello:
		resp.Pid = os.Getpid()
		return nil
	case opListen:
		return k.listen(req.Address, req.Backend)
	case opClose:
		return k.close(req.Address)
	case opExit:
		return nil
	}
	return fmt.Errorf("unknown operation %q", req.Op)
}

// checkListen refuses socket paths that a listen in dir must not take:
// listening replaces a stale file, so only a socket (*.sock) of the
// daemon's own directory, never one of the keeper's own files, and never
// forwarded to itself (each connection would open another, without end).
func checkListen(dir, address, backend string) error {
	dir = filepath.Clean(dir)
	for _, p := range []string{address, backend} {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || !strings.HasPrefix(p, dir+"/") || !strings.HasSuffix(p, ".sock") {
			return fmt.Errorf("listen %q to %q: socket paths must be clean, absolute, below %s and end in .sock", address, backend, dir)
		}
		if p == filepath.Join(dir, SocketName) || p == filepath.Join(dir, SpawnSocketName) {
			return fmt.Errorf("listen %q to %q: %s is the keeper's own", address, backend, p)
		}
	}
	if address == backend {
		return fmt.Errorf("listen %q: forwarded to itself", address)
	}
	return nil
}

func (k *keeper) listen(address, backend string) error {
	if err := checkListen(k.dir, address, backend); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	// Backends are the daemon's: forwarding to an address the keeper
	// serves could close a loop, and serving a backend would take the
	// daemon's socket while it restarts.
	if _, ok := k.proxies[backend]; ok {
		return fmt.Errorf("listen %q: backend %s is an address the keeper serves", address, backend)
	}
	for a, p := range k.proxies {
		if p.backend == address {
			return fmt.Errorf("listen %q: it is the backend of %s", address, a)
		}
	}
	if p, ok := k.proxies[address]; ok {
		if p.backend != backend {
			return fmt.Errorf("%s already forwards to %s", address, p.backend)
		}
		return nil
	}
	l, err := unixsock.Listen(address)
	if err != nil {
		return err
	}
	p := &proxied{backend: backend, l: l, proxy: ttrpcproxy.New(ttrpcproxy.Config{
		Backend: backend,
		Log:     k.log.With(zap.String("address", address)),
	})}
	k.proxies[address] = p
	go p.proxy.Serve(l)
	k.log.Info("forwarding", zap.String("address", address), zap.String("backend", backend))
	return nil
}

func (k *keeper) close(address string) error {
	k.mu.Lock()
	p, ok := k.proxies[address]
	delete(k.proxies, address)
	k.mu.Unlock()
	if !ok {
		return nil
	}
	p.proxy.Close()
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	k.log.Info("closed", zap.String("address", address))
	return nil
}

func (k *keeper) closeAll() {
	k.mu.Lock()
	addrs := make([]string, 0, len(k.proxies))
	for a := range k.proxies {
		addrs = append(addrs, a)
	}
	k.mu.Unlock()
	for _, a := range addrs {
		if err := k.close(a); err != nil {
			k.log.Warn("close", zap.String("address", a), zap.Error(err))
		}
	}
}

// call sends one control request to the keeper of dir.
func call(ctx context.Context, dir string, req request) (response, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(dir, SocketName))
	if err != nil {
		return response{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return response{}, err
	}
	resp, err := readResponse(c, req.Op)
	if err != nil {
		return resp, fmt.Errorf("keeper %s: %w", req.Op, err)
	}
	return resp, nil
}
