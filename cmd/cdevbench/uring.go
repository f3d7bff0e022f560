package main

// The minimal FUSE-over-io_uring relay ("min-uring"): the same instrument
// as the minimal relay in relay.go (one file "t" whose READ reads the tun
// fd and whose WRITE writes it), but with requests fetched and answered
// through io_uring instead of read(2)/write(2) on /dev/fuse, to measure
// what the io_uring transport of FUSE would lift.
//
// How the kernel does it (fs/fuse/dev_uring.c, 6.18):
//
//   - INIT still goes over read/write on /dev/fuse; the reply sets
//     FUSE_OVER_IO_URING (flags2 bit 9, so FUSE_INIT_EXT too), and the
//     kernel honours it only while the fuse module parameter enable_uring
//     is Y.
//   - The server then submits FUSE_IO_URING_CMD_REGISTER uring commands
//     (IORING_OP_URING_CMD on the /dev/fuse fd, 80 command bytes, hence
//     IORING_SETUP_SQE128), one per ring entry, each with two iovecs: a
//     struct fuse_uring_req_header (288 bytes) and a payload buffer of at
//     least max(8 KiB, max_write, max_pages*PAGE_SIZE).
//   - There is one queue per possible CPU (num_possible_cpus), and the
//     ring becomes ready, so that requests stop blocking, only when every
//     queue has an entry registered. A request is put on the queue of the
//     CPU its sender runs on (task_cpu(current)); the queue's entries
//     belong to whichever io_uring registered them, and the kernel fills
//     an entry in that ring's submitting task's context (task work). So
//     the kernel requires a queue per CPU but not that it be served from
//     that CPU; like libfuse, each queue here has a thread of its own
//     pinned to the queue's CPU (queue q on CPU q), so that a sender's
//     request is handed to a thread on its own CPU.
//   - A request arrives as the completion of an entry's command; the reply
//     goes back, and the entry is re-armed for the next request, with one
//     FUSE_IO_URING_CMD_COMMIT_AND_FETCH.
//   - Everything the kernel sends through fiq->ops->send_req goes through
//     the ring once it is ready (LOOKUP, GETATTR, OPEN, READ, WRITE,
//     FLUSH, RELEASE, background requests too); FORGET and INTERRUPT still
//     go through read(2) on /dev/fuse (fuse_io_uring_ops), so one thread
//     keeps reading it.
//
// io_uring is driven with raw io_uring_setup/io_uring_enter syscalls and
// mmaps through golang.org/x/sys/unix rather than a Go io_uring library:
// the relay needs only SQE128, IORING_OP_URING_CMD and IORING_OP_POLL_ADD,
// that is ~150 lines, and a measuring instrument is better without a
// dependency whose own costs would be measured with it.
//
// A READ that finds the tun empty cannot block the queue's thread (every
// other request on that CPU would wait behind it): the entry is parked, an
// IORING_OP_POLL_ADD on the tun fd is armed in the same ring, and the
// parked READs are answered when it fires.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	uringIf           = "uring0"
	uringDepth        = 8 // ring entries per queue
	uringPayload      = 128 * 1024
	uringHeaderSz     = 288 // sizeof(struct fuse_uring_req_header)
	uringEnableParam  = "/sys/module/fuse/parameters/enable_uring"
	fuseInitExt       = 1 << 30
	fuseOverIOUring2  = 1 << (41 - 32) // FUSE_OVER_IO_URING, in flags2
	fuseURingRegister = 1              // FUSE_IO_URING_CMD_REGISTER
	fuseURingCommit   = 2              // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

	ioringSetupCQSize  = 1 << 3
	ioringSetupSQE128  = 1 << 10
	ioringFeatSingleMm = 1 << 0
	ioringOffSQRing    = 0
	ioringOffCQRing    = 0x8000000
	ioringOffSQEs      = 0x10000000
	ioringEnterGetEv   = 1 << 0
	ioringRegFiles     = 2
	ioringOpPollAdd    = 6
	ioringOpURingCmd   = 46
	iosqeFixedFile     = 1 << 0
	sqeSize            = 128 // with IORING_SETUP_SQE128
	cqeSize            = 16

	pollUserData = 1 << 63 // user_data of the tun poll; entries use their index
)

