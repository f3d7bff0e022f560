package fs

import (
	"context"
	"encoding/binary"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// handleFlags: direct I/O (one packet per read, no page cache) and
// stream (no file position, so a write never waits behind a blocked read
// of the same file).
const handleFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_STREAM | fuse.FOPEN_NONSEEKABLE

// handle is an open device file. It owns one reference to its node from
// open to release, and runs each operation as an in-flight operation of
// the node, so Destroy waits for it and revocation ends it with ENXIO.
type handle struct {
	node   *devnode.Node
	io     devnode.IO
	notify func(kh uint64) // sends FUSE_NOTIFY_POLL
}

var (
	_ = (fs.FileReader)((*handle)(nil))
	_ = (fs.FileWriter)((*handle)(nil))
	_ = (fs.FileReleaser)((*handle)(nil))
	_ = (fs.FileIoctler)((*handle)(nil))
	_ = (fs.FileFlusher)((*handle)(nil))
)

func newHandle(n *devnode.Node, notify func(uint64)) *handle {
	h := &handle{node: n, notify: notify}
	h.io, _ = n.Device().(devnode.IO)
	return h
}

// Read implements fs.FileReader: one packet straight into the reply
// buffer; a short buffer truncates it. The file is a stream, so the
// transport passes the file's current open flags in off (see
// transport.handle): O_NONBLOCK, as set at open, by fcntl or by FIONBIO
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
		return nil, errno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
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
		return 0, errno(err)
	}
	return uint32(n), 0
}

// Flush implements fs.FileFlusher (close(2) of one of several dups).
func (h *handle) Flush(ctx context.Context) syscall.Errno { return 0 }

// Release implements fs.FileReleaser: the last close.
func (h *handle) Release(ctx context.Context) syscall.Errno {
	err := h.node.Close()
	h.node.Rel()
	return errno(err)
}

// Ioctl implements fs.FileIoctler; the transport's private pollCmd
// carries a FUSE_POLL.
func (h *handle) Ioctl(ctx context.Context, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	if cmd == pollCmd {
		return 0, h.poll(arg, input, output)
	}
	if err := h.node.Enter(); err != nil {
		return 0, syscall.ENXIO
	}
	defer h.node.Exit()
	ioc, ok := h.node.Device().(devnode.Ioctler)
	if !ok {
		return 0, syscall.ENOTTY
	}
	return 0, errno(ioc.Ioctl(ctx, cmd, caller(ctx).Pid, input, output))
}

// fusePollScheduleNotify is FUSE_POLL_SCHEDULE_NOTIFY: the kernel will
// wait, so readiness changes must be notified for poll handle kh.
const fusePollScheduleNotify = 1

// poll answers a FUSE_POLL: readable when a packet is queued, writable
// always, POLLERR|POLLHUP once revoked. The kernel's poll handle stays
// valid until release, so one registration serves every later wait.
func (h *handle) poll(kh uint64, in, out []byte) syscall.Errno {
	if len(in) < 8 || len(out) < 4 {
		return syscall.EINVAL
	}
	clear(out)
	rev := uint32(defaultPollMsk)
	if p, ok := h.node.Device().(devnode.Poller); ok {
		if err := h.node.Enter(); err != nil {
			rev = pollErr | pollHup
		} else {
			var wake func()
			if binary.NativeEndian.Uint32(in)&fusePollScheduleNotify != 0 && h.notify != nil {
				wake = func() { h.notify(kh) }
			}
			rev = p.Poll(wake)
			h.node.Exit()
		}
	}
	binary.NativeEndian.PutUint32(out, rev)
	return 0
}
