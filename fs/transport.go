package fs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// transport is the small, replaceable piece in front of go-fuse's request
// handling (DESIGN.md, "Layers"): it reads requests from /dev/fuse, hands
// them to a fuse.ProtocolServer and writes the replies, and it writes the
// kernel notifications itself (fs.ServerCallbacks). Owning this loop is what
// lets cdevfs answer FUSE_POLL, which go-fuse's own server refuses with
// ENOSYS, and what a FUSE-over-io_uring transport would replace.
//
// /dev/fuse is opened nonblocking and read through Go's poller, so idle
// readers are parked goroutines, not threads. A request is handled on the
// goroutine that read it; when the last idle reader takes a request a new
// one is started, so a handler blocked in a device read never starves the
// loop (the kernel's INTERRUPT for it must still be read).
type transport struct {
	dev *os.File
	ps  *fuse.ProtocolServer
	log *slog.Logger

	// poll answers FUSE_POLL; nil means ENOSYS (the kernel then treats every
	// file of the mount as always ready).
	poll func(in []byte, out []byte) int

	bufSize int
	bufs    sync.Pool

	idle    atomic.Int32 // readers waiting in read(2)
	readers sync.WaitGroup
	inited  chan struct{} // closed once INIT is answered
	initOne sync.Once

	wmu sync.Mutex // serializes writes, so a reply is never interleaved with a notification
}

const (
	opRead      = 15
	readInLen   = 80 // struct fuse_read_in after the header: flags at 72
	opInit      = 26
	opInterrupt = 36
	opPoll      = 40
	inHeaderLen = 40
	// maxIdleReaders bounds the readers kept waiting once a burst is over.
	maxIdleReaders = 4
)

func newTransport(dev *os.File, log *slog.Logger, maxWrite int) *transport {
	t := &transport{dev: dev, log: log, bufSize: maxWrite + 64*1024, inited: make(chan struct{})}
	t.bufs.New = func() any {
		b := make([]byte, 2*t.bufSize)
		return &b
	}
	return t
}

// start launches the first readers.
func (t *transport) start() {
	for range 2 {
		t.spawn()
	}
}

func (t *transport) spawn() {
	t.idle.Add(1)
	t.readers.Add(1)
	go t.reader()
}

// wait returns once every reader has stopped (the device was closed or the
// connection aborted).
func (t *transport) wait() { t.readers.Wait() }

func (t *transport) reader() {
	defer t.readers.Done()
	bp := t.bufs.Get().(*[]byte)
	defer t.bufs.Put(bp)
	in, out := (*bp)[:t.bufSize], (*bp)[t.bufSize:]
	for {
		n, err := t.dev.Read(in)
		if err != nil {
			switch {
			case errors.Is(err, syscall.EINTR), errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.ENOENT):
				continue // ENOENT: the request was interrupted before we read it
			default: // ENODEV: unmounted; os.ErrClosed: shut down
				t.idle.Add(-1)
				return
			}
		}
		if t.idle.Add(-1) == 0 {
			t.spawn()
		}
		t.handle(in[:n], out)
		if t.idle.Add(1) > maxIdleReaders {
			t.idle.Add(-1)
			return
		}
	}
}

func (t *transport) handle(in, out []byte) {
	if len(in) < inHeaderLen {
		t.log.Error("short FUSE request", "bytes", len(in))
		return
	}
	op := binary.NativeEndian.Uint32(in[4:])
	if op == opRead && len(in) >= readInLen {
		// Device files are streams (FOPEN_STREAM): the offset means
		// nothing, and go-fuse's Read does not pass the file's flags. Put
		// the flags where the offset was, so a handle sees O_NONBLOCK as it
		// is now (fcntl and FIONBIO change it without telling us).
		binary.NativeEndian.PutUint64(in[48:], uint64(binary.NativeEndian.Uint32(in[72:])))
	}
	var n int
	if op == opPoll && t.poll != nil {
		n = t.poll(in, out)
	} else {
		var st fuse.Status
		n, st = t.ps.HandleRequest([][]byte{in}, [][]byte{out})
		if !st.Ok() {
			t.log.Error("FUSE request not handled", "opcode", op, "status", st)
			n = errorReply(in, out, syscall.EIO)
		}
	}
	if op == opInit {
		defer t.initOne.Do(func() { close(t.inited) })
	}
	if n > 0 {
		t.write(out[:n])
	}
}

