package testenv

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
)

// Snap is what this machine had at one moment, restricted to the things a
// sandboxer can leak: processes, mounts, network namespaces, links, cgroups
// and files under the directories given to Snapshot.
//
// The machine is shared (other tests and builds run beside ours), so process
// entries only count processes that look like ours: a runtime-ish program
// name (containerd*, runc, *sandboxer*, pause, qemu, ...), a command line
// naming a tracked directory, another PID namespace than the test's (a
// container), or a container-ish cgroup (64-hex id, "kuasar", "k8s.io").
type Snap struct {
	Processes map[int]string  // pid -> "comm (cmdline)"
	Mounts    map[string]bool // mount points
	NetNS     map[string]bool // files under /run/netns, /var/run/netns and <dir>/**/netns
	Links     map[string]bool // "name" or "name master BR"
	Cgroups   map[string]bool // cgroup v1/v2 directories that look like pods/containers
	Files     map[string]bool // files, and directories named after an id, under the tracked dirs

	fileDirs  []string          // list files under these
	ownDirs   []string          // a process naming one of these is ours
	netnsDirs []string          // extra netns directories
	foreign   func(string) bool // reports lines that belong to another harness instance
}

var (
	hex64        = regexp.MustCompile(`^[0-9a-f]{64}$`)
	hex64Any     = regexp.MustCompile(`[0-9a-f]{64}`)
	bridgeRe     = regexp.MustCompile(`^kg[0-9a-f]{6}$`)
	harnessDirRe = regexp.MustCompile(`/tmp/kg-[0-9A-Za-z]+`)
	runtimeRe    = regexp.MustCompile(`containerd|runc|crun|runsc|sandboxer|kuasar|pause|qemu|virtiofsd|vmm-task|quark|wasm`)
)

// Snapshot records the current state. dirs are directories whose files are
// listed (and whose mention in a command line makes a process ours); a
// directory named "netns" under them is read as a netns directory.
func Snapshot(dirs ...string) *Snap {
	return snapshot(&Snap{fileDirs: dirs, ownDirs: dirs, netnsDirs: nil})
}

func snapshot(s *Snap) *Snap {
	s.Processes = map[int]string{}
	s.Mounts = map[string]bool{}
	s.NetNS = map[string]bool{}
	s.Links = map[string]bool{}
	s.Cgroups = map[string]bool{}
	s.Files = map[string]bool{}
	s.readProcesses()
	s.readMounts()
	s.readNetNS()
	s.readLinks()
	s.readCgroups()
	for _, d := range s.fileDirs {
		_ = filepath.WalkDir(d, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			// Directories count only when named after a pod or container:
			// infrastructure a daemon makes lazily (a runc root, a
			// namespace directory) is not a leak, a per-pod one is.
			if p != d && (!de.IsDir() || hex64Any.MatchString(de.Name())) {
				s.Files[p] = true
			}
			return nil
		})
	}
	return s
}

func (s *Snap) readProcesses() {
	self := os.Getpid()
	selfPidNS, _ := os.Readlink("/proc/self/ns/pid")
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid <= 2 {
			continue
		}
		base := filepath.Join("/proc", e.Name())
		stat, err := os.ReadFile(base + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		i := bytes.LastIndexByte(stat, ')')
		j := bytes.IndexByte(stat, '(')
		if i < 0 || j < 0 {
			continue
		}
		comm := string(stat[j+1 : i])
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) < 2 {
			continue
		}
		state := fields[0]
		ppid, _ := strconv.Atoi(fields[1])
		if ppid == 2 { // kernel thread
			continue
		}
		if state == "Z" && ppid == 1 {
			continue // dead, waiting for init to reap it (slow here)
		}
		cmdlineB, _ := os.ReadFile(base + "/cmdline")
		args := strings.Split(strings.TrimRight(string(cmdlineB), "\x00"), "\x00")
		cmdline := strings.Join(args, " ")
		if len(cmdlineB) == 0 && state != "Z" {
			continue // kernel thread or gone
		}
		argv0 := filepath.Base(args[0])
		ours := runtimeRe.MatchString(comm) || runtimeRe.MatchString(argv0)
		for _, d := range s.ownDirs {
			if strings.Contains(cmdline, d) {
				ours = true
			}
		}
		where := ""
		if ns, err := os.Readlink(base + "/ns/pid"); err == nil && selfPidNS != "" && ns != selfPidNS {
			ours = true
			// A container: its mounts tell whose rootfs it runs on.
			if m := harnessDirRe.FindString(rootMount(pid)); m != "" {
				where = " in " + m
			}
		}
		if cg, err := os.ReadFile(base + "/cgroup"); err == nil {
			for _, l := range strings.Split(string(cg), "\n") {
				if hex64Any.MatchString(l) || strings.Contains(l, "kuasar") || strings.Contains(l, "/k8s.io") {
					ours = true
					if i := strings.LastIndexByte(l, ':'); i >= 0 {
						where += " cgroup " + l[i+1:]
					}
					break
				}
			}
		}
		if !ours || otherTest(pid, self) {
			continue
		}
		if len(cmdline) > 200 {
			cmdline = cmdline[:200] + "..."
		}
		if state == "Z" {
			comm += " <defunct>"
		}
		s.Processes[pid] = fmt.Sprintf("%s (%s)%s", comm, cmdline, where)
	}
}

