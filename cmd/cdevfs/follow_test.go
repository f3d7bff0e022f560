package main

// Issue 5: the tree follows the kernel. Interfaces made or deleted by an
// administrator, a deleted network namespace, a killed daemon, and a
// shutdown with many handles, each with the commands an administrator
// would type, against the real kernel in private network namespaces.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/bsdtun"
	"github.com/cdevfs/cdevfs/internal/testenv"
)

var netnsSeq atomic.Int32

// newNetns makes a named network namespace (ip netns add) for one test
// and deletes it at the end unless the test did.
func newNetns(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("cdevfs-t%d-%d", os.Getpid(), netnsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() {
		if _, err := os.Stat("/run/netns/" + name); err == nil {
			exec.Command("ip", "netns", "del", name).Run()
		}
	})
	return name
}

// nsIP runs ip(8) in the named namespace.
func nsIP(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %s: %v\n%s", ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// nsLinks lists the tun/tap interface names of a named namespace.
func nsLinks(t *testing.T, ns string) []string {
	t.Helper()
	return tuntapNames(nsIP(t, ns, "-o", "link", "show"))
}

// tunFlags reads /sys/class/net/NAME/tun_flags as the administrator would,
// from a sysfs mounted inside the namespace at nsPath (a sysfs shows the
// interfaces of the namespace that mounted it).
func tunFlags(t *testing.T, nsPath, name string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+nsPath, "unshare", "--mount", "sh", "-c",
		"mount -t sysfs sysfs /sys && cat /sys/class/net/"+name+"/tun_flags").CombinedOutput()
	if err != nil {
		t.Fatalf("tun_flags of %s: %v\n%s", name, err, out)
	}
	return strings.TrimSpace(string(out))
}

// linkDetail is `ip -d link show NAME` without what the kernel changes
// by itself when any program attaches a tun: the carrier (state,
// NO-CARRIER, LOWER_UP), and IPv6's addrgenmode, which addrconf turns
// from eui64 to random the first time a tun without a hardware address
// gets a carrier (seen with a plain TUNSETIFF too). What is left tells
// whether anyone changed the interface.
func linkDetail(t *testing.T, run func(args ...string) string, name string) string {
	t.Helper()
	out := run("-d", "link", "show", name)
	for _, drop := range []string{"NO-CARRIER,", ",LOWER_UP", "state UNKNOWN", "state DOWN", "state UP",
		"addrgenmode eui64", "addrgenmode random"} {
		out = strings.ReplaceAll(out, drop, "")
	}
	return out
}

