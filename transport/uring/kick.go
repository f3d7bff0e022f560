package uring

import (
	"errors"
	"slices"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/internal/fusewire"
	"golang.org/x/sys/unix"
)

// A request the kernel puts on a queue with no entry waiting is kept in
// the queue's list, and only COMMIT_AND_FETCH takes from that list: an
// entry registered later does not (fuse_uring_do_register in
// fs/fuse/dev_uring.c only adds it to the available ones). So once a
// burst took every entry, and the entries all went to READs waiting for
// packets, a request that came during the burst would wait until one of
// those READs is answered: a deadlock if it is the write their packets
// wait for. The queue adds entries as READs take them (grow), but a
// burst can still drain it between two reaps (the kernel sees a new entry
// only at the next submit). So whenever READs took the queue low, a kick
// round runs (docs/transport.md says what TestURingCarriesRequests
// measures of it): a thread on the queue's CPU asks statfs of the mount,
// a request that lands on the queue; answering it commits an entry, which
// fetches one stranded request. Kicks go on while a kick's entry got a
// request from the list after its commit (there may be more), or the
// queue ran low again since, and stop once kickEmptyEnd kicks in a row
// found nothing.
//
// A kick sent while the burst still takes every new entry is stranded
// itself, and its thread waits with the rest: so each kick has a thread
// of its own, and the queue sends another whenever it grew since the
// last one went out. The kick sent after the burst's last new entry finds
// that entry free, and its answer starts the fetching. Nothing else
// bounds the kicks out, on purpose: with a bound, a burst that stranded
// that many kicks would leave the queue unable to send the one that
// finds the new entries free. Their number is bounded all the same: one a
// round, plus one a growth (each adds two entries or more, and a queue
// grows only while READs hold its entries), so at most about half the
// READs the queue held at once. A queue with a READ or two waiting at a
// time (a ping-pong) never runs low, so it never kicks.
//
// A kick is a STATFS, not a LOOKUP: a stranded LOOKUP holds its
// directory's lock (shared), an invalidation of an entry there waits for
// it (exclusive), and every later LOOKUP in the directory, the next kick
// too, would wait behind that. statfs takes no directory lock, and the
// kernel never answers it from a cache. The queue knows its kicks by the
// sending thread's tid, which the kernel puts in the request.

// kickEmptyEnd is how many kicks in a row must find the list empty for a
// round to end (answered).
const kickEmptyEnd = 2

// kicker is a queue's state of kicks; its thread's alone.
type kicker struct {
	lowSinceAnswer bool // READs took the queue low since the last kick was answered
	lowSinceSent   bool // ... since the last kick was sent
	roundOn        bool // a round of kicks is under way
	sendNext       bool // send a kick once what is queued is submitted

	// lastEntry is the entry that answered the round's last kick (-1:
	// none); lastFetched says a request from the kernel's list came to it
	// after its commit; lastSubmitted says that commit is submitted.
	lastEntry     int
	lastFetched   bool
	lastSubmitted bool
	emptyInARow   int // kicks in a row whose commit fetched nothing

	// out are the kicks whose thread has not returned yet (some may be
	// stranded with the rest). seq numbers the kicks sent; lastCommitSeq
	// was seq when lastEntry's commit was queued: a kick numbered after
	// it was sent after that commit.
	out           []*kickOut
	seq           uint64
	lastCommitSeq uint64
	missed        int // kicks back unanswered (the first is logged)
}

// kickOut is a kick sent. Its thread stores its tid before its request
// and clears it once the request has ended (the tid may then go to
// another process's thread), and the queue's thread reads it (match);
// the rest is the queue thread's.
type kickOut struct {
	tid      atomic.Int32
	seq      uint64
	answered bool
	err      error // why the thread could not send it (set before it is back)
}

// ranLow says READs took the queue low: a request may be stranded.
func (k *kicker) ranLow() { k.lowSinceAnswer, k.lowSinceSent = true, true }

// noteSubmitted records that the ring's submit took what was queued,
// lastEntry's commit among it, if submitted.
func (k *kicker) noteSubmitted(submitted bool) { k.lastSubmitted = k.lastSubmitted || submitted }

// due says whether a kick is to be sent now; held is how many entries
// the queue's requests hold (handed off or parked).
func (k *kicker) due(held int) bool {
	if k.lowSinceAnswer && !k.roundOn && held > 0 {
		k.roundOn, k.lastEntry, k.sendNext = true, -1, true
	}
	if k.roundOn && k.lowSinceSent && k.unanswered() {
		// The queue grew after the last kick went out: that kick may
		// have found no free entry and be stranded with the rest, and
		// only a kick sent now finds the new one.
		k.sendNext = true
	}
	due := k.sendNext
	k.sendNext = false
	return due
}

// sent numbers and records a kick about to be sent.
func (k *kicker) sent() *kickOut {
	k.seq++
	o := &kickOut{seq: k.seq}
	k.out = append(k.out, o)
	k.lowSinceSent = false
	return o
}

// match returns the kick a request with opcode op from thread pid is,
// or nil if it is none of this queue's.
func (k *kicker) match(op uint32, pid uint32) *kickOut {
	if op != fusewire.OpStatfs || pid == 0 {
		// pid 0: a sender outside the daemon's pid namespace (an
		// administrator on the host running df over a container's
		// mount), never a kick in flight.
		return nil
	}
	for _, o := range k.out {
		if o.tid.Load() == int32(pid) {
			return o
		}
	}
	return nil
}

