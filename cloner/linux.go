//go:build linux

package cloner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Linux is the Backend on real tun/tap interfaces.
//
// It does not use github.com/songgao/water: water cannot ask for an
// exclusive create (IFF_TUN_EXCL) and always writes TUNSETPERSIST, so it
// would silently attach to, then un-persist, an interface an administrator
// made. Creation and attachment are therefore done here with x/sys ioctls;
// link state and deletion go through github.com/vishvananda/netlink.
type Linux struct {
	nl   *netlink.Handle
	ep   epoller        // started by the first poller
	ns   netns.NsHandle // the namespace interfaces live in; -1 for the caller's own
	mark string         // the ownership mark (interface alias) of our interfaces
	ctl  int            // a socket in ns, for SIOCGIFINDEX

	// mu guards closed: every use of nl holds it for reading, Close for
	// writing, because a closed netlink.Handle silently falls back to the
	// daemon's own namespace, where an ifindex means another interface.
	mu     sync.RWMutex
	closed bool
}

// LinuxOptions configure a Linux backend.
type LinuxOptions struct {
	// Netns is the network namespace to create and watch interfaces in:
	// a name under /run/netns (ip netns add) or a path to a namespace
	// file. Empty means the daemon's own.
	Netns string
	// Mark is written as the alias of every interface created, so that a
	// restarted daemon with the same mark knows them (Owner).
	Mark string
}

// MarkPrefix starts every cdevfs ownership mark; an alias with it and
// another suffix belongs to another cdevfs instance.
const MarkPrefix = "cdevfs:"

// NewLinux returns a backend working in the calling thread's network
// namespace, or in opts.Netns.
func NewLinux(opts LinuxOptions) (*Linux, error) {
	b := &Linux{ns: netns.None(), mark: opts.Mark}
	var err error
	if opts.Netns != "" {
		path := NetnsPath(opts.Netns)
		if b.ns, err = netns.GetFromPath(path); err != nil {
			return nil, fmt.Errorf("cloner: network namespace %s: %w", path, err)
		}
		b.nl, err = netlink.NewHandleAt(b.ns, unix.NETLINK_ROUTE)
	} else {
		b.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		b.ns.Close()
		return nil, fmt.Errorf("cloner: netlink: %w", err)
	}
	// SIOCGIFINDEX works on a socket of any family and answers for the
	// socket's namespace; AF_UNIX is always there (glibc's if_nametoindex
	// uses it too).
	if b.ctl, err = b.inNetns(func() (int, error) {
		return unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	}); err != nil {
		b.nl.Close()
		b.ns.Close()
		return nil, fmt.Errorf("cloner: control socket: %w", err)
	}
	return b, nil
}

// NetnsPath is where the namespace named by --netns is: a bare name is
// one of ip-netns(8)'s, under /run/netns.
func NetnsPath(name string) string {
	if strings.ContainsRune(name, '/') {
		return name
	}
	return filepath.Join("/run/netns", name)
}

// Close releases the netlink socket, the namespace and the poll watcher:
// after it the backend holds no reference to the namespace, so a deleted
// namespace can go (with its interfaces). Later calls fail with ENXIO.
func (b *Linux) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.closed = true
	b.ep.close()
	b.nl.Close()
	unix.Close(b.ctl)
	b.ns.Close()
}

// handle runs f with the netlink handle, unless the backend is closed.
func (b *Linux) handle(f func(h *netlink.Handle) error) error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.closed {
		return errClosed
	}
	return f(b.nl)
}

// linkByIndex is LinkByIndex, failing with ErrGone if there is none.
func (b *Linux) linkByIndex(index int) (link netlink.Link, err error) {
	if herr := b.handle(func(h *netlink.Handle) error {
		link, err = h.LinkByIndex(index)
		return nil
	}); herr != nil {
		return nil, herr
	}
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("cloner: ifindex %d: %w", index, ErrGone)
		}
		return nil, fmt.Errorf("cloner: ifindex %d: %w", index, err)
	}
	return link, nil
}

