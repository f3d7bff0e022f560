package main

// The kernel's devices in the tree: character device nodes with the
// kernel's numbers, opened by the kernel itself; what programs that
// check /dev/null (daemon(3), noclobber, crun) see; modes enforced by the
// kernel (default_permissions).

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// kernelDefaults are the kernel devices of every tree.
var kernelDefaults = []string{"null", "zero", "full", "random", "urandom", "tty"}

// withDev runs argv in a mount namespace of its own where the tree is
// bind-mounted over /dev (the machine's /dev is untouched).
func withDev(d *daemon, argv ...string) *exec.Cmd {
	return exec.Command("unshare", append([]string{"--mount", "--", "sh", "-c",
		`mount --bind "$1" /dev && shift && exec "$@"`, "sh", d.dir}, argv...)...)
}

// TestKernelDevices: null, zero, full, random, urandom and tty are
// character devices with the numbers and modes of the machine's /dev
// (devtmpfs); --device adds one by name (kmsg, 0644 as devtmpfs makes it)
// or by numbers under a name of one's own; a device sysfs does not have is
// left out with one log line; a name of the tree's own is refused.
func TestKernelDevices(t *testing.T) {
	d := startDaemon(t, "--device", "kmsg", "--device", "bitbucket=1:3", "--device", "cdevfs-nosuch", "--device", "gone=1:250")
	for _, name := range append(kernelDefaults, "kmsg", "bitbucket") {
		host := name
		if name == "bitbucket" {
			host = "null"
		}
		var want, got unix.Stat_t
		if err := unix.Stat("/dev/"+host, &want); err != nil || want.Mode&unix.S_IFMT != unix.S_IFCHR {
			t.Fatalf("the machine's /dev/%s: %v, mode %o: not a character device to compare with", host, err, want.Mode)
		}
		if err := unix.Stat(d.path(name), &got); err != nil {
			t.Errorf("stat %s: %v", name, err)
			continue
		}
		if got.Mode != want.Mode || got.Rdev != want.Rdev || got.Uid != 0 || got.Gid != 0 {
			t.Errorf("%s: mode %o rdev %d:%d uid %d gid %d; the machine's /dev/%s: mode %o rdev %d:%d", name,
				got.Mode, unix.Major(got.Rdev), unix.Minor(got.Rdev), got.Uid, got.Gid,
				host, want.Mode, unix.Major(want.Rdev), unix.Minor(want.Rdev))
		}
		if out, err := exec.Command("test", "-c", d.path(name)).CombinedOutput(); err != nil {
			t.Errorf("test -c %s: %v %s", name, err, out)
		}
	}
	if got := d.ls(); contains(got, "cdevfs-nosuch") || contains(got, "gone") {
		t.Errorf("ls = %v: lists a device sysfs does not have", got)
	}
	for _, name := range []string{"cdevfs-nosuch", "gone"} {
		if n := strings.Count(d.log(), "msg=\"kernel device left out\" device="+name+" "); n != 1 {
			t.Errorf("log has %d \"kernel device left out\" lines for %s, want 1:\n%s", n, name, d.log())
		}
	}

	// A name the tree has, or a cloner's, stops the daemon before it mounts.
	for _, name := range []string{"tun", "tap7", "stdin", "null"} {
		mnt := t.TempDir()
		out, err := exec.Command("unshare", "--mount", "--net", cdevfs, "mount", "--device", name+"=1:3", mnt).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "the tree has a "+name+" already") {
			t.Errorf("--device %s=1:3: %v, want exit status 1 and \"the tree has a %s already\":\n%s", name, err, name, out)
		}
	}
}

