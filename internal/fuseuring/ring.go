// Package fuseuring drives the kernel's FUSE-over-io_uring transport
// (fs/fuse/dev_uring.c): an io_uring instance per FUSE queue, the ring
// entries that carry one request and its reply each, and the
// FUSE_IO_URING_CMD_REGISTER and _COMMIT_AND_FETCH commands. It is shared
// by cdevfs's transport/uring and cdevbench's minimal relay.
//
// How the kernel does it (6.18):
//
//   - INIT still goes over read/write on /dev/fuse; the reply sets
//     FUSE_OVER_IO_URING (flags2 bit 9, so FUSE_INIT_EXT too), which the
//     kernel offers in INIT, and honours, only while the fuse module
//     parameter enable_uring is Y.
//   - The server then submits a REGISTER uring command (IORING_OP_URING_CMD
//     on the /dev/fuse fd, 80 command bytes, hence IORING_SETUP_SQE128)
//     per ring entry, each with two iovecs: a struct fuse_uring_req_header
//     (288 bytes) and a payload buffer of at least max(8 KiB, max_write,
//     max_pages*PAGE_SIZE). Entries may be added at any time.
//   - There is one queue per possible CPU (num_possible_cpus), and the
//     ring is ready, so that requests stop going over read(2), only when
//     every queue has an entry registered. A request is put on the queue
//     of the CPU its sender runs on, and waits there until an entry of that
//     queue is free. The kernel fills an entry in the context of the thread
//     that submitted its command (task work), so each queue is served by
//     one thread, and like libfuse that thread is pinned to its queue's CPU.
//   - A request arrives as the completion of an entry's command: the
//     fuse_in_header at the start of the header, the operation's own
//     header (fuse_read_in, ...) at offset 128, the rest (a name, a WRITE's
//     data) in the payload buffer. The reply goes back, and the entry is
//     armed for the next request, with one COMMIT_AND_FETCH: the
//     fuse_out_header at the start of the header, the whole reply body in
//     the payload buffer.
//   - FORGET, INTERRUPT and notification replies still go over read(2) on
//     /dev/fuse, and notifications are still written to it.
//
// io_uring is driven with raw io_uring_setup/io_uring_enter syscalls and
// mmaps through golang.org/x/sys/unix rather than a Go io_uring library:
// the transport needs only SQE128, IORING_OP_URING_CMD, IORING_OP_READ and
// IORING_OP_POLL_ADD, about 150 lines, and the packet path is better
// without a dependency whose own costs would be paid on every request.
package fuseuring

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PinThread locks the calling goroutine to its thread for good (the
// thread ends with it) and pins the thread to cpu: a queue's ring is
// filled in the context of the thread that submitted its commands, and
// the kernel puts a request on the queue of its sender's CPU. It fails
// where the CPU is offline or not the process's to run on (a cpuset,
// taskset): the thread then runs anywhere, locked all the same.
func PinThread(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin a thread to CPU %d: %w", cpu, err)
	}
	return nil
}

// EnableParam is the fuse module parameter that allows FUSE over io_uring.
const EnableParam = "/sys/module/fuse/parameters/enable_uring"

// Available says whether this kernel carries FUSE over io_uring now, and
// if not why.
func Available() (bool, string) {
	b, err := os.ReadFile(EnableParam)
	if err != nil {
		return false, "this kernel's fuse has no io_uring support (no " + EnableParam + ")"
	}
	if v := strings.TrimSpace(string(b)); v != "Y" {
		return false, "fuse enable_uring=" + v + "; set Y in " + EnableParam + " to use it"
	}
	return true, ""
}

