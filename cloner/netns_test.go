//go:build linux

package cloner

// Helpers for the tests of the Linux backend (linux_test.go): they make
// real interfaces, so they run only in a private network namespace, as in
//
//	unshare --net --mount -- go test ./cloner
//
// A test that cannot run skips, except under CI=true, where it fails: a
// kernel test that silently skips in CI tests nothing.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/icmptest"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// ltUnavailable ends a test that cannot run here: a skip, or a failure
// under CI.
func ltUnavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	testenv.Unavailable(t, "kernel", fmt.Sprintf(format, args...))
}

// ltSameNamespaceAsInit tells whether we share the namespace of the given
// type (net, mnt) with the host: with pid 1 (init), or if its namespaces
// are hidden from us (reading /proc/1/ns/* needs ptrace access to init,
// which a sandbox may deny even to root) with pid 2, kthreadd, whose
// namespaces are always the initial ones. As a last resort the namespace
// inode is compared with the fixed numbers Linux 6.18 gives the initial
// network and mount namespaces.
func ltSameNamespaceAsInit(typ string) (bool, error) {
	self, err := os.Readlink("/proc/self/ns/" + typ)
	if err != nil {
		return false, err
	}
	if init, err := os.Readlink("/proc/1/ns/" + typ); err == nil {
		return self == init, nil
	}
	if comm, err := os.ReadFile("/proc/2/comm"); err == nil && strings.TrimSpace(string(comm)) == "kthreadd" {
		if kthreadd, err := os.Readlink("/proc/2/ns/" + typ); err == nil {
			return self == kthreadd, nil
		}
	}
	fixed := map[string]uint32{"net": 0xEFFFFFF9, "mnt": 0xEFFFFFF8} // PROC_{NET,MNT}_INIT_INO
	if ino, ok := fixed[typ]; ok {
		return self == fmt.Sprintf("%s:[%d]", typ, ino), nil
	}
	return false, fmt.Errorf("cannot find the initial %s namespace", typ)
}

// ltRequireNetns skips (fails under CI) unless the test runs in a private
// network namespace with /dev/net/tun, CAP_NET_ADMIN and ip(8), and returns
// a Linux backend closed at the end of the test.
func ltRequireNetns(t testing.TB) *Linux {
	t.Helper()
	same, err := ltSameNamespaceAsInit("net")
	switch {
	case err != nil:
		ltUnavailable(t, "cannot compare network namespaces: %v", err)
	case same:
		ltUnavailable(t, "in the host's network namespace; run under `unshare --net --mount`")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		ltUnavailable(t, "no tun device: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		ltUnavailable(t, "no ip(8): %v", err)
	}
	if err := exec.Command("ip", "link", "set", "lo", "up").Run(); err != nil {
		ltUnavailable(t, "cannot configure links (no CAP_NET_ADMIN?): %v", err)
	}
	ltFdCheck(t)
	b, err := NewLinux(LinuxOptions{})
	if err != nil {
		t.Fatalf("NewLinux: %v", err)
	}
	t.Cleanup(b.Close)
	return b
}

// ltFdCheck fails the test if it ends with more or fewer fds open than it
// started with. Registered first, it runs after every other cleanup (links
// closed, backend closed, sysfs unmounted).
func ltFdCheck(t testing.TB) {
	t.Helper()
	ltWarmUp.Do(func() {
		// The runtime opens its epoll fd and wakeup eventfd on first
		// use of the poller, and keeps them: open them now.
		r, w, err := os.Pipe()
		if err == nil {
			r.Close()
			w.Close()
		}
	})
	start, before := ltFdCount(t)
	t.Cleanup(func() {
		end, after := ltFdCount(t)
		if end == start {
			return
		}
		for fd, target := range after {
			if before[fd] != target {
				info, _ := os.ReadFile("/proc/self/fdinfo/" + fd)
				t.Logf("new fd %s -> %s %q", fd, target, strings.Join(strings.Fields(string(info)), " "))
			}
		}
		for fd, target := range before {
			if _, ok := after[fd]; !ok {
				t.Logf("closed fd %s -> %s", fd, target)
			}
		}
		t.Errorf("%d fds open at the start of the test, %d at the end", start, end)
	})
}

var ltWarmUp sync.Once

// ltIP runs ip(8) and fails the test if it fails.
func ltIP(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// ltLinkGone removes name at the end of the test if it still exists
// (best effort: the test itself deletes what it made).
func ltLinkGone(t testing.TB, name string) {
	t.Cleanup(func() {
		if ltLinkExists(name) {
			_ = exec.Command("ip", "link", "del", name).Run()
		}
	})
}

// ltLinkExists tells whether an interface of that name exists.
func ltLinkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// ltLinkShow is the output of `ip -o link show dev name`.
func ltLinkShow(t testing.TB, name string) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show", "dev", name).CombinedOutput()
	if err != nil {
		t.Fatalf("ip link show %s: %v\n%s", name, err, out)
	}
	return string(out)
}

// ltIsUp tells whether the link's administrative flags include UP.
func ltIsUp(t testing.TB, name string) bool {
	t.Helper()
	s := ltLinkShow(t, name)
	i, j := strings.Index(s, "<"), strings.Index(s, ">")
	if i < 0 || j < i {
		t.Fatalf("ip link show %s: no flags in %q", name, s)
	}
	for _, f := range strings.Split(s[i+1:j], ",") {
		if f == "UP" {
			return true
		}
	}
	return false
}

// ltSysfs returns the root of a sysfs that shows this network namespace.
// /sys was mounted in the host's namespace and keeps showing the host's
// interfaces after `unshare --net`, so when we also have a private mount
// namespace a fresh sysfs is mounted in a temporary directory for the
// test.
func ltSysfs(t testing.TB) string {
	t.Helper()
	same, err := ltSameNamespaceAsInit("mnt")
	if err != nil || same {
		// Mounting here would be seen by the host: use /sys and let
		// ltTunFlags check that it shows our interfaces.
		return "/sys"
	}
	dir := t.TempDir()
	if err := unix.Mount("sysfs", dir, "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC|unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount sysfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// ltTunFlags reads /sys/class/net/NAME/tun_flags, after checking that the
// sysfs shows the interface of that name in our namespace (by ifindex).
func ltTunFlags(t testing.TB, b *Linux, sys, name string) uint16 {
	t.Helper()
	link, err := b.nl.LinkByName(name)
	if err != nil {
		t.Fatalf("netlink: %s: %v", name, err)
	}
	dir := filepath.Join(sys, "class/net", name)
	idx, err := os.ReadFile(filepath.Join(dir, "ifindex"))
	if err != nil || strings.TrimSpace(string(idx)) != strconv.Itoa(link.Attrs().Index) {
		ltUnavailable(t, "%s does not show this network namespace (ifindex %q, %v); run under `unshare --net --mount`", sys, idx, err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "tun_flags"))
	if err != nil {
		t.Fatalf("tun_flags of %s: %v", name, err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(raw)), 0, 16)
	if err != nil {
		t.Fatalf("tun_flags of %s: %q: %v", name, raw, err)
	}
	return uint16(v)
}

// ltFdCount is the number of open file descriptors of this process.
func ltFdCount(t testing.TB) (int, map[string]string) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("read /proc/self/fd: %v", err)
	}
	fds := make(map[string]string, len(ents))
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		fds[e.Name()] = target
	}
	// One of them is the directory ReadDir had open; it is closed now.
	return len(ents), fds
}

