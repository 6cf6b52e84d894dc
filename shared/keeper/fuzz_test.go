package keeper

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fuzzDir stands for the keeper's directory in fuzzed requests: the
// fuzzer cannot know the temporary directory of a run.
const fuzzDir = "DIR"

// FuzzKeeperRequest serves what a keeper reads on its control socket: up
// to four requests, one per line as one per connection, served in turn by
// a keeper of a directory that holds its log and a container record.
// Nothing panics; whatever was asked, the keeper serves only sockets
// (*.sock) of its directory, none of its own, none forwarded to an address
// it serves (a loop), and the files of the directory are still there.
func FuzzKeeperRequest(f *testing.F) {
	f.Add([]byte(`{"op":"hello"}`))
	f.Add([]byte(`{"op":"listen","address":"DIR/task.sock","backend":"DIR/task-backend.sock"}` + "\n" +
		`{"op":"listen","address":"DIR/task.sock","backend":"DIR/task-backend.sock"}` + "\n" +
		`{"op":"close","address":"DIR/task.sock"}`))
	f.Add([]byte(`{"op":"listen","address":"DIR/vms/p1/task.sock","backend":"DIR/vms/p1/task-backend.sock"}` + "\n" +
		`{"op":"listen","address":"DIR/vms/p1/task-backend.sock","backend":"DIR/vms/p1/task.sock"}`))
	f.Add([]byte(`{"op":"listen","address":"DIR/keeper.log","backend":"DIR/b.sock"}`))
	f.Add([]byte(`{"op":"listen","address":"DIR/t.sock","backend":"DIR/t.sock"}`))
	f.Add([]byte(`{"op":"listen","address":"DIR/../x.sock","backend":"DIR/b.sock"}` + "\n" + `{"op":"exit"}`))
	f.Add([]byte(`{"op":"close","address":"DIR/tasks/c1.json"}` + "\n" + `{"op":"bogus"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		k := newKeeper(t)
		planted := map[string]string{LogName: "log", "tasks/c1.json": "record"}
		for name, content := range planted {
			p := filepath.Join(k.dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		data = bytes.ReplaceAll(data, []byte(fuzzDir), []byte(k.dir))
		for i, line := range bytes.SplitN(data, []byte("\n"), 5) {
			if i == 4 {
				break
			}
			req, err := readRequest(bytes.NewReader(line))
			if err != nil {
				continue
			}
			var resp response
			_ = k.do(req, &resp)
			for address, p := range k.proxies {
				if err := checkListen(k.dir, address, p.backend); err != nil {
					t.Fatalf("after %+v the keeper serves %s for %s: %v", req, address, p.backend, err)
				}
				if _, ok := k.proxies[p.backend]; ok {
					t.Fatalf("after %+v %s forwards to %s, which the keeper serves", req, address, p.backend)
				}
				if !strings.HasPrefix(address, k.dir+"/") {
					t.Fatalf("after %+v the keeper serves %s, outside %s", req, address, k.dir)
				}
			}
			for name, content := range planted {
				if b, err := os.ReadFile(filepath.Join(k.dir, name)); err != nil || string(b) != content {
					t.Fatalf("after %+v %s holds %q, %v", req, name, b, err)
				}
			}
		}
	})
}

// FuzzKeeperResponse reads what a daemon reads from its keeper. Nothing
// panics; an answer to hello that is accepted names a process (a PID
// above 0), and an accepted answer carries no error.
func FuzzKeeperResponse(f *testing.F) {
	f.Add([]byte(`{"pid":42}`), opHello)
	f.Add([]byte(`{"pid":0}`), opHello)
	f.Add([]byte(`{}`), opListen)
	f.Add([]byte(`{"error":"listen \"/x\": socket paths must be clean"}`), opListen)
	f.Add([]byte(`{"pid":42} {"pid":-1}`), opHello)
	f.Fuzz(func(t *testing.T, data []byte, op string) {
		resp, err := readResponse(bytes.NewReader(data), op)
		if err != nil {
			return
		}
		if resp.Error != "" {
			t.Fatalf("accepted an answer with error %q", resp.Error)
		}
		if op == opHello && resp.Pid <= 0 {
			t.Fatalf("accepted hello from pid %d", resp.Pid)
		}
	})
}
