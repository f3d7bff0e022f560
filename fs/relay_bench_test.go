package fs

// Benchmarks of the packet relay: FUSE WRITE and READ requests driven
// through the transport's request handling (no kernel FUSE: the requests
// are built here, the replies go to /dev/null), against an in-memory
// device and against a real tun interface. allocs/op is the number to
// watch: the relay path must allocate nothing per packet.
//
//	go test -run X -bench Relay -benchmem ./fs
//
// BenchmarkRelayTun needs root and /dev/net/tun; run it in a private
// network namespace (unshare --net).

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/icmptest"
)

// loopDev is a device whose reads return a fixed packet at once and whose
// writes take anything: the relay's cost without a kernel device.
type loopDev struct{ pkt [64]byte }

func (d *loopDev) Open(ctx context.Context) error { return nil }
func (d *loopDev) Close() error                   { return nil }
func (d *loopDev) Revoke()                        {}
func (d *loopDev) Destroy(unlink func()) error    { unlink(); return nil }
func (d *loopDev) Release()                       {}
func (d *loopDev) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	return copy(p, d.pkt[:]), nil
}
func (d *loopDev) Write(ctx context.Context, p []byte) (int, error) { return len(p), nil }

// reqs builds FUSE requests (layouts from <linux/fuse.h>) from uid 0.
type reqs struct{ unique uint64 }

func (r *reqs) header(b []byte, op uint32, nodeid uint64) []byte {
	r.unique++
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint32(b[4:], op)
	ne.PutUint64(b[8:], r.unique)
	ne.PutUint64(b[16:], nodeid)
	ne.PutUint32(b[32:], uint32(os.Getpid()))
	return b
}

func (r *reqs) init() []byte {
	b := r.header(make([]byte, inHeaderLen+64), opInit, 0)
	binary.NativeEndian.PutUint32(b[40:], 7)  // major
	binary.NativeEndian.PutUint32(b[44:], 38) // minor
	return b
}

func (r *reqs) lookup(name string) []byte {
	b := make([]byte, inHeaderLen+len(name)+1)
	copy(b[inHeaderLen:], name)
	return r.header(b, 1, 1)
}

func (r *reqs) open(nodeid uint64) []byte {
	b := r.header(make([]byte, inHeaderLen+8), opOpen, nodeid)
	binary.NativeEndian.PutUint32(b[40:], uint32(os.O_RDWR))
	return b
}

func (r *reqs) release(nodeid, fh uint64) []byte {
	b := r.header(make([]byte, inHeaderLen+24), opRelease, nodeid)
	binary.NativeEndian.PutUint64(b[40:], fh)
	return b
}

func (r *reqs) write(b []byte, nodeid, fh uint64, pkt []byte) []byte {
	b = r.header(b[:writeInLen+len(pkt)], opWrite, nodeid)
	binary.NativeEndian.PutUint64(b[40:], fh)
	binary.NativeEndian.PutUint32(b[56:], uint32(len(pkt)))
	copy(b[writeInLen:], pkt)
	return b
}

func (r *reqs) read(b []byte, nodeid, fh uint64, size int) []byte {
	b = r.header(b[:readInLen], opRead, nodeid)
	binary.NativeEndian.PutUint64(b[40:], fh)
	binary.NativeEndian.PutUint32(b[56:], uint32(size))
	binary.NativeEndian.PutUint32(b[72:], uint32(os.O_RDWR))
	return b
}

// serveTree starts request handling for root on /dev/null (replies are
// discarded) and opens name: it returns the transport, its buffers, and
// the nodeid and fh of the open file.
func serveTree(b *testing.B, root *Root, name string, fast bool) (t *transport, in, out []byte, nodeid, fh uint64, r *reqs) {
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { devnull.Close() })
	t = newServer(devnull, root, MountOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.fast = fast
	in, out = make([]byte, t.bufSize), make([]byte, t.bufSize)
	r = &reqs{}
	t.handle(r.init(), out)
	t.handle(r.lookup(name), out)
	if e := int32(binary.NativeEndian.Uint32(out[4:])); e != 0 {
		b.Fatalf("LOOKUP %s: errno %d", name, -e)
	}
	nodeid = binary.NativeEndian.Uint64(out[16:])
	t.handle(r.open(nodeid), out)
	if e := int32(binary.NativeEndian.Uint32(out[4:])); e != 0 {
		b.Fatalf("OPEN %s: errno %d", name, -e)
	}
	fh = binary.NativeEndian.Uint64(out[16:])
	return t, in, out, nodeid, fh, r
}

