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
	"time"

	"github.com/cdevfs/cdevfs/metrics"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// transport is the small piece in front of go-fuse's request
// handling (docs/design.md, "Layers"): it reads requests from /dev/fuse, hands
// them to a fuse.ProtocolServer and writes the replies, and it writes the
// kernel notifications itself (fs.ServerCallbacks). Owning this loop is what
// lets cdevfs answer FUSE_POLL, which go-fuse's own server refuses with
// ENOSYS, and carry requests over FUSE-over-io_uring queues (uring.go)
// when the kernel offers them.
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

	// fhs maps the fh of every open device handle to the handle, for
	// the READ/WRITE fast path; fast is off under --debug, so that go-fuse
	// logs every request.
	fhs  fhTable
	fast bool

	metrics *metrics.Metrics // request latency; nil counts nothing

	bufSize int
	bufs    sync.Pool

	idle    atomic.Int32   // readers waiting in read(2)
	readers sync.WaitGroup // readers, io_uring queue threads, their handoffs
	inited  chan struct{}  // closed once INIT is answered
	initOne sync.Once

	// ended is closed, once, when the connection stops being served: the
	// kernel ended it (an unmount, an abort through fusectl, or Close) or
	// an io_uring queue failed, with endErr saying how (written before
	// ended is closed). Mount.Done.
	ended   chan struct{}
	endOnce sync.Once
	endErr  error

	// wantURing asks the kernel for FUSE over io_uring in INIT; uringErr
	// says, once inited is closed, why the transport is not using it.
	wantURing bool
	dir       string // the mountpoint, whose statfs a queue's kicks ask
	uringErr  error
	uring     atomic.Pointer[uringServer] // set once the queues start
}

const (
	opOpen        = 14
	opRead        = 15
	readInLen     = 80 // struct fuse_read_in after the header: fh at 40, size at 56, flags at 72
	opWrite       = 16
	writeInLen    = 80 // struct fuse_write_in after the header: fh at 40, size at 56; data follows
	opRelease     = 18
	opInit        = 26
	opIoctl       = 39
	ioctlInLen    = 72 // struct fuse_ioctl_in after the header: cmd at 52
	opInterrupt   = 36
	opPoll        = 40
	opSetxattr    = 21 // through opRemovexattr = 24
	opRemovexattr = 24
	inHeaderLen   = 40
	// maxIdleReaders bounds the readers kept waiting once a burst is over.
	maxIdleReaders = 4
)

func newTransport(dev *os.File, log *slog.Logger, maxWrite int) *transport {
	t := &transport{dev: dev, log: log, bufSize: maxWrite + 64*1024, inited: make(chan struct{}), ended: make(chan struct{}), fast: true}
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
		if err != nil && readOutcome(err) == readFailed {
			// Go's poller says "not pollable" when epoll reported
			// EPOLLERR for the fd before the reader waited, and
			// /dev/fuse reports EPOLLERR once the connection is gone
			// (fuse_dev_poll): an unmount racing a reader that had just
			// found nothing to read. A read of our own gives the errno
			// (ENODEV then) or the request.
			n, err = t.readRaw(in)
		}
		if err != nil {
			switch readOutcome(err) {
			case readAgain:
				continue
			case readEnded:
				t.idle.Add(-1)
				t.end(nil)
				return
			default:
				t.idle.Add(-1)
				t.end(fmt.Errorf("read /dev/fuse: %w", err))
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

// What a failed read of /dev/fuse means.
const (
	readAgain  = iota // EINTR, EAGAIN, or ENOENT: the request was interrupted before we read it
	readEnded         // ENODEV: unmounted or aborted; os.ErrClosed: Close
	readFailed        // anything else
)

func readOutcome(err error) int {
	switch {
	case errors.Is(err, syscall.EINTR), errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.ENOENT):
		return readAgain
	case errors.Is(err, syscall.ENODEV), errors.Is(err, os.ErrClosed):
		return readEnded
	}
	return readFailed
}

// readRaw reads one request from /dev/fuse with read(2) itself, past Go's
// poller; EAGAIN if there is none.
func (t *transport) readRaw(in []byte) (int, error) {
	rc, err := t.dev.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), in) }); err != nil {
		return 0, err // closed
	}
	if rerr != nil {
		return 0, rerr
	}
	return n, nil
}

// end says the connection stopped being served, the first time with err
// (nil: the kernel ended it).
func (t *transport) end(err error) {
	t.endOnce.Do(func() {
		t.endErr = err
		close(t.ended)
	})
}