// PossibleCPUs is num_possible_cpus(): the number of queues the kernel
// wants registered.
func PossibleCPUs() (int, error) {
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

const (
	ioringSetupCQSize  = 1 << 3
	ioringSetupSQE128  = 1 << 10
	ioringSetupSingle  = 1 << 12 // IORING_SETUP_SINGLE_ISSUER
	ioringSetupDefer   = 1 << 13 // IORING_SETUP_DEFER_TASKRUN
	ioringFeatSingleMm = 1 << 0
	ioringFeatNoDrop   = 1 << 1
	ioringOffSQRing    = 0
	ioringOffSQEs      = 0x10000000
	ioringEnterGetEv   = 1 << 0
	ioringRegFiles     = 2
	ioringOpPollAdd    = 6
	ioringOpPollRemove = 7
	ioringOpRead       = 22
	ioringOpURingCmd   = 46
	iosqeFixedFile     = 1 << 0
)

// The io_uring ABI, <linux/io_uring.h>'s structs, with their unions
// given the one member this package uses (layout_test.go checks them
// against the kernel's offsets).

// params is struct io_uring_params, io_uring_setup's argument.
type params struct {
	SQEntries    uint32
	CQEntries    uint32
	Flags        uint32
	SQThreadCPU  uint32
	SQThreadIdle uint32
	Features     uint32
	WQFd         uint32
	Resv         [3]uint32
	SQOff        sqRingOffsets
	CQOff        cqRingOffsets
}

// sqRingOffsets is struct io_sqring_offsets: where the submission
// ring's fields are in the mapping at IORING_OFF_SQ_RING.
type sqRingOffsets struct {
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Flags       uint32
	Dropped     uint32
	Array       uint32
	Resv1       uint32
	UserAddr    uint64
}

// cqRingOffsets is struct io_cqring_offsets (the completion ring shares
// the submission ring's mapping: IORING_FEAT_SINGLE_MMAP).
type cqRingOffsets struct {
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Overflow    uint32
	CQEs        uint32
	Flags       uint32
	Resv1       uint32
	UserAddr    uint64
}

// sqe is struct io_uring_sqe as IORING_SETUP_SQE128 makes it: 128 bytes,
// the last 80 the command area of an IORING_OP_URING_CMD.
type sqe struct {
	Opcode   uint8
	Flags    uint8 // IOSQE_*
	Ioprio   uint16
	Fd       int32  // or the fixed file's index, with IOSQE_FIXED_FILE
	Off      uint64 // off; a URING_CMD's cmd_op is its first 4 bytes (setCmdOp)
	Addr     uint64 // addr: a buffer, the iovecs, a POLL_REMOVE's target
	Len      uint32
	OpFlags  uint32 // the union of rw_flags, poll32_events, uring_cmd_flags, ...
	UserData uint64
	BufIndex uint16
	Persona  uint16
	FileIdx  int32    // splice_fd_in, file_index, ...
	Cmd      [80]byte // addr3 and __pad2, or with SQE128 the command (sqe->cmd)
}

// setCmdOp sets cmd_op, the URING_CMD's member of the union at Off.
func (s *sqe) setCmdOp(op uint32) { *(*uint32)(unsafe.Pointer(&s.Off)) = op }

// cqe is struct io_uring_cqe (without IORING_SETUP_CQE32).
type cqe struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// Ring is one io_uring instance with its rings mapped. It is used by one
// thread only: the one that made it.
type Ring struct {
	fd                     int
	deferred               bool // DEFER_TASKRUN: completions posted only in Enter
	sqHead, sqTail, sqMask *uint32
	sqArray                []uint32 // the SQ ring's array of indexes into sqes
	sqes                   []sqe
	cqHead, cqTail, cqMask *uint32
	cqes                   []cqe
	tail                   uint32 // local SQ tail
	entries                uint32
	maps                   [][]byte
}

// NewRing sets up a ring of entries submission slots (and twice as many
// completion slots; the kernel keeps overflowing completions, NODROP).
// Any one thread at a time may use it.
func NewRing(entries uint32) (*Ring, error) {
	return newRing(entries, 0)
}

// NewThreadRing is NewRing for a ring that only the calling thread will
// ever submit to and wait on; the caller must be locked to its thread
// (PinThread), or the kernel refuses the submissions of any other
// (EEXIST). The ring is then set up with IORING_SETUP_SINGLE_ISSUER and
// IORING_SETUP_DEFER_TASKRUN, as the io_uring documentation recommends
// for one thread per ring: the kernel queues the work that completes a
// command (a FUSE request filling an entry, a poll firing) on the ring
// itself, to be run when the thread waits in Enter, instead of as
// task work that interrupts the thread wherever it is. Measured on the
// 2-CPU machine (docs/benchmarks.md, "What each change did"): pipelined 64 B over
// FUSE about 6 % more packets per second, ping-pong about 1 µs less.
// Completions are then posted only inside Enter.
func NewThreadRing(entries uint32) (*Ring, error) {
	return newRing(entries, ioringSetupSingle|ioringSetupDefer)
}

func newRing(entries, flags uint32) (*Ring, error) {
	p := params{CQEntries: 2 * entries, Flags: ioringSetupSQE128 | ioringSetupCQSize | flags}
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", e)
	}
	r := &Ring{fd: int(fd), entries: p.SQEntries, deferred: flags&ioringSetupDefer != 0}
	sq, cq := &p.SQOff, &p.CQOff
	sqLen := int(sq.Array) + int(p.SQEntries)*4
	cqLen := int(cq.CQEs) + int(p.CQEntries)*int(unsafe.Sizeof(cqe{}))
	if p.Features&ioringFeatSingleMm == 0 || p.Features&ioringFeatNoDrop == 0 {
		unix.Close(r.fd)
		return nil, fmt.Errorf("io_uring without IORING_FEAT_SINGLE_MMAP or NODROP")
	}
	ringMem, err := unix.Mmap(r.fd, ioringOffSQRing, max(sqLen, cqLen), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Close(r.fd)
		return nil, fmt.Errorf("mmap io_uring rings: %w", err)
	}
	sqeMem, err := unix.Mmap(r.fd, ioringOffSQEs, int(p.SQEntries)*int(unsafe.Sizeof(sqe{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Munmap(ringMem)
		unix.Close(r.fd)
		return nil, fmt.Errorf("mmap io_uring sqes: %w", err)
	}
	r.maps = [][]byte{ringMem, sqeMem}
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&ringMem[off])) }
	r.sqHead, r.sqTail, r.sqMask = at(sq.Head), at(sq.Tail), at(sq.RingMask)
	r.sqArray = unsafe.Slice(at(sq.Array), p.SQEntries)
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&sqeMem[0])), p.SQEntries)
	r.cqHead, r.cqTail, r.cqMask = at(cq.Head), at(cq.Tail), at(cq.RingMask)
	r.cqes = unsafe.Slice((*cqe)(unsafe.Pointer(&ringMem[cq.CQEs])), p.CQEntries)
	r.tail = atomic.LoadUint32(r.sqTail)
	return r, nil
}

