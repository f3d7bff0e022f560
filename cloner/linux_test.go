//go:build linux

package cloner

// Tests of the Linux backend against the real kernel. They create
// interfaces, so each one first checks that it runs in a private network
// namespace (see netns_test.go); run them as
//
//	unshare --net --mount -- go test -race -run Linux ./cloner
//
// Names use units above 100 and addresses come from 198.18.0.0/15
// (RFC 2544 benchmarking), to stay clear of every other test.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/tunfd"
	"golang.org/x/sys/unix"
)

// How long after its trigger (cancel, Wake, ip link del) a blocked Read
// may take to return.
const ltWakeLatency = 100 * time.Millisecond

// ltCreate creates name and makes sure the test ends with it deleted and
// the link closed. Tests may Delete and Close it themselves first: both
// are idempotent on the Linux backend.
func ltCreate(t *testing.T, b *Linux, name string, kind Kind, attach bool) Link {
	t.Helper()
	ltLinkGone(t, name)
	l, err := b.Create(name, kind, attach)
	if err != nil {
		t.Fatalf("Create(%s, %v, %v): %v", name, kind, attach, err)
	}
	t.Cleanup(func() {
		if err := l.Delete(); err != nil {
			t.Errorf("Delete %s: %v", name, err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("Close %s: %v", name, err)
		}
	})
	return l
}

// ltConfigure gives name a point-to-point IPv4 link local <-> peer and
// sets it up: the kernel answers pings to local that arrive on the tun.
func ltConfigure(t *testing.T, name, local, peer string) {
	t.Helper()
	ltIP(t, "addr", "add", local+"/32", "peer", peer+"/32", "dev", name)
	ltIP(t, "link", "set", name, "up")
}

// ltPing writes an echo request from src (the far end) to dst (the
// kernel's address) and reads packets until the reply, ignoring others.
func ltPing(t *testing.T, l Link, src, dst string, seq uint16) {
	t.Helper()
	req := ltEchoRequest(netip.MustParseAddr(src), netip.MustParseAddr(dst), 0xcdef, seq)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, err := l.Write(ctx, req); err != nil || n != len(req) {
		t.Fatalf("Write echo request: %d, %v; want %d", n, err, len(req))
	}
	buf := make([]byte, 65536)
	for {
		n, err := l.Read(ctx, buf, false)
		if err != nil {
			t.Fatalf("Read while waiting for echo reply %d: %v", seq, err)
		}
		if ltIsEchoReply(buf[:n], req) {
			return
		}
	}
}

// ltReadAsync starts a blocking Read and reports its result.
func ltReadAsync(ctx context.Context, l Link) <-chan ltResult {
	ch := make(chan ltResult, 1)
	go func() {
		n, err := l.Read(ctx, make([]byte, 65536), false)
		ch <- ltResult{n, err, time.Now()}
	}()
	return ch
}

// ltAwait waits for r, failing the test if the Read is still blocked
// after a generous bound.
func ltAwait(t *testing.T, what string, r <-chan ltResult) ltResult {
	t.Helper()
	select {
	case res := <-r:
		return res
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: Read still blocked after 5s", what)
		panic("unreachable")
	}
}

// ltStillBlocked fails if the Read has already returned.
func ltStillBlocked(t *testing.T, r <-chan ltResult) {
	t.Helper()
	select {
	case res := <-r:
		t.Fatalf("Read returned early: %d, %v", res.n, res.err)
	default:
	}
}

func TestLinuxCreateMakesPersistentInterface(t *testing.T) {
	b := ltRequireNetns(t)
	sys := ltSysfs(t)
	for _, tc := range []struct {
		name   string
		kind   Kind
		attach bool
		typ    uint16 // IFF_TUN or IFF_TAP
	}{
		{"tun101", Tun, false, unix.IFF_TUN},
		{"tap101", Tap, false, unix.IFF_TAP},
		{"tun102", Tun, true, unix.IFF_TUN},
		{"tap102", Tap, true, unix.IFF_TAP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := ltCreate(t, b, tc.name, tc.kind, tc.attach)
			if l.Name() != tc.name {
				t.Errorf("Name() = %q, want %q", l.Name(), tc.name)
			}
			flags := ltTunFlags(t, b, sys, tc.name)
			if flags&unix.IFF_PERSIST == 0 {
				t.Errorf("tun_flags %#x: no IFF_PERSIST", flags)
			}
			if flags&(unix.IFF_TUN|unix.IFF_TAP) != tc.typ {
				t.Errorf("tun_flags %#x: want type %#x", flags, tc.typ)
			}
			if flags&unix.IFF_NO_PI == 0 {
				t.Errorf("tun_flags %#x: no IFF_NO_PI", flags)
			}
			// Attached exactly when asked: another opener gets EBUSY
			// while our creating fd is kept.
			fd, err := tunfd.Open(tc.name, tc.typ|unix.IFF_NO_PI)
			if tc.attach {
				if !errors.Is(err, unix.EBUSY) {
					t.Errorf("independent TUNSETIFF while attached: %v, want EBUSY", err)
				}
			} else if err != nil {
				t.Errorf("independent TUNSETIFF of a closed interface: %v", err)
			}
			if fd >= 0 {
				unix.Close(fd)
			}
			// Persistent: closing every fd keeps it.
			if err := l.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if !ltLinkExists(tc.name) {
				t.Fatalf("%s vanished when its fds were closed", tc.name)
			}
			if err := l.Delete(); err != nil {
				t.Errorf("Delete: %v", err)
			}
			if ltLinkExists(tc.name) {
				t.Errorf("%s still exists after Delete", tc.name)
			}
			if err := l.Delete(); err != nil {
				t.Errorf("Delete of a deleted interface: %v, want nil", err)
			}
		})
	}
}