// handle serves one request read from /dev/fuse and writes its reply.
func (t *transport) handle(in, out []byte) {
	n, _ := t.serve(in, out, true)
	if n > 0 {
		t.write(out[:n])
	}
	if len(in) >= inHeaderLen && binary.NativeEndian.Uint32(in[4:]) == opInit {
		if n > 0 && t.wantURing && initAsksURing(out[:n]) {
			t.uringErr = t.startURing()
		} else if t.wantURing {
			t.uringErr = errNoURing
		}
		t.initOne.Do(func() { close(t.inited) })
	}
}

// serve serves one request, in as read(2) on /dev/fuse gives it, and
// builds the reply in out; n is its length, 0 for none. Unless mayBlock,
// a READ the fast path does not answer is left alone (blocked is true):
// it may wait for a packet, and the caller must not.
func (t *transport) serve(in, out []byte, mayBlock bool) (n int, blocked bool) {
	if len(in) < inHeaderLen {
		t.log.Error("short FUSE request", "bytes", len(in))
		return 0, false
	}
	start := time.Now()
	op := binary.NativeEndian.Uint32(in[4:])
	defer t.answerPanic(in, out, &n)
	if t.fast {
		if n, ok := t.fastPath(op, in, out); ok {
			t.metrics.Request(op, start) // the request's latency (fast path included)
			return n, false
		}
	}
	if op == opRead && !mayBlock {
		return 0, true
	}
	defer t.metrics.Request(op, start)
	if op == opRelease && len(in) >= inHeaderLen+8 {
		// go-fuse recycles the fh once it has handled RELEASE: forget it
		// first. The kernel sends RELEASE after every request on the file
		// has been answered, so no fast READ or WRITE can still look it up.
		t.fhs.set(binary.NativeEndian.Uint64(in[40:]), nil)
	}
	if op == opRead && len(in) >= readInLen {
		// Device files are streams (FOPEN_STREAM): the offset means
		// nothing, and go-fuse's Read does not pass the file's flags. Put
		// the flags where the offset was, so a handle sees O_NONBLOCK as it
		// is now (fcntl and FIONBIO change it without telling us).
		binary.NativeEndian.PutUint64(in[48:], uint64(binary.NativeEndian.Uint32(in[72:])))
	}
	switch {
	case op == opInterrupt && len(in) >= inHeaderLen+8 && t.uring.Load() != nil:
		// The requests are on the rings, READs parked there (uring.go).
		n = t.uring.Load().interrupt(in, out)
	case op == opPoll:
		n = t.poll(in, out)
	case op >= opSetxattr && op <= opRemovexattr:
		// No node has extended attributes. ENOSYS (go-fuse would answer
		// ENODATA every time) makes the kernel stop asking for the
		// connection's life: `ls -l` asks for security.selinux on every
		// entry, a daemon round trip each that a large tree pays for.
		n = errorReply(in, out, syscall.ENOSYS)
	case op == opIoctl && len(in) >= ioctlInLen && isPrivateCmd(binary.NativeEndian.Uint32(in[52:])):
		// The private commands are ours alone: a user's ioctl(2) with the
		// same number is refused, so a handle never mistakes it for ours.
		n = errorReply(in, out, syscall.ENOTTY)
	default:
		var st fuse.Status
		if dirs := (handlelessDir{t.ps}); dirs.owns(op, in) {
			n, st = dirs.serve(op, in, out)
		} else {
			n, st = t.ps.HandleRequest([][]byte{in}, [][]byte{out})
		}
		if !st.Ok() {
			t.log.Error("FUSE request not handled", "opcode", op, "status", st)
			n = errorReply(in, out, syscall.EIO)
		}
		if op == opOpen && n >= 16+16 && binary.NativeEndian.Uint32(out[4:]) == 0 {
			t.identify(in, binary.NativeEndian.Uint64(out[16:]))
		}
	}
	return n, false
}

// answerPanic, deferred by serve, answers a request whose handling here
// panicked as go-fuse answers one whose handler did: EIO, logged at ERROR
// and counted. The tree is not left half-changed: nothing on these paths
// changes it.
func (t *transport) answerPanic(in, out []byte, n *int) {
	if r := recover(); r != nil {
		panicHandler(t.log, t.metrics)(r)
		*n = errorReply(in, out, syscall.EIO)
	}
}

