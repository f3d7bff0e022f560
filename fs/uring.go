package fs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// IOURing says whether a mount carries its requests over FUSE-over-io_uring
// (internal/fuseuring) instead of read(2) and write(2) on /dev/fuse.
type IOURing int

const (
	// IOURingOff never asks for it: the default, because of the
	// stranded-request limit (kick).
	IOURingOff IOURing = iota
	// IOURingAuto uses io_uring when the kernel offers it in INIT, which
	// it does while the fuse module's enable_uring is Y.
	IOURingAuto
	// IOURingOn requires it: the mount fails where it cannot be had.
	IOURingOn
)

var iouringNames = [...]string{IOURingOff: "off", IOURingAuto: "auto", IOURingOn: "on"}

// MarshalText gives auto, off or on.
func (u IOURing) MarshalText() ([]byte, error) {
	if int(u) < 0 || int(u) >= len(iouringNames) {
		return nil, fmt.Errorf("io-uring: bad mode %d", int(u))
	}
	return []byte(iouringNames[u]), nil
}

// UnmarshalText parses auto, off or on.
func (u *IOURing) UnmarshalText(b []byte) error {
	for i, n := range iouringNames {
		if string(b) == n {
			*u = IOURing(i)
			return nil
		}
	}
	return fmt.Errorf("%q is not auto, on or off", b)
}

