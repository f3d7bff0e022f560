package fs

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"golang.org/x/sys/unix"
)

// pipeDev is a device whose packets come through a pipe: its read end is
// the fd a parked READ waits for (devnode.ReadWaiter). A queue asks for
// that fd as it parks a READ, before the READ is registered: waits
// counts the asks, and beforeWait, if set, runs first.
type pipeDev struct {
	r, w       int
	revoked    atomic.Bool
	waits      atomic.Int32
	beforeWait atomic.Pointer[func()]
}

var (
	_ devnode.IO         = (*pipeDev)(nil)
	_ devnode.ReadWaiter = (*pipeDev)(nil)
)

func newPipeDev(t *testing.T) *pipeDev {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	return &pipeDev{r: p[0], w: p[1]}
}

func (d *pipeDev) Open(ctx context.Context) error { return nil }
func (d *pipeDev) Close() error                   { return nil }
func (d *pipeDev) Revoke()                        { d.revoked.Store(true) }
func (d *pipeDev) Destroy(unlink func()) error    { unlink(); return nil }
func (d *pipeDev) Release()                       { unix.Close(d.r); unix.Close(d.w) }

// ReadFD implements devnode.ReadWaiter.
func (d *pipeDev) ReadFD() int {
	if f := d.beforeWait.Load(); f != nil {
		(*f)()
	}
	d.waits.Add(1)
	return d.r
}

// Read: a blocking read polls the pipe in steps, so that a revoke or a
// cancelled ctx ends it (a READ that is handed off instead of parked).
func (d *pipeDev) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	for {
		if d.revoked.Load() {
			return 0, syscall.ENXIO
		}
		n, err := unix.Read(d.r, p)
		if err != unix.EAGAIN || nonblock {
			return n, err
		}
		if ctx.Err() != nil {
			return 0, syscall.EINTR
		}
		unix.Poll([]unix.PollFd{{Fd: int32(d.r), Events: unix.POLLIN}}, 10)
	}
}

func (d *pipeDev) Write(ctx context.Context, p []byte) (int, error) { return len(p), nil }

// TestParkedReadEnds: a blocking READ of a device with a ReadWaiter fd is
// parked in its queue's ring, and ends in each of the ways a blocked read
// ends: with the packet that comes; with ENXIO when the node is destroyed
// (the root's Observer.Revoked); with EINTR when its reader is signalled,
// even if the INTERRUPT reaches the daemon before the READ is parked (the
// kernel sends it only once: it must be kept for the READ).
func TestParkedReadEnds(t *testing.T) {
	setURing(t, "Y")
	for _, tc := range []struct {
		name string
		end  func(t *testing.T, d *pipeDev, n *devnode.Node)
		// early: signal the reader while its READ is on the queue's
		// thread, before it is parked.
		early   bool
		want    string
		wantErr error
	}{
		{name: "packet", end: func(t *testing.T, d *pipeDev, n *devnode.Node) {
			if _, err := unix.Write(d.w, []byte("a packet")); err != nil {
				t.Fatal(err)
			}
		}, want: "a packet"},
		{name: "destroy", end: func(t *testing.T, d *pipeDev, n *devnode.Node) {
			go n.Destroy(context.Background())
		}, wantErr: syscall.ENXIO},
		{name: "interrupt before park", early: true, wantErr: syscall.EINTR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, n, m, fd := mountPipeDev(t, IOURingOn)
			s := m.rings.Load()
			tid, got := make(chan int, 1), make(chan readResult, 1)
			if tc.early {
				// The device is asked for its fd on the queue's thread,
				// before the READ is registered as parked.
				dev.signalBeforeWait(tid)
			}
			go readOnThread(fd, tid, got)
			if !tc.early {
				deadline := time.Now().Add(5 * time.Second)
				for s.Held() == 0 {
					if time.Now().After(deadline) {
						t.Fatal("the blocking read was not parked within 5 s")
					}
					time.Sleep(time.Millisecond)
				}
				tc.end(t, dev, n)
			}
			expectRead(t, "parked", dev, got, tc.want, tc.wantErr)
			if dev.waits.Load() == 0 {
				t.Error("the read was never parked (the device was never asked for its fd)")
			}
		})
	}
}

// mountPipeDev mounts a tree whose one node, tun0, is a new pipeDev,
// served over u, and opens the node; all of it is undone when the test
// ends.
func mountPipeDev(t *testing.T, u IOURing) (dev *pipeDev, n *devnode.Node, m *Mount, fd int) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	dev = newPipeDev(t)
	n, err := reg.Make("tun0", dev, false)
	if err != nil {
		t.Fatal(err)
	}
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return false }, ownPolicy(t), quiet)
	dir := t.TempDir()
	m, err = New(dir, root, MountOptions{Log: quiet, IOURing: u})
	if err != nil {
		n.Rel()
		reg.Shutdown(context.Background(), nil)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Rel()
		reg.Shutdown(context.Background(), func() { m.Unmount() })
		m.Close()
	})
	fd, err = unix.Open(filepath.Join(dir, "tun0"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return dev, n, m, fd
}

// readResult is what a read(2) of a device node returned.
type readResult struct {
	n   int
	err error
	buf []byte
}

// readOnThread reads fd once on a thread of its own, whose tid it sends
// first (for a signal), then what the read returned. EINTR is not
// retried: it is an answer here.
func readOnThread(fd int, tid chan<- int, got chan<- readResult) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid <- unix.Gettid()
	buf := make([]byte, 64)
	k, err := unix.Read(fd, buf)
	got <- readResult{k, err, buf[:max(k, 0)]}
}

// expectRead waits up to 2 s for what the read readOnThread started
// returned, and checks it: the packet want, or the error wantErr. what
// names the read in the messages. A read still blocked then is ended
// with a packet, so that the test can end.
func expectRead(t *testing.T, what string, dev *pipeDev, got <-chan readResult, want string, wantErr error) {
	t.Helper()
	var r readResult
	select {
	case r = <-got:
	case <-time.After(2 * time.Second):
		unix.Write(dev.w, []byte("late"))
		r = <-got
		t.Fatalf("%s read not answered within 2 s (then got %q, %v); want %q, %v", what, r.buf, r.err, want, wantErr)
	}
	switch {
	case wantErr != nil && !errors.Is(r.err, wantErr):
		t.Errorf("%s read = %q, %v; want %v", what, r.buf, r.err, wantErr)
	case wantErr == nil && (r.err != nil || string(r.buf) != want):
		t.Errorf("%s read = %q, %v; want %q", what, r.buf, r.err, want)
	}
}

// signalBeforeWait makes the device, when first asked for its fd, signal
// the reader whose tid comes on tid, and wait 200 ms for the INTERRUPT
// that follows to reach the daemon: an INTERRUPT before the READ waits.
func (d *pipeDev) signalBeforeWait(tid <-chan int) {
	var once atomic.Bool
	signal := func() {
		if once.CompareAndSwap(false, true) {
			unix.Tgkill(unix.Getpid(), <-tid, unix.SIGURG)
			time.Sleep(200 * time.Millisecond) // the INTERRUPT comes meanwhile
		}
	}
	d.beforeWait.Store(&signal)
}
