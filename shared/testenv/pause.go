package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// pauseSource is a minimal pause: PID 1 of the pod sandbox that reaps
// children and exits 0 on SIGTERM or SIGINT.
const pauseSource = `package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range ch {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
`

// goBinary finds the go command that runs the tests.
func goBinary() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("go toolchain not found (needed to build the pause binary)")
	}
	return p, nil
}

// BuildPauseBinary compiles the pause program (static, CGO_ENABLED=0,
// reproducible flags) and returns its bytes.
func BuildPauseBinary() ([]byte, error) {
	goBin, err := goBinary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kgpause-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module pause\n\ngo 1.21\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(pauseSource), 0o644); err != nil {
		return nil, err
	}
	out := filepath.Join(dir, "pause")
	cmd := exec.Command(goBin, "build", "-trimpath", "-buildvcs=false",
		"-ldflags=-s -w -buildid=", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOOS=linux", "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build pause: %v: %s", err, b)
	}
	return os.ReadFile(out)
}

// PauseImageTar builds PauseImage: /pause as Entrypoint, plus the image skeleton.
func PauseImageTar() ([]byte, error) {
	bin, err := BuildPauseBinary()
	if err != nil {
		return nil, err
	}
	return ImageTar(ImageSpec{
		Name:       PauseImage,
		Files:      append(baseFiles(), ImageFile{Path: "/pause", Mode: 0o755, Data: bin}),
		Env:        []string{defaultPath},
		Entrypoint: []string{"/pause"},
	})
}

// BuildPauseImage writes PauseImage's OCI image layout tar to path.
func BuildPauseImage(path string) error {
	b, err := PauseImageTar()
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
