package fuseuring

import (
	"fmt"
	"unsafe"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// ReqHeader is struct fuse_uring_req_header, an entry's header buffer.
type ReqHeader struct {
	// InOut holds the request's fuse_in_header when the entry completes,
	// and the reply's fuse_out_header when it is committed.
	InOut [128]byte
	// OpIn holds the operation's own header (struct fuse_read_in, ...).
	OpIn [128]byte
	Ent  EntInOut
}

// EntInOut is struct fuse_uring_ent_in_out.
type EntInOut struct {
	Flags     uint64
	CommitID  uint64 // the kernel's, in a request; unused by the server
	PayloadSz uint32 // of the request in Pay, or of the reply body
	Padding   uint32
	Reserved  uint64
}

// cmdReq is struct fuse_uring_cmd_req, a FUSE uring command's argument
// in the SQE's command area.
type cmdReq struct {
	Flags    uint64
	CommitID uint64 // COMMIT_AND_FETCH: the unique of the request answered
	QID      uint16
	Padding  [6]uint8
}

// fuseCmd is s's command area as a FUSE uring command.
func (s *sqe) fuseCmd() *cmdReq { return (*cmdReq)(unsafe.Pointer(&s.Cmd)) }

const (
	// HeaderSize is sizeof(struct fuse_uring_req_header), a ReqHeader.
	HeaderSize = 288
	// OpIn is where the operation's own header starts, ReqHeader.OpIn.
	OpIn = 128

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
	hdr      *ReqHeader // Hdr's
	iov      *[2]unix.Iovec
	lastOp   uint32 // the last command, to resubmit on EAGAIN/EINTR
	lastID   uint64
}

// Header is the entry's header buffer, Hdr, as its struct.
func (e *Entry) Header() *ReqHeader { return e.hdr }

// in is the request's fuse_in_header.
func (e *Entry) in() *fuse.InHeader { return (*fuse.InHeader)(unsafe.Pointer(&e.hdr.InOut)) }

// Op is the request's opcode.
func (e *Entry) Op() uint32 { return e.in().Opcode }

// PayloadSize is how much of Pay the request filled.
func (e *Entry) PayloadSize() int { return int(e.hdr.Ent.PayloadSz) }

// InView is the request in entry e as go-fuse's struct for it, T
// (fuse.ReadIn, fuse.WriteIn, ...: the in header, then the operation's
// own), without a copy: a view of Hdr placed so that T's own fields fall
// on OpIn. The InHeader T embeds is then not the request's but the unused
// tail of InOut, to be neither read nor written: the header is
// fusewire.Header(e.Hdr). nil if T's own fields overrun op_in's 128 bytes.
func InView[T any](e *Entry) *T {
	return fusewire.View[T](e.Hdr[OpIn-fusewire.InHeaderSize : OpIn+len(e.hdr.OpIn)])
}

// Request copies the request into dst as read(2) on /dev/fuse would give
// it: fuse_in_header, the operation's header, the payload. The in
// header's len counts all three, which gives the operation header's size.
func (e *Entry) Request(dst []byte) ([]byte, error) {
	const hs = fusewire.InHeaderSize
	total := int(e.in().Length)
	pay := e.PayloadSize()
	opLen := total - hs - pay
	if opLen < 0 || opLen > len(e.hdr.OpIn) || pay > len(e.Pay) || total > len(dst) {
		return nil, fmt.Errorf("fuse ring request op %d: len %d, payload %d", e.Op(), total, pay)
	}
	copy(dst[:hs], e.hdr.InOut[:hs])
	copy(dst[hs:], e.hdr.OpIn[:opLen])
	copy(dst[hs+opLen:], e.Pay[:pay])
	return dst[:total], nil
}

// Out is where a reply is built as write(2) on /dev/fuse would take it:
// a fuse_out_header then the body, which is Pay itself, so a
// reply's body (a READ's packet) is written where the kernel takes it
// from. Commit moves the header into place.
func (e *Entry) Out() []byte { return e.mem[hdrSpace-fusewire.OutHeaderSize:] }

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
	e := &Entry{mem: mem, Hdr: mem[:HeaderSize], Pay: mem[hdrSpace:], hdr: (*ReqHeader)(unsafe.Pointer(&mem[0]))}
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
	s := q.Ring.next()
	s.Opcode = ioringOpURingCmd
	s.Flags = iosqeFixedFile
	s.Fd = 0 // fixed file 0, /dev/fuse
	s.setCmdOp(op)
	s.UserData = uint64(i)
	if op == cmdRegister {
		s.Addr = uint64(uintptr(unsafe.Pointer(e.iov)))
		s.Len = uint32(len(e.iov))
	}
	*s.fuseCmd() = cmdReq{CommitID: commitID, QID: uint16(q.QID)}
}

// Retry resubmits entry i's last command (its completion was EINTR or
// EAGAIN), as libfuse does.
func (q *Queue) Retry(i int) { q.cmd(i, q.Ents[i].lastOp, q.Ents[i].lastID) }

// Commit answers the request in entry i with the reply built in Out (n
// bytes, header included) and arms the entry for the next request.
func (q *Queue) Commit(i, n int) {
	e := q.Ents[i]
	unique := e.in().Unique // the request's, still there
	*fusewire.Out(e.hdr.InOut[:]) = fuse.OutHeader{Length: uint32(n), Status: fusewire.Out(e.Out()).Status, Unique: unique}
	e.hdr.Ent.PayloadSz = uint32(n - fusewire.OutHeaderSize)
	q.cmd(i, cmdCommit, unique)
}

// Reply answers the request in entry i with errno and the first payload
// bytes of Pay as the body.
func (q *Queue) Reply(i int, errno unix.Errno, payload int) {
	fusewire.Out(q.Ents[i].Out()).Status = -int32(errno)
	q.Commit(i, fusewire.OutHeaderSize+payload)
}
