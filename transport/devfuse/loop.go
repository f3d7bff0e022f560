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
)

// Loop reads requests from /dev/fuse and writes their replies.
//
// Each idle reader waits in a blocking read(2) of /dev/fuse on a thread
// of its own, as libfuse's workers do: the kernel wakes exactly one
// waiting reader per request (an exclusive wait) and hands it the
// request in that read. Through Go's poller instead, every request
// costs the poller's thread a wakeup, a goroutine handoff and a read
// that finds nothing (EAGAIN) before the reader parks again. A request
// is handled on the reader that read it; when the last idle reader takes
// a request a new one is started, so a handler blocked in a device read
// never starves the loop (the kernel's INTERRUPT for it must still be
// read).
//
// A blocked read(2) holds /dev/fuse open, so closing the fd no longer
// ends the connection while a reader waits: the connection ends with its
// unmount (the readers get ENODEV), or Stop aborts it.
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
	rc, err := l.c.Dev().SyscallConn()
	if err != nil {
		l.idle.Add(-1)
		l.c.End(fmt.Errorf("read /dev/fuse: %w", err))
		return
	}
	for {
		// Control holds the fd open (not its number only) while the
		// read waits: Close defers the close(2) until the read returns,
		// so the number is never reused under a reader.
		var n int
		var rerr error
		if err := rc.Control(func(fd uintptr) { n, rerr = syscall.Read(int(fd), in) }); err != nil {
			rerr = err // closed
		}
		if rerr != nil {
			switch readOutcome(rerr) {
			case readAgain:
				continue
			case readEnded:
				l.idle.Add(-1)
				l.c.End(nil)
				return
			default:
				l.idle.Add(-1)
				l.c.End(fmt.Errorf("read /dev/fuse: %w", rerr))
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