// TestKernelDevicesAsDev: with the tree as /dev, the kernel's devices do
// what programs ask of them: glibc's daemon(3) takes /dev/null, bash's
// noclobber writes to it, a shared mmap of /dev/zero works, and a piped
// stdout is no /dev/null (its st_rdev differs: crun
// takes every fd whose st_rdev is /dev/null's for /dev/null).
func TestKernelDevicesAsDev(t *testing.T) {
	d := startDaemon(t, "--allow-other")
	shell := "bash"
	if _, err := exec.LookPath("bash"); err != nil {
		shell = "sh"
	}
	if out, err := withDev(d, shell, "-c", "set -C; echo x >/dev/null && echo x >>/dev/null && test -c /dev/null").CombinedOutput(); err != nil {
		t.Errorf("%s: set -C; echo x >/dev/null: %v %s", shell, err, out)
	}

	report := filepath.Join(t.TempDir(), "daemonized")
	if out, err := withDev(d, filepath.Join(binDir, "daemonize"), report).CombinedOutput(); err != nil {
		t.Fatalf("daemonize with the tree as /dev: %v %s", err, out)
	}
	var null unix.Stat_t
	if err := unix.Stat(d.path("null"), &null); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("ok %d:%d\n", unix.Major(null.Rdev), unix.Minor(null.Rdev))
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(report)
		if err == nil {
			if string(b) != want {
				t.Errorf("the daemon's stdin: %q, want %q (the tree's null)", b, want)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon of daemon(3) wrote no report in 10s: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// stat(1) of the pipe that stdout is, and of /dev/null.
	out, err := withDev(d, "sh", "-c", `stat -L -c %t:%T /dev/stdout; stat -c %t:%T /dev/null`).Output()
	lines := strings.Fields(string(out))
	if err != nil || len(lines) != 2 || lines[0] == lines[1] || lines[1] == "0:0" {
		t.Errorf("st_rdev of a piped stdout and of /dev/null: %q %v, want two different numbers, null's not 0:0", out, err)
	}

	zero, err := unix.Open(d.path("zero"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(zero)
	m, err := unix.Mmap(zero, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap(MAP_SHARED) of zero: %v", err)
	}
	m[1<<19] = 7
	if m[0] != 0 || m[1<<20-1] != 0 || m[1<<19] != 7 {
		t.Errorf("mmap of zero: not zeroed, or not writable")
	}
	unix.Munmap(m)
}

// TestKernelDeviceModes: the kernel enforces a kernel device's mode
// (default_permissions): with a rule making null 0600, user nobody's
// open is EACCES, which the daemon never sees, and root's succeeds; a
// chmod and a chown by root through the mount let nobody in, a rule
// hides full; nobody cannot chmod null back.
func TestKernelDeviceModes(t *testing.T) {
	rules := filepath.Join(t.TempDir(), "devfs.rules")
	if err := os.WriteFile(rules, []byte("[r=10]\nadd path null mode 0600\nadd path full hide\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "--allow-other", "--rules", rules, "--ruleset", "r")
	letOthersIn(t, d)
	wantAttr(t, d.path("null"), 0o600, 0, 0)
	nobodyOpens := func() error {
		_, err := as(nobody, nobody, nil, "exec 3<"+d.path("null"))
		return err
	}
	if out, err := as(nobody, nobody, nil, "exec 3<"+d.path("null")); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("nobody opening a 0600 null: %v %q, want EACCES", err, out)
	}
	if out, err := as(nobody, nobody, nil, "exec 3<"+d.path("zero")); err != nil {
		t.Errorf("nobody opening zero (0666): %v %s", err, out)
	}
	fd, err := syscall.Open(d.path("null"), syscall.O_RDWR, 0)
	if err != nil {
		t.Errorf("root opening a 0600 null: %v", err)
	} else {
		syscall.Close(fd)
	}
	if strings.Contains(d.log(), "refused open") {
		t.Errorf("the daemon logged a refused open of a kernel device, which the kernel refuses alone:\n%s", d.log())
	}
	wantENOENT(t, d.path("full"))

	if err := os.Chmod(d.path("null"), 0o666); err != nil {
		t.Fatal(err)
	}
	wantAttr(t, d.path("null"), 0o666, 0, 0)
	if err := nobodyOpens(); err != nil {
		t.Errorf("nobody opening null after chmod 0666: %v", err)
	}
	if err := os.Chmod(d.path("null"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := nobodyOpens(); err == nil {
		t.Errorf("nobody opened null after chmod 0600")
	}
	if err := os.Chown(d.path("null"), nobody, nobody); err != nil {
		t.Fatal(err)
	}
	wantAttr(t, d.path("null"), 0o600, nobody, nobody)
	if err := nobodyOpens(); err != nil {
		t.Errorf("nobody opening the 0600 null it owns: %v", err)
	}
	if out, err := as(4242, 4242, nil, "chmod 0666 "+d.path("null")); err == nil || !strings.Contains(out, "not permitted") {
		t.Errorf("uid 4242's chmod of nobody's null: %v %q, want EPERM", err, out)
	}
	wantAttr(t, d.path("null"), 0o600, nobody, nobody)
	if fd, err := syscall.Open(d.path("null"), syscall.O_WRONLY, 0); err != nil {
		t.Errorf("root opening nobody's 0600 null: %v", err)
	} else {
		syscall.Close(fd)
	}
}
