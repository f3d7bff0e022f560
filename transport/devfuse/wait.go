package devfuse

import (
	"encoding/binary"
	"sync"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// A blocking READ of a device file that finds no packet waits on the
// thread of the reader that read it, in poll(2) on the device's fd and on
// an eventfd of the reader's that ends the wait early: as a tun's own
// read(2) sleeps in the kernel until a packet comes (tun_ring_recv), and
// as a relay's thread would. A packet then costs one wakeup of that
// thread; waiting in Go's poller instead would cost the poller's thread a
// wakeup and a goroutine handoff, and go-fuse's request a context.
//
// Three things end a wait early, each through the eventfd: an INTERRUPT
// for the READ (answered EINTR, as a signal ends tun_ring_recv), a revoke
// of its device (the READ reads again and gets the device's error,
// ENXIO, as a blocked read(2) does once tun_detach wakes it), and the end
// of the connection (no answer: there is no one to send it to).
//
// Each wait holds a thread, so at most maxWaits READs wait so; the
// next ones wait in go-fuse's Read, as goroutines. Any caller who may
// read a device can issue blocking READs, and must not be able to make
// the daemon start threads without bound.
const maxWaits = 64

// waits are the READs waiting in poll(2) now.
type waits struct {
	mu    sync.Mutex // guards the fields below and each waiter's unique, device, why and signaled
	reads []*waiter  // the waiting READs, at most maxWaits
	ended bool       // the connection ended: no wait starts, every wait ends
}

// waiter is one reader's wait, reused for every READ the reader waits
// for. efd is made before the first registration and closed after the
// last; while the waiter is registered the INTERRUPT, revoke and end
// paths write it, under mu. fds and cnt are the reader's own.
type waiter struct {
	efd      int            // eventfd that ends the wait early; -1 until the first wait
	fds      [2]unix.PollFd // the device's fd and efd, kept here so poll(2) allocates nothing
	cnt      [8]byte        // eventfd counter, read to drain it
	unique   uint64         // the READ waiting, 0 while none is
	device   uint64         // its device (transport.File.Device)
	why      syscall.Errno  // EINTR: interrupted; ENOTCONN: the connection ended; 0: none (a revoke only wakes)
	signaled bool           // efd was written since the wait began
}

// close frees the waiter's eventfd; its reader is ending.
func (w *waiter) close() {
	if w.efd >= 0 {
		unix.Close(w.efd)
		w.efd = -1
	}
}

// What begin did.
const (
	waitBegun = iota // w is registered
	waitFull         // maxWaits READs wait already
	waitEnded        // the connection ended
)

// begin registers w as waiting for the READ unique on device.
func (ws *waits) begin(w *waiter, unique, device uint64) int {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	switch {
	case ws.ended:
		return waitEnded
	case len(ws.reads) >= maxWaits:
		return waitFull
	}
	w.unique, w.device, w.why, w.signaled = unique, device, 0, false
	ws.reads = append(ws.reads, w)
	return waitBegun
}

// end unregisters w and drains its eventfd, so that a wake meant for
// this READ does not end the reader's next wait.
func (ws *waits) end(w *waiter) {
	ws.mu.Lock()
	for i, r := range ws.reads {
		if r == w {
			last := len(ws.reads) - 1
			ws.reads[i], ws.reads[last] = ws.reads[last], nil
			ws.reads = ws.reads[:last]
			break
		}
	}
	w.unique = 0
	signaled := w.signaled
	ws.mu.Unlock()
	if signaled {
		_, _ = unix.Read(w.efd, w.cnt[:])
	}
}

// woken says why w's eventfd was written, 0 if only to read again, and
// drains it, so that a later signal wakes the poll again.
func (ws *waits) woken(w *waiter) syscall.Errno {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if w.signaled {
		_, _ = unix.Read(w.efd, w.cnt[:])
		w.signaled = false
	}
	return w.why
}

// signalLocked wakes w's reader.
func (w *waiter) signalLocked(why syscall.Errno) {
	if why != 0 {
		w.why = why
	}
	if !w.signaled {
		w.signaled = true
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1) // eventfd(2)'s counter
		_, _ = unix.Write(w.efd, one[:])
	}
}