// fastPath serves READ and WRITE of a device handle without go-fuse: the
// fh is looked up in fhs, a READ reads the packet straight into the reply
// buffer, a WRITE writes the request's payload, and nothing is allocated.
// ok is false for anything else, and for a blocking READ with no packet
// queued (go-fuse then serves it, with its interrupt handling).
func (t *transport) fastPath(op uint32, in, out []byte) (n int, ok bool) {
	ne := binary.NativeEndian
	switch {
	case op == opRead && len(in) >= readInLen:
		h := t.fhs.get(ne.Uint64(in[40:]))
		size := int(ne.Uint32(in[56:]))
		if h == nil || 16+size > len(out) {
			return 0, false
		}
		n, wait := readReply(h, in, out, size, ne.Uint32(in[72:])&syscall.O_NONBLOCK != 0)
		return n, !wait
	case op == opWrite && len(in) >= writeInLen:
		h := t.fhs.get(ne.Uint64(in[40:]))
		size := int(ne.Uint32(in[56:]))
		if h == nil || writeInLen+size > len(in) {
			return 0, false
		}
		m, e := h.writeNow(in[writeInLen : writeInLen+size])
		if e != 0 {
			return errorReply(in, out, e), true
		}
		ne.PutUint32(out[0:], 24)
		ne.PutUint32(out[4:], 0)
		copy(out[8:16], in[8:16])
		ne.PutUint64(out[16:], uint64(uint32(m))) // struct fuse_write_out: size, padding
		return 24, true
	case op == opPoll && len(in) >= 64:
		if h := t.fhs.get(ne.Uint64(in[40:])); h != nil {
			var rev [4]byte
			if h.poll(ne.Uint64(in[48:]), in[56:64], rev[:]) != 0 {
				ne.PutUint32(rev[:], defaultPollMsk)
			}
			ne.PutUint32(out[0:], 24)
			ne.PutUint32(out[4:], 0)
			copy(out[8:16], in[8:16])
			ne.PutUint64(out[16:], uint64(ne.Uint32(rev[:])))
			return 24, true
		}
	}
	return 0, false
}

// readReply answers a READ of size bytes on device handle h: one packet
// straight into out's body, or the error; in gives the unique (in[8:16]).
// wait says no packet is queued and a blocking READ must wait: nothing
// was built. It allocates nothing.
func readReply(h *handle, in, out []byte, size int, nonblock bool) (n int, wait bool) {
	m, e, wait := h.readNow(out[16:16+size], nonblock)
	switch {
	case wait:
		return 0, true
	case e != 0:
		return errorReply(in, out, e), false
	}
	ne := binary.NativeEndian
	ne.PutUint32(out[0:], uint32(16+m))
	ne.PutUint32(out[4:], 0)
	copy(out[8:16], in[8:16])
	return 16 + m, false
}

// identify asks go-fuse which file handle it registered under fh for the
// OPEN request in (before the reply is written, so before any READ can
// carry fh): an IOCTL with the private identCmd, which go-fuse routes by
// fh like any other, and which a device handle answers by registering
// itself in fhs. Handles of other files do not know the command.
func (t *transport) identify(open []byte, fh uint64) {
	if fh == 0 {
		return
	}
	var req [ioctlInLen]byte
	copy(req[:inHeaderLen], open[:inHeaderLen]) // unique, nodeid, caller
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint32(req[4:], opIoctl)
	binary.NativeEndian.PutUint64(req[40:], fh)
	binary.NativeEndian.PutUint32(req[52:], identCmd)
	binary.NativeEndian.PutUint64(req[56:], fh) // arg
	var rep [16 + 16]byte
	_, _ = t.ps.HandleRequest([][]byte{req[:]}, [][]byte{rep[:]})
}

// identCmd is the private ioctl of identify (_IO('t', 254)).
const identCmd = 't'<<8 | 254

func isPrivateCmd(cmd uint32) bool { return cmd == pollCmd || cmd == identCmd }

// pollCmd is the private ioctl command by which the transport asks a file
// handle for its readiness: go-fuse's request handling has no POLL for file
// handles, but it maps an IOCTL's fh to the handle, so a FUSE_POLL is
// answered by handing go-fuse an IOCTL carrying the poll's arguments:
// arg is the kernel's poll handle kh, the 8-byte input is the poll flags
// and events, the 8-byte output is revents. (_IOWR('t', 255, 8).)
const pollCmd = 3<<30 | 8<<16 | 't'<<8 | 255

// Poll masks (<poll.h>): DEFAULT_POLLMASK is what a file without poll
// support reports.
const (
	pollIn         = 0x1
	pollOut        = 0x4
	pollErr        = 0x8
	pollHup        = 0x10
	pollNval       = 0x20
	pollRdNorm     = 0x40
	pollWrNorm     = 0x100
	defaultPollMsk = pollIn | pollOut | pollRdNorm | pollWrNorm
)

