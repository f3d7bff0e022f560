package uring

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/internal/fusewire"
	"golang.org/x/sys/unix"
)

// queue is one FUSE queue and the thread that serves it.
//
// The thread owns everything not marked otherwise. mu guards what other
// goroutines hand the thread (replies of handed-off requests, notes,
// kicks back) and the eventfd that wakes it; the parked READs' uniques
// are written under it too, since an INTERRUPT scans them from a
// /dev/fuse reader. No lock is shared by the queues: a queue's mu is
// contended only by an INTERRUPT, a revoke or a handed-off reply.
type queue struct {
	s   *Server
	qid int
	q   *fuseuring.Queue
	in  []byte // a request as read(2) would give it, rebuilt here

	waiting   int  // entries the kernel holds, waiting for a request
	handedOff int  // entries whose request a goroutine serves
	connGone  bool // the kernel ended an entry with ENOTCONN: the connection is gone
	held      int  // handedOff+parks.count as the metric last heard

	parks parkedReads     // READs waiting for a packet (park.go)
	kicks kicker          // stranded requests (kick.go)
	early earlyInterrupts // INTERRUPTs that came before their READ (interrupt.go); guarded by mu

	// wakeFD is an eventfd that wakes the thread: a handed-off request
	// has its reply in done, a note or a kick came back, or stop was
	// asked. wakeBuf is where the ring reads its count to; wakeArmed
	// says that read is in the ring.
	wakeFD    int
	wakeBuf   []byte
	wakeArmed bool
	stopping  atomic.Bool

	mu         sync.Mutex
	done       []answer   // guarded by mu
	notes      []note     // guarded by mu
	kicksBack  []*kickOut // kicks whose thread returned; guarded by mu
	wakeClosed bool       // wakeFD is closed: a late wake must not write to its reuse; guarded by mu
}

// answer is a handed-off request's reply, n bytes in its entry's Out.
type answer struct{ entry, n int }

func newQueue(s *Server, qid int) *queue {
	return &queue{s: s, qid: qid, in: make([]byte, s.c.BufSize()), wakeBuf: make([]byte, 8),
		wakeFD: -1, kicks: kicker{lastEntry: -1}}
}

func (q *queue) wake() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.wakeLocked()
}

func (q *queue) wakeLocked() {
	if q.wakeClosed || q.wakeFD < 0 {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(q.wakeFD, one[:]) // a full counter (2^64-2) already wakes
}

// setup makes the queue's eventfd, ring and first entries, registering
// them: on the thread that will serve them, pinned to the queue's CPU.
func (q *queue) setup() error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	q.mu.Lock()
	q.wakeFD = efd
	if len(q.notes) > 0 {
		q.wakeLocked() // sent before there was an eventfd to wake
	}
	q.mu.Unlock()
	rc, err := q.s.c.Dev().SyscallConn()
	if err != nil {
		return err
	}
	var qerr error
	if err := rc.Control(func(fd uintptr) {
		// The ring holds /dev/fuse as a fixed file from here on: closing
		// the connection's fd no longer ends the connection (Stop).
		q.q, qerr = fuseuring.NewQueue(q.qid, int(fd), sqSize, q.s.payload)
	}); err != nil {
		return err
	}
	if qerr != nil {
		return qerr
	}
	for range Entries {
		if err := q.addEntry(); err != nil {
			return err
		}
	}
	q.armWake()
	if err := q.q.Ring.Enter(false); err != nil {
		return err
	}
	// A REGISTER the kernel refuses completes at once; one it takes
	// completes when a request comes. Once the last queue registers, the
	// requests the kernel held since INIT are sent: one may be here
	// already, and is served.
	var rerr error
	q.q.Ring.Reap(func(ud uint64, res int32) {
		if ud != eventUserData && res < 0 && res != -int32(unix.EINTR) && res != -int32(unix.EAGAIN) {
			if rerr == nil {
				rerr = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER, queue %d: %w", q.qid, syscall.Errno(-res))
			}
			return
		}
		q.completed(ud, res)
	})
	return rerr
}

func (q *queue) addEntry() error {
	if _, err := q.q.AddEntry(); err != nil {
		return err
	}
	q.waiting++
	return nil
}

func (q *queue) armWake() {
	if !q.wakeArmed {
		q.q.Ring.Read(q.wakeFD, q.wakeBuf, eventUserData)
		q.wakeArmed = true
	}
}

