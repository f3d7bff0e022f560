package transport

import (
	"errors"
	"os"
	"syscall"
	"unsafe"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Notifier writes the kernel notifications of a connection to /dev/fuse:
// the invalidations go-fuse's tree asks for (it implements
// fs.ServerCallbacks) and the poll wakeups of device files. Notifications
// always go over /dev/fuse, whatever carries the requests.
type Notifier struct {
	dev *os.File
}

// NewNotifier writes notifications to dev.
func NewNotifier(dev *os.File) *Notifier { return &Notifier{dev: dev} }

// WriteErrno is the errno of a failed write to /dev/fuse. ENOENT: the
// kernel no longer waits for the request (interrupted).
func WriteErrno(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}

// notify writes a notification with code and body. Not through os.File's
// Write: os.File serializes writes on one fd (poll.FD's write lock), and
// the kernel handles INVAL_ENTRY under the directory's inode lock, which a
// LOOKUP in that directory holds until it is answered. Holding the write
// lock while the kernel waits for that lock would keep the LOOKUP's reply,
// and every other reply, from being written: a deadlock. So the message
// is written with a plain write(2) on the fd, which Control keeps open.
func (n *Notifier) notify(code int32, body ...[]byte) fuse.Status {
	size := fusewire.OutHeaderSize
	for _, b := range body {
		size += len(b)
	}
	msg := make([]byte, fusewire.OutHeaderSize, size)
	fusewire.Notify(msg, code, size-fusewire.OutHeaderSize)
	for _, b := range body {
		msg = append(msg, b...)
	}
	rc, err := n.dev.SyscallConn()
	if err != nil {
		return fuse.Status(WriteErrno(err))
	}
	var werr error
	if err := rc.Control(func(fd uintptr) { _, werr = unix.Write(int(fd), msg) }); err != nil {
		return fuse.Status(syscall.EBADF) // closed
	}
	if werr != nil {
		return fuse.Status(WriteErrno(werr))
	}
	return fuse.OK
}

// bytesOf is the memory of *p, a wire struct, as bytes.
func bytesOf[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

// nul ends a name in a notification.
var nul = []byte{0}

// EntryNotify invalidates the kernel's dentry parent/name.
func (n *Notifier) EntryNotify(parent uint64, name string) fuse.Status {
	h := fuse.NotifyInvalEntryOut{Parent: parent, NameLen: uint32(len(name))}
	return n.notify(fusewire.NotifyInvalEntry, bytesOf(&h), []byte(name), nul)
}

// DeleteNotify tells the kernel that name, child of parent, is gone.
func (n *Notifier) DeleteNotify(parent, child uint64, name string) fuse.Status {
	h := fuse.NotifyInvalDeleteOut{Parent: parent, Child: child, NameLen: uint32(len(name))}
	return n.notify(fusewire.NotifyDelete, bytesOf(&h), []byte(name), nul)
}

// InodeNotify invalidates a node's attributes and cached data.
func (n *Notifier) InodeNotify(node uint64, off, length int64) fuse.Status {
	h := fuse.NotifyInvalInodeOut{Ino: node, Off: off, Length: length}
	return n.notify(fusewire.NotifyInvalInode, bytesOf(&h))
}

// PollNotify wakes the kernel's pollers of the file with poll handle kh.
// It runs once per new packet on a polled device, so it builds the
// message on the stack, and writes it as a reply is written.
func (n *Notifier) PollNotify(kh uint64) syscall.Errno {
	var msg [fusewire.OutHeaderSize + 8]byte
	fusewire.Notify(msg[:], fusewire.NotifyPoll, 8)
	*fusewire.OutBody[fusewire.NotifyPollWakeupOut](msg[:]) = fusewire.NotifyPollWakeupOut{Kh: kh}
	if _, err := n.dev.Write(msg[:]); err != nil {
		return WriteErrno(err)
	}
	return 0
}

// InodeRetrieveCache is not used by cdevfs (device nodes are direct I/O).
func (n *Notifier) InodeRetrieveCache(node uint64, offset int64, dest []byte) (int, fuse.Status) {
	return 0, fuse.ENOSYS
}

// InodeNotifyStoreCache is not used by cdevfs.
func (n *Notifier) InodeNotifyStoreCache(node uint64, offset int64, data []byte) fuse.Status {
	return fuse.ENOSYS
}
