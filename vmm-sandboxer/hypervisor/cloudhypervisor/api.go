package cloudhypervisor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor/chapi"
)

// apiBase is the server URL of the OpenAPI description; the host part is
// not used on a unix socket.
const apiBase = "http://localhost/api/v1"

// APIError is a request Cloud Hypervisor answered with an error status; Body
// is its own message.
type APIError struct {
	Method, Path string
	Status       string
	Body         string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s %s: HTTP %s: %s", e.Method, e.Path, e.Status, e.Body)
}

type filesKey struct{}

// withFiles makes the request sent under ctx carry files (SCM_RIGHTS), the
// way vm.add-net takes tap fds.
func withFiles(ctx context.Context, files []*os.File) context.Context {
	return context.WithValue(ctx, filesKey{}, files)
}

// apiDoer sends each request on a connection of its own to the API socket:
// Cloud Hypervisor takes passed fds from the message that starts a request,
// which a pooled http.Transport cannot promise. Answers other than 2xx
// become an *APIError, so every call site gets the VMM's message.
type apiDoer struct {
	socket string
}

func newAPIClient(socket string) (*chapi.ClientWithResponses, error) {
	return chapi.NewClientWithResponses(apiBase, chapi.WithHTTPClient(&apiDoer{socket: socket}))
}

func (d *apiDoer) Do(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "unix", d.socket)
	if err != nil {
		return nil, err
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()

	req.Close = true
	var buf bytes.Buffer
	if err := req.Write(&buf); err != nil {
		return nil, err
	}
	if err := send(conn, buf.Bytes(), ctx.Value(filesKey{})); err != nil {
		return nil, fmt.Errorf("%s %s: send: %w", req.Method, req.URL.Path, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", req.Method, req.URL.Path, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", req.Method, req.URL.Path, err)
	}
	if resp.StatusCode/100 != 2 {
		return nil, &APIError{Method: req.Method, Path: req.URL.Path, Status: resp.Status, Body: string(bytes.TrimSpace(body))}
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	return resp, nil
}

// send writes msg, the fds riding on its first bytes.
func send(conn *net.UnixConn, msg []byte, files any) error {
	fs, _ := files.([]*os.File)
	if len(fs) == 0 {
		_, err := conn.Write(msg)
		return err
	}
	fds := make([]int, len(fs))
	for i, f := range fs {
		fds[i] = int(f.Fd())
	}
	n, _, err := conn.WriteMsgUnix(msg, unix.UnixRights(fds...), nil)
	if err != nil || n == len(msg) {
		// Nothing more to write: even an empty write fails once the VMM,
		// having read the whole request, has answered and closed.
		return err
	}
	_, err = conn.Write(msg[n:])
	return err
}