func TestLinuxCreateExistingNameFailsAndLeavesDeviceUntouched(t *testing.T) {
	b := ltRequireNetns(t)
	sys := ltSysfs(t)
	for _, tc := range []struct {
		desc  string
		name  string
		setup []string // ip(8) arguments making the existing device; nil: Create
		kind  Kind     // what we try to create
		tun   uint16   // the existing device's IFF_TUN/IFF_TAP, 0 if not a tun
	}{
		{"tun from ip tuntap", "tun103", []string{"tuntap", "add", "dev", "tun103", "mode", "tun"}, Tun, unix.IFF_TUN},
		{"tun from ip tuntap, create tap", "tun104", []string{"tuntap", "add", "dev", "tun104", "mode", "tun"}, Tap, unix.IFF_TUN},
		{"tap from ip tuntap", "tap103", []string{"tuntap", "add", "dev", "tap103", "mode", "tap"}, Tap, unix.IFF_TAP},
		{"not a tun (dummy, or ifb or bridge)", "tun105", []string{"non-tun"}, Tun, 0},
		{"created by us", "tun106", nil, Tun, unix.IFF_TUN},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			ltLinkGone(t, tc.name)
			switch {
			case len(tc.setup) == 1 && tc.setup[0] == "non-tun":
				ltAddNonTun(t, tc.name)
			case tc.setup != nil:
				ltIP(t, tc.setup...)
			default:
				ltCreate(t, b, tc.name, Tun, false)
			}
			ltIP(t, "link", "set", tc.name, "up")
			before, err := b.nl.LinkByName(tc.name)
			if err != nil {
				t.Fatal(err)
			}
			var flagsBefore uint16
			if tc.tun != 0 {
				flagsBefore = ltTunFlags(t, b, sys, tc.name)
			}

			l, err := b.Create(tc.name, tc.kind, true)
			if !errors.Is(err, syscall.EEXIST) {
				t.Errorf("Create of existing %s: %v, want EEXIST", tc.name, err)
			}
			if l != nil {
				t.Errorf("Create of existing %s returned a link", tc.name)
				_ = l.Close()
			}

			after, err := b.nl.LinkByName(tc.name)
			if err != nil {
				t.Fatalf("%s gone after the failed Create: %v", tc.name, err)
			}
			if after.Attrs().Index != before.Attrs().Index {
				t.Errorf("ifindex %d -> %d: the device was replaced", before.Attrs().Index, after.Attrs().Index)
			}
			if after.Type() != before.Type() {
				t.Errorf("type %q -> %q", before.Type(), after.Type())
			}
			if !ltIsUp(t, tc.name) {
				t.Errorf("%s was set down", tc.name)
			}
			if tc.tun == 0 {
				return
			}
			if got := ltTunFlags(t, b, sys, tc.name); got != flagsBefore {
				t.Errorf("tun_flags %#x -> %#x", flagsBefore, got)
			}
			// Not left attached to a stray fd of ours.
			fd, err := tunfd.Open(tc.name, tc.tun|unix.IFF_NO_PI)
			if err != nil {
				t.Errorf("independent TUNSETIFF after the failed Create: %v", err)
			} else {
				unix.Close(fd)
			}
		})
	}
}