// errClosed is what every operation gets once the backend is closed.
var errClosed = fmt.Errorf("cloner: network namespace released: %w", syscall.ENXIO)

func kindFlags(k Kind) uint16 {
	if k == Tap {
		return unix.IFF_TAP | unix.IFF_NO_PI
	}
	return unix.IFF_TUN | unix.IFF_NO_PI
}

// openTun opens /dev/net/tun nonblocking (reads go through Go's poller,
// so a blocked read holds no thread). A tun fd belongs to the namespace of
// the thread that opens it, and TUNSETIFF makes the interface there.
func (b *Linux) openTun() (int, error) {
	b.mu.RLock() // b.ns stays open
	defer b.mu.RUnlock()
	if b.closed {
		return -1, errClosed
	}
	return b.inNetns(func() (int, error) {
		return unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	})
}

// inNetns runs open, which makes an fd, in the backend's namespace: for
// --netns on a thread moved into that namespace, else on the caller's.
// b.ns must stay open meanwhile (b.mu held, or b not yet published).
func (b *Linux) inNetns(open func() (int, error)) (int, error) {
	if !b.ns.IsOpen() {
		return open()
	}
	runtime.LockOSThread()
	own, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return -1, err
	}
	defer own.Close()
	if err := netns.Set(b.ns); err != nil {
		runtime.UnlockOSThread()
		return -1, err
	}
	fd, oerr := open()
	if err := netns.Set(own); err != nil {
		// The thread is stuck in the other namespace: leave it locked so
		// the runtime ends it with this goroutine instead of reusing it.
		if fd >= 0 {
			unix.Close(fd)
		}
		return -1, fmt.Errorf("return to own network namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return fd, oerr
}

// tunSetIff opens /dev/net/tun and binds it to name.
func (b *Linux) tunSetIff(name string, flags uint16) (*os.File, error) {
	fd, err := b.openTun()
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tun:"+name), nil
}

// createHook, if set, runs in Create once the interface is made and
// persistent, before its ifindex is looked up by name: tests delete or
// rename it there, as an administrator may.
var createHook func(name string)

// Create implements Backend: TUNSETIFF with IFF_TUN_EXCL, so an existing
// device of that name (ours, an administrator's, or not a tun at all) is
// never attached to; then TUNSETPERSIST so the interface outlives its fd
// like a FreeBSD tun outlives its last close; then the ownership mark.
func (b *Linux) Create(name string, kind Kind, attach bool) (Link, error) {
	f, err := b.tunSetIff(name, kindFlags(kind)|unix.IFF_TUN_EXCL)
	if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("%w (%v)", syscall.EEXIST, err)
	}
	if err != nil {
		return nil, err
	}
	l := b.newLink(name, kind, kindFlags(kind), OwnerSelf)
	if err := ioctlInt(f, unix.TUNSETPERSIST, 1); err != nil {
		f.Close() // not persistent yet: closing removes it
		return nil, fmt.Errorf("TUNSETPERSIST %s: %w", name, err)
	}
	if createHook != nil {
		createHook(name)
	}
	err = b.handle(func(h *netlink.Handle) error {
		// The ifindex by ioctl, not RTM_GETLINK: the kernel would fill,
		// and the library parse, a whole link message for one number.
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		if err := unix.IoctlIfreq(b.ctl, unix.SIOCGIFINDEX, ifr); err != nil {
			return fmt.Errorf("look up %s: %w", name, err)
		}
		l.index = int(ifr.Uint32())
		if b.mark != "" {
			link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: l.index, Name: name}}
			if err := h.LinkSetAlias(link, b.mark); err != nil {
				return fmt.Errorf("mark %s: %w", name, err)
			}
		}
		return nil
	})
	if err != nil {
		_ = ioctlInt(f, unix.TUNSETPERSIST, 0)
		f.Close()
		if errors.Is(err, unix.ENODEV) {
			// Deleted or renamed (ip link) since TUNSETIFF made it: the
			// unit went as it was made, as a node destroyed under an
			// open goes (ENXIO), not "no such device".
			err = fmt.Errorf("cloner: %s went while it was made: %w (%v)", name, syscall.ENXIO, err)
		}
		return nil, err
	}
	if attach {
		l.setFile(f)
	} else {
		f.Close()
	}
	return l, nil
}