// uringAvailable says whether min-uring can run here, and if not why.
func uringAvailable() (bool, string) {
	b, err := os.ReadFile(uringEnableParam)
	if err != nil {
		return false, "this kernel's fuse has no io_uring support (no " + uringEnableParam + ")"
	}
	if v := strings.TrimSpace(string(b)); v != "Y" {
		return false, "fuse enable_uring=" + v + "; set Y in " + uringEnableParam + " to measure"
	}
	return true, ""
}

// possibleCPUs is num_possible_cpus(): the number of queues the kernel
// wants registered.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, ok := strings.Cut(r, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu/possible %q", b)
		}
		z := a
		if ok {
			if z, err = strconv.Atoi(hi); err != nil {
				return 0, fmt.Errorf("cpu/possible %q", b)
			}
		}
		n = max(n, z+1)
	}
	return n, nil
}

// ioRing is one io_uring instance: its rings mapped, used by one thread.
type ioRing struct {
	fd                     int
	sqHead, sqTail, sqMask *uint32
	sqArray                unsafe.Pointer
	sqes                   []byte
	cqHead, cqTail, cqMask *uint32
	cqes                   unsafe.Pointer
	tail                   uint32 // local SQ tail
	entries                uint32
	maps                   [][]byte
}

func newIORing(entries uint32) (*ioRing, error) {
	var p [120]byte // struct io_uring_params
	ne := binary.NativeEndian
	ne.PutUint32(p[4:], 2*entries) // cq_entries
	ne.PutUint32(p[8:], ioringSetupSQE128|ioringSetupCQSize)
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p[0])), 0)
	if e != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", e)
	}
	r := &ioRing{fd: int(fd), entries: ne.Uint32(p[0:])}
	sqEntries, cqEntries, features := ne.Uint32(p[0:]), ne.Uint32(p[4:]), ne.Uint32(p[20:])
	sq, cq := p[40:80], p[80:120] // io_sqring_offsets, io_cqring_offsets
	sqLen := int(ne.Uint32(sq[24:])) + int(sqEntries)*4
	cqLen := int(ne.Uint32(cq[20:])) + int(cqEntries)*cqeSize
	if features&ioringFeatSingleMm == 0 {
		unix.Close(r.fd)
		return nil, fmt.Errorf("io_uring without IORING_FEAT_SINGLE_MMAP")
	}
	ringMem, err := unix.Mmap(r.fd, ioringOffSQRing, max(sqLen, cqLen), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Close(r.fd)
		return nil, fmt.Errorf("mmap io_uring rings: %w", err)
	}
	r.sqes, err = unix.Mmap(r.fd, ioringOffSQEs, int(sqEntries)*sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Munmap(ringMem)
		unix.Close(r.fd)
		return nil, fmt.Errorf("mmap io_uring sqes: %w", err)
	}
	r.maps = [][]byte{ringMem, r.sqes}
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&ringMem[off])) }
	r.sqHead, r.sqTail, r.sqMask = at(ne.Uint32(sq[0:])), at(ne.Uint32(sq[4:])), at(ne.Uint32(sq[8:]))
	r.sqArray = unsafe.Pointer(&ringMem[ne.Uint32(sq[24:])])
	r.cqHead, r.cqTail, r.cqMask = at(ne.Uint32(cq[0:])), at(ne.Uint32(cq[4:])), at(ne.Uint32(cq[8:]))
	r.cqes = unsafe.Pointer(&ringMem[ne.Uint32(cq[20:])])
	r.tail = atomic.LoadUint32(r.sqTail)
	_ = cqLen
	return r, nil
}

func (r *ioRing) close() {
	for _, m := range r.maps {
		unix.Munmap(m)
	}
	unix.Close(r.fd)
}

// sqe returns the next free submission entry, zeroed.
func (r *ioRing) sqe() []byte {
	if r.tail-atomic.LoadUint32(r.sqHead) >= r.entries {
		panic("io_uring submission queue full") // more in flight than entries: a bug
	}
	i := r.tail & *r.sqMask
	*(*uint32)(unsafe.Add(r.sqArray, 4*i)) = i
	r.tail++
	s := r.sqes[int(i)*sqeSize : int(i+1)*sqeSize]
	clear(s)
	return s
}