// waitNode waits for name to be listed in the mount and returns how long
// after start it appeared.
func waitNode(t *testing.T, d *daemon, name string, start time.Time) time.Duration {
	t.Helper()
	for !contains(d.ls(), name) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s did not appear in the mount within 5s:\n%s", name, d.log())
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

// TestExternalInterfaceIsAdoptedAndLeftAsMade: `ip tuntap add` makes a
// node appear within 100 ms; opening it attaches and carries packets
// without changing tun_flags or the link; closing leaves it as it was;
// cdevfs refuses to make it transient (it would delete it) and does not
// delete it at exit.
func TestExternalInterfaceIsAdoptedAndLeftAsMade(t *testing.T) {
	ns := newNetns(t)
	d := startDaemon(t, "--netns", ns)
	nsPath := "/run/netns/" + ns
	run := func(args ...string) string { return nsIP(t, ns, args...) }
	for _, c := range []struct{ name, mode string }{{"tun7", "tun"}, {"tap4", "tap"}} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			run("tuntap", "add", "dev", c.name, "mode", c.mode)
			if dt := waitNode(t, d, c.name, start); dt > 100*time.Millisecond {
				t.Errorf("%s appeared %v after ip tuntap add, want within 100ms", c.name, dt)
			} else {
				t.Logf("%s appeared in ls %v after ip tuntap add started", c.name, dt)
			}
			if c.mode == "tun" {
				run("addr", "add", "198.18.0.1/32", "peer", "198.18.0.2", "dev", c.name)
			}
			run("link", "set", c.name, "up", "mtu", "1400")
			flagsBefore, linkBefore := tunFlags(t, nsPath, c.name), linkDetail(t, run, c.name)

			fd := openDev(t, d.path(c.name))
			if got := tunFlags(t, nsPath, c.name); got != flagsBefore {
				t.Errorf("tun_flags of %s while open = %s, want %s as before", c.name, got, flagsBefore)
			}
			if e := ioctlSetInt(fd, bsdtun.TUNSTRANSIENT, 1); e != syscall.EPERM {
				t.Errorf("TUNSTRANSIENT on an adopted interface = %v, want EPERM (cdevfs never deletes what it did not make)", e)
			}
			syscall.Close(fd)
			if c.mode == "tun" {
				out, err := client("icmpecho", d.path(c.name), "198.18.0.2", "198.18.0.1", "3").CombinedOutput()
				if err != nil {
					t.Fatalf("icmpecho through the adopted %s: %v\n%s\n%s", c.name, err, out, d.log())
				}
			}
			syscall.Close(reopen(t, d.path(c.name))) // an open waits for the client's close (its RELEASE)
			time.Sleep(100 * time.Millisecond)       // this close's RELEASE: nothing waits for it
			if got := tunFlags(t, nsPath, c.name); got != flagsBefore {
				t.Errorf("tun_flags of %s after close = %s, want %s as before", c.name, got, flagsBefore)
			}
			if got := linkDetail(t, run, c.name); got != linkBefore {
				t.Errorf("%s changed by an open and close:\nbefore: %s\nafter:  %s", c.name, linkBefore, got)
			}
			if !strings.Contains(d.log(), "msg=adopt unit="+c.name) {
				t.Errorf("no adopt log line for %s:\n%s", c.name, d.log())
			}
		})
	}
	d.stop()
	if got := nsLinks(t, ns); !contains(got, "tun7") || !contains(got, "tap4") {
		t.Errorf("interfaces after cdevfs exited = %v, want the administrator's tun7 and tap4 still there", got)
	}
}

// TestDeviceOfAnotherKindIsNeverAttached: a device with a name of ours
// that is not a tun/tap of that kind gets no node; opening the name is
// EBUSY and leaves it untouched.
func TestDeviceOfAnotherKindIsNeverAttached(t *testing.T) {
	ns := newNetns(t)
	d := startDaemon(t, "--netns", ns)
	run := func(args ...string) string { return nsIP(t, ns, args...) }
	for _, c := range []struct {
		name string
		make []string
	}{
		{"tun8", []string{"link", "add", "tun8", "type", "ifb"}}, // this kernel has no dummy driver; ifb is another non-tun driver
		{"tap5", []string{"tuntap", "add", "dev", "tap5", "mode", "tun"}},
		{"tun9", []string{"tuntap", "add", "dev", "tun9", "mode", "tap"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			run(c.make...)
			before := linkDetail(t, run, c.name)
			time.Sleep(150 * time.Millisecond) // longer than a node takes to appear
			if contains(d.ls(), c.name) {
				t.Errorf("%s (%s) got a node", c.name, strings.Join(c.make, " "))
			}
			if fd, err := syscall.Open(d.path(c.name), syscall.O_RDWR, 0); err != syscall.EBUSY {
				if err == nil {
					syscall.Close(fd)
				}
				t.Errorf("open %s = %v, want EBUSY", c.name, err)
			}
			if after := linkDetail(t, run, c.name); after != before {
				t.Errorf("%s changed:\nbefore: %s\nafter:  %s", c.name, before, after)
			}
		})
	}
}