// Close closes the ring: the kernel cancels the commands still pending
// in it (for FUSE: the entries waiting for a request).
func (r *Ring) Close() {
	for _, m := range r.maps {
		unix.Munmap(m)
	}
	unix.Close(r.fd)
}

// RegisterFile makes fd the ring's fixed file 0.
func (r *Ring) RegisterFile(fd int) error {
	fds := []int32{int32(fd)}
	if _, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), ioringRegFiles, uintptr(unsafe.Pointer(&fds[0])), 1, 0, 0); e != 0 {
		return fmt.Errorf("IORING_REGISTER_FILES: %w", e)
	}
	return nil
}

// next returns the next free submission entry, zeroed; with every slot
// taken it submits what is queued first.
func (r *Ring) next() *sqe {
	for r.tail-atomic.LoadUint32(r.sqHead) >= r.entries {
		if err := r.Enter(false); err != nil {
			panic(err) // the ring itself is broken
		}
	}
	i := r.tail & *r.sqMask
	r.sqArray[i] = i
	r.tail++
	s := &r.sqes[i]
	*s = sqe{}
	return s
}

// Enter submits what is queued and, if wait, waits for a completion.
// On a thread ring it also posts the completions that are ready, wait or
// not (the deferred work runs only in io_uring_enter with GETEVENTS).
func (r *Ring) Enter(wait bool) error {
	atomic.StoreUint32(r.sqTail, r.tail)
	toSubmit := r.tail - atomic.LoadUint32(r.sqHead)
	var flags, minComplete uintptr
	switch {
	case wait:
		flags, minComplete = ioringEnterGetEv, 1
	case r.deferred:
		flags = ioringEnterGetEv // min_complete 0: post, do not wait
	case toSubmit == 0:
		return nil
	}
	_, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), minComplete, flags, 0, 0)
	if e != 0 && e != unix.EINTR && e != unix.EAGAIN && e != unix.EBUSY {
		return fmt.Errorf("io_uring_enter: %w", e)
	}
	return nil
}

// Submitted says whether the kernel took every command queued: Enter
// returns nil on EAGAIN and EBUSY, which may leave some for the next.
func (r *Ring) Submitted() bool {
	return atomic.LoadUint32(r.sqHead) == r.tail
}

// Reap calls f on every completion waiting.
func (r *Ring) Reap(f func(userData uint64, res int32)) {
	head := atomic.LoadUint32(r.cqHead)
	for tail := atomic.LoadUint32(r.cqTail); head != tail; head++ {
		c := &r.cqes[head&*r.cqMask]
		f(c.UserData, c.Res)
	}
	atomic.StoreUint32(r.cqHead, head)
}

// PollAdd queues a one-shot poll of fd for events.
func (r *Ring) PollAdd(fd int, events uint32, userData uint64) {
	s := r.next()
	s.Opcode = ioringOpPollAdd
	s.Fd = int32(fd)
	s.OpFlags = events // poll32_events
	s.UserData = userData
}

// PollRemove queues the removal of the poll queued with target as its
// user data; the poll then completes with ECANCELED (or has completed
// already: the removal then fails with ENOENT).
func (r *Ring) PollRemove(target, userData uint64) {
	s := r.next()
	s.Opcode = ioringOpPollRemove
	s.Fd = -1
	s.Addr = target // the poll's user data
	s.UserData = userData
}

// Read queues a read(2) of fd into buf, which must stay put (not Go
// heap memory the collector may free) until the completion.
func (r *Ring) Read(fd int, buf []byte, userData uint64) {
	s := r.next()
	s.Opcode = ioringOpRead
	s.Fd = int32(fd)
	s.Off = ^uint64(0) // -1, the file position (none for an eventfd)
	s.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
	s.Len = uint32(len(buf))
	s.UserData = userData
}

// SetEnable sets the fuse module's enable_uring to v ("Y" or "N"), for
// tests: it is machine-wide, and decides what the kernel offers the next
// mounts' INIT (a mount keeps what it negotiated). restore puts back what
// was there.
func SetEnable(v string) (restore func() error, err error) {
	old, err := os.ReadFile(EnableParam)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(EnableParam, []byte(v), 0); err != nil {
		return nil, fmt.Errorf("set %s to %s: %w", EnableParam, v, err)
	}
	return func() error { return os.WriteFile(EnableParam, []byte(strings.TrimSpace(string(old))), 0) }, nil
}