// enter submits what is queued and, if wait, waits for a completion.
func (r *ioRing) enter(wait bool) error {
	atomic.StoreUint32(r.sqTail, r.tail)
	toSubmit := r.tail - atomic.LoadUint32(r.sqHead)
	var flags, minComplete uintptr
	if wait {
		flags, minComplete = ioringEnterGetEv, 1
	}
	if toSubmit == 0 && !wait {
		return nil
	}
	_, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), minComplete, flags, 0, 0)
	if e != 0 && e != unix.EINTR && e != unix.EAGAIN && e != unix.EBUSY {
		return fmt.Errorf("io_uring_enter: %w", e)
	}
	return nil
}

// reap calls f on every completion waiting.
func (r *ioRing) reap(f func(userData uint64, res int32)) {
	head := atomic.LoadUint32(r.cqHead)
	for tail := atomic.LoadUint32(r.cqTail); head != tail; head++ {
		c := unsafe.Add(r.cqes, uintptr(head&*r.cqMask)*cqeSize)
		f(*(*uint64)(c), *(*int32)(unsafe.Add(c, 8)))
	}
	atomic.StoreUint32(r.cqHead, head)
}

// uringEnt is one ring entry: its header and payload buffers and the
// iovecs that register them, in memory of its own (mmap), out of the Go
// heap's reach.
type uringEnt struct {
	mem      []byte
	hdr, pay []byte
	iov      *[2]unix.Iovec
	lastOp   uint32 // the last command, to resubmit on EAGAIN/EINTR
	lastID   uint64
}

// uringQueue is one queue: a ring, its entries, its thread.
type uringQueue struct {
	qid      int
	ring     *ioRing
	ents     [uringDepth]uringEnt
	ffdIdx   int32 // the /dev/fuse fd, as fixed file 0
	tfd      int
	parked   []int
	pollArmd bool
}

func newUringQueue(qid, ffd, tfd int) (*uringQueue, error) {
	r, err := newIORing(2 * uringDepth)
	if err != nil {
		return nil, err
	}
	q := &uringQueue{qid: qid, ring: r, tfd: tfd}
	fds := []int32{int32(ffd)}
	if _, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), ioringRegFiles, uintptr(unsafe.Pointer(&fds[0])), 1, 0, 0); e != 0 {
		r.close()
		return nil, fmt.Errorf("IORING_REGISTER_FILES: %w", e)
	}
	const hdrSpace = 4096 // header and iovecs, page-aligned as libfuse does
	for i := range q.ents {
		mem, err := unix.Mmap(-1, 0, hdrSpace+uringPayload, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			return nil, fmt.Errorf("mmap entry: %w", err)
		}
		e := &q.ents[i]
		e.mem, e.hdr, e.pay = mem, mem[:uringHeaderSz], mem[hdrSpace:]
		e.iov = (*[2]unix.Iovec)(unsafe.Pointer(&mem[2048]))
		e.iov[0].Base, e.iov[0].Len = &e.hdr[0], uringHeaderSz
		e.iov[1].Base, e.iov[1].Len = &e.pay[0], uringPayload
	}
	return q, nil
}

// cmd queues a fuse uring command for entry i.
func (q *uringQueue) cmd(i int, op uint32, commitID uint64) {
	q.ents[i].lastOp, q.ents[i].lastID = op, commitID
	s := q.ring.sqe()
	ne := binary.NativeEndian
	s[0] = ioringOpURingCmd
	s[1] = iosqeFixedFile
	ne.PutUint32(s[4:], 0)          // fd: fixed file 0, /dev/fuse
	ne.PutUint32(s[8:], op)         // cmd_op
	ne.PutUint64(s[32:], uint64(i)) // user_data
	if op == fuseURingRegister {
		ne.PutUint64(s[16:], uint64(uintptr(unsafe.Pointer(q.ents[i].iov)))) // addr: the iovecs
		ne.PutUint32(s[24:], 2)                                              // len
	}
	// struct fuse_uring_cmd_req in the command area (sqe->cmd, offset 48)
	ne.PutUint64(s[48:], 0)        // flags
	ne.PutUint64(s[56:], commitID) // commit_id
	ne.PutUint16(s[64:], uint16(q.qid))
}