// ltAddNonTun makes an interface that is not a tun: a dummy, as the brief
// of these tests asks, or, on kernels built without the dummy driver, an
// ifb or a bridge.
func ltAddNonTun(t *testing.T, name string) {
	t.Helper()
	var outs []string
	for _, typ := range []string{"dummy", "ifb", "bridge"} {
		out, err := exec.Command("ip", "link", "add", name, "type", typ).CombinedOutput()
		if err == nil {
			t.Logf("existing %s is a %s", name, typ)
			return
		}
		outs = append(outs, typ+": "+strings.TrimSpace(string(out)))
	}
	t.Fatalf("cannot make a non-tun interface %s: %s", name, strings.Join(outs, "; "))
}

func TestLinuxAttachDetach(t *testing.T) {
	b := ltRequireNetns(t)
	const name = "tun107"
	l := ltCreate(t, b, name, Tun, false)
	ctx := context.Background()

	if err := l.Attach(ctx); err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if err := l.Attach(ctx); err != nil {
		t.Fatalf("second Attach (a no-op): %v", err)
	}
	if fd, err := tunfd.Open(name, unix.IFF_TUN|unix.IFF_NO_PI); !errors.Is(err, unix.EBUSY) {
		if fd >= 0 {
			unix.Close(fd)
		}
		t.Fatalf("independent TUNSETIFF while attached: %v, want EBUSY", err)
	}

	ltIP(t, "link", "set", name, "up")
	if !ltIsUp(t, name) {
		t.Fatalf("%s not up after ip link set up", name)
	}
	if err := l.Detach(); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if !ltLinkExists(name) {
		t.Fatalf("%s gone after Detach", name)
	}
	if ltIsUp(t, name) {
		t.Errorf("%s still UP after Detach: %s", name, ltLinkShow(t, name))
	}
	if _, err := l.Write(ctx, make([]byte, 20)); err == nil {
		t.Errorf("Write after Detach succeeded")
	}

	// Someone else attached: our Attach is EBUSY, theirs undisturbed.
	fd, err := tunfd.Open(name, unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		t.Fatalf("independent TUNSETIFF after Detach: %v", err)
	}
	if err := l.Attach(ctx); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Attach while held elsewhere: %v, want EBUSY", err)
	}
	unix.Close(fd)
	if err := l.Attach(ctx); err != nil {
		t.Fatalf("Attach after the other holder closed: %v", err)
	}
	if err := l.Detach(); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	if !ltLinkExists(name) {
		t.Fatalf("%s gone after the second Detach", name)
	}
}

func TestLinuxEchoThroughBackend(t *testing.T) {
	b := ltRequireNetns(t)
	const name, local, peer = "tun108", "198.18.1.1", "198.18.1.2"
	l := ltCreate(t, b, name, Tun, true)
	ltConfigure(t, name, local, peer)
	for seq := uint16(1); seq <= 3; seq++ {
		ltPing(t, l, peer, local, seq)
	}

	t.Run("short buffer truncates", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req := ltEchoRequest(netip.MustParseAddr(peer), netip.MustParseAddr(local), 0xcdef, 4)
		if _, err := l.Write(ctx, req); err != nil {
			t.Fatalf("Write: %v", err)
		}
		buf := make([]byte, 20)
		for {
			n, err := l.Read(ctx, buf, false)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if n != len(buf) {
				t.Fatalf("Read into %d bytes returned %d", len(buf), n)
			}
			// The reply's IPv4 header: ICMP, local -> peer, 84 bytes.
			if buf[0] == 0x45 && buf[9] == 1 && string(buf[12:16]) == string(req[16:20]) &&
				string(buf[16:20]) == string(req[12:16]) && int(buf[2])<<8|int(buf[3]) == len(req) {
				break
			}
		}
		// The rest of the reply was dropped: whatever is queued now
		// starts with an IP header, not with the reply's ICMP header.
		big := make([]byte, 65536)
		for {
			n, err := l.Read(ctx, big, true)
			if errors.Is(err, syscall.EAGAIN) {
				break
			}
			if err != nil {
				t.Fatalf("nonblocking Read: %v", err)
			}
			if v := big[0] >> 4; n == 0 || (v != 4 && v != 6) {
				t.Fatalf("after a truncated read, got %d bytes % x...: the rest of the packet was not dropped", n, big[:min(n, 16)])
			}
		}
		ltPing(t, l, peer, local, 5)
	})

	t.Run("write on a down link is EIO", func(t *testing.T) {
		ltIP(t, "link", "set", name, "down")
		req := ltEchoRequest(netip.MustParseAddr(peer), netip.MustParseAddr(local), 0xcdef, 6)
		if _, err := l.Write(context.Background(), req); !errors.Is(err, syscall.EIO) {
			t.Errorf("Write on a down tun: %v, want EIO", err)
		}
	})
}