// poll answers FUSE_POLL (struct fuse_poll_in: fh at 40, kh at 48, flags
// at 56, events at 60) through the private ioctl; a file that is not a
// device handle (a static node) is always ready, as the kernel would
// report for a file without poll.
func (t *transport) poll(in, out []byte) int {
	if len(in) < 64 {
		return errorReply(in, out, syscall.EINVAL)
	}
	var req [ioctlInLen + 8]byte
	copy(req[:inHeaderLen], in[:inHeaderLen])
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint32(req[4:], opIoctl)
	copy(req[40:48], in[40:48])                      // fh
	binary.NativeEndian.PutUint32(req[52:], pollCmd) // cmd
	copy(req[56:64], in[48:56])                      // arg: kh
	binary.NativeEndian.PutUint32(req[64:], 8)       // in size
	binary.NativeEndian.PutUint32(req[68:], 8)       // out size
	copy(req[72:80], in[56:64])                      // flags, events
	var rep [16 + 16 + 8]byte
	n, st := t.ps.HandleRequest([][]byte{req[:]}, [][]byte{rep[:]})
	revents := uint32(defaultPollMsk)
	if st.Ok() && n >= len(rep) && binary.NativeEndian.Uint32(rep[4:]) == 0 {
		revents = binary.NativeEndian.Uint32(rep[32:])
	}
	binary.NativeEndian.PutUint32(out[0:], 24)
	binary.NativeEndian.PutUint32(out[4:], 0)
	copy(out[8:16], in[8:16])
	binary.NativeEndian.PutUint64(out[16:], uint64(revents))
	return 24
}

// errorReply writes a bare error reply for the request in into out.
func errorReply(in, out []byte, errno syscall.Errno) int {
	binary.NativeEndian.PutUint32(out[0:], 16)
	binary.NativeEndian.PutUint32(out[4:], uint32(-int32(errno)))
	copy(out[8:16], in[8:16]) // unique
	return 16
}

// write writes one reply or notification. The kernel takes each write(2)
// to /dev/fuse as one whole message, so writers need no lock of ours (and
// os.File serializes writes on the fd anyway).
func (t *transport) write(b []byte) syscall.Errno {
	if _, err := t.dev.Write(b); err != nil {
		return writeErrno(err)
	}
	return 0
}

func writeErrno(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		// ENOENT: the kernel no longer waits for this request (interrupted).
		return errno
	}
	return syscall.EIO
}

// Notifications (fs.ServerCallbacks). Layouts from <linux/fuse.h>.
const (
	notifyPoll       = 1
	notifyInvalInode = 2
	notifyInvalEntry = 3
	notifyDelete     = 6
)

// notify writes an invalidation. Not through t.write: os.File serializes
// writes on one fd (poll.FD's write lock), and the kernel handles
// INVAL_ENTRY under the directory's inode lock, which a LOOKUP in that
// directory holds until it is answered. Holding the write lock while
// the kernel waits for that lock would keep the LOOKUP's reply, and
// every other reply, from being written: a deadlock. So the message is
// written with a plain write(2) on the fd, which Control keeps open.
func (t *transport) notify(code int32, body []byte) fuse.Status {
	msg := make([]byte, 16+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint32(msg[4:], uint32(code)) // error field carries the code; unique is 0
	copy(msg[16:], body)
	rc, err := t.dev.SyscallConn()
	if err != nil {
		return fuse.Status(writeErrno(err))
	}
	var werr error
	if err := rc.Control(func(fd uintptr) { _, werr = unix.Write(int(fd), msg) }); err != nil {
		return fuse.Status(syscall.EBADF) // closed
	}
	if werr != nil {
		return fuse.Status(writeErrno(werr))
	}
	return fuse.OK
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
// It runs once per new packet on a polled device, so it builds the
// message on the stack.
func (t *transport) PollNotify(kh uint64) fuse.Status {
	var msg [16 + 8]byte
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint32(msg[4:], notifyPoll) // error field carries the code; unique is 0
	binary.NativeEndian.PutUint64(msg[16:], kh)
	return fuse.Status(t.write(msg[:]))
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
//
// The mount allows device nodes (no MS_NODEV): the kernel's devices are
// character device inodes that the kernel opens itself. Such an open
// never reaches the daemon, and without default_permissions the kernel
// would not check the node's mode either (fuse_permission asks the
// daemon only for access(2) and chdir): a 0600 null would open for
// anyone. With it the kernel checks every mode (generic_permission) and
// every chmod, chown and utimes (setattr_prepare) itself.
func openFuse(mnt string, allowOther bool, maxRead int) (*os.File, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,max_read=%d,default_permissions",
		fd, os.Getuid(), os.Getgid(), maxRead)
	if allowOther {
		data += ",allow_other"
	}
	if err := unix.Mount("cdevfs", mnt, "fuse.cdevfs", unix.MS_NOSUID, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mount %s: %w", mnt, err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}