// interrupt ends the wait of the READ unique, if it waits here.
func (ws *waits) interrupt(unique uint64) bool {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for _, w := range ws.reads {
		if w.unique == unique {
			w.signalLocked(syscall.EINTR)
			return true
		}
	}
	return false
}

// revoked wakes the READs waiting for device, to read again.
func (ws *waits) revoked(device uint64) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for _, w := range ws.reads {
		if w.device == device {
			w.signalLocked(0)
		}
	}
}

// endAll ends every wait, and every later one before it starts.
func (ws *waits) endAll() {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	ws.ended = true
	for _, w := range ws.reads {
		w.signalLocked(syscall.ENOTCONN)
	}
}

// waitRead serves READ in, which found no packet and must wait: on w,
// in poll(2), or where it cannot (not a device file with an fd, maxWaits
// waiting), in go-fuse's Read. It returns the reply's length, 0 for
// none.
func (l *Loop) waitRead(w *waiter, in, out []byte) int {
	start := time.Now()
	r := fusewire.View[fuse.ReadIn](in)
	var f transport.File
	if r != nil && l.c.Fast() && fusewire.OutHeaderSize+int(r.Size) <= len(out) {
		f = l.c.Files().File(r.Fh)
	}
	if f == nil || !l.prepare(w) {
		n, _ := l.c.Serve(in, out, true)
		return n
	}
	// The file's wait begins before the READ is registered, so that a
	// READ registered is one that waits here: an INTERRUPT that finds
	// it is never lost on a READ gone to go-fuse. One that comes before
	// is answered EAGAIN by go-fuse, and the kernel sends it again.
	fd, ok := f.BeginWait()
	if !ok {
		n, _ := l.c.Serve(in, out, true) // no fd, or dying: go-fuse's Read answers
		return n
	}
	switch l.waits.begin(w, r.Unique, f.Device()) {
	case waitEnded:
		f.EndWait()
		return 0 // the connection ended: no one to answer
	case waitFull:
		f.EndWait()
		n, _ := l.c.Serve(in, out, true)
		return n
	}
	defer f.EndWait()
	defer l.waits.end(w)
	defer l.c.Metrics().Request(fusewire.OpRead, start)
	w.fds = [2]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(w.efd), Events: unix.POLLIN}}
	for {
		// Read after registering: a revoke before it has already made
		// the device fail reads, one after it wakes the poll.
		n, wait := transport.ReadReply(f, in, out, int(r.Size), false)
		if !wait {
			return n
		}
		w.fds[0].Revents, w.fds[1].Revents = 0, 0
		if _, err := unix.Poll(w.fds[:], -1); err != nil && err != unix.EINTR {
			return fusewire.ErrorReply(in, out, syscall.EIO)
		}
		if w.fds[1].Revents != 0 {
			switch why := l.waits.woken(w); why {
			case syscall.ENOTCONN:
				return 0
			case syscall.EINTR:
				return fusewire.ErrorReply(in, out, why)
			}
		}
		if w.fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			// A tun whose interface is gone polls POLLERR for ever;
			// its read gives the error, or, if it still says wait,
			// the device is gone all the same.
			if n, wait := transport.ReadReply(f, in, out, int(r.Size), false); !wait {
				return n
			}
			return fusewire.ErrorReply(in, out, syscall.ENXIO)
		}
	}
}

// prepare gives w its eventfd on its first wait; false if none can be
// made (the READ then waits in go-fuse, which works as well). Logged at
// DEBUG only: it is retried on every READ, and a caller who can exhaust
// the daemon's fds must not also fill its log.
func (l *Loop) prepare(w *waiter) bool {
	if w.efd >= 0 {
		return true
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		l.c.Log().Debug("eventfd for a READ's wait; it waits in go-fuse", "err", err)
		return false
	}
	w.efd = efd
	return true
}

// Revoked tells the loop that device dev was revoked: the READs waiting
// for its packets read again, and get its error, so that the destroy's
// drain can finish.
func (l *Loop) Revoked(dev uint64) { l.waits.revoked(dev) }
