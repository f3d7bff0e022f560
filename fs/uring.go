package fs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"

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
	ringSQSize     = 64 // commands submitted at once, not an entry bound
	eventUserData  = 1 << 63
)

// uringServer carries the transport's requests over one FUSE queue per
// possible CPU, each served by a thread of its own pinned to its CPU.
// A request is served on its queue's thread, except a READ that must wait
// for a packet (or any READ the fast path does not take): that is handed
// to a goroutine, as the classic loop hands it to a reader of its own,
// so that the queue goes on serving the write that will bring the packet.
// /dev/fuse keeps its classic readers: FORGET and INTERRUPT still come
// over read(2), and so does everything before the ring is ready.
type uringServer struct {
	t      *transport
	queues []*uringQueue
	served atomic.Uint64 // requests answered through a ring
}

// uringQueue is one queue. Its thread owns q, in and the counts; mu
// guards done, which handoff goroutines append to.
type uringQueue struct {
	s   *uringServer
	qid int
	q   *fuseuring.Queue
	in  []byte // a request as read(2) would give it, rebuilt here

	waiting   int          // entries the kernel holds, waiting for a request
	handedOff int          // entries whose request a goroutine serves
	entries   atomic.Int32 // len(q.Ents), for readers outside the thread

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
	efdClosed bool     // guarded by mu

	// Stranded requests (see kick): low says the queue ran low on
	// entries since the last kick; kicking, that a round of kicks is
	// under way; kickEnt is the entry that answered the round's last
	// kick (-1 none) and kickGot says a request came to it after.
	low      bool
	kicking  bool
	kickEnt  int
	kickGot  bool
	kickNext bool          // send a kick once what is queued is submitted
	kicks    atomic.Int32  // kicks answered, for tests
	kickc    chan struct{} // to the kicker: one LOOKUP of kickName
}

// answer is a handed-off request's reply, n bytes in its entry's Out.
type answer struct{ i, n int }

// startURing starts the queues after INIT was answered with
// FUSE_OVER_IO_URING, and returns once every queue has registered its
// entries (the ring is then ready) or one failed.
func (t *transport) startURing() error {
	nq, err := fuseuring.PossibleCPUs()
	if err != nil {
		return fmt.Errorf("io_uring queues: %w", err)
	}
	s := &uringServer{t: t}
	errs := make(chan error, nq)
	for qid := range nq {
		uq := &uringQueue{s: s, qid: qid, in: make([]byte, t.bufSize), efdBuf: make([]byte, 8),
			efd: -1, kickEnt: -1, kickc: make(chan struct{}, 1)}
		s.queues = append(s.queues, uq)
		t.readers.Add(2)
		go uq.run(errs)
		go uq.kicker(filepath.Join(t.dir, kickName))
	}
	t.uring.Store(s)
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
	uq.efd = efd
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
	defer close(uq.kickc) // ends the kicker, whatever ends the queue
	fuseuring.PinThread(uq.qid)
	err := uq.setup()
	started <- err
	if err != nil {
		uq.release(false)
		return
	}
	log := uq.s.t.log
	for {
		if err := uq.q.Ring.Enter(true); err != nil {
			log.Error("FUSE io_uring queue", "queue", uq.qid, "err", err)
			break
		}
		uq.q.Ring.Reap(uq.completed)
		if uq.handedOff == 0 && (uq.stopping.Load() || uq.waiting == 0) {
			break // asked to stop, or every entry is gone: the connection is
		}
		if uq.low && !uq.kicking && uq.handedOff > 0 {
			uq.kicking, uq.kickEnt, uq.kickNext = true, -1, true
		}
		if uq.kickNext {
			// Only once the entries added are in the kernel: a kick
			// that finds none free is stranded itself.
			uq.kickNext = false
			if err := uq.q.Ring.Enter(false); err != nil {
				log.Error("FUSE io_uring queue", "queue", uq.qid, "err", err)
				break
			}
			uq.kick()
		}
		uq.armWake()
	}
	// The entries are freed only if the kernel gave every one back and no
	// goroutine still writes a reply into one.
	uq.release(uq.waiting == 0 && uq.handedOff == 0)
}

// kickName is the name the kicker looks up: never a node, never cached
// (negative entries are not), so each lookup is a request to the queue.
const kickName = ".cdevfs-io-uring-kick"