// otherTest reports whether pid is, or descends from, the binary of another
// package's tests (go test runs packages in parallel): its runtimes,
// engines and VMs are that test's to account for.
func otherTest(pid, self int) bool {
	for i := 0; i < 16 && pid > 1; i++ {
		if pid == self {
			return false
		}
		if argv0, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
			if a0, _, _ := bytes.Cut(argv0, []byte{0}); strings.HasSuffix(string(a0), ".test") {
				return true
			}
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			return false
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			return false
		}
		pid, _ = strconv.Atoi(f[1])
	}
	return false
}

func (s *Snap) readMounts() {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		s.Mounts[unescapeMount(fields[4])] = true
	}
}

// unescapeMount undoes the octal escapes of /proc/self/mountinfo.
func unescapeMount(p string) string {
	if !strings.Contains(p, `\`) {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if p[i] == '\\' && i+3 < len(p) {
			if v, err := strconv.ParseUint(p[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

func (s *Snap) readNetNS() {
	for _, d := range []string{"/run/netns", "/var/run/netns"} {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			s.NetNS[filepath.Join(d, e.Name())] = true
		}
	}
	for _, d := range s.netnsDirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			s.NetNS[filepath.Join(d, e.Name())] = true
		}
	}
	for _, root := range s.fileDirs {
		_ = filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if de.IsDir() && de.Name() == "netns" {
				ents, _ := os.ReadDir(p)
				for _, e := range ents {
					s.NetNS[filepath.Join(p, e.Name())] = true
				}
				return fs.SkipDir
			}
			// Do not descend into container root filesystems.
			if de.IsDir() && (de.Name() == "rootfs" || strings.HasPrefix(de.Name(), "io.containerd.snapshotter")) {
				return fs.SkipDir
			}
			return nil
		})
	}
}

func (s *Snap) readLinks() {
	ents, _ := os.ReadDir("/sys/class/net")
	for _, e := range ents {
		name := e.Name()
		if m, err := os.Readlink(filepath.Join("/sys/class/net", name, "master")); err == nil {
			name += " master " + filepath.Base(m)
		}
		s.Links[name] = true
	}
}

func (s *Snap) readCgroups() {
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		root := filepath.Join("/sys/fs/cgroup", e.Name())
		_ = filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
			if err != nil || !de.IsDir() {
				return nil
			}
			if p == root {
				return nil
			}
			n := de.Name()
			// The sandboxers' common parent of pods without a cgroup
			// parent stays once made, like kubelet's kubepods.
			if strings.TrimPrefix(p, root) == cgroup.OwnRoot {
				return nil
			}
			if hex64.MatchString(n) || strings.Contains(n, "kuasar") {
				s.Cgroups[p] = true
			}
			if strings.Count(strings.TrimPrefix(p, root), "/") >= 6 {
				return fs.SkipDir
			}
			return nil
		})
	}
}

// Diff returns one human-readable line for each thing that later has and s
// has not. An empty result means nothing leaked between the two snapshots.
func (s *Snap) Diff(later *Snap) []string {
	var out []string
	skip := func(line string) bool {
		if s.foreign != nil && s.foreign(line) {
			return true
		}
		return later.foreign != nil && later.foreign(line)
	}
	add := func(kind, what string) {
		if !skip(what) {
			out = append(out, kind+": "+what)
		}
	}
	var pids []int
	for pid := range later.Processes {
		if old, ok := s.Processes[pid]; !ok || old != later.Processes[pid] {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	for _, pid := range pids {
		add("process", fmt.Sprintf("%d %s", pid, later.Processes[pid]))
	}
	for _, c := range []struct {
		kind     string
		old, new map[string]bool
	}{
		{"mount", s.Mounts, later.Mounts},
		{"netns", s.NetNS, later.NetNS},
		{"link", s.Links, later.Links},
		{"cgroup", s.Cgroups, later.Cgroups},
		{"file", s.Files, later.Files},
	} {
		var keys []string
		for k := range c.new {
			if !c.old[k] {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		for _, k := range keys {
			add(c.kind, k)
		}
	}
	return out
}

// rootMount returns the mountinfo line of a process's root mount ("/").
func rootMount(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == "/" {
			return l
		}
	}
	return ""
}
