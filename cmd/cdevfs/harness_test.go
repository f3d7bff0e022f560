package main

// The end-to-end harness: the real cdevfs binary, a real FUSE mount in
// t.TempDir(), real interfaces, and the C clients of testdata/. Each
// daemon runs under `unshare --net`, so the interfaces of a test live in a
// network namespace of its own that dies with the daemon; the test reaches
// it with `nsenter --net`.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var (
	binDir  string // built binaries: cdevfs and the C clients
	cdevfs  string
	kernErr error // why kernel tests cannot run here, if they cannot
)

func TestMain(m *testing.M) {
	code := func() int {
		var err error
		binDir, err = os.MkdirTemp("", "cdevfs-e2e-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(binDir)
		kernErr = buildAll()
		before := leftovers()
		code := m.Run()
		if after := leftovers(); after != before && code == 0 {
			fmt.Fprintf(os.Stderr, "TestMain: the suite left something behind:\nbefore: %s\nafter:  %s\n", before, after)
			return 1
		}
		return code
	}()
	os.Exit(code)
}

// buildAll builds cdevfs and the C clients, and checks what the kernel
// tests need.
func buildAll() error {
	if os.Geteuid() != 0 {
		return errors.New("not root")
	}
	for _, dev := range []string{"/dev/fuse", "/dev/net/tun"} {
		if _, err := os.Stat(dev); err != nil {
			return err
		}
	}
	for _, tool := range []string{"unshare", "nsenter", "ip", "gcc", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s: %w", tool, err)
		}
	}
	cdevfs = filepath.Join(binDir, "cdevfs")
	if out, err := exec.Command("go", "build", "-race", "-o", cdevfs, ".").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	srcs, _ := filepath.Glob("../../testdata/*.c")
	for _, src := range srcs {
		out := filepath.Join(binDir, strings.TrimSuffix(filepath.Base(src), ".c"))
		if b, err := exec.Command("gcc", "-Wall", "-Wextra", "-O2", "-I../../include", "-o", out, src).CombinedOutput(); err != nil {
			return fmt.Errorf("gcc %s: %v\n%s", src, err, b)
		}
	}
	return nil
}

// leftovers describes what a test could leak: cdevfs mounts, cdevfs
// processes, tun/tap interfaces in the suite's own namespace.
func leftovers() string {
	var parts []string
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		parts = append(parts, fmt.Sprintf("mounts=%d", strings.Count(string(b), "fuse.cdevfs")))
	}
	// Only this run's binary: other runs (other worktrees) may be going on.
	out, _ := exec.Command("pgrep", "-c", "-f", "^"+cdevfs+" mount").Output()
	parts = append(parts, "daemons="+strings.TrimSpace(string(out)))
	links, _ := exec.Command("ip", "-o", "link", "show").Output()
	n := 0
	for _, l := range strings.Split(string(links), "\n") {
		if strings.Contains(l, ": tun") || strings.Contains(l, ": tap") {
			n++
		}
	}
	parts = append(parts, fmt.Sprintf("tuntap=%d", n))
	return strings.Join(parts, " ")
}

// requireKernel skips a kernel test where it cannot run, but fails it in
// CI, where it must.
func requireKernel(t *testing.T) {
	t.Helper()
	if kernErr != nil {
		testenv.Unavailable(t, "kernel", kernErr)
	}
}

// daemon is one running `cdevfs mount` in a network namespace of its own.
type daemon struct {
	t   *testing.T
	cmd *exec.Cmd
	dir string

	mu   sync.Mutex // guards logb
	logb bytes.Buffer
	done chan struct{}
	err  error // exit status, once done is closed
}

// daemonFlags go to every daemon a test starts before its own flags
// (TestOverIOURing runs tests with --io-uring on).
var daemonFlags []string

// startDaemon mounts a fresh tree at a temporary directory.
func startDaemon(t *testing.T, flags ...string) *daemon {
	t.Helper()
	requireKernel(t)
	return startDaemonAt(t, t.TempDir(), flags...)
}

// startDaemonAt mounts a tree at dir (a restart after a crash reuses it).
func startDaemonAt(t *testing.T, dir string, flags ...string) *daemon {
	t.Helper()
	requireKernel(t)
	d := &daemon{t: t, dir: dir, done: make(chan struct{})}
	args := append(append([]string{"--net", "--", cdevfs, "mount"}, daemonFlags...), flags...)
	d.cmd = exec.Command("unshare", append(args, d.dir)...)
	// The race runtime sleeps 1 s at exit (atexit_sleep_ms) to catch late
	// reports; that is not the daemon's shutdown time.
	d.cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			d.mu.Lock()
			d.logb.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			if strings.Contains(sc.Text(), "msg=serving") || strings.Contains(sc.Text(), `"msg":"serving"`) {
				once.Do(func() { close(ready) })
			}
		}
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	select {
	case <-ready:
	case <-d.done:
		t.Fatalf("cdevfs exited before serving: %v\n%s", d.err, d.log())
	case <-time.After(20 * time.Second):
		d.cmd.Process.Kill()
		t.Fatalf("cdevfs did not serve within 20s:\n%s", d.log())
	}
	t.Cleanup(func() { d.stop() })
	return d
}