func (q *uringQueue) armPoll() {
	if q.pollArmd {
		return
	}
	s := q.ring.sqe()
	ne := binary.NativeEndian
	s[0] = ioringOpPollAdd
	ne.PutUint32(s[4:], uint32(q.tfd))
	ne.PutUint32(s[28:], unix.POLLIN) // poll32_events
	ne.PutUint64(s[32:], pollUserData)
	q.pollArmd = true
}

// reply writes the out header and payload size of entry i and commits it.
func (q *uringQueue) reply(i int, errno unix.Errno, payload int) {
	h := q.ents[i].hdr
	ne := binary.NativeEndian
	unique := ne.Uint64(h[8:]) // the in header's unique, still there
	ne.PutUint32(h[0:], uint32(16+payload))
	ne.PutUint32(h[4:], uint32(-int32(errno)))
	ne.PutUint64(h[8:], unique)
	ne.PutUint32(h[256+16:], uint32(payload)) // ring_ent_in_out.payload_sz
	q.cmd(i, fuseURingCommit, unique)
}

// serveRead answers the READ in entry i from the tun fd, or reports that
// it would block.
func (q *uringQueue) serveRead(i int) bool {
	e := &q.ents[i]
	ne := binary.NativeEndian
	op := e.hdr[128:] // struct fuse_read_in
	size := min(int(ne.Uint32(op[16:])), uringPayload)
	m, err := unix.Read(q.tfd, e.pay[:size])
	switch {
	case err == unix.EAGAIN && ne.Uint32(op[32:])&unix.O_NONBLOCK == 0:
		return false
	case err != nil:
		q.reply(i, err.(unix.Errno), 0)
	default:
		q.reply(i, 0, m)
	}
	return true
}

// handle serves the request that arrived in entry i.
func (q *uringQueue) handle(i int) {
	e := &q.ents[i]
	ne := binary.NativeEndian
	h, op := e.hdr, e.hdr[128:]
	nodeid := ne.Uint64(h[16:])
	paySz := int(ne.Uint32(h[256+16:]))
	switch ne.Uint32(h[4:]) {
	case fuseOpLookup:
		if nodeid != 1 || paySz < 1 || string(e.pay[:paySz-1]) != "t" {
			q.reply(i, unix.ENOENT, 0)
			return
		}
		clear(e.pay[:128])
		ne.PutUint64(e.pay[0:], 2)
		relayAttr(e.pay[40:], 2)
		q.reply(i, 0, 128)
	case fuseOpGetatt:
		clear(e.pay[:104])
		relayAttr(e.pay[16:], nodeid)
		q.reply(i, 0, 104)
	case fuseOpOpen:
		clear(e.pay[:16])
		ne.PutUint64(e.pay[0:], 1)
		ne.PutUint32(e.pay[8:], 1|4|16) // DIRECT_IO | NONSEEKABLE | STREAM
		q.reply(i, 0, 16)
	case fuseOpRead:
		if len(q.parked) > 0 || !q.serveRead(i) {
			q.parked = append(q.parked, i)
			q.armPoll()
		}
	case fuseOpWrite:
		size := min(int(ne.Uint32(op[16:])), paySz)
		m, err := unix.Write(q.tfd, e.pay[:size])
		if err != nil {
			q.reply(i, err.(unix.Errno), 0)
			return
		}
		ne.PutUint64(e.pay[0:], uint64(m))
		q.reply(i, 0, 8)
	case fuseOpFlush, fuseOpRel:
		q.reply(i, 0, 0)
	default:
		q.reply(i, unix.ENOSYS, 0)
	}
}