// Sizing of the queues. The kernel wants a payload buffer per entry of at
// least max(8 KiB, max_write, max_pages pages); go-fuse asks for max_pages
// to cover maxWrite.
const (
	ringPayload = maxWrite
	// ringEntries is the number of entries a queue starts with. An entry
	// is busy while its request is served; a READ waiting for a packet
	// keeps its entry until the packet comes (the reply must go back
	// through it), so a queue adds entries while fewer than
	// ringMinWaiting wait for a request: a request the kernel puts on a
	// queue with none waits there, whatever the other queues have.
	ringEntries    = 8
	ringMinWaiting = 2
	ringMaxGrow    = 32 // entries added at once (grow)
	ringSQSize     = 64 // commands submitted at once, not an entry bound
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

// uringServer carries the transport's requests over one FUSE queue per
// possible CPU, each served by a thread of its own pinned to its CPU.
// A request is served on its queue's thread. A READ of a device that must
// wait for a packet is parked (park): the queue polls the device's fd in
// its own ring and answers the READ when the fd turns readable, so the
// queue goes on serving the write that will bring the packet, and no
// other thread is woken on the way. Any other READ the fast path does not
// take is handed to a goroutine, as the classic loop hands it to a reader
// of its own.
// /dev/fuse keeps its classic readers: FORGET and INTERRUPT still come
// over read(2), and so does everything before the ring is ready.
type uringServer struct {
	t      *transport
	queues []*uringQueue
	served atomic.Uint64 // requests answered through a ring
	parked atomic.Uint64 // READs parked (as the metric, for tests)
}

// uringQueue is one queue. Its thread owns q, in, parks and the counts;
// mu guards done, which handoff goroutines append to, notes, kicksBack,
// the eventfd and early; the parks slice and its uniques are written
// under it too, as interrupt scans them from a /dev/fuse reader. No lock is shared by
// the queues: a queue's mu is contended only by an INTERRUPT, a revoke
// or a handed-off reply.
type uringQueue struct {
	s   *uringServer
	qid int
	q   *fuseuring.Queue
	in  []byte // a request as read(2) would give it, rebuilt here

	waiting   int          // entries the kernel holds, waiting for a request
	handedOff int          // entries whose request a goroutine serves
	nParked   int          // entries whose READ is parked
	entries   atomic.Int32 // len(q.Ents), for readers outside the thread
	holding   atomic.Int32 // handedOff+nParked as of the last wait, for tests

	// parks[i] is entry i's parked READ, if any (park).
	parks []parkedRead

	// efd wakes the thread: a handed-off request has its reply in done,
	// or stop was asked. efdBuf is where the ring reads the count to.
	// efd is written under mu, and closed under it (efdClosed): a late
	// wake must not write to whatever fd reuses the number.
	efd      int
	efdBuf   []byte
	efdArmed bool
	stopping atomic.Bool

	mu        sync.Mutex
	done      []answer // guarded by mu
	notes     []note   // guarded by mu
	efdClosed bool     // guarded by mu

	// early keeps INTERRUPTs that found their request nowhere. The kernel
	// sends an INTERRUPT once: answered EAGAIN it is queued again only for
	// a request read from /dev/fuse (fuse_dev_do_write looks for it there,
	// not among the rings'). One that finds neither a parked READ nor a
	// request go-fuse serves came between a READ's arrival on its queue
	// and its park (or handoff): the READ checks early as it parks.
	// Guarded by mu; uniques are never reused, so stale ones do no harm.
	early  [16]uint64
	earlyI int // the next slot of early to fill

	// Stranded requests (see kick): low says the queue ran low on
	// entries since the last kick was answered, lowSent since the last
	// one was sent; kicking, that a round of kicks is under way;
	// kickEnt is the entry that answered the round's last kick (-1 none)
	// and kickGot says a request from the kernel's list came to it after.
	low       bool
	lowSent   bool
	torn      bool // the kernel ended an entry with ENOTCONN: the connection is gone
	kicking   bool
	kickEnt   int
	kickGot   bool
	kickSent  bool // kickEnt's commit is submitted (see serveKick)
	kickEmpty int  // kicks in a row whose commit fetched nothing
	kickNext  bool // send a kick once what is queued is submitted
	// kicksOut are the kicks whose thread has not returned yet (some
	// may be stranded with the rest). kickSeq numbers the kicks sent;
	// kickCommitSeq was kickSeq when kickEnt's commit was queued: a kick
	// numbered after it was sent after that commit.
	kicksOut      []*kickOut
	kickSeq       uint64
	kickCommitSeq uint64
	kicks         atomic.Int32 // kicks answered, for tests
	kicksMissed   atomic.Int32 // kicks back unanswered (the first is logged)
	kicksBack     []*kickOut   // kicks whose thread returned; guarded by mu
}

// kickOut is a kick sent (kick). Its thread stores its tid before its
// request and clears it once the request has ended (the tid may then go
// to another process's thread), and the queue's thread reads it
// (kickIn); the rest is the queue thread's.
type kickOut struct {
	tid      atomic.Int32
	seq      uint64
	answered bool
	err      error // why the thread could not send it (set before it is back)
}

// answer is a handed-off request's reply, n bytes in its entry's Out.
type answer struct{ i, n int }

// note tells a queue of an INTERRUPT for a parked READ (unique), or of a
// revoked node (node), whose parked READs must end.
type note struct {
	unique uint64
	node   *devnode.Node
}

// parkedRead is a READ waiting in the ring for its device's fd. The
// queue's thread owns it; the slice and unique are written under the
// queue's mu (interrupt reads them). While
// parked it is an in-flight operation of its node (Enter), as a blocked
// Read would be, so a destroy's drain waits for it; the revoke hook ends
// it (revoked).
type parkedRead struct {
	h      *handle
	fd     int
	size   int
	gen    uint32 // bumped by every park and unpark: tells stale polls
	armed  bool   // a poll of fd is in the ring
	unique uint64 // the READ's, 0 when none is parked; written under mu
	start  time.Time
}

// startURing starts the queues after INIT was answered with
// FUSE_OVER_IO_URING, and returns once every queue has registered its
// entries (the ring is then ready) or one failed.
func (t *transport) startURing() error {
	nq, err := fuseuring.PossibleCPUs()
	if err != nil {
		return fmt.Errorf("io_uring queues: %w", err)
	}
	s := &uringServer{t: t}
	for qid := range nq {
		s.queues = append(s.queues, &uringQueue{s: s, qid: qid, in: make([]byte, t.bufSize), efdBuf: make([]byte, 8),
			efd: -1, kickEnt: -1})
	}
	// Published before any queue serves a request: a revoke or INTERRUPT
	// for a READ parked in one must find it.
	t.uring.Store(s)
	errs := make(chan error, nq)
	for _, uq := range s.queues {
		t.readers.Add(1)
		go uq.run(errs)
	}
	for range nq {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		s.stop()
	}
	return err
}

// stop asks every queue's thread to end, once its handed-off requests
// are answered.
func (s *uringServer) stop() {
	for _, uq := range s.queues {
		uq.stopping.Store(true)
		uq.wake()
	}
}

func (uq *uringQueue) wake() {
	uq.mu.Lock()
	defer uq.mu.Unlock()
	uq.wakeLocked()
}

func (uq *uringQueue) wakeLocked() {
	if uq.efdClosed || uq.efd < 0 {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(uq.efd, one[:]) // a full counter (2^64-2) already wakes
}

// setup makes the queue's eventfd, ring and first entries, registering
// them: on the thread that will serve them, pinned to the queue's CPU.
func (uq *uringQueue) setup() error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	uq.mu.Lock()
	uq.efd = efd
	if len(uq.notes) > 0 {
		uq.wakeLocked() // sent before there was an eventfd to wake
	}
	uq.mu.Unlock()
	rc, err := uq.s.t.dev.SyscallConn()
	if err != nil {
		return err
	}
	var qerr error
	if err := rc.Control(func(fd uintptr) {
		// The ring holds /dev/fuse as a fixed file from here on: closing
		// the transport's fd no longer ends the connection (Close).
		uq.q, qerr = fuseuring.NewQueue(uq.qid, int(fd), ringSQSize, ringPayload)
	}); err != nil {
		return err
	}
	if qerr != nil {
		return qerr
	}
	for range ringEntries {
		if err := uq.addEntry(); err != nil {
			return err
		}
	}
	uq.armWake()
	if err := uq.q.Ring.Enter(false); err != nil {
		return err
	}
	// A REGISTER the kernel refuses completes at once; one it takes
	// completes when a request comes. Once the last queue registers, the
	// requests the kernel held since INIT are sent: one may be here
	// already, and is served.
	var rerr error
	uq.q.Ring.Reap(func(ud uint64, res int32) {
		if ud != eventUserData && res < 0 && res != -int32(unix.EINTR) && res != -int32(unix.EAGAIN) {
			if rerr == nil {
				rerr = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER, queue %d: %w", uq.qid, syscall.Errno(-res))
			}
			return
		}
		uq.completed(ud, res)
	})
	return rerr
}

func (uq *uringQueue) addEntry() error {
	i, err := uq.q.AddEntry()
	if err != nil {
		return err
	}
	uq.waiting++
	uq.entries.Store(int32(i + 1))
	return nil
}

func (uq *uringQueue) armWake() {
	if !uq.efdArmed {
		uq.q.Ring.Read(uq.efd, uq.efdBuf, eventUserData)
		uq.efdArmed = true
	}
}

// run is the queue's thread.
func (uq *uringQueue) run(started chan<- error) {
	defer uq.s.t.readers.Done()
	// Unpinned, the queue still serves the requests of its CPU, from
	// another; only its kicks cannot reach it (kicksReturned says so).
	_ = fuseuring.PinThread(uq.qid)
	err := uq.setup()
	started <- err
	if err != nil {
		uq.dropParks() // a READ served during setup may have parked
		uq.release(false)
		return
	}
	log := uq.s.t.log
	for {
		uq.armWake() // before every wait: setup's reap may have taken it
		if err := uq.enter(true); err != nil {
			uq.fail(err)
			break
		}
		uq.kickSent = uq.kickSent || uq.q.Ring.Submitted()
		uq.q.Ring.Reap(uq.completed)
		uq.holding.Store(int32(uq.handedOff + uq.nParked))
		stopping := uq.stopping.Load() // once: parks answered are parks ended
		if stopping && uq.nParked > 0 {
			// After the registry's shutdown has revoked every node (the
			// daemon's close order) none is left; in a test's lazy
			// unmount there may be: the device is going away.
			uq.unparkAll(syscall.ENXIO)
			if err := uq.enter(false); err != nil {
				log.Error("FUSE io_uring queue", "queue", uq.qid, "err", err)
			}
		}
		if uq.handedOff == 0 && (stopping || uq.waiting == 0 && (uq.nParked == 0 || uq.torn)) {
			break // asked to stop, or every entry is gone: the connection is
		}
		if uq.low && !uq.kicking && uq.handedOff+uq.nParked > 0 {
			uq.kicking, uq.kickEnt, uq.kickNext = true, -1, true
		}
		if uq.kicking && uq.lowSent && uq.kickUnanswered() {
			// The queue grew after the last kick went out: that kick
			// may have found no free entry and be stranded with the
			// rest, and only a kick sent now finds the new one.
			uq.kickNext = true
		}
		if uq.kickNext {
			// Only once the entries added are in the kernel: a kick
			// that finds none free is stranded itself.
			uq.kickNext = false
			if err := uq.enter(false); err != nil {
				uq.fail(err)
				break
			}
			uq.kickSent = uq.kickSent || uq.q.Ring.Submitted()
			uq.kick()
		}
	}
	// A READ still parked belongs to a connection that is gone: it only
	// holds its node in flight.
	uq.dropParks()
	// The entries are freed only if the kernel gave every one back and no
	// goroutine still writes a reply into one.
	uq.release(uq.waiting == 0 && uq.handedOff == 0)
}

// ringFault, when set (tests only), is asked before each io_uring_enter of
// a queue for an error to fail with, as if the ring had broken.
var ringFault atomic.Pointer[func(qid int) error]

// enter submits, and waits if wait (fuseuring.Ring.Enter).
func (uq *uringQueue) enter(wait bool) error {
	if f := ringFault.Load(); f != nil {
		if err := (*f)(uq.qid); err != nil {
			return err
		}
	}
	return uq.q.Ring.Enter(wait)
}

// fail ends the queue's loop on an error of its ring. The kernel still
// puts the requests of the queue's CPU on it, and nothing would answer
// them: every process touching the mount from that CPU would hang. So
// the whole connection is given up (Mount.Done): the daemon shuts down
// in its close order, and the unmount and Close abort the connection,
// which ends those requests with ENOTCONN.
func (uq *uringQueue) fail(err error) {
	err = fmt.Errorf("FUSE io_uring queue %d: %w", uq.qid, err)
	if uq.stopping.Load() { // the connection is being closed anyway
		uq.s.t.log.Error("FUSE io_uring queue", "queue", uq.qid, "err", err)
		return
	}
	uq.s.t.log.Error("FUSE io_uring queue failed; the connection is given up", "queue", uq.qid, "err", err)
	uq.s.t.end(err)
}

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
// fetches one stranded request. Kicks go on while a kick's entry got a request
// from the list after its commit (there may be more), or the queue ran
// low again since, and stop once kickEmptyEnd kicks in a row found
// nothing.
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
// READs the queue held at once (TestURingCarriesRequests saw at most 10
// out with 2,051 READs). A queue with a READ or two waiting at a time (a
// ping-pong) never runs low, so it never kicks.
//
// A kick is a STATFS, not a LOOKUP: a stranded LOOKUP holds its
// directory's lock (shared), an invalidation of an entry there waits for
// it (exclusive), and every later LOOKUP in the directory, the next kick
// too, would wait behind that. statfs takes no directory lock, and
// the kernel never answers it from a cache. The queue knows its kicks by
// the sending thread's tid, which the kernel puts in the request.
func (uq *uringQueue) kick() {
	uq.kickSeq++
	k := &kickOut{seq: uq.kickSeq}
	uq.kicksOut = append(uq.kicksOut, k)
	uq.lowSent = false
	uq.s.t.readers.Add(1) // the queue's thread holds one: never from zero
	go uq.sendKick(k)
}

// kickEmptyEnd is how many kicks in a row must find the list empty for a
// round to end (serveKick).
const kickEmptyEnd = 2

// sendKick sends kick k from the queue's CPU, and tells the queue when
// it returns (kickBack). The thread stays locked when the goroutine
// returns, so the runtime ends it rather than reuse a thread pinned to
// one CPU.
func (uq *uringQueue) sendKick(k *kickOut) {
	defer uq.s.t.readers.Done()
	if err := fuseuring.PinThread(uq.qid); err != nil {
		// The CPU is not the daemon's to run on (a cpuset, taskset,
		// systemd's CPUAffinity=) or went offline: the kick would land
		// on another queue.
		k.err = err
	} else {
		k.tid.Store(int32(unix.Gettid()))
		var st unix.Statfs_t
		_ = unix.Statfs(uq.s.t.dir, &st) // answered by the queue (serveKick)
		k.tid.Store(0)
	}
	uq.mu.Lock()
	uq.kicksBack = append(uq.kicksBack, k)
	uq.wakeLocked()
	uq.mu.Unlock()
}

// kickIn says whether entry i holds one of this queue's kicks, and which.
func (uq *uringQueue) kickIn(i int) *kickOut {
	const opStatfs = 17
	e := uq.q.Ents[i]
	if e.Op() != opStatfs || len(uq.kicksOut) == 0 {
		return nil
	}
	pid := int32(binary.NativeEndian.Uint32(e.Hdr[32:])) // fuse_in_header.pid: the sender's tid
	if pid == 0 {
		// A sender outside the daemon's pid namespace (an administrator
		// on the host running df over a container's mount), or a kick
		// not sent or already over: never a kick in flight.
		return nil
	}
	for _, k := range uq.kicksOut {
		if k.tid.Load() == pid {
			return k
		}
	}
	return nil
}

// kicksReturned takes in the kicks whose thread returned. One the queue
// did not answer went elsewhere: its thread could not run on the queue's
// CPU, or the mountpoint no longer leads to the mount (a lazy unmount,
// a mount over it). No kick of this queue can reach it then, so the
// round ends, and the log says so, once.
func (uq *uringQueue) kicksReturned(back []*kickOut) {
	for _, k := range back {
		uq.kicksOut = slices.DeleteFunc(uq.kicksOut, func(o *kickOut) bool { return o == k })
		if k.answered {
			continue
		}
		if uq.kicksMissed.Add(1) == 1 {
			err := k.err
			if err == nil {
				err = errors.New("its statfs of " + uq.s.t.dir + " did not reach the queue")
			}
			uq.s.t.log.Warn("FUSE io_uring queue cannot send kicks: a request stranded there waits until a request on the queue is answered",
				"queue", uq.qid, "err", err)
		}
		// Another round starts only when the queue runs low again.
		uq.kicking, uq.kickEnt, uq.kickEmpty, uq.kickNext = false, -1, 0, false
		uq.low, uq.lowSent = false, false
	}
}

// kickUnanswered says whether a kick sent is not answered yet.
func (uq *uringQueue) kickUnanswered() bool {
	return slices.ContainsFunc(uq.kicksOut, func(k *kickOut) bool { return !k.answered })
}

// fromList says whether the request entry i got came from the kernel's
// list (see kick): anything but a kick sent after the entry's commit.
func (uq *uringQueue) fromList(i int) bool {
	k := uq.kickIn(i)
	return k == nil || k.seq <= uq.kickCommitSeq
}

// serveKick answers a kick, and sends the next one if the last one's
// entry got a request from the list (see kick).
func (uq *uringQueue) serveKick(i int, k *kickOut) {
	e := uq.q.Ents[i]
	uq.kicks.Add(1)
	k.answered = true
	// Whether the last kick's commit fetched a request is known only once
	// that commit was submitted (two kicks answered in one reap, stranded
	// ones fetched in turn, do not know it), and even then its completion
	// may come after a later kick's: so the round ends only after
	// kickEmptyEnd kicks in a row found the list empty.
	if uq.kickEnt < 0 || uq.kickGot || uq.low || !uq.kickSent {
		uq.kickEmpty = 0
	} else {
		uq.kickEmpty++
	}
	again := uq.kicking && uq.kickEmpty < kickEmptyEnd
	uq.kickEnt, uq.kickGot, uq.low, uq.kickSent = i, false, false, false
	uq.kickCommitSeq = uq.kickSeq
	uq.commit(i, errorReply(e.Hdr, e.Out(), syscall.EAGAIN)) // the kick's thread ignores it
	if again {
		uq.kickNext = true
	} else {
		uq.kicking, uq.kickEnt, uq.kickEmpty = false, -1, 0
	}
}

// completed handles one completion.
func (uq *uringQueue) completed(ud uint64, res int32) {
	switch {
	case ud == eventUserData:
		uq.efdArmed = false
		done, notes, back := uq.takeSent()
		uq.commitAnswers(done)
		uq.readNotes(notes)
		uq.kicksReturned(back)
		return
	case ud&pollTag != 0:
		uq.polled(int(uint32(ud)), uint32(ud>>32)&genMask, res)
		return
	case ud&removeTag != 0:
		return
	}
	i := int(ud)
	switch {
	case res == 0:
		uq.waiting--
		if i == uq.kickEnt && uq.fromList(i) {
			uq.kickGot = true // a stranded kick too, not the next kick
		}
		if k := uq.kickIn(i); k != nil {
			uq.serveKick(i, k)
			return
		}
		uq.serve(i)
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		uq.q.Retry(i) // as libfuse does
	default:
		// ENOTCONN: the connection was torn down (unmount, abort), and
		// the kernel gives the entry back for good.
		if res != -int32(unix.ENOTCONN) {
			uq.s.t.log.Debug("FUSE io_uring entry ended", "queue", uq.qid, "err", syscall.Errno(-res))
		} else {
			uq.torn = true
		}
		uq.waiting--
	}
}

// serve answers the request in entry i, or hands it to a goroutine.
func (uq *uringQueue) serve(i int) {
	t := uq.s.t
	e := uq.q.Ents[i]
	in, err := e.Request(uq.in)
	if err != nil {
		t.log.Error("FUSE io_uring request", "err", err)
		uq.commit(i, errorReply(e.Hdr, e.Out(), syscall.EIO))
		return
	}
	n, blocked := t.serveQueued(in, e.Out())
	switch {
	case !blocked:
		uq.commit(i, n)
	case binary.NativeEndian.Uint32(in[4:]) != opRead || !uq.park(i, in):
		uq.handOff(i, in)
	}
}

func (uq *uringQueue) commit(i, n int) {
	if n < 16 { // every request on the ring has a reply
		n = errorReply(uq.q.Ents[i].Hdr, uq.q.Ents[i].Out(), syscall.EIO)
	}
	uq.q.Commit(i, n)
	uq.waiting++
	uq.s.served.Add(1)
	uq.s.t.metrics.RingRequest()
}

// handOff serves the request of entry i on a goroutine of its own, which
// may block; the reply comes back through done. The entry stays out of
// the kernel meanwhile, so the queue adds one if too few are left.
func (uq *uringQueue) handOff(i int, in []byte) {
	t := uq.s.t
	uq.mu.Lock()
	interrupted := len(in) >= inHeaderLen && uq.takeEarlyLocked(binary.NativeEndian.Uint64(in[8:]))
	uq.mu.Unlock()
	if interrupted {
		uq.commit(i, errorReply(in, uq.q.Ents[i].Out(), syscall.EINTR))
		return
	}
	// An INTERRUPT that comes from here until go-fuse has taken the
	// request in is lost (docs/transport.md, "Limits"): only READs that
	// cannot be parked are handed off, and OPENs that wait for a closing
	// holder (whose wait is bounded).
	uq.handedOff++
	bp := t.bufs.Get().(*[]byte)
	req := append((*bp)[:0], in...)
	out := uq.q.Ents[i].Out()
	t.readers.Add(1)
	go func() {
		defer t.readers.Done()
		n, _ := t.serve(req, out, true)
		t.bufs.Put(bp)
		uq.mu.Lock()
		uq.done = append(uq.done, answer{i, n})
		uq.wakeLocked()
		uq.mu.Unlock()
	}()
	uq.grow()
}

// grow adds entries if too few are left waiting, now that an entry is
// held (handed off or parked) for as long as its READ waits.
func (uq *uringQueue) grow() {
	t := uq.s.t
	if uq.waiting >= ringMinWaiting {
		return
	}
	// The kernel may have run out of entries before it sees the new
	// ones: a request may be stranded (kick).
	uq.low, uq.lowSent = true, true
	// Reads that took the queue low come in a burst, which is likely to
	// go on: every request of it that finds no free entry is stranded,
	// and so is a kick sent while it lasts. So the queue grows by half
	// the entries it holds (as a slice does), at most ringMaxGrow at a
	// time: a burst of n reads takes it low about log n times, not n.
	want := min(max(ringMinWaiting, (uq.handedOff+uq.nParked)/2), ringMaxGrow)
	for uq.waiting < want {
		if err := uq.addEntry(); err != nil {
			t.log.Error("FUSE io_uring queue cannot grow", "queue", uq.qid, "entries", len(uq.q.Ents), "err", err)
			return
		}
	}
}

// takeSent takes what the queue was sent since it last looked: the
// replies of handed-off requests, notes, and kicks back.
func (uq *uringQueue) takeSent() (done []answer, notes []note, back []*kickOut) {
	uq.mu.Lock()
	defer uq.mu.Unlock()
	done, notes, back = uq.done, uq.notes, uq.kicksBack
	uq.done, uq.notes, uq.kicksBack = nil, nil, nil
	return done, notes, back
}

// commitAnswers commits the replies of handed-off requests.
func (uq *uringQueue) commitAnswers(done []answer) {
	for _, a := range done {
		uq.handedOff--
		uq.commit(a.i, a.n)
	}
}

// release closes the ring and the eventfd. The entries' memory is unmapped
// only if the kernel gave every entry back (clean is true: the connection
// was torn down, after a plain unmount). Otherwise the kernel may still
// fill an entry before closing the ring has cancelled it (the cancel runs
// asynchronously), so the memory stays mapped: the pages of a stopped
// queue (a lazy unmount, or a failed start) are left for the process's
// life rather than risk the kernel writing into memory reused since.
func (uq *uringQueue) release(clean bool) {
	if uq.q != nil {
		uq.q.Ring.Close()
		if clean {
			uq.q.FreeEntries()
		}
	}
	uq.mu.Lock()
	if !uq.efdClosed && uq.efd >= 0 {
		unix.Close(uq.efd)
	}
	uq.efdClosed = true
	uq.mu.Unlock()
}

// probeURing checks, before a mount asks the kernel for FUSE over
// io_uring, what would keep its queues from starting: io_uring itself
// may be off (the kernel.io_uring_disabled sysctl) or forbidden
// (seccomp, as container runtimes often do).
func probeURing() error {
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

// ringServed is the number of requests answered through the rings.
func (t *transport) ringServed() uint64 {
	if s := t.uring.Load(); s != nil {
		return s.served.Load()
	}
	return 0
}

// initAsksURing says whether the INIT reply out asks for FUSE over
// io_uring (go-fuse sets it when asked to and the kernel offered it).
func initAsksURing(out []byte) bool {
	const flags2 = 16 + 32 // struct fuse_init_out's flags2, after the out header
	return len(out) >= flags2+4 && binary.NativeEndian.Uint32(out[flags2:])&uint32(fuse.CAP_OVER_IO_URING>>32) != 0
}

var errNoURing = errors.New("the kernel does not offer FUSE over io_uring")

// park parks the blocking READ in entry i (in is its request) if its
// file is a device handle whose device has an fd to wait for
// (devnode.ReadWaiter): a poll of the fd goes into the ring, and polled
// answers the READ once a packet is there. The READ is an in-flight
// operation of its node while parked. It reports false if the READ is
// not for parking (go-fuse's Read serves it, on a goroutine).
func (uq *uringQueue) park(i int, in []byte) bool {
	t := uq.s.t
	if !t.fast || len(in) < readInLen {
		return false
	}
	ne := binary.NativeEndian
	h := t.fhs.get(ne.Uint64(in[40:]))
	size := int(ne.Uint32(in[56:]))
	if h == nil || 16+size > len(uq.q.Ents[i].Out()) {
		return false
	}
	w, ok := h.node.Device().(devnode.ReadWaiter)
	if !ok {
		return false
	}
	if h.node.Enter() != nil {
		return false // dying: Read answers ENXIO
	}
	fd := w.ReadFD()
	if fd < 0 {
		h.node.Exit()
		return false
	}
	unique := ne.Uint64(in[8:])
	if hook := parkHook.Load(); hook != nil {
		(*hook)()
	}
	uq.mu.Lock() // interrupt reads parks
	for len(uq.parks) <= i {
		uq.parks = append(uq.parks, parkedRead{})
	}
	p := &uq.parks[i]
	p.gen++
	p.h, p.fd, p.size, p.start = h, fd, size, time.Now()
	p.unique = unique
	interrupted := uq.takeEarlyLocked(unique)
	uq.mu.Unlock()
	uq.nParked++
	uq.s.parked.Add(1)
	t.metrics.RingParked()
	if interrupted {
		uq.failParked(i, syscall.EINTR)
		return true
	}
	uq.arm(i)
	uq.grow()
	return true
}

// parkHook, if set, runs in park before the READ is registered: tests
// widen the window in which an INTERRUPT finds the READ not yet parked.
var parkHook atomic.Pointer[func()]

// arm queues the poll of parked entry i's fd. A packet queued before the
// poll is armed is not missed: the poll checks readiness as it arms.
func (uq *uringQueue) arm(i int) {
	p := &uq.parks[i]
	p.armed = true
	uq.q.Ring.PollAdd(p.fd, unix.POLLIN, pollUserData(i, p.gen))
}

// polled handles the completion of parked entry i's poll (res: revents,
// or an error): a packet, or the error that ends the READ (an interface
// deleted: POLLERR), is read into the entry's reply; a wake that found
// no packet (another reader took it) polls again.
func (uq *uringQueue) polled(i int, gen uint32, res int32) {
	if i >= len(uq.parks) || uq.parks[i].h == nil || uq.parks[i].gen&genMask != gen {
		return // a park that has ended since (its poll was removed)
	}
	uq.parks[i].armed = false
	if res >= 0 {
		if uq.readParked(i) {
			return
		}
		if res&(pollErr|pollHup|pollNval) == 0 {
			uq.arm(i) // another reader took the packet
			return
		}
	}
	// The fd cannot be waited for here: the poll failed, or reports an
	// error while a read finds nothing (a tun whose interface is being
	// unregistered), which would wake every poll at once. Serve the READ
	// as the /dev/fuse loop does: the device's Read, on a goroutine,
	// finds out what happened (and schedules the node's destroy).
	uq.s.t.log.Warn("FUSE io_uring: a parked READ's poll failed; served on a goroutine", "queue", uq.qid, "res", res)
	e := uq.q.Ents[i]
	uq.unpark(i, false)
	in, err := e.Request(uq.in)
	if err != nil {
		uq.commit(i, errorReply(e.Hdr, e.Out(), syscall.EIO))
		return
	}
	uq.handOff(i, in)
}

// retry reads for parked entry i: its reply is committed, unless there is
// still no packet (then it polls again).
func (uq *uringQueue) retry(i int) {
	if !uq.readParked(i) && !uq.parks[i].armed {
		uq.arm(i)
	}
}

// readParked reads for parked entry i and answers it with the packet or
// the error; it reports false, answering nothing, if there is no packet.
func (uq *uringQueue) readParked(i int) bool {
	p, e := &uq.parks[i], uq.q.Ents[i]
	n, wait := readReply(p.h, e.Hdr, e.Out(), p.size, false)
	if !wait {
		uq.answerParked(i, n)
	}
	return !wait
}

// answerParked ends parked entry i's READ with the reply built in its Out
// (n bytes), removing its poll if one is in the ring.
func (uq *uringQueue) answerParked(i, n int) {
	start := uq.parks[i].start
	uq.unpark(i, true)
	uq.s.t.metrics.Request(opRead, start)
	uq.commit(i, n)
}

// failParked ends parked entry i's READ with errno.
func (uq *uringQueue) failParked(i int, errno syscall.Errno) {
	e := uq.q.Ents[i]
	uq.answerParked(i, errorReply(e.Hdr, e.Out(), errno))
}

// unpark ends entry i's park: the poll, if armed, is removed (unless the
// ring is about to be closed, which cancels it); the node's in-flight
// operation ends.
func (uq *uringQueue) unpark(i int, removePoll bool) {
	p := &uq.parks[i]
	if p.armed && removePoll {
		uq.q.Ring.PollRemove(pollUserData(i, p.gen), removeTag)
	}
	p.h.node.Exit()
	uq.mu.Lock()
	*p = parkedRead{gen: p.gen + 1}
	uq.mu.Unlock()
	uq.nParked--
}

// unparkAll answers every parked READ with errno.
func (uq *uringQueue) unparkAll(errno syscall.Errno) {
	for i := range uq.parks {
		if uq.parks[i].h != nil {
			uq.failParked(i, errno)
		}
	}
}

// dropParks ends the parks of a queue that stops: no reply can go
// anywhere, but each held its node in flight.
func (uq *uringQueue) dropParks() {
	for i := range uq.parks {
		if uq.parks[i].h != nil {
			uq.unpark(i, false)
		}
	}
}

// readNotes acts on the INTERRUPTs and revokes sent to the queue: an
// interrupted READ is answered EINTR (as go-fuse's Read would be); the
// READs of a revoked node read again, which now answers ENXIO (the node
// is dying).
func (uq *uringQueue) readNotes(notes []note) {
	for _, nt := range notes {
		for i := range uq.parks {
			p := &uq.parks[i]
			switch {
			case p.h == nil:
			case nt.node != nil && p.h.node == nt.node:
				uq.retry(i)
			case nt.node == nil && p.unique == nt.unique:
				uq.failParked(i, syscall.EINTR)
			}
		}
	}
}

// send gives the queue a note and wakes it.
func (uq *uringQueue) send(nt note) {
	uq.mu.Lock()
	defer uq.mu.Unlock()
	uq.sendLocked(nt)
}

func (uq *uringQueue) sendLocked(nt note) {
	if uq.efdClosed {
		return // the queue has stopped: nothing is parked
	}
	uq.notes = append(uq.notes, nt)
	uq.wakeLocked()
}

// interrupt serves an INTERRUPT (in; its reply, if any, in out) while
// the rings carry the requests: a parked READ is answered EINTR by its
// queue; a request go-fuse serves (a READ handed off, or an inline one)
// is interrupted by go-fuse; one neither knows is kept in every queue's
// early, for a READ about to be parked or handed off. A queue's scan and
// its keeping are one critical section, as its park's registering and
// checking are: either the INTERRUPT finds the park, or the park finds it.
func (s *uringServer) interrupt(in, out []byte) int {
	unique := binary.NativeEndian.Uint64(in[40:])
	for _, uq := range s.queues {
		if uq.interruptParked(unique, false) {
			return 0 // an INTERRUPT has no reply
		}
	}
	n, st := s.t.ps.HandleRequest([][]byte{in}, [][]byte{out})
	if st.Ok() && n >= 16 && int32(binary.NativeEndian.Uint32(out[4:])) == -int32(syscall.EAGAIN) {
		// Not a request go-fuse serves either. Its EAGAIN is still sent:
		// for a request read from /dev/fuse the kernel queues the
		// INTERRUPT again.
		for _, uq := range s.queues {
			if uq.interruptParked(unique, true) {
				break
			}
		}
	}
	return n
}

// interruptParked sends the queue a note for the READ with unique if it
// is parked there, and reports whether it is; if not, and keep, it keeps
// unique in early.
func (uq *uringQueue) interruptParked(unique uint64, keep bool) bool {
	uq.mu.Lock()
	defer uq.mu.Unlock()
	for i := range uq.parks {
		if uq.parks[i].unique == unique {
			uq.sendLocked(note{unique: unique})
			return true
		}
	}
	if keep {
		uq.early[uq.earlyI] = unique
		uq.earlyI = (uq.earlyI + 1) % len(uq.early)
	}
	return false
}

// takeEarlyLocked reports whether an INTERRUPT for unique came before its
// READ was parked or handed off, and forgets it. Called with mu held.
func (uq *uringQueue) takeEarlyLocked(unique uint64) bool {
	for i, u := range uq.early {
		if u == unique {
			uq.early[i] = 0
			return true
		}
	}
	return false
}

// revoked tells every queue that n's device was revoked (the registry's
// revoke hook): its parked READs end, so the destroy's drain can finish.
// Nothing served on a queue's thread waits for a drain (a transient
// close's destroy is queued to the registry's worker), so the queue is
// free to answer.
func (s *uringServer) revoked(n *devnode.Node) {
	if s == nil {
		return
	}
	for _, uq := range s.queues {
		uq.send(note{node: n})
	}
}
