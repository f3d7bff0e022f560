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
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"unsafe"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/internal/icmptest"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fuse"
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

// reqs builds FUSE requests from uid 0.
type reqs struct{ unique uint64 }

// header fills the header of request b, of its whole length.
func (r *reqs) header(b []byte, op uint32, nodeid uint64) []byte {
	r.unique++
	*fusewire.Header(b) = fuse.InHeader{Length: uint32(len(b)), Opcode: op, Unique: r.unique, NodeId: nodeid,
		Caller: fuse.Caller{Pid: uint32(os.Getpid())}}
	return b
}

func (r *reqs) init() []byte {
	b := make([]byte, unsafe.Sizeof(fuse.InitIn{}))
	*fusewire.View[fuse.InitIn](b) = fuse.InitIn{Major: 7, Minor: 38}
	return r.header(b, fusewire.OpInit, 0)
}

func (r *reqs) lookup(name string) []byte {
	b := make([]byte, fusewire.InHeaderSize+len(name)+1)
	copy(b[fusewire.InHeaderSize:], name)
	return r.header(b, fusewire.OpLookup, 1)
}

func (r *reqs) open(nodeid uint64) []byte {
	b := make([]byte, unsafe.Sizeof(fuse.OpenIn{}))
	*fusewire.View[fuse.OpenIn](b) = fuse.OpenIn{Flags: uint32(os.O_RDWR)}
	return r.header(b, fusewire.OpOpen, nodeid)
}

func (r *reqs) release(nodeid, fh uint64) []byte {
	b := make([]byte, unsafe.Sizeof(fuse.ReleaseIn{}))
	*fusewire.View[fuse.ReleaseIn](b) = fuse.ReleaseIn{Fh: fh}
	return r.header(b, fusewire.OpRelease, nodeid)
}

func (r *reqs) write(b []byte, nodeid, fh uint64, pkt []byte) []byte {
	size := int(unsafe.Sizeof(fuse.WriteIn{}))
	b = b[:size+len(pkt)]
	*fusewire.View[fuse.WriteIn](b) = fuse.WriteIn{Fh: fh, Size: uint32(len(pkt))}
	copy(b[size:], pkt)
	return r.header(b, fusewire.OpWrite, nodeid)
}

func (r *reqs) read(b []byte, nodeid, fh uint64, size int) []byte {
	b = b[:unsafe.Sizeof(fuse.ReadIn{})]
	*fusewire.View[fuse.ReadIn](b) = fuse.ReadIn{Fh: fh, Size: uint32(size), Flags: uint32(os.O_RDWR)}
	return r.header(b, fusewire.OpRead, nodeid)
}

// serveOne serves request in on c and writes its reply to c's /dev/fuse, as
// transport/devfuse's loop does.
func serveOne(c *transport.Conn, in, out []byte) {
	n, _ := c.Serve(in, out, true)
	if n > 0 {
		c.Dev().Write(out[:n])
	}
	if fusewire.Opcode(in) == fusewire.OpInit {
		c.InitAnswered(out[:n])
	}
}

// serveConn serves root's tree on dev in-process, with the fast path or
// with go-fuse alone (but without --debug's logging).
func serveConn(dev *os.File, root *Root, fast bool) *transport.Conn {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ps, notifier := newProtocolServer(dev, root, MountOptions{Log: quiet})
	return transport.NewConn(dev, ps, root, notifier, transport.Options{Log: quiet, Debug: !fast, MaxWrite: maxWrite})
}

// serveTree starts request handling for root on /dev/null (replies are
// discarded) and opens name: it returns the connection, its buffers, and
// the nodeid and fh of the open file.
func serveTree(b *testing.B, root *Root, name string, fast bool) (c *transport.Conn, in, out []byte, nodeid, fh uint64, r *reqs) {
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { devnull.Close() })
	c = serveConn(devnull, root, fast)
	in, out = make([]byte, c.BufSize()), make([]byte, c.BufSize())
	r = &reqs{}
	serveOne(c, r.init(), out)
	serveOne(c, r.lookup(name), out)
	if e := fusewire.Status(out); e != 0 {
		b.Fatalf("LOOKUP %s: %v", name, e)
	}
	nodeid = fusewire.OutBody[fuse.EntryOut](out).NodeId
	serveOne(c, r.open(nodeid), out)
	if e := fusewire.Status(out); e != 0 {
		b.Fatalf("OPEN %s: %v", name, e)
	}
	fh = fusewire.OutBody[fuse.OpenOut](out).Fh
	return c, in, out, nodeid, fh, r
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
	c, in, out, nodeid, fh, r := serveTree(b, root, "tun0", fast)
	if root.File(fh) == nil {
		b.Fatal("the open handle is not registered for the fast path")
	}
	pkt := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		serveOne(c, r.write(in, nodeid, fh, pkt), out)
		serveOne(c, r.read(in, nodeid, fh, 65536), out)
	}
	b.StopTimer()
	if got := fusewire.Out(out).Length; got != 16+64 {
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
			c, in, out, nodeid, fh, r := serveTree(b, root, "tun7", fast)
			defer serveOne(c, r.release(nodeid, fh), out)
			for _, args := range [][]string{{"addr", "add", "198.18.7.1/24", "dev", "tun7"}, {"link", "set", "tun7", "up"}} {
				if o, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
					b.Fatalf("ip %v: %v %s", args, err, o)
				}
			}
			pkt := icmptest.EchoRequest(netip.MustParseAddr("198.18.7.2"), netip.MustParseAddr("198.18.7.1"), 1, 1, 36)
			// The first packets after link up can be dropped: prime.
			for range 100 {
				serveOne(c, r.write(in, nodeid, fh, pkt), out)
			}
			for {
				serveOne(c, r.read(in, nodeid, fh, 65536), out)
				if fusewire.Out(out).Length == 16+64 {
					break
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				serveOne(c, r.write(in, nodeid, fh, pkt), out)
				for {
					// Skip anything but the reply (it is queued before
					// the write returns: the kernel answers in the write).
					serveOne(c, r.read(in, nodeid, fh, 65536), out)
					if fusewire.Out(out).Length == 16+64 && out[16+20] == 0 {
						break
					}
				}
			}
		})
	}
}