func TestLinuxReadInterruptedByContext(t *testing.T) {
	b := ltRequireNetns(t)
	const name, local, peer = "tun109", "198.18.2.1", "198.18.2.2"
	l := ltCreate(t, b, name, Tun, true)
	// The link stays down until the end: nothing can be queued, so only
	// the cancel can end the read.
	for i := 0; i < 5; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		r := ltReadAsync(ctx, l)
		time.Sleep(50 * time.Millisecond)
		ltStillBlocked(t, r)
		t0 := time.Now()
		cancel()
		res := ltAwait(t, "interrupt", r)
		ltWithin(t, "Read after cancel", res.err, syscall.EINTR, res.at.Sub(t0), ltWakeLatency)
	}

	// A context already done never blocks.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Read(ctx, make([]byte, 100), false); !errors.Is(err, syscall.EINTR) {
		t.Errorf("Read with a cancelled context: %v, want EINTR", err)
	}

	// The link is fine afterwards: packets flow both ways.
	ltConfigure(t, name, local, peer)
	ltPing(t, l, peer, local, 1)
}

// A cancel that lands while a Read is returning a packet still runs the
// AfterFunc that sets the read deadline to wake the reader; it then finds
// nobody to wake. The deadline lands on the dup that the Read waited on
// (pollable), which the Read closes: later Reads, blocking or not, must
// not mistake it for a revoke.
func TestLinuxReadAfterLateInterrupt(t *testing.T) {
	b := ltRequireNetns(t)
	const name, local, peer = "tun110", "198.18.3.1", "198.18.3.2"
	l := ltCreate(t, b, name, Tun, true)
	ll := l.(*linuxLink)
	late := func() {
		t.Helper()
		f, err := ll.file()
		if err != nil {
			t.Fatal(err)
		}
		pf, err := pollable(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := pf.SetReadDeadline(longAgo); err != nil {
			t.Fatal(err)
		}
		pf.Close()
	}

	late()
	if _, err := l.Read(context.Background(), make([]byte, 100), true); !errors.Is(err, syscall.EAGAIN) {
		t.Errorf("nonblocking Read on an empty queue after a late interrupt: %v, want EAGAIN", err)
	}

	ltConfigure(t, name, local, peer)
	late()
	ltPing(t, l, peer, local, 1)

	// Queue a reply and read it without blocking.
	late()
	req := ltEchoRequest(netip.MustParseAddr(peer), netip.MustParseAddr(local), 0xcdef, 2)
	if _, err := l.Write(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 65536)
	for {
		n, err := l.Read(context.Background(), buf, true)
		if err == nil && ltIsEchoReply(buf[:n], req) {
			break
		}
		if err != nil && !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("nonblocking Read after a late interrupt: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatal("no echo reply within 5s")
		}
		time.Sleep(time.Millisecond)
	}

	// The real race: cancel while a Read with a packet queued returns.
	// Before readOnce bypassed the poller, about 1 in 60 rounds here
	// made the next nonblocking Read fail with ErrRevoked.
	for i := 0; i < 2000; i++ {
		req := ltEchoRequest(netip.MustParseAddr(peer), netip.MustParseAddr(local), 0xcdef, uint16(3+i))
		if _, err := l.Write(context.Background(), req); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		go cancel()
		if _, err := l.Read(ctx, buf, false); err != nil && !errors.Is(err, syscall.EINTR) {
			t.Fatalf("Read racing a cancel: %v", err)
		}
		for j := 0; j < 2; j++ {
			if _, err := l.Read(context.Background(), buf, true); err != nil && !errors.Is(err, syscall.EAGAIN) {
				t.Fatalf("round %d: nonblocking Read after a Read that raced a cancel: %v", i, err)
			}
		}
		cancel()
	}
}

func TestLinuxWakeRevokesBlockedRead(t *testing.T) {
	b := ltRequireNetns(t)
	const name = "tun111"
	l := ltCreate(t, b, name, Tun, true)
	r := ltReadAsync(context.Background(), l)
	time.Sleep(50 * time.Millisecond)
	ltStillBlocked(t, r)
	t0 := time.Now()
	l.Wake()
	res := ltAwait(t, "wake", r)
	ltWithin(t, "Read after Wake", res.err, ErrRevoked, res.at.Sub(t0), ltWakeLatency)
	if !errors.Is(res.err, syscall.ENXIO) {
		t.Errorf("Read after Wake: %v does not wrap ENXIO", res.err)
	}

	l.Wake() // idempotent
	ctx := context.Background()
	buf := make([]byte, 100)
	if _, err := l.Read(ctx, buf, false); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("blocking Read after Wake: %v, want ENXIO", err)
	}
	if _, err := l.Read(ctx, buf, true); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("nonblocking Read after Wake: %v, want ENXIO", err)
	}
	if _, err := l.Write(ctx, make([]byte, 20)); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("Write after Wake: %v, want ENXIO", err)
	}
	// The interface itself is untouched; the node's destroy deletes it.
	if err := l.Detach(); err != nil {
		t.Errorf("Detach after Wake: %v", err)
	}
	if !ltLinkExists(name) {
		t.Errorf("%s gone after Wake", name)
	}
}