// run is the queue's thread.
func (q *queue) run(started chan<- error) {
	defer q.s.workers.Done()
	// Unpinned, the queue still serves the requests of its CPU, from
	// another; only its kicks cannot reach it (kicksReturned says so).
	_ = fuseuring.PinThread(q.qid)
	err := q.setup()
	started <- err
	if err != nil {
		q.dropParks() // a READ served during setup may have parked
		q.release(false)
		return
	}
	defer q.countHeld(0)
	log := q.s.c.Log()
	for {
		q.armWake() // before every wait: setup's reap may have taken it
		if err := q.q.Ring.Enter(true); err != nil {
			q.fail(err)
			break
		}
		q.kicks.noteSubmitted(q.q.Ring.Submitted())
		q.q.Ring.Reap(q.completed)
		q.countHeld(q.handedOff + q.parks.count)
		stopping := q.stopping.Load() // once: parks answered are parks ended
		if stopping && q.parks.count > 0 {
			// After the registry's shutdown has revoked every node (the
			// daemon's close order) none is left; in a test's lazy
			// unmount there may be: the device is going away.
			q.unparkAll(syscall.ENXIO)
			if err := q.q.Ring.Enter(false); err != nil {
				log.Error("FUSE io_uring queue", "queue", q.qid, "err", err)
			}
		}
		if q.handedOff == 0 && (stopping || q.waiting == 0 && (q.parks.count == 0 || q.connGone)) {
			break // asked to stop, or every entry is gone: the connection is
		}
		if q.kicks.due(q.handedOff + q.parks.count) {
			// Only once the entries added are in the kernel: a kick
			// that finds none free is stranded itself.
			if err := q.q.Ring.Enter(false); err != nil {
				q.fail(err)
				break
			}
			q.kicks.noteSubmitted(q.q.Ring.Submitted())
			q.kick()
		}
	}
	// A READ still parked belongs to a connection that is gone: it only
	// holds its device in use.
	q.dropParks()
	// The entries are freed only if the kernel gave every one back and no
	// goroutine still writes a reply into one.
	q.release(q.waiting == 0 && q.handedOff == 0)
}

// countHeld tells the server and the metrics how many requests the queue holds now.
func (q *queue) countHeld(n int) {
	if n != q.held {
		q.s.held.Add(int64(n - q.held))
		q.s.c.Metrics().RingHeld(n - q.held)
		q.held = n
	}
}

// fail ends the queue's loop on an error of its ring. The kernel still
// puts the requests of the queue's CPU on it, and nothing would answer
// them: every process touching the mount from that CPU would hang. So
// the whole connection is given up (Conn.End): the daemon shuts down in
// its close order, and the unmount and close abort the connection,
// which ends those requests with ENOTCONN.
func (q *queue) fail(err error) {
	err = fmt.Errorf("FUSE io_uring queue %d: %w", q.qid, err)
	log := q.s.c.Log()
	if q.stopping.Load() { // the connection is being closed anyway
		log.Error("FUSE io_uring queue", "queue", q.qid, "err", err)
		return
	}
	log.Error("FUSE io_uring queue failed; the connection is given up", "queue", q.qid, "err", err)
	q.s.c.End(err)
}

// completed handles one completion.
func (q *queue) completed(ud uint64, res int32) {
	switch {
	case ud == eventUserData:
		q.wakeArmed = false
		done, notes, back := q.takeSent()
		q.commitAnswers(done)
		q.readNotes(notes)
		q.kicksReturned(back)
		return
	case ud&pollTag != 0:
		q.polled(int(uint32(ud)), uint32(ud>>32)&genMask, res)
		return
	case ud&removeTag != 0:
		return
	}
	i := int(ud)
	switch {
	case res == 0:
		q.waiting--
		k := q.kickIn(i)
		q.kicks.fetched(i, k)
		if k != nil {
			q.serveKick(i, k)
			return
		}
		q.serve(i)
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		q.q.Retry(i) // as libfuse does
	default:
		// ENOTCONN: the connection was torn down (unmount, abort), and
		// the kernel gives the entry back for good.
		if res != -int32(unix.ENOTCONN) {
			q.s.c.Log().Debug("FUSE io_uring entry ended", "queue", q.qid, "err", syscall.Errno(-res))
		} else {
			q.connGone = true
		}
		q.waiting--
	}
}

// serve answers the request in entry i, or hands it to a goroutine.
func (q *queue) serve(i int) {
	e := q.q.Ents[i]
	in, err := e.Request(q.in)
	if err != nil {
		q.s.c.Log().Error("FUSE io_uring request", "err", err)
		q.commit(i, fusewire.ErrorReply(e.Hdr, e.Out(), syscall.EIO))
		return
	}
	n, blocked := q.s.c.ServeQueued(in, e.Out())
	switch {
	case !blocked:
		q.commit(i, n)
	case fusewire.Opcode(in) != fusewire.OpRead || !q.park(i, in):
		q.handOff(i, in)
	}
}

