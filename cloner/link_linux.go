//go:build linux

package cloner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// linuxLink implements Link on a real tun/tap interface: the fd that
// attaches it, and what an attach must not change of it.
type linuxLink struct {
	b       *Linux
	name    string
	kind    Kind
	index   int    // the kernel's ifindex: survives a rename, not a re-create
	flags   uint16 // TUNSETIFF flags that attach without changing tun_flags
	foreign bool   // not made by this cdevfs: never set down or deleted

	// readSem lets one reader at a time block in Read, so a deadline set
	// to wake it (interrupt or revoke) can only hit that reader.
	readSem chan struct{}
	woken   chan struct{} // closed by Wake
	wake    sync.Once

	mu       sync.Mutex // guards f, waiting, pollWake, watchFd
	f        *os.File   // attached fd while open, nil while closed; not in Go's poller
	waiting  *os.File   // the blocked Read's pollable dup of f, nil when none waits
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
	l.wakeReaderLocked()
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

// Read implements Link. A blocked read waits in Go's poller, on a dup of
// the fd (pollable); to end it early (FUSE interrupt, revoke, detach)
// the waker first records why (ctx done, woken closed, fd gone) and then
// sets a read deadline in the past. The reader clears the deadline
// before it checks why, so a wake that lands between the check and the
// read still ends the read.
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
	pf, err := pollable(f)
	if err != nil {
		return 0, err
	}
	l.mu.Lock()
	l.waiting = pf
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.waiting = nil
		l.mu.Unlock()
		pf.Close()
	}()
	stop := context.AfterFunc(ctx, func() { _ = pf.SetReadDeadline(longAgo) })
	defer stop()
	for {
		_ = pf.SetReadDeadline(time.Time{})
		select {
		case <-l.woken:
			return 0, ErrRevoked
		default:
		}
		if ctx.Err() != nil {
			return 0, syscall.EINTR
		}
		if l.ReadFD() < 0 {
			return 0, l.detachedErr() // Detach or Close
		}
		n, err := pf.Read(p)
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
		case l.gone(pf):
			// Once the interface is unregistered tun's poll reports
			// only EPOLLERR, and Go's poller then fails reads with
			// "not pollable" without making the syscall.
			return 0, ErrGone
		default:
			return 0, err
		}
	}
}

// pollable returns a dup of f's descriptor that Go's poller waits on, for
// a read or write that must wait (f itself is kept out of the poller:
// Linux.tunSetIff). The caller closes it when the wait is over, which
// takes it out of the poller's epoll set.
func pollable(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, ErrRevoked
	}
	dfd, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { dfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, ErrRevoked
	}
	if derr != nil {
		return nil, fmt.Errorf("cloner: dup of %s: %w", f.Name(), derr)
	}
	// O_NONBLOCK is the open file's, so the dup has it and os.NewFile
	// hands it to the poller.
	return os.NewFile(uintptr(dfd), f.Name()), nil
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
// tun does not report in practice) waits in Go's poller, on a dup of the
// fd, until there is room or ctx ends (EINTR, as go-fuse's interrupt
// cancels it).
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
	pf, err := pollable(f)
	if err != nil {
		return 0, err
	}
	defer pf.Close()
	stop := context.AfterFunc(ctx, func() { _ = pf.SetWriteDeadline(longAgo) })
	defer stop()
	n, err = pf.Write(p)
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, unix.EBADFD):
		return 0, ErrGone
	case errors.Is(err, os.ErrClosed):
		return 0, ErrRevoked
	case errors.Is(err, os.ErrDeadlineExceeded):
		return n, syscall.EINTR // ctx ended
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
	l.wakeReaderLocked()
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
		// A zero timeout does not keep poll(2) from failing with EINTR:
		// do_poll looks at pending signals before the timeout, and Go's
		// preemption signals the daemon's threads often.
		for {
			_, perr = unix.Poll(pfd, 0)
			if perr != unix.EINTR {
				break
			}
		}
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

// wakeReaderLocked ends the wait of a blocked Read, which then looks
// again at why it should stop. Called with l.mu held.
func (l *linuxLink) wakeReaderLocked() {
	if l.waiting != nil {
		_ = l.waiting.SetReadDeadline(longAgo)
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
	l.wakeReaderLocked()
	l.mu.Unlock()
	if f != nil {
		return f.Close()
	}
	return nil
}
