// Package devfuse carries a FUSE connection's requests over read(2) and
// write(2) on /dev/fuse, the classic transport, and mounts it: the loop
// reads each request and has transport.Conn answer it.
package devfuse

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Loop reads requests from /dev/fuse and writes their replies.
//
// Each idle reader waits in a blocking read(2) of /dev/fuse on a thread
// of its own, as libfuse's workers do: the kernel wakes exactly one
// waiting reader per request (fuse_dev_do_read's exclusive wait) and
// hands it the request in that read. Through Go's poller instead, every
// request would cost the poller's thread a wakeup, a goroutine handoff
// and a read that finds nothing (EAGAIN) before the reader parks again.
// A request is handled on the reader that read it; when the last idle
// reader takes a request a new one is started, so a handler that waits
// (a READ for a packet, wait.go) never starves the loop: the kernel's
// INTERRUPT for it must still be read.
//
// The readers read and write a dup of the connection's fd that the Loop
// closes once they have all stopped, so its number is never reused under
// one. A blocked read(2) holds /dev/fuse open, so closing the fd does not
// end the readers: the connection's end does (an unmount, or an abort,
// which fs.Mount.Close makes), and they get ENODEV.
type Loop struct {
	c    *transport.Conn
	fd   int       // the loop's dup of /dev/fuse, closed once every reader stopped
	bufs sync.Pool // request and reply buffers, one pair per reader

	idle    atomic.Int32   // readers waiting in read(2)
	readers sync.WaitGroup // every reader
	stopped chan struct{}  // closed once every reader stopped and fd is closed
	waits   waits          // blocking READs waiting on their reader's thread (wait.go)
}

// maxIdleReaders bounds the readers kept waiting once a burst is over.
const maxIdleReaders = 4

// BlockedThreads is how many of the process's threads a busy loop
// keeps blocked in syscalls: its idle readers in read(2), and a READ or
// two waiting for a packet in poll(2). Each holds a P of Go's scheduler
// while it waits, until sysmon takes the P back (see cmd/cdevfs's
// GOMAXPROCS).
const BlockedThreads = maxIdleReaders + 2

// Start starts serving c's requests from its /dev/fuse fd, which must
// be blocking.
func Start(c *transport.Conn) (*Loop, error) {
	rc, err := c.Dev().SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("/dev/fuse: %w", err)
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(d uintptr) { fd, derr = unix.FcntlInt(d, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, fmt.Errorf("/dev/fuse: %w", err)
	}
	if derr != nil {
		return nil, fmt.Errorf("dup /dev/fuse: %w", derr)
	}
	l := &Loop{c: c, fd: fd, stopped: make(chan struct{})}
	l.bufs.New = func() any {
		b := make([]byte, 2*c.BufSize())
		return &b
	}
	l.spawn() // serves INIT alone; it starts the second reader (reader)
	go func() {
		// spawn runs on a live reader only, so the count is never
		// back at zero before the last reader stops.
		l.readers.Wait()
		unix.Close(l.fd)
		close(l.stopped)
	}()
	return l, nil
}

func (l *Loop) spawn() {
	l.idle.Add(1)
	l.readers.Add(1)
	go l.reader()
}

// Wait returns once every reader has stopped: the connection ended (an
// unmount, an abort).
func (l *Loop) Wait() { <-l.stopped }

// Stopped is closed once every reader has stopped.
func (l *Loop) Stopped() <-chan struct{} { return l.stopped }

func (l *Loop) reader() {
	defer l.readers.Done()
	bp := l.bufs.Get().(*[]byte)
	defer l.bufs.Put(bp)
	size := l.c.BufSize()
	in, out := (*bp)[:size], (*bp)[size:]
	w := &waiter{efd: -1}
	defer w.close()
	for {
		n, err := syscall.Read(l.fd, in)
		if err != nil {
			outcome := readOutcome(err)
			if outcome == readAgain {
				continue
			}
			var why error // nil: the kernel ended the connection
			if outcome == readFailed {
				why = fmt.Errorf("read /dev/fuse: %w", err)
			}
			l.idle.Add(-1)
			l.waits.endAll()
			l.c.End(why)
			return
		}
		// INIT is served by the first reader alone, and the second is
		// started once it is answered. The kernel sends nothing else
		// before the reply, but what go-fuse learns from INIT (the
		// kernel's settings, the negotiated flags) is read by every
		// later request's parse, and the kernel's ordering of the reply
		// before the next request is not one the Go memory model sees:
		// the go statement that starts the second reader is.
		isInit := fusewire.Opcode(in[:n]) == fusewire.OpInit
		if l.idle.Add(-1) == 0 && !isInit {
			l.spawn()
		}
		reply := l.handle(w, in[:n], out)
		if isInit {
			l.c.InitAnswered(out[:reply])
			l.spawn()
		}
		if l.idle.Add(1) > maxIdleReaders {
			l.idle.Add(-1)
			return
		}
	}
}

// handle serves one request read from /dev/fuse, writes its reply and
// returns the reply's length (0: none). A READ that must wait for a
// packet waits on w (wait.go), and an INTERRUPT for it ends that wait.
func (l *Loop) handle(w *waiter, in, out []byte) int {
	if ir := fusewire.View[fuse.InterruptIn](in); ir != nil && ir.Opcode == fusewire.OpInterrupt && l.waits.interrupt(ir.Unique) {
		return 0 // an INTERRUPT has no reply
	}
	n, blocked := l.c.Serve(in, out, false)
	if blocked {
		n = l.waitRead(w, in, out)
	}
	if n > 0 {
		// The kernel takes each write(2) to /dev/fuse as one whole
		// message, so writers need no lock of ours. An error is the
		// kernel's: ENOENT for a request no longer waited for.
		_, _ = unix.Write(l.fd, out[:n])
	}
	return n
}

// What a failed read of /dev/fuse means.
const (
	readAgain  = iota // EINTR, EAGAIN, or ENOENT: the request was interrupted before we read it
	readEnded         // ENODEV: unmounted or aborted
	readFailed        // anything else
)

func readOutcome(err error) int {
	switch {
	case errors.Is(err, syscall.EINTR), errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.ENOENT):
		return readAgain
	case errors.Is(err, syscall.ENODEV):
		return readEnded
	}
	return readFailed
}