func TestLinuxExternalDeleteGivesErrGone(t *testing.T) {
	b := ltRequireNetns(t)
	const name = "tun112"
	ctx := context.Background()
	// Several rounds: the wakeup races the kernel's teardown of the queue.
	for i := 0; i < 10; i++ {
		l := ltCreate(t, b, name, Tun, true)
		r := ltReadAsync(ctx, l)
		time.Sleep(20 * time.Millisecond)
		ltStillBlocked(t, r)
		ltIP(t, "link", "del", name)
		t0 := time.Now() // the interface is gone once ip(8) returns
		res := ltAwait(t, "ip link del", r)
		ltWithin(t, "Read after ip link del", res.err, ErrGone, res.at.Sub(t0), ltWakeLatency)

		if _, err := l.Write(ctx, make([]byte, 20)); !errors.Is(err, ErrGone) {
			t.Errorf("Write after ip link del: %v, want ErrGone", err)
		}
		if _, err := l.Read(ctx, make([]byte, 100), false); !errors.Is(err, ErrGone) {
			t.Errorf("blocking Read after ip link del: %v, want ErrGone", err)
		}
		if _, err := l.Read(ctx, make([]byte, 100), true); !errors.Is(err, ErrGone) {
			t.Errorf("nonblocking Read after ip link del: %v, want ErrGone", err)
		}
		if err := l.Detach(); err != nil {
			t.Errorf("Detach after ip link del: %v", err)
		}
		if err := l.Attach(ctx); !errors.Is(err, ErrGone) {
			t.Errorf("Attach after ip link del: %v, want ErrGone", err)
		}
		if ltLinkExists(name) {
			t.Fatalf("Attach after ip link del left a new %s behind", name)
		}
		if err := l.Delete(); err != nil {
			t.Errorf("Delete after ip link del: %v", err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("Close after ip link del: %v", err)
		}
		if t.Failed() {
			t.Fatalf("round %d failed", i)
		}
	}
}

func TestLinuxAttachFollowsRename(t *testing.T) {
	b := ltRequireNetns(t)
	const name, renamed = "tun113", "other101"
	ltLinkGone(t, renamed)
	l := ltCreate(t, b, name, Tun, false)
	ltIP(t, "link", "set", name, "name", renamed)
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if err := l.Attach(ctx); err != nil {
			t.Fatalf("Attach %d after rename: %v", i, err)
		}
		if ltLinkExists(name) {
			t.Fatalf("Attach after rename created a new %s", name)
		}
		if fd, err := tunfd.Open(renamed, unix.IFF_TUN|unix.IFF_NO_PI); !errors.Is(err, unix.EBUSY) {
			if fd >= 0 {
				unix.Close(fd)
			}
			t.Fatalf("Attach did not attach %s: independent TUNSETIFF: %v, want EBUSY", renamed, err)
		}
		if _, err := l.Read(ctx, make([]byte, 100), true); !errors.Is(err, syscall.EAGAIN) {
			t.Errorf("nonblocking Read of the renamed interface: %v, want EAGAIN", err)
		}
		if err := l.Detach(); err != nil {
			t.Fatalf("Detach %d: %v", i, err)
		}
	}
	if l.Name() != name {
		t.Errorf("Name() = %q after rename, want the created name %q", l.Name(), name)
	}
	if err := l.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if ltLinkExists(renamed) {
		t.Errorf("Delete left %s", renamed)
	}
	if ltLinkExists(name) {
		t.Errorf("%s exists after Delete", name)
	}
}

