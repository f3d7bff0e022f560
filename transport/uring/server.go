// Package uring carries a FUSE connection's requests over
// FUSE-over-io_uring queues (internal/fuseuring), one per possible CPU,
// each served by a thread of its own pinned to its CPU, and has
// transport.Conn answer them.
//
// A request is served on its queue's thread (queue.go). A READ of a
// device that must wait for a packet is parked (park.go): the queue polls
// the device's fd in its own ring and answers the READ when the fd turns
// readable, so the queue goes on serving the write that will bring the
// packet, and no other thread is woken on the way. Any other request that
// may block is handed to a goroutine, as the /dev/fuse loop hands it to a
// reader of its own. A request the kernel strands on a queue whose
// entries READs hold is fetched by kicks (kick.go). /dev/fuse keeps its
// loop: FORGET and INTERRUPT still come over read(2) (interrupt.go).
package uring

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/transport"
)

// Sizing of the queues. The kernel wants a payload buffer per entry of at
// least max(8 KiB, max_write, max_pages pages).
const (
	// Entries is the number of entries a queue starts with. An entry is
	// busy while its request is served; a READ waiting for a packet
	// keeps its entry until the packet comes (the reply must go back
	// through it), so a queue adds entries while fewer than minWaiting
	// wait for a request: a request the kernel puts on a queue with none
	// waiting waits there, whatever the other queues have.
	Entries    = 8
	minWaiting = 2
	maxGrow    = 32 // entries added at once (grow)
	sqSize     = 64 // commands submitted at once, not an entry bound
)

// User data of the ring's operations: an entry's command carries its
// index; a parked READ's poll pollTag, the park's generation and the
// entry's index (a completion of an earlier park is then told apart);
// a poll's removal removeTag (its completion says nothing).
const (
	eventUserData = 1 << 63
	pollTag       = 1 << 62
	removeTag     = 1 << 61
)

// genMask keeps a park's generation clear of the tags.
const genMask = 1<<24 - 1

func pollUserData(i int, gen uint32) uint64 {
	return pollTag | uint64(gen&genMask)<<32 | uint64(uint32(i))
}

// Server is the set of queues of one connection.
type Server struct {
	c       *transport.Conn
	dir     string // the mountpoint, whose statfs a queue's kicks ask
	payload int    // an entry's payload buffer
	queues  []*queue
	bufs    sync.Pool      // copies of handed-off requests
	workers sync.WaitGroup // the queues' threads, handed-off requests, kicks
	held    atomic.Int64   // requests the queues hold while they wait (Held)
}

// Start starts the queues of c, mounted at dir, after INIT was answered
// with FUSE_OVER_IO_URING, and returns once every queue has registered its
// entries (the ring is then ready) or one failed. On failure the queues
// are stopped, and the Server is returned all the same for its Wait.
// maxWrite is the largest WRITE the mount allows.
func Start(c *transport.Conn, dir string, maxWrite int) (*Server, error) {
	nq, err := fuseuring.PossibleCPUs()
	if err != nil {
		return nil, fmt.Errorf("io_uring queues: %w", err)
	}
	s := &Server{c: c, dir: dir, payload: maxWrite}
	s.bufs.New = func() any {
		b := make([]byte, c.BufSize())
		return &b
	}
	for qid := range nq {
		s.queues = append(s.queues, newQueue(s, qid))
	}
	// Before any queue serves a request: an INTERRUPT for a READ parked
	// in one must find it.
	c.SetInterrupter(s)
	errs := make(chan error, nq)
	for _, q := range s.queues {
		s.workers.Add(1)
		go q.run(errs)
	}
	for range nq {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		s.Stop()
	}
	return s, err
}

// Held is the number of requests the queues hold while they wait, as
// of each queue's last reap: READs parked for a packet, and requests
// served on a goroutine of their own (the metric
// cdevfs_fuse_ring_requests_held).
func (s *Server) Held() int { return int(s.held.Load()) }

// Queues is the number of queues.
func (s *Server) Queues() int { return len(s.queues) }

// Stop asks every queue's thread to end, once its handed-off requests
// are answered. The ring of each holds /dev/fuse as a fixed file, so
// the fd's close ends the connection only once they are stopped.
func (s *Server) Stop() {
	for _, q := range s.queues {
		q.stopping.Store(true)
		q.wake()
	}
}

// Wait returns once every queue's thread and every goroutine it started
// have returned.
func (s *Server) Wait() { s.workers.Wait() }

// Revoked tells every queue that the device dev was revoked: its parked
// READs end, so that the destroy's drain can finish. Nothing served on a
// queue's thread waits for a drain (a transient close's destroy is
// queued to the registry's worker), so the queue is free to answer.
func (s *Server) Revoked(dev uint64) {
	for _, q := range s.queues {
		q.send(note{device: dev})
	}
}

// Probe checks, before a mount asks the kernel for FUSE over io_uring,
// what would keep its queues from starting: io_uring itself may be off
// (the kernel.io_uring_disabled sysctl) or forbidden (seccomp, as
// container runtimes often do).
func Probe() error {
	if _, err := fuseuring.PossibleCPUs(); err != nil {
		return fmt.Errorf("possible CPUs: %w", err)
	}
	r, err := fuseuring.NewRing(2)
	if err != nil {
		return err
	}
	r.Close()
	return nil
}

// NotOffered says why the kernel did not offer FUSE over io_uring in
// INIT: the fuse module's parameter, if it says so.
func NotOffered() error {
	if ok, why := fuseuring.Available(); !ok {
		return errors.New(why)
	}
	return errors.New("the kernel does not offer FUSE over io_uring")
}