// A request the kernel puts on a queue with no entry waiting is kept in
// the queue's list, and only COMMIT_AND_FETCH takes from that list: an
// entry registered later does not (fuse_uring_do_register in
// fs/fuse/dev_uring.c only adds it to the available ones). So once a
// burst took every entry, and the entries all went to READs waiting for
// packets, a request that came during the burst would wait until one of
// those READs is answered: a deadlock if it is the write their packets
// wait for. The queue adds entries as READs take them (handOff), but a
// burst can still drain it between two reaps (the kernel sees a new entry
// only at the next submit). So whenever READs took the queue low, a kick
// round runs (a mitigation, not a cure: a kick finds no free entry in a
// burst faster than the queue grows, and is stranded with the rest; the
// README says how often TestURingCarriesRequests sees it):
// the queue's kicker, a thread on the queue's CPU, looks up kickName,
// which lands on the queue; answering it commits an entry, which fetches
// one stranded request. Kicks go on while the last kick's entry got a
// request after its commit (there may be more), or the queue ran low
// again since, and stop once neither happened. A queue with a READ or two
// waiting at a time (a ping-pong) never runs low, so it never kicks.
func (uq *uringQueue) kick() {
	select {
	case uq.kickc <- struct{}{}:
	default:
	}
}

// kicker sends the queue's kicks, from the queue's CPU.
func (uq *uringQueue) kicker(path string) {
	defer uq.s.t.readers.Done()
	fuseuring.PinThread(uq.qid)
	var st unix.Stat_t
	for range uq.kickc {
		_ = unix.Lstat(path, &st) // ENOENT, from the queue
	}
}

// isKick says whether entry e holds the kicker's lookup.
func isKick(e *fuseuring.Entry) bool {
	const opLookup = 1
	n := e.PayloadSize()
	return e.Op() == opLookup && binary.NativeEndian.Uint64(e.Hdr[16:]) == 1 && // the root
		n == len(kickName)+1 && string(e.Pay[:n-1]) == kickName
}

// serveKick answers a kick, and sends the next one if the last one's
// entry got a request (see kick).
func (uq *uringQueue) serveKick(i int) {
	e := uq.q.Ents[i]
	uq.kicks.Add(1)
	again := uq.kicking && (uq.kickEnt < 0 || uq.kickGot || uq.low)
	uq.kickEnt, uq.kickGot, uq.low = i, false, false
	uq.commit(i, errorReply(e.Hdr, e.Out(), syscall.ENOENT))
	if again {
		uq.kickNext = true
	} else {
		uq.kicking, uq.kickEnt = false, -1
	}
}

// completed handles one completion.
func (uq *uringQueue) completed(ud uint64, res int32) {
	if ud == eventUserData {
		uq.efdArmed = false
		uq.commitAnswers()
		return
	}
	i := int(ud)
	switch {
	case res == 0:
		uq.waiting--
		if isKick(uq.q.Ents[i]) {
			uq.serveKick(i)
			return
		}
		if i == uq.kickEnt {
			uq.kickGot = true
		}
		uq.serve(i)
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		uq.q.Retry(i) // as libfuse does
	default:
		// ENOTCONN: the connection was torn down (unmount, abort), and
		// the kernel gives the entry back for good.
		if res != -int32(unix.ENOTCONN) {
			uq.s.t.log.Debug("FUSE io_uring entry ended", "queue", uq.qid, "err", syscall.Errno(-res))
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
	n, blocked := t.serve(in, e.Out(), false)
	if blocked {
		uq.handOff(i, in)
		return
	}
	uq.commit(i, n)
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
	if uq.waiting < ringMinWaiting {
		// The kernel may have run out of entries before it sees the new
		// one: a request may be stranded (kick).
		uq.low = true
		if err := uq.addEntry(); err != nil {
			t.log.Error("FUSE io_uring queue cannot grow", "queue", uq.qid, "entries", len(uq.q.Ents), "err", err)
		}
	}
}

// commitAnswers commits the replies of handed-off requests.
func (uq *uringQueue) commitAnswers() {
	uq.mu.Lock()
	done := uq.done
	uq.done = nil
	uq.mu.Unlock()
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
