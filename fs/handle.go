package fs

import (
	"context"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// handleFlags: direct I/O (one packet per read, no page cache) and
// stream (no file position, so a write never waits behind a blocked read
// of the same file). Not FOPEN_NOFLUSH: the FLUSH of every close is how
// a node learns that its holder may be closing (Flush).
const handleFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_STREAM | fuse.FOPEN_NONSEEKABLE

// handle is an open device file. It owns one reference to its node from
// open to release, and runs each operation as an in-flight operation of
// the node, so Destroy waits for it and revocation ends it with ENXIO.
type handle struct {
	node    *devnode.Node
	io      devnode.IO
	files   *fhTable         // the tree's device files by fh (transport.Files)
	metrics *metrics.Metrics // packets, bytes, errors; nil counts nothing

	// fh is go-fuse's number of the handle, as the transport told it
	// (transport.IdentifyCmd); 0 until then.
	fh atomic.Uint64

	// pollKh is the kernel's poll handle of this file (stable until
	// release) and pollWake the wake function built for it once, so a
	// poll that schedules a notification allocates nothing.
	pollMu   sync.Mutex
	pollKh   uint64
	pollWake func()

	// closer is the process of the latest close(2) of this file (FLUSH).
	// RELEASE, the last close, carries no caller (the kernel sends it
	// without credentials, often from a worker), so this is who closed.
	closer atomic.Pointer[devnode.Actor]
}

var (
	_ = (fs.FileReader)((*handle)(nil))
	_ = (fs.FileWriter)((*handle)(nil))
	_ = (fs.FileReleaser)((*handle)(nil))
	_ = (fs.FileIoctler)((*handle)(nil))
	_ = (fs.FileFlusher)((*handle)(nil))
	_ = (transport.File)((*handle)(nil))
)

func newHandle(n *devnode.Node, r *Root) *handle {
	h := &handle{node: n, files: &r.files, metrics: r.metrics}
	h.io, _ = n.Device().(devnode.IO)
	return h
}

// Read implements fs.FileReader: one packet straight into the reply
// buffer; a short buffer truncates it. The file is a stream, so the
// transport passes the file's current open flags in off (see
// transport.Conn.Serve): O_NONBLOCK, as set at open, by fcntl or by FIONBIO
// (which the VFS handles without asking us), makes an empty read EAGAIN.
func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if h.io == nil {
		return nil, syscall.ENODEV
	}
	if err := h.node.Enter(); err != nil {
		return nil, syscall.ENXIO
	}
	defer h.node.Exit()
	n, err := h.io.Read(ctx, dest, off&syscall.O_NONBLOCK != 0)
	if err != nil {
		return nil, h.fail(err)
	}
	h.metrics.Read(n)
	return fuse.ReadResultData(dest[:n]), 0
}

// ReadNow implements transport.File: one packet straight into dest (the
// reply buffer) if one is queued. wait reports that none is and the read
// should block, which is left to Read (go-fuse's request, with its
// interrupt handling) or to a wait (BeginWait). It allocates nothing.
func (h *handle) ReadNow(dest []byte, nonblock bool) (n int, e syscall.Errno, wait bool) {
	if h.io == nil {
		return 0, syscall.ENODEV, false
	}
	n, err := h.inFlight(func() (int, error) { return h.io.Read(context.Background(), dest, true) })
	if err != nil {
		e = errno(err)
		if e == syscall.EAGAIN && !nonblock {
			return 0, 0, true
		}
		return 0, h.fail(err), false
	}
	h.metrics.Read(n)
	return n, 0, false
}

// WriteNow implements transport.File: Write without go-fuse. A device
// write never blocks (a tun takes or drops the packet), so no interrupt
// can concern it.
func (h *handle) WriteNow(data []byte) (int, syscall.Errno) {
	if h.io == nil {
		return 0, syscall.ENODEV
	}
	n, err := h.inFlight(func() (int, error) { return h.io.Write(context.Background(), data) })
	if err != nil {
		return 0, h.fail(err)
	}
	h.metrics.Wrote(n)
	return n, 0
}

// inFlight runs op as an in-flight operation of the node; ENXIO if the
// node is dying. Exit is deferred: a device that panics (a bug the
// transport answers EIO) must not leave an operation counted in flight,
// or the node's Destroy would wait for it for ever.
func (h *handle) inFlight(op func() (int, error)) (int, error) {
	if err := h.node.Enter(); err != nil {
		return 0, syscall.ENXIO
	}
	defer h.node.Exit()
	return op()
}