func (b *Linux) newLink(name string, kind Kind, flags uint16, owner Owner) *linuxLink {
	return &linuxLink{b: b, name: name, kind: kind, flags: flags, foreign: owner != OwnerSelf,
		woken: make(chan struct{}), readSem: make(chan struct{}, 1), watchFd: -1, fd: -1}
}

// Adopt implements Backend.
func (b *Linux) Adopt(index int) (Link, LinkInfo, error) {
	link, err := b.linkByIndex(index)
	if err != nil {
		return nil, LinkInfo{}, err
	}
	info := b.linkInfo(link)
	if !info.TunTap {
		return nil, info, fmt.Errorf("cloner: %s is not a tun/tap device: %w", info.Name, syscall.EBUSY)
	}
	l := b.newLink(info.Name, info.Kind, attachFlags(link.(*netlink.Tuntap)), info.Owner)
	l.index = index
	return l, info, nil
}

// Find implements Backend.
func (b *Linux) Find(name string) (LinkInfo, error) {
	var link netlink.Link
	err := b.handle(func(h *netlink.Handle) (err error) {
		link, err = h.LinkByName(name)
		return err
	})
	if err != nil {
		return LinkInfo{}, fmt.Errorf("cloner: %s: %w", name, err)
	}
	return b.linkInfo(link), nil
}

// linkInfo describes a netlink link for the watch.
func (b *Linux) linkInfo(link netlink.Link) LinkInfo {
	a := link.Attrs()
	info := LinkInfo{Name: a.Name, Index: a.Index}
	switch {
	case a.Alias == "" || !strings.HasPrefix(a.Alias, MarkPrefix):
		info.Owner = OwnerNone
	case a.Alias == b.mark:
		info.Owner = OwnerSelf
	default:
		info.Owner = OwnerOther
	}
	if tt, ok := link.(*netlink.Tuntap); ok {
		info.TunTap = true
		info.Persist = !tt.NonPersist
		if tt.Mode == netlink.TUNTAP_MODE_TAP {
			info.Kind = Tap
		}
	}
	return info
}

// attachFlags are the TUNSETIFF flags that attach to tt without changing
// its tun_flags. TUNSETIFF on an existing interface overwrites the
// TUN_FEATURES bits of tun_flags with the caller's (drivers/net/tun.c), so
// they are passed as netlink reports them (IFLA_TUN_PI, _VNET_HDR,
// _MULTI_QUEUE). Netlink does not report IFF_ONE_QUEUE (obsolete, ignored
// by the kernel) or IFF_NAPI*, and sysfs cannot be trusted to show the
// daemon's namespace (a daemon in its own netns usually shares the host's
// /sys), so an interface made with those loses them when cdevfs attaches.
func attachFlags(tt *netlink.Tuntap) uint16 {
	f := uint16(unix.IFF_TUN)
	if tt.Mode == netlink.TUNTAP_MODE_TAP {
		f = unix.IFF_TAP
	}
	if tt.Flags&netlink.TUNTAP_NO_PI != 0 {
		f |= unix.IFF_NO_PI
	}
	if tt.Flags&netlink.TUNTAP_VNET_HDR != 0 {
		f |= unix.IFF_VNET_HDR
	}
	if tt.Flags&netlink.TUNTAP_MULTI_QUEUE != 0 {
		f |= unix.IFF_MULTI_QUEUE
	}
	return f
}

func ioctlInt(f *os.File, req uint, v int) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlSetInt(int(fd), req, v) }); err != nil {
		return err
	}
	return ierr
}