// commit answers entry i's request with the n bytes of reply in its Out.
func (q *queue) commit(i, n int) {
	if n < fusewire.OutHeaderSize { // every request on the ring has a reply
		n = fusewire.ErrorReply(q.q.Ents[i].Hdr, q.q.Ents[i].Out(), syscall.EIO)
	}
	q.q.Commit(i, n)
	q.waiting++
	q.s.c.Metrics().RingRequest()
}

// handOff serves the request of entry i on a goroutine of its own, which
// may block; the reply comes back through done. The entry stays out of
// the kernel meanwhile, so the queue adds one if too few are left.
func (q *queue) handOff(i int, in []byte) {
	q.mu.Lock()
	interrupted := q.early.take(fusewire.Header(in).Unique)
	q.mu.Unlock()
	if interrupted {
		q.commit(i, fusewire.ErrorReply(in, q.q.Ents[i].Out(), syscall.EINTR))
		return
	}
	// An INTERRUPT that comes from here until go-fuse has taken the
	// request in is lost (docs/transport.md, "Limits"): only READs that
	// cannot be parked are handed off, and OPENs that wait for a closing
	// holder (whose wait is bounded).
	q.handedOff++
	bp := q.s.bufs.Get().(*[]byte)
	req := append((*bp)[:0], in...)
	out := q.q.Ents[i].Out()
	q.s.workers.Add(1)
	go func() {
		defer q.s.workers.Done()
		n, _ := q.s.c.Serve(req, out, true)
		q.s.bufs.Put(bp)
		q.mu.Lock()
		q.done = append(q.done, answer{i, n})
		q.wakeLocked()
		q.mu.Unlock()
	}()
	q.grow()
}

// grow adds entries if too few are left waiting, now that an entry is
// held (handed off or parked) for as long as its request waits.
func (q *queue) grow() {
	if q.waiting >= minWaiting {
		return
	}
	// The kernel may have run out of entries before it sees the new
	// ones: a request may be stranded (kick.go).
	q.kicks.ranLow()
	// Reads that took the queue low come in a burst, which is likely to
	// go on: every request of it that finds no free entry is stranded,
	// and so is a kick sent while it lasts. So the queue grows by half
	// the entries it holds (as a slice does), at most maxGrow at a
	// time: a burst of n reads takes it low about log n times, not n.
	want := min(max(minWaiting, (q.handedOff+q.parks.count)/2), maxGrow)
	for q.waiting < want {
		if err := q.addEntry(); err != nil {
			q.s.c.Log().Error("FUSE io_uring queue cannot grow", "queue", q.qid, "entries", len(q.q.Ents), "err", err)
			return
		}
	}
}

// takeSent takes what the queue was sent since it last looked: the
// replies of handed-off requests, notes, and kicks back.
func (q *queue) takeSent() (done []answer, notes []note, back []*kickOut) {
	q.mu.Lock()
	defer q.mu.Unlock()
	done, notes, back = q.done, q.notes, q.kicksBack
	q.done, q.notes, q.kicksBack = nil, nil, nil
	return done, notes, back
}

// commitAnswers commits the replies of handed-off requests.
func (q *queue) commitAnswers(done []answer) {
	for _, a := range done {
		q.handedOff--
		q.commit(a.entry, a.n)
	}
}

// release closes the ring and the eventfd. The entries' memory is unmapped
// only if the kernel gave every entry back (clean is true: the connection
// was torn down, after a plain unmount). Otherwise the kernel may still
// fill an entry before closing the ring has cancelled it (the cancel runs
// asynchronously), so the memory stays mapped: the pages of a stopped
// queue (a lazy unmount, or a failed start) are left for the process's
// life rather than risk the kernel writing into memory reused since.
func (q *queue) release(clean bool) {
	if q.q != nil {
		q.q.Ring.Close()
		if clean {
			q.q.FreeEntries()
		}
	}
	q.mu.Lock()
	if !q.wakeClosed && q.wakeFD >= 0 {
		unix.Close(q.wakeFD)
	}
	q.wakeClosed = true
	q.mu.Unlock()
}

// send gives the queue a note and wakes it.
func (q *queue) send(nt note) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.sendLocked(nt)
}

func (q *queue) sendLocked(nt note) {
	if q.wakeClosed {
		return // the queue has stopped: nothing is parked
	}
	q.notes = append(q.notes, nt)
	q.wakeLocked()
}