// An interface deleted behind our back and re-made under the same name by
// someone else is not ours: Attach says ErrGone and Delete leaves it.
func TestLinuxAttachRefusesReplacedInterface(t *testing.T) {
	b := ltRequireNetns(t)
	sys := ltSysfs(t)
	const name = "tun114"
	l := ltCreate(t, b, name, Tun, false)
	ltIP(t, "link", "del", name)
	if err := l.Attach(context.Background()); !errors.Is(err, ErrGone) {
		t.Errorf("Attach of a deleted interface: %v, want ErrGone", err)
	}
	if ltLinkExists(name) {
		t.Fatalf("Attach of a deleted interface created %s", name)
	}

	ltIP(t, "tuntap", "add", "dev", name, "mode", "tun")
	flags := ltTunFlags(t, b, sys, name)
	if err := l.Attach(context.Background()); !errors.Is(err, ErrGone) {
		t.Errorf("Attach of a re-made interface: %v, want ErrGone", err)
	}
	if err := l.Delete(); err != nil {
		t.Errorf("Delete: %v", err)
	}
	if !ltLinkExists(name) {
		t.Fatalf("Delete removed the other %s", name)
	}
	if got := ltTunFlags(t, b, sys, name); got != flags {
		t.Errorf("tun_flags of the other %s: %#x -> %#x", name, flags, got)
	}
	fd, err := tunfd.Open(name, unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		t.Errorf("the other %s was left attached: %v", name, err)
	} else {
		unix.Close(fd)
	}
}

func TestLinuxNonblockingReadOnEmptyQueueIsEAGAIN(t *testing.T) {
	b := ltRequireNetns(t)
	const name = "tun115"
	l := ltCreate(t, b, name, Tun, true)
	t0 := time.Now()
	_, err := l.Read(context.Background(), make([]byte, 100), true)
	if !errors.Is(err, syscall.EAGAIN) {
		t.Errorf("nonblocking Read on an empty queue: %v, want EAGAIN", err)
	}
	if d := time.Since(t0); d > ltWakeLatency {
		t.Errorf("nonblocking Read took %v", d)
	}
}