func benchLoop(b *testing.B, fast bool) {
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil) // its worker goroutine (goleak)
	n, err := reg.Make("tun0", &loopDev{}, false)
	if err != nil {
		b.Fatal(err)
	}
	n.Rel()
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return false }, ownPolicy(b), slog.New(slog.NewTextHandler(io.Discard, nil)))
	t, in, out, nodeid, fh, r := serveTree(b, root, "tun0", fast)
	if fast && t.fhs.get(fh) == nil {
		b.Fatal("the open handle is not registered for the fast path")
	}
	pkt := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		t.handle(r.write(in, nodeid, fh, pkt), out)
		t.handle(r.read(in, nodeid, fh, 65536), out)
	}
	b.StopTimer()
	if got := binary.NativeEndian.Uint32(out[0:]); got != 16+64 {
		b.Fatalf("READ reply is %d bytes, want %d", got, 16+64)
	}
}

// BenchmarkRelayLoop: one WRITE and one READ per op, on an in-memory
// device, through the fast path and through go-fuse alone.
func BenchmarkRelayLoop(b *testing.B) {
	b.Run("fast", func(b *testing.B) { benchLoop(b, true) })
	b.Run("gofuse", func(b *testing.B) { benchLoop(b, false) })
}

// linuxTunTree is a registry with a tun cloner on the Linux backend (real
// interfaces: run in a private network namespace) and the tree serving it.
// The caller shuts the registry down; the backend is closed at cleanup.
func linuxTunTree(b *testing.B) (*devnode.Registry, *Root) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	be, err := cloner.NewLinux(cloner.LinuxOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(be.Close)
	reg := devnode.NewRegistry()
	cloner.New(cloner.Tun, be, reg, 100, log)
	return reg, NewRoot(reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(b), log)
}

// BenchmarkRelayTun: one ICMP echo request written and its reply read per
// op, on a real tun interface made by the Linux cloner.
func BenchmarkRelayTun(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		b.Skip(err)
	}
	for _, fast := range []bool{true, false} {
		name := map[bool]string{true: "fast", false: "gofuse"}[fast]
		b.Run(name, func(b *testing.B) {
			reg, root := linuxTunTree(b)
			defer reg.Shutdown(context.Background(), nil)
			t, in, out, nodeid, fh, r := serveTree(b, root, "tun7", fast)
			defer t.handle(r.release(nodeid, fh), out)
			for _, args := range [][]string{{"addr", "add", "198.18.7.1/24", "dev", "tun7"}, {"link", "set", "tun7", "up"}} {
				if o, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
					b.Fatalf("ip %v: %v %s", args, err, o)
				}
			}
			pkt := icmptest.EchoRequest(netip.MustParseAddr("198.18.7.2"), netip.MustParseAddr("198.18.7.1"), 1, 1, 36)
			// The first packets after link up can be dropped: prime.
			for range 100 {
				t.handle(r.write(in, nodeid, fh, pkt), out)
			}
			for {
				t.handle(r.read(in, nodeid, fh, 65536), out)
				if binary.NativeEndian.Uint32(out[0:]) == 16+64 {
					break
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				t.handle(r.write(in, nodeid, fh, pkt), out)
				for {
					// Skip anything but the reply (it is queued before
					// the write returns: the kernel answers in the write).
					t.handle(r.read(in, nodeid, fh, 65536), out)
					if binary.NativeEndian.Uint32(out[0:]) == 16+64 && out[16+20] == 0 {
						break
					}
				}
			}
		})
	}
}
