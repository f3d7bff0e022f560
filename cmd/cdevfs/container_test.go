package main

// The OCI runtimes themselves (crun, runc) with a cdevfs mount as a
// container's whole /dev: the runtime's own default spec (`crun spec`,
// `runc spec`), whose /dev tmpfs entry is replaced by a bind of the mount
// and whose devpts, shm and mqueue mounts stay; a busybox rootfs and
// static C clients from testdata/.
//
// Where a runtime runs: in the daemon's network namespace (nsenter), so
// that the container, whose `network` namespace entry is removed, clones
// its tun there and the kernel answers its pings; in a private mount
// namespace of its own, with a tmpfs over /run, so nothing it mounts
// reaches the machine (its /dev, /run, /sys/fs/cgroup) or the test's own
// namespace; with its state (--root) in a temporary directory.
//
// Cgroups (this machine's layout is hybrid v1+v2, CI's may differ): crun
// refuses a hybrid layout ("cgroups in hybrid mode not supported"), so it
// runs with --cgroup-manager=disabled and a tmpfs over /sys/fs/cgroup in
// its private mount namespace; runc runs on the real hierarchy with a
// relative cgroupsPath of its own (under the test's cgroup), removed by
// the runtime when the container ends and by `runc delete -f` at cleanup,
// and checked gone. The spec's /sys/fs/cgroup mount is dropped: the
// container needs no cgroup view, and crun's would be a tmpfs.

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// staticClients are the C clients a container runs: its rootfs has no
// libc, so they are built with -static.
var staticClients = []string{"daemonize", "icmpecho", "openpty", "mmapzero"}

var (
	staticOnce sync.Once
	staticDir  string
	staticErr  error
)

// buildStatic builds staticClients into binDir/static once per run.
func buildStatic() (string, error) {
	staticOnce.Do(func() {
		staticDir = filepath.Join(binDir, "static")
		if staticErr = os.MkdirAll(staticDir, 0o755); staticErr != nil {
			return
		}
		for _, name := range staticClients {
			src := filepath.Join("../../testdata", name+".c")
			out, err := exec.Command("gcc", "-static", "-Wall", "-Wextra", "-O2", "-I../../include",
				"-o", filepath.Join(staticDir, name), src).CombinedOutput()
			if err != nil {
				staticErr = fmt.Errorf("gcc -static %s (libc6-dev has the static libc): %v\n%s", src, err, out)
				return
			}
		}
	})
	return staticDir, staticErr
}

// staticBusybox is the machine's busybox if it is statically linked
// (Debian's busybox-static).
func staticBusybox() (string, error) {
	path, err := exec.LookPath("busybox")
	if err != nil {
		return "", err
	}
	f, err := elf.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("%s is dynamically linked: install busybox-static", path)
		}
	}
	return path, nil
}