// errorReply writes a bare error reply for the request in into out.
func errorReply(in, out []byte, errno syscall.Errno) int {
	binary.NativeEndian.PutUint32(out[0:], 16)
	binary.NativeEndian.PutUint32(out[4:], uint32(-int32(errno)))
	copy(out[8:16], in[8:16]) // unique
	return 16
}

func (t *transport) write(b []byte) syscall.Errno {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	_, err := t.dev.Write(b)
	var errno syscall.Errno
	if errors.As(err, &errno) {
		// ENOENT: the kernel no longer waits for this request (interrupted).
		return errno
	}
	if err != nil {
		return syscall.EIO
	}
	return 0
}

// Notifications (fs.ServerCallbacks). Layouts from <linux/fuse.h>.
const (
	notifyPoll       = 1
	notifyInvalInode = 2
	notifyInvalEntry = 3
	notifyDelete     = 6
)

func (t *transport) notify(code int32, body []byte) fuse.Status {
	msg := make([]byte, 16+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint32(msg[4:], uint32(code)) // error field carries the code; unique is 0
	copy(msg[16:], body)
	return fuse.Status(t.write(msg))
}

func nameBody(head []byte, name string) []byte {
	b := append(head, name...)
	return append(b, 0)
}

// EntryNotify invalidates the kernel's dentry parent/name.
func (t *transport) EntryNotify(parent uint64, name string) fuse.Status {
	h := make([]byte, 16)
	binary.NativeEndian.PutUint64(h[0:], parent)
	binary.NativeEndian.PutUint32(h[8:], uint32(len(name)))
	return t.notify(notifyInvalEntry, nameBody(h, name))
}

// DeleteNotify tells the kernel that name, child of parent, is gone.
func (t *transport) DeleteNotify(parent, child uint64, name string) fuse.Status {
	h := make([]byte, 24)
	binary.NativeEndian.PutUint64(h[0:], parent)
	binary.NativeEndian.PutUint64(h[8:], child)
	binary.NativeEndian.PutUint32(h[16:], uint32(len(name)))
	return t.notify(notifyDelete, nameBody(h, name))
}

// InodeNotify invalidates a node's attributes and cached data.
func (t *transport) InodeNotify(node uint64, off, length int64) fuse.Status {
	h := make([]byte, 24)
	binary.NativeEndian.PutUint64(h[0:], node)
	binary.NativeEndian.PutUint64(h[8:], uint64(off))
	binary.NativeEndian.PutUint64(h[16:], uint64(length))
	return t.notify(notifyInvalInode, h)
}

// PollNotify wakes the kernel's pollers of the file with poll handle kh.
func (t *transport) PollNotify(kh uint64) fuse.Status {
	h := make([]byte, 8)
	binary.NativeEndian.PutUint64(h, kh)
	return t.notify(notifyPoll, h)
}

// InodeRetrieveCache is not used by cdevfs (device nodes are direct I/O).
func (t *transport) InodeRetrieveCache(node uint64, offset int64, dest []byte) (int, fuse.Status) {
	return 0, fuse.ENOSYS
}

// InodeNotifyStoreCache is not used by cdevfs.
func (t *transport) InodeNotifyStoreCache(node uint64, offset int64, data []byte) fuse.Status {
	return fuse.ENOSYS
}

// openFuse opens /dev/fuse nonblocking and mounts it at mnt, as go-fuse's
// DirectMount does (mount(2) with fd=N, no fusermount), but keeping the fd
// so that this package's loop serves it.
func openFuse(mnt string, allowOther bool, maxRead int) (*os.File, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,max_read=%d",
		fd, os.Getuid(), os.Getgid(), maxRead)
	if allowOther {
		data += ",allow_other"
	}
	if err := unix.Mount("cdevfs", mnt, "fuse.cdevfs", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mount %s: %w", mnt, err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}