// --- IPv4 / ICMP ---

// ltEchoRequest builds an IPv4 ICMP echo request from src to dst with a
// 56-byte payload.
func ltEchoRequest(src, dst netip.Addr, id, seq uint16) []byte {
	return icmptest.EchoRequest(src, dst, id, seq, 56)
}

// ltIsEchoReply tells whether pkt is the kernel's answer to req: IPv4 from
// req's destination to its source, valid checksums, ICMP echo reply with
// the same id, sequence and payload.
func ltIsEchoReply(pkt, req []byte) bool {
	if len(pkt) < 20 || pkt[0]>>4 != 4 {
		return false
	}
	ihl := int(pkt[0]&0xf) * 4
	tot := int(binary.BigEndian.Uint16(pkt[2:]))
	if ihl < 20 || tot < ihl || tot > len(pkt) || pkt[9] != 1 || icmptest.Checksum(pkt[:ihl]) != 0 {
		return false
	}
	if string(pkt[12:16]) != string(req[16:20]) || string(pkt[16:20]) != string(req[12:16]) {
		return false
	}
	icmp, reqICMP := pkt[ihl:tot], req[20:]
	return len(icmp) == len(reqICMP) && icmp[0] == 0 && icmp[1] == 0 &&
		icmptest.Checksum(icmp) == 0 && string(icmp[4:]) == string(reqICMP[4:])
}

// ltBuildICMPEcho compiles testdata/icmpecho.c into a temporary directory.
func ltBuildICMPEcho(t testing.TB) string {
	t.Helper()
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		ltUnavailable(t, "no gcc: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "icmpecho")
	cmd := exec.Command(gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", bin, "../testdata/icmpecho.c")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gcc icmpecho.c: %v\n%s", err, out)
	}
	return bin
}

// ltResult is what a Read in a goroutine returned, and when.
type ltResult struct {
	n   int
	err error
	at  time.Time
}

// ltWithin fails unless err matches target and d is at most max.
func ltWithin(t testing.TB, what string, err, target error, d, max time.Duration) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: error %v, want %v", what, err, target)
	}
	if d > max {
		t.Errorf("%s: returned %v after the trigger, want at most %v", what, d, max)
	}
}
