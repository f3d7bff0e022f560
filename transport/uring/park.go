package uring

import (
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// parkedReads are a queue's READs waiting in its ring for their device's
// fd, by entry index. The queue's thread owns them; a read's unique is
// written under the queue's mu, since Interrupt scans them.
type parkedReads struct {
	reads []parkedRead
	count int // entries whose READ is parked
}

// parkedRead is a READ waiting for a packet. While parked its file is in
// a wait (transport.File.BeginWait), as a blocked Read would be, so a
// destroy's drain waits for it; a revoke notice ends it (Server.Revoked).
type parkedRead struct {
	file   transport.File // nil: no READ is parked in the entry
	fd     int            // the fd that turns readable with a packet
	size   int            // the READ's size
	gen    uint32         // bumped by every park and unpark: tells stale polls
	armed  bool           // a poll of fd is in the ring
	unique uint64         // the READ's, 0 when none is parked; written under mu
	start  time.Time      // when the READ came, for its latency
}

// note tells a queue of an INTERRUPT for a parked READ (unique), or of a
// revoked device (device), whose parked READs must end.
type note struct {
	unique uint64
	device uint64
}

// park parks the blocking READ in entry i (in is its request) if its
// file is a device file that can be waited for (BeginWait): a poll of the
// fd goes into the ring, and polled answers the READ once a packet is
// there. It reports false if the READ is not for parking (go-fuse's Read
// serves it, on a goroutine).
func (q *queue) park(i int, in []byte) bool {
	c := q.s.c
	r := fusewire.View[fuse.ReadIn](in)
	if !c.Fast() || r == nil {
		return false
	}
	f := c.Files().File(r.Fh)
	if f == nil || fusewire.OutHeaderSize+int(r.Size) > len(q.q.Ents[i].Out()) {
		return false
	}
	fd, ok := f.BeginWait()
	if !ok {
		return false // not a device with an fd, or dying: Read answers
	}
	q.mu.Lock() // Interrupt reads the uniques
	for len(q.parks.reads) <= i {
		q.parks.reads = append(q.parks.reads, parkedRead{})
	}
	p := &q.parks.reads[i]
	p.gen++
	p.file, p.fd, p.size, p.start = f, fd, int(r.Size), time.Now()
	p.unique = r.Unique
	interrupted := q.early.take(r.Unique)
	q.mu.Unlock()
	q.parks.count++
	c.Metrics().RingParked()
	if interrupted {
		q.failParked(i, syscall.EINTR)
		return true
	}
	q.arm(i)
	q.grow()
	return true
}

// arm queues the poll of parked entry i's fd. A packet queued before the
// poll is armed is not missed: the poll checks readiness as it arms.
func (q *queue) arm(i int) {
	p := &q.parks.reads[i]
	p.armed = true
	q.q.Ring.PollAdd(p.fd, unix.POLLIN, pollUserData(i, p.gen))
}

// polled handles the completion of parked entry i's poll (res: revents,
// or an error): a packet, or the error that ends the READ (an interface
// deleted: POLLERR), is read into the entry's reply; a wake that found
// no packet (another reader took it) polls again.
func (q *queue) polled(i int, gen uint32, res int32) {
	if i >= len(q.parks.reads) || q.parks.reads[i].file == nil || q.parks.reads[i].gen&genMask != gen {
		return // a park that has ended since (its poll was removed)
	}
	q.parks.reads[i].armed = false
	if res >= 0 {
		if q.readParked(i) {
			return
		}
		if res&(transport.PollErr|transport.PollHup|transport.PollNval) == 0 {
			q.arm(i) // another reader took the packet
			return
		}
	}
	// The fd cannot be waited for here: the poll failed, or reports an
	// error while a read finds nothing (a tun whose interface is being
	// unregistered), which would wake every poll at once. Serve the READ
	// as the /dev/fuse loop does: the device's Read, on a goroutine,
	// finds out what happened (and schedules the node's destroy).
	q.s.c.Log().Warn("FUSE io_uring: a parked READ's poll failed; served on a goroutine", "queue", q.qid, "res", res)
	e := q.q.Ents[i]
	q.unpark(i, false)
	in, err := e.Request(q.in)
	if err != nil {
		q.commit(i, fusewire.ErrorReply(e.Hdr, e.Out(), syscall.EIO))
		return
	}
	q.handOff(i, in)
}

// retry reads for parked entry i: its reply is committed, unless there is
// still no packet (then it polls again).
func (q *queue) retry(i int) {
	if !q.readParked(i) && !q.parks.reads[i].armed {
		q.arm(i)
	}
}

// readParked reads for parked entry i and answers it with the packet or
// the error; it reports false, answering nothing, if there is no packet.
func (q *queue) readParked(i int) bool {
	p, e := &q.parks.reads[i], q.q.Ents[i]
	n, wait := transport.ReadReply(p.file, e.Hdr, e.Out(), p.size, false)
	if !wait {
		q.answerParked(i, n)
	}
	return !wait
}

// answerParked ends parked entry i's READ with the reply built in its Out
// (n bytes), removing its poll if one is in the ring.
func (q *queue) answerParked(i, n int) {
	start := q.parks.reads[i].start
	q.unpark(i, true)
	q.s.c.Metrics().Request(fusewire.OpRead, start)
	q.commit(i, n)
}

// failParked ends parked entry i's READ with errno.
func (q *queue) failParked(i int, errno syscall.Errno) {
	e := q.q.Ents[i]
	q.answerParked(i, fusewire.ErrorReply(e.Hdr, e.Out(), errno))
}

// unpark ends entry i's park: the poll, if armed, is removed (unless the
// ring is about to be closed, which cancels it); the file's wait ends.
func (q *queue) unpark(i int, removePoll bool) {
	p := &q.parks.reads[i]
	if p.armed && removePoll {
		q.q.Ring.PollRemove(pollUserData(i, p.gen), removeTag)
	}
	p.file.EndWait()
	q.mu.Lock()
	*p = parkedRead{gen: p.gen + 1}
	q.mu.Unlock()
	q.parks.count--
}

// unparkAll answers every parked READ with errno.
func (q *queue) unparkAll(errno syscall.Errno) {
	for i := range q.parks.reads {
		if q.parks.reads[i].file != nil {
			q.failParked(i, errno)
		}
	}
}

// dropParks ends the parks of a queue that stops: no reply can go
// anywhere, but each held its device in use.
func (q *queue) dropParks() {
	for i := range q.parks.reads {
		if q.parks.reads[i].file != nil {
			q.unpark(i, false)
		}
	}
}

// readNotes acts on the INTERRUPTs and revokes sent to the queue: an
// interrupted READ is answered EINTR (as go-fuse's Read would be); the
// READs of a revoked device read again, which now answers ENXIO (the
// device is dying).
func (q *queue) readNotes(notes []note) {
	for _, nt := range notes {
		for i := range q.parks.reads {
			p := &q.parks.reads[i]
			switch {
			case p.file == nil:
			case nt.device != 0 && p.file.Device() == nt.device:
				q.retry(i)
			case nt.device == 0 && p.unique == nt.unique:
				q.failParked(i, syscall.EINTR)
			}
		}
	}
}