func (d *daemon) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logb.String()
}

// stop sends SIGTERM and checks a clean exit with the mount gone.
func (d *daemon) stop() {
	t := d.t
	t.Helper()
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		// Generous: a slow machine must not fail here; a hung shutdown
		// still does.
		d.cmd.Process.Kill()
		<-d.done
		t.Errorf("cdevfs did not exit within 60s of SIGTERM:\n%s", d.log())
		return
	}
	if d.err != nil {
		t.Errorf("cdevfs exited with %v after SIGTERM, want status 0:\n%s", d.err, d.log())
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), " "+d.dir+" ") {
		t.Errorf("mount %s still there after cdevfs exited", d.dir)
	}
}

// netns opens the daemon's network namespace, held past the daemon's
// exit until the test ends.
func (d *daemon) netns() *os.File {
	d.t.Helper()
	ns, err := os.Open("/proc/" + strconv.Itoa(d.cmd.Process.Pid) + "/ns/net")
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { ns.Close() })
	return ns
}

// netlink returns a netlink handle in the daemon's network namespace,
// closed when the test ends.
func (d *daemon) netlink() *netlink.Handle {
	d.t.Helper()
	nl, err := netlink.NewHandleAt(netns.NsHandle(d.netns().Fd()))
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(nl.Close)
	return nl
}

// holdNetns keeps the daemon's network namespace alive past the daemon's
// exit, until the test ends, and returns what lists its links then
// (`ip -o link show`).
func (d *daemon) holdNetns() func() string {
	t := d.t
	t.Helper()
	ns := d.netns()
	return func() string {
		t.Helper()
		cmd := exec.Command("nsenter", "--net=/proc/self/fd/3", "ip", "-o", "link", "show")
		cmd.ExtraFiles = []*os.File{ns}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("ip link in the daemon's namespace: %v %s", err, out)
		}
		return string(out)
	}
}

// path is a node's path in the mount.
func (d *daemon) path(name string) string { return filepath.Join(d.dir, name) }

// ip runs ip(8) in the daemon's network namespace.
func (d *daemon) ip(args ...string) (string, error) {
	full := append([]string{"--net=/proc/" + fmt.Sprint(d.cmd.Process.Pid) + "/ns/net", "ip"}, args...)
	out, err := exec.Command("nsenter", full...).CombinedOutput()
	return string(out), err
}

// mustIP is ip that fails the test on error.
func (d *daemon) mustIP(args ...string) string {
	d.t.Helper()
	out, err := d.ip(args...)
	if err != nil {
		d.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// links lists the tun/tap interface names in the daemon's namespace.
func (d *daemon) links() []string {
	d.t.Helper()
	return tuntapNames(d.mustIP("-o", "link", "show"))
}

// tuntapNames picks the tun* and tap* names out of `ip -o link show`.
func tuntapNames(out string) []string {
	var names []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 1 {
			name := strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":")
			if strings.HasPrefix(name, "tun") || strings.HasPrefix(name, "tap") {
				names = append(names, name)
			}
		}
	}
	return names
}

// ls lists the mount's directory.
func (d *daemon) ls() []string {
	d.t.Helper()
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		d.t.Fatalf("readdir %s: %v", d.dir, err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// configure gives tunN the point-to-point addresses 198.18.0.1 peer
// 198.18.0.2 and sets it up.
func (d *daemon) configure(name string) {
	d.t.Helper()
	d.mustIP("addr", "add", "198.18.0.1/32", "peer", "198.18.0.2", "dev", name)
	d.mustIP("link", "set", name, "up")
}

// client runs a C client from testdata.
func client(name string, args ...string) *exec.Cmd {
	return exec.Command(filepath.Join(binDir, name), args...)
}

// openDev opens a node with a plain blocking open(2) (not os.File, which
// would put a FUSE file in Go's poller).
func openDev(t *testing.T, path string) int {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	return fd
}

// reopen opens a node whose holder has just closed it or exited: as on
// BSD, the node is free at once (TestCloseMeansClosed), so any error,
// EBUSY too, fails the test.
func reopen(t *testing.T, path string) int {
	t.Helper()
	fd, err := openRetry(path)
	if err != nil {
		t.Fatalf("open %s right after its holder closed it: %v, want it free", path, err)
	}
	return fd
}

// openRetry opens a node for reading and writing, retrying EINTR caused
// by the Go runtime's own signals: an open that waits for a closing
// holder is a FUSE request a signal interrupts, as a blocked read is
// (os.OpenFile retries it too).
func openRetry(path string) (int, error) {
	for {
		fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
		if err != syscall.EINTR {
			return fd, err
		}
	}
}

// readRetry is read(2) that retries EINTR caused by the Go runtime's own
// signals (a FUSE request interrupted by SIGURG ends with EINTR).
func readRetry(fd int, p []byte) (int, error) {
	for {
		n, err := syscall.Read(fd, p)
		if err != syscall.EINTR {
			return n, err
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
