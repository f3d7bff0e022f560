package transport

import "syscall"

// Files is what a transport needs of the tree beyond go-fuse's node API:
// the open device files whose READ, WRITE and POLL it serves itself,
// without go-fuse, so that the packet path allocates nothing.
//
// go-fuse numbers a file handle (the fh of every later request on it)
// only once the tree's Open has returned, so the tree cannot know the
// number. The transport tells it: right after answering an OPEN, it
// hands go-fuse an IOCTL with IdentifyCmd for that fh, which go-fuse
// routes to the new handle like any ioctl, and a device file answers it
// by recording itself under arg, the fh. It forgets the number on its
// release, before go-fuse recycles it.
type Files interface {
	// File returns the device file go-fuse keeps under fh, or nil.
	File(fh uint64) File
}

// File is an open device file.
type File interface {
	// ReadNow reads one packet into dest if one is queued. wait says
	// none is and a blocking READ must wait for one: nothing was done.
	// nonblock is the file's O_NONBLOCK as it is now (a READ carries
	// the file's flags): an empty device then answers EAGAIN.
	ReadNow(dest []byte, nonblock bool) (n int, errno syscall.Errno, wait bool)
	// WriteNow writes one packet. A device write never blocks.
	WriteNow(data []byte) (int, syscall.Errno)
	// Poll gives the file's readiness as poll(2) revents. If schedule,
	// the kernel will wait: the file calls n.PollNotify(kh) when it
	// turns ready.
	Poll(kh uint64, schedule bool, n PollNotifier) (revents uint32)
	// BeginWait starts a wait for a packet outside the device (an
	// io_uring queue parks a blocking READ): it returns the fd that
	// turns readable when a packet is queued, and from then until
	// EndWait the device is in use, so a destroy waits for EndWait
	// (Revoked tells the transport to end the wait). ok is false if the
	// file cannot be waited for so, or its device is going away.
	BeginWait() (fd int, ok bool)
	// EndWait ends what BeginWait started.
	EndWait()
	// Device identifies the file's device, as revoke notices name it.
	Device() uint64
}

// PollNotifier sends FUSE_NOTIFY_POLL for the kernel's poll handle kh.
type PollNotifier interface {
	PollNotify(kh uint64) syscall.Errno
}

// Protocol between a transport and the tree, carried in go-fuse's own
// requests (whose API has no room for it).
const (
	// IdentifyCmd is the private ioctl by which the transport tells a
	// new device file its fh (arg) (_IO('t', 254)). A user's ioctl(2)
	// with the number is refused before it reaches the tree.
	IdentifyCmd = 't'<<8 | 254

	// OpenNoWait, set by a transport in an OPEN's flags, tells the tree
	// that the OPEN must not wait (a closing holder): it answers
	// ErrnoOpenWouldWait instead, and the transport serves the OPEN again
	// where it may wait. The kernel never sends the bit: open(2) keeps
	// only VALID_OPEN_FLAGS, all far below it.
	OpenNoWait = 1 << 31
	// ErrnoOpenWouldWait answers an OPEN told not to wait that would
	// have. The transport never sends it to the kernel.
	ErrnoOpenWouldWait = syscall.ERESTART

	// FopenHandleless, in the open flags a directory's OpendirHandle
	// returns, says that its handles hold nothing between READDIRs: the
	// transport then keeps no go-fuse handle per open (dirs.go). The
	// kernel never sees it: a flag of ours, far above the FOPEN_ ones.
	FopenHandleless = 1 << 31
)