// busyboxRootfs makes a read-only container's root: busybox with a link
// per applet, and the static clients, in bin.
func busyboxRootfs(t *testing.T) string {
	t.Helper()
	busybox, err := staticBusybox()
	if err != nil {
		testenv.Unavailable(t, "container", err)
	}
	clients, err := buildStatic()
	if err != nil {
		testenv.Unavailable(t, "container", err)
	}
	root := filepath.Join(t.TempDir(), "rootfs")
	for _, dir := range []string{"bin", "dev", "proc", "sys", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile := func(src, dst string) {
		b, err := os.ReadFile(src)
		if err == nil {
			err = os.WriteFile(dst, b, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	copyFile(busybox, filepath.Join(root, "bin/busybox"))
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range staticClients {
		copyFile(filepath.Join(clients, name), filepath.Join(root, "bin", name))
	}
	return root
}

// containerScript is what the container runs, as `sh -c`: each check
// prints one line the test looks for; set -e stops at the first failure.
const containerScript = `set -e
echo "stdout: $(stat -L -c '%F %t:%T' /proc/$$/fd/1)"
test -c /dev/null && echo "test -c /dev/null: ok $(stat -c %t:%T /dev/null)"
ls -l /dev
grep ' /dev' /proc/self/mounts
cat /proc/self/cgroup
daemonize /dev/shm/daemonized
i=0
until [ -e /dev/shm/daemonized ]; do
	i=$((i + 1))
	[ $i -le 100 ] || { echo "daemon(3): no report from the daemon in 10 s"; exit 1; }
	sleep 0.1
done
echo "daemon(3): $(cat /dev/shm/daemonized)"
openpty
mmapzero
icmpecho -u 'ip addr add 198.18.0.1/32 peer 198.18.0.2 dev "$1" && ip link set "$1" up && echo "up $1"' /dev/tun 198.18.0.2 198.18.0.1 3
echo "icmpecho: 3 echoes through /dev/tun"
echo "container: done"
`

// TestContainerDev: crun and runc each run a container whose whole /dev
// is a cdevfs mount, with the runtime's default devpts, shm and mqueue
// mounts, once with the container's output piped to the caller and once
// with terminal: true; inside, the kernel's devices are character
// devices (`test -c /dev/null`), `ls -l /dev` lists the tree and the
// runtime's mounts, daemon(3) takes /dev/null, a pseudo-terminal opens
// through /dev/ptmx, /dev/zero maps shared, and a client clones through
// /dev/tun and gets three ICMP echoes answered by the kernel.
//
// Both runtimes run with a terminal too, because they set it up
// differently over a bound /dev: runc creates /dev/console if it is not
// there and binds the pty's slave over it; crun 1.8 (and crun today) only
// binds over /dev/console, which it creates just in a /dev of its own
// making ("mount `/dev/pts/0` to `/dev/console`: No such file or
// directory" without the tree's default console).
func TestContainerDev(t *testing.T) {
	requireKernel(t)
	if _, err := exec.LookPath("script"); err != nil {
		testenv.Unavailable(t, "container", err)
	}
	rootfs := busyboxRootfs(t)
	devBefore, _ := os.ReadDir("/dev")
	for _, runtime := range []string{"crun", "runc"} {
		for _, terminal := range []bool{false, true} {
			name := runtime + "/piped"
			if terminal {
				name = runtime + "/terminal"
			}
			t.Run(name, func(t *testing.T) { runContainerDev(t, runtime, rootfs, terminal) })
		}
	}
	if devAfter, _ := os.ReadDir("/dev"); fmt.Sprint(devBefore) != fmt.Sprint(devAfter) {
		t.Errorf("the machine's /dev changed: %v, then %v", devBefore, devAfter)
	}
}

// runContainerDev runs containerScript under runtime with a fresh daemon's
// mount as /dev and checks what it printed.
func runContainerDev(t *testing.T, runtime, rootfs string, terminal bool) {
	if _, err := exec.LookPath(runtime); err != nil {
		testenv.Unavailable(t, "container ("+runtime+")", err)
	}
	start := time.Now()
	d := startDaemon(t, "--allow-other")
	for _, dir := range []string{"pts", "shm", "mqueue"} {
		if contains(d.ls(), dir) {
			t.Fatalf("a fresh tree has %s already: %v", dir, d.ls())
		}
	}
	if !contains(d.ls(), "console") {
		t.Fatalf("a fresh tree has no console to bind a terminal over: %v", d.ls())
	}
	// The runtime makes pts, shm and mqueue itself, through the mount
	// (both do: runc mkdir 0755, crun mkdirat 01755).

	bundle := t.TempDir()
	state := filepath.Join(bundle, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("cdevfs-%d-%s-%t", os.Getpid(), runtime, terminal)
	cgroupsPath := ""
	if runtime == "runc" {
		cgroupsPath = id
	}
	writeSpec(t, runtime, bundle, rootfs, d.dir, cgroupsPath, terminal)

	// The runtime's command line, in the daemon's network namespace and a
	// private mount namespace of its own.
	var inner string
	switch runtime {
	case "crun":
		inner = `mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /sys/fs/cgroup && ` +
			`exec crun --root "$1" --cgroup-manager=disabled run -b "$2" "$3"`
	case "runc":
		inner = `mount -t tmpfs tmpfs /run && exec runc --root "$1" run -b "$2" "$3"`
	}
	argv := []string{"nsenter", "--net=/proc/" + strconv.Itoa(d.cmd.Process.Pid) + "/ns/net", "--",
		"unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh", state, bundle, id}
	if terminal {
		// The runtime needs a terminal on its own stdin and relays the
		// container's pty to it: script(1) gives it one, and copies it to
		// its stdout, our pipe.
		quoted := make([]string, len(argv))
		for i, a := range argv {
			quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		argv = []string{"script", "-qec", strings.Join(quoted, " "), "/dev/null"}
	}
	t.Cleanup(func() {
		// A container still running after a failure is killed; runc removes
		// its cgroup (crun made none).
		args := []string{"--root", state, "delete", "-f", id}
		if runtime == "crun" {
			args = append([]string{"--cgroup-manager=disabled"}, args...)
		}
		// Both exit 0 for a container that is gone already.
		if out, err := exec.Command(runtime, args...).CombinedOutput(); err != nil {
			t.Errorf("%s delete -f %s: %v %s", runtime, id, err, out)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// A stdin that stays open and silent: script(1) at the end of its
	// input (/dev/null) sends the terminal an end-of-file byte, which the
	// container's pty echoes ("^@").
	if _, err := cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	err := cmd.Run()
	// Through a terminal, lines end in CR LF.
	out := strings.ReplaceAll(stdout.String(), "\r\n", "\n")
	t.Logf("%s run (terminal: %t) in %v: %v\nstdout:\n%s\nstderr:\n%s", runtime, terminal,
		time.Since(start).Round(time.Millisecond), err, out, stderr.String())
	if err != nil {
		t.Fatalf("%s run: %v\nstderr: %s\nstdout:\n%s\ndaemon log:\n%s", runtime, err, stderr.String(), out, d.log())
	}

	var null unix.Stat_t
	if err := unix.Stat("/dev/null", &null); err != nil {
		t.Fatal(err)
	}
	nullRdev := fmt.Sprintf("%x:%x", unix.Major(null.Rdev), unix.Minor(null.Rdev))
	stdoutIs := `stdout: fifo 0:0` // the pipe, not the /dev/null crun took it for before
	if terminal {
		stdoutIs = `stdout: character special file 88:\d+` // a pts of the container's devpts
	}
	for _, want := range []string{
		"(?m)^" + stdoutIs + "$",
		"(?m)^test -c /dev/null: ok " + nullRdev + "$",
		`(?m)^crw-rw-rw- .* 1, +3 .* null$`,
		`(?m)^crw-rw-rw- .* 1, +5 .* zero$`,
		`(?m)^-rw------- .* tun$`,
		`(?m)^lrwxrwxrwx .* ptmx -> pts/ptmx$`,
		`(?m)^d.* pts$`, `(?m)^d.* shm$`, `(?m)^d.* mqueue$`,
		`(?m)^cdevfs /dev fuse.cdevfs `,
		`(?m)^devpts /dev/pts devpts `,
		`(?m)^shm /dev/shm tmpfs `,
		`(?m)^mqueue /dev/mqueue mqueue `,
		fmt.Sprintf(`(?m)^daemon\(3\): ok %d:%d$`, unix.Major(null.Rdev), unix.Minor(null.Rdev)),
		`(?m)^pty /dev/pts/\d+ ok$`,
		`(?m)^mmap /dev/zero ok$`,
		`(?m)^up tun0$`,
		`(?m)^icmpecho: 3 echoes through /dev/tun$`,
		`(?m)^container: done$`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("%s, terminal: %t: the container's output lacks %q", runtime, terminal, want)
		}
	}
	// With a terminal, the pty's slave is bound over /dev/console.
	if terminal && !regexp.MustCompile(`(?m)^crw--w---- .* 136, +\d+ .* console$`).MatchString(out) {
		t.Errorf("%s, terminal: %t: ls -l /dev lacks a console that is the pty", runtime, terminal)
	}

	// What the runtime left in the tree: the directories it made, and the
	// interface the client cloned (down, kept, as on BSD).
	ls := d.ls()
	for _, want := range []string{"pts", "shm", "mqueue"} {
		if !contains(ls, want) {
			t.Errorf("%s did not make %s through the mount: %v", runtime, want, ls)
		}
	}
	if links := d.links(); !slices.Equal(links, []string{"tun0"}) {
		t.Errorf("interfaces after the run: %v, want [tun0]", links)
	}
	if cgroupsPath != "" {
		t.Cleanup(func() { checkCgroupsGone(t, out, cgroupsPath) })
	}
}

// writeSpec writes bundle/config.json: the runtime's own default spec
// (`runtime spec`) made to run containerScript as root with CAP_NET_ADMIN
// in rootfs, with the tree at mount bound over /dev, in the runtime's
// network namespace.
func writeSpec(t *testing.T, runtime, bundle, rootfs, mount, cgroupsPath string, terminal bool) {
	t.Helper()
	gen := exec.Command(runtime, "spec")
	gen.Dir = bundle
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("%s spec: %v %s", runtime, err, out)
	}
	path := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatalf("%s spec: %v", runtime, err)
	}
	obj := func(m map[string]any, key string) map[string]any {
		v, ok := m[key].(map[string]any)
		if !ok {
			t.Fatalf("%s spec: no %q object:\n%s", runtime, key, b)
		}
		return v
	}
	process := obj(spec, "process")
	process["terminal"] = terminal
	process["args"] = []any{"sh", "-c", containerScript}
	// Cloning through /dev/tun and configuring the interface need
	// CAP_NET_ADMIN (the daemon asks for it in the user namespace that owns
	// its network namespace, the machine's here): in the bounding,
	// effective and permitted sets; not ambient (a capability there must
	// be inheritable too, and root needs none).
	for set, list := range obj(process, "capabilities") {
		if caps, ok := list.([]any); ok && set != "ambient" {
			obj(process, "capabilities")[set] = append(caps, "CAP_NET_ADMIN")
		}
	}
	obj(spec, "root")["path"] = rootfs

	// The default mounts are /proc, /dev (a tmpfs), /dev/pts, /dev/shm,
	// /dev/mqueue, /sys, /sys/fs/cgroup; the /dev entry becomes the bind of
	// the tree, in its place: before the mounts under it.
	mounts, _ := spec["mounts"].([]any)
	var kept []any
	bound := false
	for _, m := range mounts {
		mm := m.(map[string]any)
		switch mm["destination"] {
		case "/dev":
			kept = append(kept, map[string]any{"destination": "/dev", "type": "bind", "source": mount,
				"options": []any{"rbind", "rw"}})
			bound = true
		case "/sys/fs/cgroup":
		default:
			kept = append(kept, m)
		}
	}
	if !bound {
		t.Fatalf("%s spec has no /dev mount to replace:\n%s", runtime, b)
	}
	spec["mounts"] = kept

	linux := obj(spec, "linux")
	var namespaces []any
	for _, ns := range linux["namespaces"].([]any) {
		if ns.(map[string]any)["type"] != "network" {
			namespaces = append(namespaces, ns)
		}
	}
	linux["namespaces"] = namespaces
	if cgroupsPath != "" {
		linux["cgroupsPath"] = cgroupsPath
	}
	b, err = json.MarshalIndent(spec, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkCgroupsGone checks that the cgroups the container was in (as its
// /proc/self/cgroup, in out, named them) are gone.
func checkCgroupsGone(t *testing.T, out, cgroupsPath string) {
	t.Helper()
	found := false
	for _, l := range strings.Split(out, "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 || !strings.HasSuffix(f[2], "/"+cgroupsPath) {
			continue
		}
		found = true
		dirs := []string{"/sys/fs/cgroup" + f[2], "/sys/fs/cgroup/unified" + f[2]}
		if f[1] != "" {
			dirs = []string{filepath.Join("/sys/fs/cgroup", strings.TrimPrefix(f[1], "name="), f[2])}
		}
		for _, dir := range dirs {
			if _, err := os.Stat(dir); err == nil {
				t.Errorf("the container's cgroup %s is left after runc delete", dir)
			}
		}
	}
	if !found {
		t.Errorf("the container's /proc/self/cgroup names no cgroup ending in %s:\n%s", cgroupsPath, out)
	}
}