// TestNetnsDeletionRevokesItsDevices: with --netns the interfaces live in
// that namespace while the daemon stays in its own. `ip netns del`
// revokes every node of it (a blocked reader gets ENXIO), the static
// nodes keep working, cloning is ENXIO, and the daemon lets go of the
// namespace so the kernel really destroys it (a veth probe whose peer is
// in the namespace disappears with it).
func TestNetnsDeletionRevokesItsDevices(t *testing.T) {
	ns := newNetns(t)
	probe := fmt.Sprintf("cdvp%d", os.Getpid()%100000)
	if out, err := exec.Command("ip", "link", "add", probe, "type", "veth", "peer", "name", "peer0", "netns", ns).CombinedOutput(); err != nil {
		t.Fatalf("veth probe: %v\n%s", err, out)
	}
	defer exec.Command("ip", "link", "del", probe).Run()
	d := startDaemon(t, "--netns", ns)
	fd := openDev(t, d.path("tun"))
	defer syscall.Close(fd)
	if _, err := os.Stat(d.path("tap3")); err != nil {
		t.Fatal(err)
	}
	if got := nsLinks(t, ns); !contains(got, "tun0") || !contains(got, "tap3") {
		t.Fatalf("interfaces in %s = %v, want tun0 and tap3", ns, got)
	}
	if own := d.links(); len(own) != 0 {
		t.Fatalf("interfaces in the daemon's own namespace = %v, want none", own)
	}
	res := make(chan error, 1)
	go func() {
		_, err := readRetry(fd, make([]byte, 2048))
		res <- err
	}()
	time.Sleep(200 * time.Millisecond) // let the read block in the daemon
	if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v\n%s", err, out)
	}
	deleted := time.Now()
	select {
	case err := <-res:
		if err != syscall.ENXIO {
			t.Errorf("blocked read after ip netns del = %v, want ENXIO", err)
		}
		t.Logf("blocked read ended %v after ip netns del", time.Since(deleted))
	case <-time.After(5 * time.Second):
		t.Fatalf("blocked read still blocked 5s after ip netns del:\n%s", d.log())
	}
	testenv.WaitFor(t, "tun0 and tap3 to leave ls", func() bool {
		ls := d.ls()
		return !contains(ls, "tun0") && !contains(ls, "tap3")
	})
	for !linkGone(probe) {
		if time.Since(deleted) > 10*time.Second {
			t.Fatalf("the namespace was not destroyed within 10s of ip netns del (veth probe %s still there): cdevfs still holds it?\n%s", probe, d.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("namespace destroyed %v after ip netns del", time.Since(deleted))
	zfd := openDev(t, d.path("zero"))
	if n, err := syscall.Read(zfd, make([]byte, 8)); n != 8 || err != nil {
		t.Errorf("read of zero after the namespace went = %d, %v; want 8 bytes", n, err)
	}
	syscall.Close(zfd)
	if cfd, err := syscall.Open(d.path("tun"), syscall.O_RDWR, 0); err != syscall.ENXIO {
		if err == nil {
			syscall.Close(cfd)
		}
		t.Errorf("open tun after the namespace went = %v, want ENXIO", err)
	}
	if !strings.Contains(d.log(), "network namespace deleted") {
		t.Errorf("no log line for the namespace deletion:\n%s", d.log())
	}
}

func linkGone(name string) bool {
	return exec.Command("ip", "link", "show", name).Run() != nil
}

// TestCrashRestartAdoptsOwnInterfaces: after kill -9, clients get an
// error and never hang; a restart cleans the stale mount with one log
// line, adopts the interfaces the dead daemon made (they open and carry
// packets) and an administrator's one as foreign, and at exit deletes
// only its own. With --orphans destroy a restart deletes them instead.
func TestCrashRestartAdoptsOwnInterfaces(t *testing.T) {
	ns := newNetns(t)
	dir := t.TempDir()
	d := startDaemonAt(t, dir, "--netns", ns)
	nsIP(t, ns, "tuntap", "add", "dev", "tun9", "mode", "tun") // the administrator's
	fd := openDev(t, d.path("tun"))
	defer syscall.Close(fd)
	for _, name := range []string{"tun1", "tap0"} {
		if _, err := os.Stat(d.path(name)); err != nil {
			t.Fatal(err)
		}
	}
	res := make(chan error, 1)
	go func() {
		_, err := readRetry(fd, make([]byte, 2048))
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	d.cmd.Process.Kill()
	<-d.done
	killed := time.Now()
	select {
	case err := <-res:
		if err != syscall.ENOTCONN && err != syscall.ECONNABORTED {
			t.Errorf("blocked read after kill -9 = %v, want ENOTCONN or ECONNABORTED", err)
		}
		t.Logf("blocked read ended with %v, %v after kill -9", err, time.Since(killed))
	case <-time.After(5 * time.Second):
		t.Fatal("blocked read still blocked 5s after kill -9")
	}
	if _, err := syscall.Read(fd, make([]byte, 64)); err != syscall.ENOTCONN {
		t.Errorf("read on a handle of the dead daemon = %v, want ENOTCONN", err)
	}
	if _, err := os.Stat(d.path("tun0")); !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("stat in the dead mount = %v, want ENOTCONN", err)
	}
	want := []string{"tap0", "tun0", "tun1", "tun9"}
	if got := nsLinks(t, ns); strings.Join(slices.Sorted(slices.Values(got)), " ") != strings.Join(want, " ") {
		t.Fatalf("interfaces after kill -9 = %v, want %v (persistent, nothing leaked or lost)", got, want)
	}

	d2 := startDaemonAt(t, dir, "--netns", ns)
	if n := strings.Count(d2.log(), "stale cdevfs mount"); n != 1 {
		t.Errorf("restart logged %d lines about the stale mount, want 1:\n%s", n, d2.log())
	}
	ls := d2.ls()
	for _, name := range want {
		if !contains(ls, name) {
			t.Errorf("after restart %s has no node; ls = %v", name, ls)
		}
	}
	nsIP(t, ns, "addr", "add", "198.18.0.1/32", "peer", "198.18.0.2", "dev", "tun0")
	nsIP(t, ns, "link", "set", "tun0", "up")
	if out, err := client("icmpecho", d2.path("tun0"), "198.18.0.2", "198.18.0.1", "3").CombinedOutput(); err != nil {
		t.Errorf("icmpecho through the adopted tun0: %v\n%s\n%s", err, out, d2.log())
	}
	d2.stop()
	if got := nsLinks(t, ns); strings.Join(got, " ") != "tun9" {
		t.Errorf("interfaces after the restarted daemon exited = %v, want only the administrator's tun9", got)
	}

	// --orphans destroy: a restart deletes what a killed daemon left.
	d3 := startDaemonAt(t, dir, "--netns", ns)
	if _, err := os.Stat(d3.path("tun4")); err != nil {
		t.Fatal(err)
	}
	d3.cmd.Process.Kill()
	<-d3.done
	d4 := startDaemonAt(t, dir, "--netns", ns, "--orphans", "destroy")
	if got := nsLinks(t, ns); strings.Join(got, " ") != "tun9" {
		t.Errorf("interfaces after a restart with --orphans destroy = %v, want only tun9", got)
	}
	if contains(d4.ls(), "tun4") {
		t.Error("tun4 still has a node after --orphans destroy")
	}
}

// TestSigtermWithManyHandlesIsQuick: SIGTERM with 100 open handles, 10 of
// them with a blocked reader, exits within 1 s and leaves no interface
// cdevfs made and no mount.
func TestSigtermWithManyHandlesIsQuick(t *testing.T) {
	ns := newNetns(t)
	d := startDaemon(t, "--netns", ns)
	nsIP(t, ns, "tuntap", "add", "dev", "tun999", "mode", "tun") // the administrator's: stays
	var fds []int
	for i := 0; i < 100; i++ {
		fds = append(fds, openDev(t, d.path("tun")))
	}
	defer func() {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}()
	res := make(chan error, 10)
	for _, fd := range fds[:10] {
		go func(fd int) {
			_, err := readRetry(fd, make([]byte, 2048))
			res <- err
		}(fd)
	}
	time.Sleep(300 * time.Millisecond) // let the reads block in the daemon
	if n := len(nsLinks(t, ns)); n != 101 {
		t.Fatalf("%d interfaces before SIGTERM, want 101", n)
	}
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("no exit 30s after SIGTERM:\n%s", d.log())
	}
	took := time.Since(start)
	t.Logf("exit %v after SIGTERM with 100 handles and 10 blocked readers", took)
	if took > time.Second {
		t.Errorf("exit took %v after SIGTERM, want under 1s:\n%s", took, d.log())
	}
	if d.err != nil {
		t.Errorf("exit status %v, want 0:\n%s", d.err, d.log())
	}
	for i := 0; i < 10; i++ {
		if err := <-res; err == nil {
			t.Errorf("a blocked reader read a packet at shutdown, want an error")
		}
	}
	if got := nsLinks(t, ns); strings.Join(got, " ") != "tun999" {
		t.Errorf("interfaces after exit = %v, want only the administrator's tun999", got)
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), " "+d.dir+" ") {
		t.Error("mount still there after exit")
	}
}
