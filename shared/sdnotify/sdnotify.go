// Package sdnotify implements the client side of the systemd notify protocol
// (sd_notify(3)) and the service watchdog (sd_watchdog_enabled(3)) with the
// standard library only.
//
// A daemon started by a unit with Type=notify calls Notify(Ready) once it
// serves requests and Notify(Stopping) when it begins to shut down; with
// WatchdogSec= set in the unit it runs RunWatchdog for its whole life.
package sdnotify

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// States understood by systemd.
const (
	// Ready tells the service manager that start-up is finished.
	Ready = "READY=1"
	// Stopping tells the service manager that the service is shutting down.
	Stopping = "STOPPING=1"
	// Watchdog is the keep-alive ping for WatchdogSec=.
	Watchdog = "WATCHDOG=1"
)

// Environment variables set by systemd.
const (
	envSocket       = "NOTIFY_SOCKET"
	envWatchdogUsec = "WATCHDOG_USEC"
	envWatchdogPID  = "WATCHDOG_PID"
)

// Notify sends state (e.g. "READY=1"; several assignments may be joined with
// newlines) as one datagram to the socket named by $NOTIFY_SOCKET. It returns
// false, nil when NOTIFY_SOCKET is unset, and true, nil once the datagram was
// sent. A path starting with '@' names a socket in the abstract namespace.
func Notify(state string) (bool, error) {
	addr := os.Getenv(envSocket)
	if addr == "" {
		return false, nil
	}
	if strings.HasPrefix(addr, "vsock:") {
		return false, fmt.Errorf("sdnotify: %s=%q: vsock notify sockets are not supported", envSocket, addr)
	}
	if addr[0] != '/' && addr[0] != '@' {
		return false, fmt.Errorf("sdnotify: %s=%q: want an absolute path or an abstract name starting with '@'", envSocket, addr)
	}
	// On Linux the net package maps a leading '@' to the abstract namespace
	// (a leading NUL byte in sun_path), which is what systemd means by it.
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: dial %s: %w", addr, err)
	}
	defer conn.Close()
	n, err := conn.Write([]byte(state))
	if err != nil {
		return false, fmt.Errorf("sdnotify: send to %s: %w", addr, err)
	}
	if n != len(state) {
		return false, fmt.Errorf("sdnotify: send to %s: %w", addr, errors.New("short write"))
	}
	return true, nil
}

// WatchdogInterval returns how often the service should send Watchdog: half
// of $WATCHDOG_USEC, as systemd recommends, when $WATCHDOG_PID is unset or
// equals os.Getpid(). It returns 0 when the watchdog is not enabled for this
// process or the variables do not parse.
func WatchdogInterval() time.Duration {
	usecStr := os.Getenv(envWatchdogUsec)
	if usecStr == "" {
		return 0
	}
	usec, err := strconv.ParseUint(usecStr, 10, 64)
	if err != nil || usec == 0 {
		return 0
	}
	if pidStr := os.Getenv(envWatchdogPID); pidStr != "" {
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid != os.Getpid() {
			return 0
		}
	}
	const maxUsec = uint64(1<<63-1) / uint64(time.Microsecond)
	if usec > maxUsec {
		usec = maxUsec
	}
	return time.Duration(usec) * time.Microsecond / 2
}

// RunWatchdog sends Watchdog every WatchdogInterval() until ctx is done. It
// returns at once when the interval is 0. Send errors are ignored: a missed
// ping is what the watchdog exists to notice.
func RunWatchdog(ctx context.Context) {
	interval := WatchdogInterval()
	if interval <= 0 {
		return
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			_, _ = Notify(Watchdog)
		}
	}
}