func TestLinuxICMPEchoClient(t *testing.T) {
	b := ltRequireNetns(t)
	bin := ltBuildICMPEcho(t)
	const name, local, peer = "tun116", "198.18.0.1", "198.18.0.2"
	l := ltCreate(t, b, name, Tun, false)
	ltConfigure(t, name, local, peer)

	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		return string(out), err
	}
	if out, err := run("-t", name, "/dev/net/tun", peer, local, "3"); err != nil {
		t.Fatalf("icmpecho: %v\n%s", err, out)
	}
	// It attached without clearing the persist flag.
	if err := l.Attach(context.Background()); err != nil {
		t.Fatalf("Attach after icmpecho: %v", err)
	}
	// While we hold it, the client fails at once.
	if out, err := run("-t", name, "/dev/net/tun", peer, local); err == nil || !strings.Contains(out, "TUNSETIFF") {
		t.Errorf("icmpecho on a busy interface: %v, %q; want exit 1 with a TUNSETIFF error", err, out)
	}
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	// No such interface: exit 1, and none is left behind.
	const missing = "tun117"
	if out, err := run("-t", missing, "/dev/net/tun", peer, local); err == nil {
		t.Errorf("icmpecho -t %s succeeded: %s", missing, out)
	}
	if ltLinkExists(missing) {
		t.Errorf("icmpecho left %s behind", missing)
	}
	// Bad arguments: exit 1 with usage.
	if out, err := run("/dev/net/tun", "198.18.0.x", local); err == nil || !strings.Contains(out, "SRC") {
		t.Errorf("icmpecho with a bad address: %v, %q", err, out)
	}
	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
	if ltLinkExists(name) {
		t.Errorf("%s exists after Delete", name)
	}
}

// Creating, attaching, detaching and deleting leaves no fd behind.
func TestLinuxNoFdLeak(t *testing.T) {
	b := ltRequireNetns(t)
	ctx := context.Background()
	cycle := func(name string, attach bool) {
		t.Helper()
		l, err := b.Create(name, Tun, attach)
		if err != nil {
			t.Fatalf("Create %s: %v", name, err)
		}
		if err := l.Attach(ctx); err != nil {
			t.Fatalf("Attach %s: %v", name, err)
		}
		if _, err := l.Read(ctx, make([]byte, 100), true); !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("Read %s: %v", name, err)
		}
		if err := l.Detach(); err != nil {
			t.Fatalf("Detach %s: %v", name, err)
		}
		if err := l.Delete(); err != nil {
			t.Fatalf("Delete %s: %v", name, err)
		}
		if err := l.Close(); err != nil {
			t.Fatalf("Close %s: %v", name, err)
		}
	}
	for u := 150; u < 200; u++ {
		ltLinkGone(t, "tun"+strconv.Itoa(u))
	}
	cycle("tun150", false) // warm up the runtime's poller
	start, before := ltFdCount(t)
	for u := 150; u < 200; u++ {
		cycle("tun"+strconv.Itoa(u), u%2 == 0)
	}
	end, after := ltFdCount(t)
	if end != start {
		for fd, target := range after {
			if before[fd] != target {
				t.Logf("new fd %s -> %s", fd, target)
			}
		}
		t.Errorf("open fds: %d before 50 create/attach/detach/delete cycles, %d after", start, end)
	}
	for u := 150; u < 200; u++ {
		if ltLinkExists("tun" + strconv.Itoa(u)) {
			t.Errorf("tun%d left behind", u)
		}
	}
}