// Write implements fs.FileWriter: one packet.
func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if h.io == nil {
		return 0, syscall.ENODEV
	}
	if err := h.node.Enter(); err != nil {
		return 0, syscall.ENXIO
	}
	defer h.node.Exit()
	n, err := h.io.Write(ctx, data)
	if err != nil {
		return 0, h.fail(err)
	}
	h.metrics.Wrote(n)
	return uint32(n), 0
}

// fail maps a device error to its errno and counts it.
func (h *handle) fail(err error) syscall.Errno {
	e := errno(err)
	h.metrics.Error(e)
	return e
}

// Flush implements fs.FileFlusher: every close(2) of a descriptor of
// the file, and every exit holding one (filp_close), with the closer's
// credentials, which Release logs for a transient destroy. The closer
// waits for this answer (fuse_flush), and not for the RELEASE that a last
// close sends after it: the node learns here that its holder may be
// closing, so that a reopen right after close(2) waits for that RELEASE
// instead of failing EBUSY (devnode.Node.Closing).
func (h *handle) Flush(ctx context.Context) syscall.Errno {
	c := caller(ctx)
	h.closer.Store(&devnode.Actor{Pid: c.Pid, Uid: c.Uid})
	h.node.Closing()
	return 0
}

// Release implements fs.FileReleaser: the last close.
func (h *handle) Release(ctx context.Context) syscall.Errno {
	if a := h.closer.Load(); a != nil {
		ctx = devnode.WithActor(ctx, *a)
	} else {
		ctx = withActor(ctx)
	}
	if fh := h.fh.Load(); fh != 0 {
		// Before go-fuse recycles the number. The kernel sends RELEASE
		// after every request on the file was answered, so no READ or
		// WRITE can still look it up.
		h.files.clear(fh, h)
	}
	err := h.node.Close(ctx)
	h.node.Rel()
	return errno(err)
}

// Ioctl implements fs.FileIoctler; the transport's private IdentifyCmd
// tells the handle its fh.
func (h *handle) Ioctl(ctx context.Context, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	if cmd == transport.IdentifyCmd {
		h.fh.Store(arg)
		h.files.set(arg, h)
		return 0, 0
	}
	if err := h.node.Enter(); err != nil {
		return 0, syscall.ENXIO
	}
	defer h.node.Exit()
	ioc, ok := h.node.Device().(devnode.Ioctler)
	if !ok {
		return 0, syscall.ENOTTY
	}
	if err := ioc.Ioctl(ctx, cmd, caller(ctx).Pid, input, output); err != nil {
		return 0, h.fail(err)
	}
	return 0, 0
}

// Poll implements transport.File: readable when a packet is queued,
// writable always, POLLERR|POLLHUP once revoked. The kernel's poll handle
// kh stays valid until release, so one registration serves every later
// wait.
func (h *handle) Poll(kh uint64, schedule bool, n transport.PollNotifier) uint32 {
	p, ok := h.node.Device().(devnode.Poller)
	if !ok {
		return transport.DefaultPollMask
	}
	var wake func()
	if schedule {
		wake = h.waker(kh, n)
	}
	r, err := h.inFlight(func() (int, error) { return int(p.Poll(wake)), nil })
	if err != nil {
		return transport.PollErr | transport.PollHup
	}
	return uint32(r)
}

// waker returns the function that notifies the kernel's pollers of poll
// handle kh through n, made once per handle (the kernel keeps kh until
// release), so a poll that schedules a notification allocates nothing.
func (h *handle) waker(kh uint64, n transport.PollNotifier) func() {
	h.pollMu.Lock()
	defer h.pollMu.Unlock()
	if h.pollWake == nil || h.pollKh != kh {
		h.pollKh = kh
		h.pollWake = func() { n.PollNotify(kh) }
	}
	return h.pollWake
}

// BeginWait implements transport.File: the device's fd to wait for a
// packet on (devnode.ReadWaiter), the wait an in-flight operation of the
// node, as a blocked Read is, until EndWait.
func (h *handle) BeginWait() (fd int, ok bool) {
	w, ok := h.node.Device().(devnode.ReadWaiter)
	if !ok || h.io == nil {
		return -1, false
	}
	if h.node.Enter() != nil {
		return -1, false // dying: Read answers ENXIO
	}
	if fd = w.ReadFD(); fd < 0 {
		h.node.Exit()
		return -1, false
	}
	return fd, true
}

// EndWait implements transport.File.
func (h *handle) EndWait() { h.node.Exit() }

// Device implements transport.File: the node's inode number, which no
// other node ever has, names it in revoke notices.
func (h *handle) Device() uint64 { return h.node.Ino() }
