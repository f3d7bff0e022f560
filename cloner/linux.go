//go:build linux

package cloner

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"github.com/cdevfs/cdevfs/internal/tunfd"
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

// openTun opens /dev/net/tun. A tun fd belongs to the namespace of the
// thread that opens it, and TUNSETIFF makes the interface there.
func (b *Linux) openTun() (int, error) {
	b.mu.RLock() // b.ns stays open
	defer b.mu.RUnlock()
	if b.closed {
		return -1, errClosed
	}
	return b.inNetns(func() (int, error) {
		return unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
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
	if err := tunfd.SetIff(fd, name, flags); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// The file is made while the fd blocks, so Go's poller does not take
	// it, and only then made nonblocking (a read of an empty queue must
	// answer EAGAIN). A tun fd in an epoll set costs every packet queued
	// on it a wakeup of the poller's thread (tun_net_xmit wakes the
	// socket's waiters, ep_poll_callback the epoll's), whether or not
	// anyone waits. A read or write that must wait polls a dup of the fd
	// for the wait's length (linuxLink.pollable).
	f := os.NewFile(uintptr(fd), "tun:"+name)
	if err := unix.SetNonblock(fd, true); err != nil {
		f.Close()
		return nil, fmt.Errorf("tun %s: O_NONBLOCK: %w", name, err)
	}
	return f, nil
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
