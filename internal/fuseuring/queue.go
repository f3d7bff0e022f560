package fuseuring

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// HeaderSize is sizeof(struct fuse_uring_req_header): in_out[128]
	// (the fuse_in_header of a request, the fuse_out_header of a reply),
	// op_in[128], then struct fuse_uring_ent_in_out.
	HeaderSize = 288
	// OpIn is where the operation's own header starts.
	OpIn     = 128
	entInOut = 256 // struct fuse_uring_ent_in_out: flags, commit_id, payload_sz

	// The FUSE_INIT flags that ask for the transport.
	InitExt          = 1 << 30        // FUSE_INIT_EXT, in flags
	OverIOURingFlag2 = 1 << (41 - 32) // FUSE_OVER_IO_URING, in flags2

	cmdRegister = 1 // FUSE_IO_URING_CMD_REGISTER
	cmdCommit   = 2 // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

	// hdrSpace is the page before each payload buffer: the header at its
	// start, the iovecs at iovOff, and its last 16 bytes a scratch reply
	// header (see Entry.Out).
	hdrSpace = 4096
	iovOff   = 2048
)

// Entry is one ring entry: its header and payload buffers and the iovecs
// that register them, in memory of its own (mmap, out of the Go heap's
// reach, since the kernel writes it whenever a request arrives).
type Entry struct {
	mem      []byte
	Hdr, Pay []byte
	iov      *[2]unix.Iovec
	lastOp   uint32 // the last command, to resubmit on EAGAIN/EINTR
	lastID   uint64
}

// Op is the request's opcode.
func (e *Entry) Op() uint32 { return binary.NativeEndian.Uint32(e.Hdr[4:]) }

// PayloadSize is how much of Pay the request filled.
func (e *Entry) PayloadSize() int { return int(binary.NativeEndian.Uint32(e.Hdr[entInOut+16:])) }

// Request copies the request into dst as read(2) on /dev/fuse would give
// it: fuse_in_header, the operation's header, the payload. The in
// header's len counts all three, which gives the operation header's size.
func (e *Entry) Request(dst []byte) ([]byte, error) {
	total := int(binary.NativeEndian.Uint32(e.Hdr[0:]))
	pay := e.PayloadSize()
	opLen := total - 40 - pay
	if opLen < 0 || opLen > OpIn || pay > len(e.Pay) || total > len(dst) {
		return nil, fmt.Errorf("fuse ring request op %d: len %d, payload %d", e.Op(), total, pay)
	}
	copy(dst[0:40], e.Hdr[0:40])
	copy(dst[40:], e.Hdr[OpIn:OpIn+opLen])
	copy(dst[40+opLen:], e.Pay[:pay])
	return dst[:total], nil
}

// Out is where a reply is built as write(2) on /dev/fuse would take it:
// a 16-byte fuse_out_header then the body, which is Pay itself, so a
// reply's body (a READ's packet) is written where the kernel takes it
// from. Commit moves the header into place.
func (e *Entry) Out() []byte { return e.mem[hdrSpace-16:] }

// Queue is one FUSE queue: its ring and entries. It belongs to the
// thread that made it.
type Queue struct {
	QID     int
	Ring    *Ring
	Ents    []*Entry
	payload int
}

// NewQueue sets up the ring of queue qid on the /dev/fuse fd ffd, whose
// entries get payload buffers of payload bytes; ringSize bounds the
// commands submitted at once, not the entries. The caller is the thread
// that serves the queue, locked to it (PinThread): the ring is a
// NewThreadRing.
func NewQueue(qid, ffd int, ringSize uint32, payload int) (*Queue, error) {
	r, err := NewThreadRing(ringSize)
	if err != nil {
		return nil, err
	}
	if err := r.RegisterFile(ffd); err != nil {
		r.Close()
		return nil, err
	}
	return &Queue{QID: qid, Ring: r, payload: payload}, nil
}

// AddEntry makes an entry and queues its REGISTER; it returns the
// entry's index, its user_data in completions.
func (q *Queue) AddEntry() (int, error) {
	mem, err := unix.Mmap(-1, 0, hdrSpace+q.payload, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, fmt.Errorf("mmap fuse ring entry: %w", err)
	}
	e := &Entry{mem: mem, Hdr: mem[:HeaderSize], Pay: mem[hdrSpace:]}
	e.iov = (*[2]unix.Iovec)(unsafe.Pointer(&mem[iovOff]))
	e.iov[0].Base, e.iov[0].Len = &e.Hdr[0], HeaderSize
	e.iov[1].Base, e.iov[1].Len = &e.Pay[0], uint64(q.payload)
	q.Ents = append(q.Ents, e)
	i := len(q.Ents) - 1
	q.cmd(i, cmdRegister, 0)
	return i, nil
}

// FreeEntries unmaps every entry. Only once the kernel is done with them:
// each has completed for good (the connection was torn down), or the
// ring is closed and the thread that served it gone.
func (q *Queue) FreeEntries() {
	for _, e := range q.Ents {
		unix.Munmap(e.mem)
	}
	q.Ents = nil
}

// cmd queues a fuse uring command for entry i.
func (q *Queue) cmd(i int, op uint32, commitID uint64) {
	e := q.Ents[i]
	e.lastOp, e.lastID = op, commitID
	s := q.Ring.sqe()
	ne := binary.NativeEndian
	s[0] = ioringOpURingCmd
	s[1] = iosqeFixedFile
	ne.PutUint32(s[4:], 0)          // fd: fixed file 0, /dev/fuse
	ne.PutUint32(s[8:], op)         // cmd_op
	ne.PutUint64(s[32:], uint64(i)) // user_data
	if op == cmdRegister {
		ne.PutUint64(s[16:], uint64(uintptr(unsafe.Pointer(e.iov)))) // addr: the iovecs
		ne.PutUint32(s[24:], 2)                                      // len
	}
	// struct fuse_uring_cmd_req in the command area (sqe->cmd, offset 48)
	ne.PutUint64(s[48:], 0)        // flags
	ne.PutUint64(s[56:], commitID) // commit_id
	ne.PutUint16(s[64:], uint16(q.QID))
}

// Retry resubmits entry i's last command (its completion was EINTR or
// EAGAIN), as libfuse does.
func (q *Queue) Retry(i int) { q.cmd(i, q.Ents[i].lastOp, q.Ents[i].lastID) }

// Commit answers the request in entry i with the reply built in Out (n
// bytes, header included) and arms the entry for the next request.
func (q *Queue) Commit(i, n int) {
	e := q.Ents[i]
	ne := binary.NativeEndian
	unique := ne.Uint64(e.Hdr[8:]) // the in header's, still there
	copy(e.Hdr[0:16], e.Out()[:16])
	ne.PutUint64(e.Hdr[8:], unique)
	ne.PutUint32(e.Hdr[0:], uint32(n))
	ne.PutUint32(e.Hdr[entInOut+16:], uint32(n-16)) // payload_sz
	q.cmd(i, cmdCommit, unique)
}

// Reply answers the request in entry i with errno and the first payload
// bytes of Pay as the body.
func (q *Queue) Reply(i int, errno unix.Errno, payload int) {
	out := q.Ents[i].Out()
	binary.NativeEndian.PutUint32(out[4:], uint32(-int32(errno)))
	q.Commit(i, 16+payload)
}
