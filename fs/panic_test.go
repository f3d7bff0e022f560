package fs

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/metrics"
	"golang.org/x/sys/unix"
)

// panicDev panics on every read, write and ioctl: a bug in a device, on
// the transport's fast path (READ, WRITE) and on go-fuse's (IOCTL).
type panicDev struct{ loopDev }

func (d *panicDev) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	panic("read bug")
}
func (d *panicDev) Write(ctx context.Context, p []byte) (int, error) { panic("write bug") }
func (d *panicDev) Ioctl(ctx context.Context, cmd uint32, pid uint32, in, out []byte) error {
	panic("ioctl bug")
}

// lockedBuffer is a log destination safe for the daemon's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestHandlerPanic: a panicking handler answers EIO, is logged at ERROR
// with its stack and counted, and leaves the tree as it was.
func TestHandlerPanic(t *testing.T) {
	requireFuse(t)
	var logb lockedBuffer
	log := slog.New(slog.NewTextHandler(&logb, nil))
	reg := devnode.NewRegistry()
	mx := metrics.New(reg.States)
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return false }, ownPolicy(t), log)
	dir, _, err := mountTree(t, reg, root, MountOptions{Log: log, Metrics: mx})
	if err != nil {
		t.Fatal(err)
	}
	n, err := reg.Make("tun0", &panicDev{}, false)
	if err != nil {
		t.Fatal(err)
	}
	n.Rel()
	before, _ := os.ReadDir(dir)

	// Plain system calls: Go's poller would register the fd with epoll,
	// whose FUSE_POLL this process answers (a deadlock in a stopped world).
	path := filepath.Join(dir, "tun0")
	fd, err := unix.Open(path, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Read(fd, make([]byte, 64)); err != syscall.EIO {
		t.Errorf("read: %v, want EIO", err)
	}
	if _, err := unix.Write(fd, make([]byte, 64)); err != syscall.EIO {
		t.Errorf("write: %v, want EIO", err)
	}
	if _, err := unix.IoctlGetInt(fd, 0x40047459); err != syscall.EIO { // TUNGDEBUG
		t.Errorf("ioctl: %v, want EIO", err)
	}
	unix.Close(fd)

	for _, bug := range []string{"read bug", "write bug", "ioctl bug"} {
		var line string
		for _, l := range strings.Split(logb.String(), "\n") {
			if strings.Contains(l, bug) {
				line = l
			}
		}
		if !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "goroutine") {
			t.Errorf("log line of the %s: %q, want one at ERROR with a stack", bug, line)
		}
	}
	rec := httptest.NewRecorder()
	mx.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(rec.Body.String(), "cdevfs_handler_panics_total 3") {
		t.Errorf("metrics lack cdevfs_handler_panics_total 3:\n%s", grepLines(rec.Body.String(), "panics"))
	}
	after, err := os.ReadDir(dir)
	if err != nil || !slices.EqualFunc(before, after, func(a, b os.DirEntry) bool { return a.Name() == b.Name() }) {
		t.Errorf("listing after the panics: %v %v, want %v", after, err, before)
	}
	// The handle was released: the device opens again.
	if fd, err := reopen(path); err != nil {
		t.Errorf("reopen after the panics: %v", err)
	} else {
		unix.Close(fd)
	}
}

// reopen opens a device whose last handle was just closed: RELEASE
// comes after close(2) returns, so the node may look open a moment.
func reopen(path string) (int, error) {
	for i := 0; ; i++ {
		fd, err := unix.Open(path, unix.O_RDWR, 0)
		if err != syscall.EBUSY || i == 100 {
			return fd, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

var _ io.Writer = (*lockedBuffer)(nil)
