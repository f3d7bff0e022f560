// Package devfuse carries a FUSE connection's requests over read(2) and
// write(2) on /dev/fuse, the classic transport, and mounts it: the loop
// reads each request and has transport.Conn answer it.
package devfuse

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/transport"
	"golang.org/x/sys/unix"
)

// Loop reads requests from /dev/fuse and writes their replies.
//
// /dev/fuse is opened nonblocking and read through Go's poller, so idle
// readers are parked goroutines, not threads. A request is handled on the
// goroutine that read it; when the last idle reader takes a request a new
// one is started, so a handler blocked in a device read never starves the
// loop (the kernel's INTERRUPT for it must still be read).
type Loop struct {
	c    *transport.Conn
	bufs sync.Pool // request and reply buffers, one pair per reader

	idle    atomic.Int32   // readers waiting in read(2)
	readers sync.WaitGroup // every reader
}

// maxIdleReaders bounds the readers kept waiting once a burst is over.
const maxIdleReaders = 4

// Start starts serving c's requests from its /dev/fuse fd.
func Start(c *transport.Conn) *Loop {
	l := &Loop{c: c}
	l.bufs.New = func() any {
		b := make([]byte, 2*c.BufSize())
		return &b
	}
	for range 2 {
		l.spawn()
	}
	return l
}

func (l *Loop) spawn() {
	l.idle.Add(1)
	l.readers.Add(1)
	go l.reader()
}

// Wait returns once every reader has stopped: the connection ended (an
// unmount, an abort) or the fd was closed.
func (l *Loop) Wait() { l.readers.Wait() }

func (l *Loop) reader() {
	defer l.readers.Done()
	bp := l.bufs.Get().(*[]byte)
	defer l.bufs.Put(bp)
	size := l.c.BufSize()
	in, out := (*bp)[:size], (*bp)[size:]
	dev := l.c.Dev()
	for {
		n, err := dev.Read(in)
		if err != nil && readOutcome(err) == readFailed {
			// Go's poller says "not pollable" when epoll reported
			// EPOLLERR for the fd before the reader waited, and
			// /dev/fuse reports EPOLLERR once the connection is gone
			// (fuse_dev_poll): an unmount racing a reader that had just
			// found nothing to read. A read of our own gives the errno
			// (ENODEV then) or the request.
			n, err = readRaw(dev, in)
		}
		if err != nil {
			switch readOutcome(err) {
			case readAgain:
				continue
			case readEnded:
				l.idle.Add(-1)
				l.c.End(nil)
				return
			default:
				l.idle.Add(-1)
				l.c.End(fmt.Errorf("read /dev/fuse: %w", err))
				return
			}
		}
		if l.idle.Add(-1) == 0 {
			l.spawn()
		}
		l.handle(in[:n], out)
		if l.idle.Add(1) > maxIdleReaders {
			l.idle.Add(-1)
			return
		}
	}
}

// handle serves one request read from /dev/fuse and writes its reply.
func (l *Loop) handle(in, out []byte) {
	n, _ := l.c.Serve(in, out, true)
	if n > 0 {
		// The kernel takes each write(2) to /dev/fuse as one whole
		// message, so writers need no lock of ours. An error is the
		// kernel's: ENOENT for a request no longer waited for.
		_, _ = l.c.Dev().Write(out[:n])
	}
	if fusewire.Opcode(in) == fusewire.OpInit {
		l.c.InitAnswered(out[:n])
	}
}

// What a failed read of /dev/fuse means.
const (
	readAgain  = iota // EINTR, EAGAIN, or ENOENT: the request was interrupted before we read it
	readEnded         // ENODEV: unmounted or aborted; os.ErrClosed: the fd was closed
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

// readRaw reads one request from dev with read(2) itself, past Go's
// poller; EAGAIN if there is none.
func readRaw(dev *os.File, in []byte) (int, error) {
	rc, err := dev.SyscallConn()
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