// register submits every entry's REGISTER and reports the first error the
// kernel gives back at once.
func (q *uringQueue) register() error {
	for i := range q.ents {
		q.cmd(i, fuseURingRegister, 0)
	}
	for try := 0; ; try++ {
		if err := q.ring.enter(false); err != nil {
			return err
		}
		var ferr error
		again := false
		q.ring.reap(func(ud uint64, res int32) {
			if res == -int32(unix.EAGAIN) && try < 100 { // INIT not processed yet
				q.cmd(int(ud), fuseURingRegister, 0)
				again = true
			} else if ferr == nil {
				ferr = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER qid %d: %w", q.qid, unix.Errno(-res))
			}
		})
		if ferr != nil || !again {
			return ferr
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run serves the queue until the connection goes (ENOTCONN on teardown).
func (q *uringQueue) run() error {
	for {
		if err := q.ring.enter(true); err != nil {
			return err
		}
		var ferr error
		q.ring.reap(func(ud uint64, res int32) {
			if ud == pollUserData {
				q.pollArmd = false
				n := 0
				for _, i := range q.parked {
					if !q.serveRead(i) {
						break
					}
					n++
				}
				q.parked = q.parked[n:]
				if len(q.parked) > 0 {
					q.armPoll()
				}
				return
			}
			i := int(ud)
			switch {
			case res == 0:
				q.handle(i)
			case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
				q.cmd(i, q.ents[i].lastOp, q.ents[i].lastID) // as libfuse does
			case ferr == nil:
				ferr = fmt.Errorf("qid %d: uring command: %w", q.qid, unix.Errno(-res))
			}
		})
		if ferr != nil {
			return ferr
		}
	}
}

// uringServe is the min-uring relay process: like relayServe, with the
// requests after INIT carried by io_uring.
func uringServe(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: cdevbench uring-serve DIR")
		return 2
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "min-uring:", err); return 1 }
	nq, err := possibleCPUs()
	if err != nil {
		return fail(err)
	}
	tfd, ffd, err := relayMount(uringIf, args[0])
	if err != nil {
		return fail(err)
	}
	// INIT, over /dev/fuse.
	in, out := make([]byte, 132*1024), make([]byte, 4096)
	for {
		n, err := unix.Read(ffd, in)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return fail(fmt.Errorf("read INIT: %w", err))
		}
		if op := binary.NativeEndian.Uint32(in[4:]); n < 56 || op != fuseOpInit {
			return fail(fmt.Errorf("first request op %d, not INIT", op))
		}
		break
	}
	// Protocol 7.42 brought FUSE_OVER_IO_URING.
	body := relayInitReply(out, in, 42, fuseInitExt, fuseOverIOUring2)
	binary.NativeEndian.PutUint32(out[0:], uint32(16+body))
	binary.NativeEndian.PutUint32(out[4:], 0)
	copy(out[8:16], in[8:16])
	if _, err := unix.Write(ffd, out[:16+body]); err != nil {
		return fail(fmt.Errorf("INIT reply: %w", err))
	}
	// One queue per possible CPU, each its own thread pinned to its CPU.
	errs, ended := make(chan error, nq), make(chan struct{}, nq)
	for qid := range nq {
		go func() {
			runtime.LockOSThread() // for ever: the ring is this thread's
			var set unix.CPUSet
			set.Set(qid)
			_ = unix.SchedSetaffinity(0, &set) // an offline CPU: serve it from anywhere
			q, err := newUringQueue(qid, ffd, tfd)
			if err == nil {
				err = q.register()
			}
			errs <- err
			if err != nil {
				return
			}
			if err := q.run(); err != nil && !errors.Is(err, unix.ENOTCONN) { // ENOTCONN: unmounted
				fmt.Fprintln(os.Stderr, "min-uring:", err)
				os.Exit(1)
			}
			ended <- struct{}{}
		}()
	}
	for range nq {
		if err := <-errs; err != nil {
			return fail(err)
		}
	}
	// FORGET and INTERRUPT still come over /dev/fuse; anything else there
	// would mean the kernel fell back to the classic transport.
	go func() {
		in := make([]byte, 132*1024)
		for {
			n, err := unix.Read(ffd, in)
			if err == unix.EINTR || err == unix.EAGAIN || err == unix.ENOENT {
				continue
			}
			if err != nil {
				return
			}
			switch op := binary.NativeEndian.Uint32(in[4:]); op {
			case fuseOpForget, fuseOpBForg, fuseOpIntr:
			default:
				fmt.Fprintf(os.Stderr, "min-uring: op %d arrived over /dev/fuse, not the ring (%d bytes)\n", op, n)
				os.Exit(1)
			}
		}
	}()
	for {
		if _, err := os.Stat(filepath.Join(args[0], "t")); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	fmt.Println("ready")
	// Serve until killed, or until the connection goes (unmount, abort).
	for range nq {
		<-ended
	}
	return 0
}