type linuxLink struct {
	b       *Linux
	name    string
	kind    Kind
	index   int    // the kernel's ifindex: survives a rename, not a re-create
	flags   uint16 // TUNSETIFF flags that attach without changing tun_flags
	foreign bool   // not made by this cdevfs: never set down or deleted

	// readSem lets one reader at a time block in f.Read, so a deadline set
	// to wake it (interrupt or revoke) can only hit that reader.
	readSem chan struct{}
	woken   chan struct{} // closed by Wake
	wake    sync.Once

	mu       sync.Mutex // guards f, pollWake, watchFd
	f        *os.File   // attached fd while open, nil while closed
	pollWake func()     // the poller's wake, set by Watch
	watchFd  int        // the fd in the backend's epoll set, or -1

	// The packet path reads and writes f's descriptor with plain
	// read(2)/write(2), under ioMu held shared: no SyscallConn closure
	// (an allocation per packet) and no l.mu. Changing f takes ioMu
	// exclusively (after l.mu), so fd is never closed, and its number
	// never reused, under a read or write in progress.
	ioMu sync.RWMutex
	fd   int // f's descriptor, -1 while detached
}

// setFile attaches f (nil: detaches). Called with l.mu held, or before
// the link is published.
func (l *linuxLink) setFile(f *os.File) {
	fd := -1
	if f != nil {
		if rc, err := f.SyscallConn(); err == nil {
			_ = rc.Control(func(d uintptr) { fd = int(d) })
		}
	}
	l.ioMu.Lock()
	l.f, l.fd = f, fd
	l.ioMu.Unlock()
}

func (l *linuxLink) Name() string { return l.name }

func (l *linuxLink) Index() int { return l.index }

func (l *linuxLink) file() (*os.File, error) {
	select {
	case <-l.woken:
		return nil, ErrRevoked
	default:
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil, fmt.Errorf("cloner: %s is not attached: %w", l.name, syscall.EBADF)
	}
	return l.f, nil
}

// Attach implements Link. The interface is found by ifindex, so a renamed
// interface still attaches (FreeBSD PR 235704). TUNSETIFF without
// IFF_TUN_EXCL would create a fresh interface if ours was deleted in the
// meantime: the persist flag and the ifindex tell, and such an accidental
// interface is closed at once, which removes it.
func (l *linuxLink) Attach(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		return nil
	}
	link, err := l.b.linkByIndex(l.index)
	if err != nil {
		return ErrGone
	}
	name := link.Attrs().Name
	f, err := l.b.tunSetIff(name, l.flags)
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("cloner: %s is attached elsewhere: %w", name, syscall.EBUSY)
	}
	if err != nil {
		return ErrGone
	}
	flags, err := tunFlags(f)
	if err != nil || flags&unix.IFF_PERSIST == 0 {
		f.Close()
		return ErrGone
	}
	var now netlink.Link
	if err := l.b.handle(func(h *netlink.Handle) (err error) {
		now, err = h.LinkByName(name)
		return err
	}); err != nil || now.Attrs().Index != l.index {
		f.Close()
		return ErrGone
	}
	l.setFile(f)
	return nil
}

func tunFlags(f *os.File) (uint16, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	ifr, _ := unix.NewIfreq("")
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr) }); err != nil {
		return 0, err
	}
	return ifr.Uint16(), ierr
}

// Detach implements Link: link down, then close the fd (like tunclose()).
// An adopted interface is not set down: closing leaves it exactly as its
// maker left it (issue 5).
func (l *linuxLink) Detach() error {
	l.mu.Lock()
	f := l.f
	l.setFile(nil)
	l.unwatchLocked()
	l.mu.Unlock()
	var err error
	if !l.foreign && l.index > 0 {
		// Down by ifindex in one request (no RTM_GETLINK first): an
		// interface gone meanwhile is ENODEV, which is no error here,
		// and neither is a released namespace.
		link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: l.index}}
		err = l.b.handle(func(h *netlink.Handle) error { return h.LinkSetDown(link) })
		if errors.Is(err, unix.ENODEV) || errors.Is(err, errClosed) {
			err = nil
		}
	}
	if f != nil {
		f.Close()
	}
	return err
}