// fetched records that entry i got a request, kick o if it is one of
// ours (nil if not): if i answered the round's last kick, the request
// came from the kernel's list unless it is a kick sent after that
// commit.
func (k *kicker) fetched(i int, o *kickOut) {
	if i == k.lastEntry && (o == nil || o.seq <= k.lastCommitSeq) {
		k.lastFetched = true // a stranded kick too, not the next kick
	}
}

// answered records that kick o, in entry i, is being answered, and
// whether the round goes on: a next kick is then due (due).
func (k *kicker) answered(i int, o *kickOut) {
	o.answered = true
	// Whether the last kick's commit fetched a request is known only once
	// that commit was submitted (two kicks answered in one reap, stranded
	// ones fetched in turn, do not know it), and even then its completion
	// may come after a later kick's: so the round ends only after
	// kickEmptyEnd kicks in a row found the list empty.
	if k.lastEntry < 0 || k.lastFetched || k.lowSinceAnswer || !k.lastSubmitted {
		k.emptyInARow = 0
	} else {
		k.emptyInARow++
	}
	again := k.roundOn && k.emptyInARow < kickEmptyEnd
	k.lastEntry, k.lastFetched, k.lowSinceAnswer, k.lastSubmitted = i, false, false, false
	k.lastCommitSeq = k.seq
	if again {
		k.sendNext = true
	} else {
		k.roundOn, k.lastEntry, k.emptyInARow = false, -1, 0
	}
}

// returned takes in a kick whose thread returned, and reports whether it
// missed: the queue did not answer it, so it went elsewhere, unless the
// connection ended under it. Its thread
// could not run on the queue's CPU, or the mountpoint no longer leads to
// the mount (a lazy unmount, a mount over it): no kick of this queue can
// reach it then, so the round ends until the queue runs low again.
func (k *kicker) returned(o *kickOut) (missed bool) {
	k.out = slices.DeleteFunc(k.out, func(x *kickOut) bool { return x == o })
	if o.answered {
		return false
	}
	k.roundOn, k.lastEntry, k.emptyInARow, k.sendNext = false, -1, 0, false
	k.lowSinceAnswer, k.lowSinceSent = false, false
	if connEnded(o.err) {
		// Not a miss: the connection was aborted under it, and no
		// request will be stranded on a connection that is gone.
		return false
	}
	k.missed++
	return true
}

// connEnded says whether a kick's statfs failed because the connection
// ended: ENOTCONN once it is aborted, ECONNABORTED while the kernel
// tears its queues down.
func connEnded(err error) bool {
	return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED)
}

// unanswered says whether a kick sent is not answered yet.
func (k *kicker) unanswered() bool {
	return slices.ContainsFunc(k.out, func(o *kickOut) bool { return !o.answered })
}

// kick sends a kick from a thread of its own.
func (q *queue) kick() {
	o := q.kicks.sent()
	q.s.workers.Add(1) // the queue's thread holds one: never from zero
	go q.sendKick(o)
}

// sendKick sends kick o from the queue's CPU, and tells the queue when
// it returns (kicksBack). The thread stays locked when the goroutine
// returns, so the runtime ends it rather than reuse a thread pinned to
// one CPU.
func (q *queue) sendKick(o *kickOut) {
	defer q.s.workers.Done()
	if err := fuseuring.PinThread(q.qid); err != nil {
		// The CPU is not the daemon's to run on (a cpuset, taskset,
		// systemd's CPUAffinity=) or went offline: the kick would land
		// on another queue.
		o.err = err
	} else {
		o.tid.Store(int32(unix.Gettid()))
		var st unix.Statfs_t
		err := unix.Statfs(q.s.dir, &st) // answered by the queue (serveKick)
		o.tid.Store(0)
		if err != nil && !errors.Is(err, syscall.EAGAIN) {
			// The queue answers its kicks EAGAIN. Anything else came
			// from elsewhere: ENOTCONN from an aborted connection, or
			// the errno of whatever is mounted there now.
			o.err = err
		}
	}
	q.mu.Lock()
	q.kicksBack = append(q.kicksBack, o)
	q.wakeLocked()
	q.mu.Unlock()
}

// kickIn says whether entry i holds one of this queue's kicks, and which.
func (q *queue) kickIn(i int) *kickOut {
	h := fusewire.Header(q.q.Ents[i].Hdr)
	return q.kicks.match(h.Opcode, h.Pid)
}

// serveKick answers kick o in entry i, and sends the next one if the
// round goes on.
func (q *queue) serveKick(i int, o *kickOut) {
	e := q.q.Ents[i]
	q.kicks.answered(i, o)
	q.s.c.Metrics().RingKick(true)
	q.commit(i, fusewire.ErrorReply(e.Hdr, e.Out(), syscall.EAGAIN)) // the kick's thread expects it
}

// kicksReturned takes in the kicks whose thread returned. One the queue
// did not answer is counted missed and ends the round, and the first
// is logged.
func (q *queue) kicksReturned(back []*kickOut) {
	for _, o := range back {
		if !q.kicks.returned(o) {
			continue
		}
		q.s.c.Metrics().RingKick(false)
		if q.kicks.missed == 1 {
			err := o.err
			if err == nil {
				err = errors.New("its statfs of " + q.s.dir + " did not reach the queue")
			}
			q.s.c.Log().Warn("FUSE io_uring queue cannot send kicks: a request stranded there waits until a request on the queue is answered",
				"queue", q.qid, "err", err)
		}
	}
}
