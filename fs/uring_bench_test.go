package fs

// A benchmark of the packet path over FUSE-over-io_uring: a real mount
// served over io_uring by this process, a real tun interface, echo
// requests written and their replies read through the mount. allocs/op
// counts every allocation in the process, the queues' threads included
// (the client's raw read(2) and write(2) allocate nothing):
//
//	unshare --net --mount -- go test -run X -bench RingRelay -benchmem ./fs
//
// It sets the fuse module's enable_uring to Y for its run, and back.

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cdevfs/cdevfs/internal/icmptest"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// BenchmarkRingRelay: one echo request written and its reply read per op.
// fast: the reply is queued before the READ comes (the kernel answers in
// the write), so the READ is served at once. parked: the READ comes
// first and is parked in its queue's ring until the reply arrives (its
// ns/op means nothing: the writer yields until the READ is parked).
func BenchmarkRingRelay(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	testenv.SetURing(b, "Y")
	reg, root := linuxTunTree(b)
	dir := b.TempDir()
	m, err := New(dir, root, MountOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), IOURing: IOURingOn})
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		b.Fatal(err)
	}
	fd, err := unix.Open(filepath.Join(dir, "tun7"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
		reg.Shutdown(context.Background(), func() { m.Unmount() })
		m.Close()
	}()
	if err != nil {
		b.Fatal(err)
	}
	for _, args := range [][]string{{"addr", "add", "198.18.7.1/24", "dev", "tun7"}, {"link", "set", "tun7", "up"}} {
		if o, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			b.Fatalf("ip %v: %v %s", args, err, o)
		}
	}
	pkt := icmptest.EchoRequest(netip.MustParseAddr("198.18.7.2"), netip.MustParseAddr("198.18.7.1"), 1, 1, 36)
	buf := make([]byte, 65536)
	readReply := func() {
		for {
			n, err := unix.Read(fd, buf)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				b.Error(err)
				return
			}
			if n == 64 && buf[20] == 0 { // the echo reply (anything else is skipped)
				return
			}
		}
	}
	// The first packets after link up can be dropped: prime.
	for range 20 {
		unix.Write(fd, pkt)
	}
	for n := 0; n != 64; {
		if n, _ = unix.Read(fd, buf); n == 64 && buf[20] == 0 {
			break
		}
	}
	for { // drain the other primers' replies
		if ready, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 10); ready == 0 {
			break
		}
		unix.Read(fd, buf)
	}
	s := m.rings.Load()

	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			if _, err := unix.Write(fd, pkt); err != nil {
				b.Fatal(err)
			}
			readReply()
		}
	})
	b.Run("parked", func(b *testing.B) {
		start, done := make(chan struct{}), make(chan struct{})
		go func() {
			runtime.LockOSThread()
			for range start {
				readReply()
				done <- struct{}{}
			}
		}()
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			held := s.Held() // a stray packet's READ may be parked too
			start <- struct{}{}
			for s.Held() <= held {
				runtime.Gosched() // until the READ is parked
			}
			if _, err := unix.Write(fd, pkt); err != nil {
				b.Fatal(err)
			}
			<-done
		}
		b.StopTimer()
		close(start)
	})
}