var longAgo = time.Unix(1, 0)

// Read implements Link. A blocked read waits in Go's poller; to end it
// early (FUSE interrupt, revoke) the waker first records why (ctx done,
// woken closed) and then sets a read deadline in the past. The reader
// clears the deadline before it checks why, so a wake that lands between
// the check and the read still ends the read.
func (l *linuxLink) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	select {
	case <-l.woken:
		return 0, ErrRevoked
	default:
	}
	// A packet already queued is read at once: no wait, so none of the
	// cancellation machinery below (context.AfterFunc costs a goroutine per
	// call for go-fuse's context) is set up on the busy packet path.
	if n, err := l.readOnce(p); nonblock || !errors.Is(err, unix.EAGAIN) {
		return n, err
	}
	f, err := l.file()
	if err != nil {
		return 0, err
	}
	select {
	case l.readSem <- struct{}{}:
	case <-l.woken:
		return 0, ErrRevoked
	case <-ctx.Done():
		return 0, syscall.EINTR
	}
	defer func() { <-l.readSem }()
	stop := context.AfterFunc(ctx, func() { _ = f.SetReadDeadline(longAgo) })
	defer stop()
	for {
		_ = f.SetReadDeadline(time.Time{})
		select {
		case <-l.woken:
			return 0, ErrRevoked
		default:
		}
		if ctx.Err() != nil {
			return 0, syscall.EINTR
		}
		n, err := f.Read(p)
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue
		case errors.Is(err, io.EOF), errors.Is(err, unix.EBADFD):
			// The kernel shut our queue down: the interface was deleted.
			return 0, ErrGone
		case errors.Is(err, os.ErrClosed):
			return 0, ErrRevoked
		case l.gone(f):
			// Once the interface is unregistered tun's poll reports
			// only EPOLLERR, and Go's poller then fails reads with
			// "not pollable" without making the syscall.
			return 0, ErrGone
		default:
			return 0, err
		}
	}
}

// gone tells whether the kernel has deleted our interface: the fd has
// been detached from it (EBADFD), or its ifindex is no longer listed.
func (l *linuxLink) gone(f *os.File) bool {
	if _, err := tunFlags(f); errors.Is(err, unix.EBADFD) {
		return true
	}
	_, err := l.b.linkByIndex(l.index)
	return errors.Is(err, ErrGone)
}

// readOnce is the O_NONBLOCK read: one read(2), EAGAIN if nothing is queued.
// It bypasses Go's poller (a plain read(2) under ioMu): the poller would
// fail it with a read deadline left behind by a cancel that came too late
// to wake a blocking Read, and with "not pollable" after the interface is
// deleted. It allocates nothing.
func (l *linuxLink) readOnce(p []byte) (int, error) {
	l.ioMu.RLock()
	fd := l.fd
	if fd < 0 {
		l.ioMu.RUnlock()
		return 0, l.detachedErr()
	}
	n, rerr := unix.Read(fd, p)
	l.ioMu.RUnlock()
	switch {
	case rerr == nil && n == 0 && len(p) > 0, errors.Is(rerr, unix.EBADFD):
		return 0, ErrGone
	case rerr != nil:
		return 0, rerr
	}
	return n, nil
}

// ReadFD is the attached tun fd, -1 while detached (device.ReadFD).
func (l *linuxLink) ReadFD() int {
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	return l.fd
}

// detachedErr is the error of an I/O on a link without an fd.
func (l *linuxLink) detachedErr() error {
	select {
	case <-l.woken:
		return ErrRevoked
	default:
	}
	return fmt.Errorf("cloner: %s is not attached: %w", l.name, syscall.EBADF)
}

