package uring

import (
	"syscall"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// earlyInterrupts keeps INTERRUPTs that found their request nowhere. The
// kernel sends an INTERRUPT once: answered EAGAIN it is queued again only
// for a request read from /dev/fuse (fuse_dev_do_write looks for it
// there, not among the rings'). One that finds neither a parked READ nor
// a request go-fuse serves came between a READ's arrival on its queue and
// its park (or handoff): the READ checks them as it parks. Uniques are
// never reused, so stale ones do no harm, and the oldest is overwritten.
type earlyInterrupts struct {
	uniques [16]uint64
	next    int // the slot to fill next
}

func (e *earlyInterrupts) keep(unique uint64) {
	e.uniques[e.next] = unique
	e.next = (e.next + 1) % len(e.uniques)
}

// take reports whether an INTERRUPT for unique came early, and forgets it.
func (e *earlyInterrupts) take(unique uint64) bool {
	for i, u := range e.uniques {
		if u == unique && u != 0 {
			e.uniques[i] = 0
			return true
		}
	}
	return false
}

// Interrupt implements transport.Interrupter: it serves an INTERRUPT (in;
// its reply, if any, in out) while the rings carry the requests. A parked
// READ is answered EINTR by its queue; a request go-fuse serves (a READ
// handed off, or an inline one) is interrupted by go-fuse; one neither
// knows is kept in every queue's early interrupts, for a READ about to
// be parked or handed off. A queue's scan and its keeping are one
// critical section, as its park's registering and checking are: either
// the INTERRUPT finds the park, or the park finds it.
func (s *Server) Interrupt(in, out []byte) int {
	r := fusewire.View[fuse.InterruptIn](in)
	if r == nil {
		return fusewire.ErrorReply(in, out, syscall.EINVAL)
	}
	for _, q := range s.queues {
		if q.interruptParked(r.Unique, false) {
			return 0 // an INTERRUPT has no reply
		}
	}
	n, ok := s.c.ServeGoFuse(in, out)
	if ok && fusewire.Status(out[:n]) == syscall.EAGAIN {
		// Not a request go-fuse serves either. Its EAGAIN is still sent:
		// for a request read from /dev/fuse the kernel queues the
		// INTERRUPT again.
		for _, q := range s.queues {
			if q.interruptParked(r.Unique, true) {
				break
			}
		}
	}
	return n
}

// interruptParked sends the queue a note for the READ with unique if it
// is parked there, and reports whether it is; if not, and keep, the
// queue keeps unique among its early interrupts.
func (q *queue) interruptParked(unique uint64, keep bool) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := range q.parks.reads {
		if q.parks.reads[i].unique == unique {
			q.sendLocked(note{unique: unique})
			return true
		}
	}
	if keep {
		q.early.keep(unique)
	}
	return false
}