// TestLinuxCreateMarksInterfaceWithItsIndex: Create learns the ifindex
// (an ioctl on the backend's socket) and marks the interface by it before
// returning, in the daemon's namespace and with --netns. In the --netns
// case an interface of the same name in the daemon's own namespace must
// be neither the one indexed nor the one marked.
func TestLinuxCreateMarksInterfaceWithItsIndex(t *testing.T) {
	ltRequireNetns(t)
	const mark = MarkPrefix + "/test/mark"
	check := func(t *testing.T, b *Linux, name string, kind Kind, attach bool) Link {
		t.Helper()
		l, err := b.Create(name, kind, attach)
		if err != nil {
			t.Fatalf("Create(%s): %v", name, err)
		}
		t.Cleanup(func() { _ = l.Delete(); _ = l.Close() })
		link, err := b.nl.LinkByName(name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := link.Attrs().Index; l.Index() != got {
			t.Errorf("Index() = %d, the kernel's ifindex of %s is %d", l.Index(), name, got)
		}
		if got := link.Attrs().Alias; got != mark {
			t.Errorf("alias of %s = %q, want %q", name, got, mark)
		}
		if info, err := b.Find(name); err != nil || info.Owner != OwnerSelf || info.Index != l.Index() {
			t.Errorf("Find(%s) = %+v, %v; want owner self, ifindex %d", name, info, err, l.Index())
		}
		return l
	}
	t.Run("own namespace", func(t *testing.T) {
		b, err := NewLinux(LinuxOptions{Mark: mark})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		ltLinkGone(t, "tun107")
		ltLinkGone(t, "tap107")
		l := check(t, b, "tun107", Tun, true)
		check(t, b, "tap107", Tap, false)
		// Detach sets down by ifindex; an interface deleted meanwhile is
		// no error.
		ltIP(t, "link", "del", "tun107")
		if err := l.Detach(); err != nil {
			t.Errorf("Detach of a deleted interface: %v, want nil", err)
		}
	})
	t.Run("netns", func(t *testing.T) {
		ns := fmt.Sprintf("cdevfs-cl%d", os.Getpid())
		ltIP(t, "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		ltLinkGone(t, "tun108")
		ltIP(t, "tuntap", "add", "dev", "tun108", "mode", "tun") // the daemon's namespace has a tun108 too
		ownIndex := ltIndex(t, "tun108")
		b, err := NewLinux(LinuxOptions{Netns: ns, Mark: mark})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		check(t, b, "tun108", Tun, true)
		if got := ltIndex(t, "tun108"); got != ownIndex {
			t.Errorf("tun108 of the daemon's namespace: ifindex %d -> %d", ownIndex, got)
		}
		if show := ltLinkShow(t, "tun108"); strings.Contains(show, mark) {
			t.Errorf("tun108 of the daemon's namespace was marked: %s", show)
		}
	})
}

// ltIndex is the ifindex of name in the test's namespace.
func ltIndex(t *testing.T, name string) int {
	t.Helper()
	i, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return i.Index
}

// TestLinuxCreateRacingDeleteOrRename: an interface an administrator
// deletes or renames between its making and its lookup by name fails the
// create with ENXIO (the unit went as it was made, as a destroyed node
// goes), not ENODEV, which the daemon passed on to the opener of the
// clone node (TestMixedStress met it a few times a minute), and leaves
// nothing behind: the renamed one goes with the fd that made it.
func TestLinuxCreateRacingDeleteOrRename(t *testing.T) {
	b := ltRequireNetns(t)
	for _, tc := range []struct {
		name, renamed string
		attach        bool
	}{
		{"tun109", "", false},
		{"tap109", "", true},
		{"tun110", "mv-tun110", true},
		{"tap110", "mv-tap110", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ltLinkGone(t, tc.name)
			if tc.renamed != "" {
				ltLinkGone(t, tc.renamed)
			}
			createHook = func(name string) {
				if tc.renamed != "" {
					ltIP(t, "link", "set", "dev", name, "name", tc.renamed)
				} else {
					ltIP(t, "link", "del", name)
				}
			}
			defer func() { createHook = nil }()
			kind := Tun
			if strings.HasPrefix(tc.name, "tap") {
				kind = Tap
			}
			l, err := b.Create(tc.name, kind, tc.attach)
			if err == nil {
				_ = l.Delete()
				_ = l.Close()
				t.Fatalf("Create(%s) with the interface gone meanwhile succeeded", tc.name)
			}
			if !errors.Is(err, syscall.ENXIO) {
				t.Errorf("Create(%s) with the interface gone meanwhile: %v, want ENXIO", tc.name, err)
			}
			for _, name := range []string{tc.name, tc.renamed} {
				if name != "" && ltLinkExists(name) {
					t.Errorf("%s left behind by the failed create", name)
				}
			}
		})
	}
}

// The attached tun fd is in no epoll set until a read must wait: a tun
// fd in one costs every packet queued on it a wakeup of the epoll's
// waiter (Go's poller thread), whether anyone waits or not.
func TestLinuxTunFdNotPolled(t *testing.T) {
	b := ltRequireNetns(t)
	l := ltCreate(t, b, "tun111", Tun, true)
	fd := l.(*linuxLink).ReadFD()
	if fd < 0 {
		t.Fatal("the created link has no fd")
	}
	// An epoll fd's fdinfo lists each fd in its set as "tfd: N".
	infos, err := filepath.Glob("/proc/self/fdinfo/*")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("tfd: %8d ", fd)
	for _, info := range infos {
		b, err := os.ReadFile(info)
		if err != nil {
			continue // closed meanwhile
		}
		if strings.Contains(string(b), want) {
			t.Errorf("the tun fd %d is in the epoll set of fd %s; want it in none", fd, filepath.Base(info))
		}
	}
}