// Write implements Link: one packet, one write(2), straight on the fd
// (ioMu held shared, no allocation); only a full queue (EAGAIN, which a
// tun does not report in practice) waits in Go's poller.
func (l *linuxLink) Write(ctx context.Context, p []byte) (int, error) {
	select {
	case <-l.woken:
		return 0, ErrRevoked
	default:
	}
	l.ioMu.RLock()
	fd := l.fd
	if fd < 0 {
		l.ioMu.RUnlock()
		return 0, l.detachedErr()
	}
	n, err := unix.Write(fd, p)
	l.ioMu.RUnlock()
	switch {
	case err == nil:
		return n, nil
	case err == unix.EBADFD:
		return 0, ErrGone
	case err != unix.EAGAIN:
		return 0, err
	}
	f, err := l.file()
	if err != nil {
		return 0, err
	}
	n, err = f.Write(p)
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, unix.EBADFD):
		return 0, ErrGone
	case errors.Is(err, os.ErrClosed):
		return 0, ErrRevoked
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		return n, pe.Err
	}
	return n, err
}

// Wake implements Link; pollers hear of it too (they then see
// POLLERR|POLLHUP).
func (l *linuxLink) Wake() {
	l.wake.Do(func() { close(l.woken) })
	l.mu.Lock()
	if l.f != nil {
		_ = l.f.SetReadDeadline(longAgo)
	}
	w := l.pollWake
	l.mu.Unlock()
	if w != nil {
		w()
	}
}

// Readable implements Link: a zero-timeout poll(2) of the tun fd.
func (l *linuxLink) Readable() (bool, error) {
	f, err := l.file()
	if err != nil {
		return false, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return false, ErrRevoked
	}
	var rev int16
	var perr error
	if err := rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		_, perr = unix.Poll(pfd, 0)
		rev = pfd[0].Revents
	}); err != nil {
		return false, ErrRevoked
	}
	switch {
	case perr != nil:
		return false, perr
	case rev&unix.POLLERR != 0: // a tun fd whose interface is gone
		return false, ErrGone
	}
	return rev&unix.POLLIN != 0, nil
}

// Watch implements Link: the fd joins the backend's epoll set once; wake
// is looked up at each event, so a later Watch just replaces it.
func (l *linuxLink) Watch(wake func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pollWake = wake
	if l.f == nil || l.watchFd >= 0 {
		return
	}
	rc, err := l.f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		if l.b.ep.add(int(fd), l.onReady) == nil {
			l.watchFd = int(fd)
		}
	})
}

func (l *linuxLink) onReady() {
	l.mu.Lock()
	w := l.pollWake
	l.mu.Unlock()
	if w != nil {
		w()
	}
}

// unwatchLocked takes the fd out of the epoll set before it is closed.
// Called with l.mu held.
func (l *linuxLink) unwatchLocked() {
	if l.watchFd >= 0 {
		l.b.ep.del(l.watchFd)
		l.watchFd = -1
	}
	l.pollWake = nil
}

// MTU implements Link.
func (l *linuxLink) MTU() (int, bool, error) {
	link, err := l.b.linkByIndex(l.index)
	if err != nil {
		return 0, false, ErrGone
	}
	a := link.Attrs()
	return a.MTU, a.Flags&net.FlagUp != 0, nil
}

// SetMTU implements Link.
func (l *linuxLink) SetMTU(mtu int) error {
	link, err := l.b.linkByIndex(l.index)
	if err != nil {
		return ErrGone
	}
	return l.b.handle(func(h *netlink.Handle) error { return h.LinkSetMTU(link, mtu) })
}

// Delete implements Link: RTM_DELLINK by ifindex, so a renamed interface
// is still the one deleted; an interface already gone is not an error.
// An adopted foreign interface is never deleted.
func (l *linuxLink) Delete() error {
	if l.foreign {
		return nil
	}
	link, err := l.b.linkByIndex(l.index)
	if err != nil {
		return nil // gone already, or the namespace was released
	}
	if err := l.b.handle(func(h *netlink.Handle) error { return h.LinkDel(link) }); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", l.name, err)
	}
	return nil
}

// Close implements Link.
func (l *linuxLink) Close() error {
	l.mu.Lock()
	f := l.f
	l.setFile(nil)
	l.unwatchLocked()
	l.mu.Unlock()
	if f != nil {
		return f.Close()
	}
	return nil
}
