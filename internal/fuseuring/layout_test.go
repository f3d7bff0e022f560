package fuseuring

import (
	"encoding/binary"
	"testing"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// TestLayout checks the structs this package lays over kernel memory
// against the kernel's ABI: the sizes and offsets of <linux/io_uring.h>
// and of <linux/fuse.h>'s FUSE-over-io_uring structs, as offsetof gives
// them on a 64-bit Linux.
func TestLayout(t *testing.T) {
	var (
		sq  sqe
		cq  cqe
		p   params
		so  sqRingOffsets
		co  cqRingOffsets
		cmd cmdReq
		h   ReqHeader
		ent EntInOut
	)
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		// struct io_uring_sqe, 128 bytes with IORING_SETUP_SQE128.
		{"sizeof(io_uring_sqe) with SQE128", unsafe.Sizeof(sq), 128},
		{"io_uring_sqe.opcode", unsafe.Offsetof(sq.Opcode), 0},
		{"io_uring_sqe.flags", unsafe.Offsetof(sq.Flags), 1},
		{"io_uring_sqe.ioprio", unsafe.Offsetof(sq.Ioprio), 2},
		{"io_uring_sqe.fd", unsafe.Offsetof(sq.Fd), 4},
		{"io_uring_sqe.off (cmd_op)", unsafe.Offsetof(sq.Off), 8},
		{"io_uring_sqe.addr", unsafe.Offsetof(sq.Addr), 16},
		{"io_uring_sqe.len", unsafe.Offsetof(sq.Len), 24},
		{"io_uring_sqe.rw_flags (poll32_events)", unsafe.Offsetof(sq.OpFlags), 28},
		{"io_uring_sqe.user_data", unsafe.Offsetof(sq.UserData), 32},
		{"io_uring_sqe.buf_index", unsafe.Offsetof(sq.BufIndex), 40},
		{"io_uring_sqe.personality", unsafe.Offsetof(sq.Persona), 42},
		{"io_uring_sqe.file_index", unsafe.Offsetof(sq.FileIdx), 44},
		{"io_uring_sqe.cmd (addr3)", unsafe.Offsetof(sq.Cmd), 48},
		{"sizeof(io_uring_sqe.cmd) with SQE128", unsafe.Sizeof(sq.Cmd), 80},

		// struct io_uring_cqe, without CQE32.
		{"sizeof(io_uring_cqe)", unsafe.Sizeof(cq), 16},
		{"io_uring_cqe.user_data", unsafe.Offsetof(cq.UserData), 0},
		{"io_uring_cqe.res", unsafe.Offsetof(cq.Res), 8},
		{"io_uring_cqe.flags", unsafe.Offsetof(cq.Flags), 12},

		// struct io_uring_params and its ring offsets.
		{"sizeof(io_uring_params)", unsafe.Sizeof(p), 120},
		{"io_uring_params.sq_entries", unsafe.Offsetof(p.SQEntries), 0},
		{"io_uring_params.cq_entries", unsafe.Offsetof(p.CQEntries), 4},
		{"io_uring_params.flags", unsafe.Offsetof(p.Flags), 8},
		{"io_uring_params.features", unsafe.Offsetof(p.Features), 20},
		{"io_uring_params.wq_fd", unsafe.Offsetof(p.WQFd), 24},
		{"io_uring_params.sq_off", unsafe.Offsetof(p.SQOff), 40},
		{"io_uring_params.cq_off", unsafe.Offsetof(p.CQOff), 80},
		{"sizeof(io_sqring_offsets)", unsafe.Sizeof(so), 40},
		{"io_sqring_offsets.head", unsafe.Offsetof(so.Head), 0},
		{"io_sqring_offsets.tail", unsafe.Offsetof(so.Tail), 4},
		{"io_sqring_offsets.ring_mask", unsafe.Offsetof(so.RingMask), 8},
		{"io_sqring_offsets.array", unsafe.Offsetof(so.Array), 24},
		{"io_sqring_offsets.user_addr", unsafe.Offsetof(so.UserAddr), 32},
		{"sizeof(io_cqring_offsets)", unsafe.Sizeof(co), 40},
		{"io_cqring_offsets.head", unsafe.Offsetof(co.Head), 0},
		{"io_cqring_offsets.tail", unsafe.Offsetof(co.Tail), 4},
		{"io_cqring_offsets.ring_mask", unsafe.Offsetof(co.RingMask), 8},
		{"io_cqring_offsets.cqes", unsafe.Offsetof(co.CQEs), 20},
		{"io_cqring_offsets.user_addr", unsafe.Offsetof(co.UserAddr), 32},

		// struct fuse_uring_cmd_req, in the SQE's command area.
		{"sizeof(fuse_uring_cmd_req)", unsafe.Sizeof(cmd), 24},
		{"fuse_uring_cmd_req.flags", unsafe.Offsetof(cmd.Flags), 0},
		{"fuse_uring_cmd_req.commit_id", unsafe.Offsetof(cmd.CommitID), 8},
		{"fuse_uring_cmd_req.qid", unsafe.Offsetof(cmd.QID), 16},
		{"fuse_uring_cmd_req.padding", unsafe.Offsetof(cmd.Padding), 18},

		// struct fuse_uring_req_header and fuse_uring_ent_in_out.
		{"sizeof(fuse_uring_req_header)", unsafe.Sizeof(h), 288},
		{"fuse_uring_req_header.in_out", unsafe.Offsetof(h.InOut), 0},
		{"fuse_uring_req_header.op_in", unsafe.Offsetof(h.OpIn), 128},
		{"fuse_uring_req_header.ring_ent_in_out", unsafe.Offsetof(h.Ent), 256},
		{"sizeof(fuse_uring_ent_in_out)", unsafe.Sizeof(ent), 32},
		{"fuse_uring_ent_in_out.flags", unsafe.Offsetof(ent.Flags), 0},
		{"fuse_uring_ent_in_out.commit_id", unsafe.Offsetof(ent.CommitID), 8},
		{"fuse_uring_ent_in_out.payload_sz", unsafe.Offsetof(ent.PayloadSz), 16},
		{"fuse_uring_ent_in_out.padding", unsafe.Offsetof(ent.Padding), 20},
		{"fuse_uring_ent_in_out.reserved", unsafe.Offsetof(ent.Reserved), 24},

		// The package's constants agree with the structs.
		{"HeaderSize", HeaderSize, unsafe.Sizeof(h)},
		{"OpIn", OpIn, unsafe.Offsetof(h.OpIn)},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}

// TestEntryViews: the typed views of an entry read what the kernel
// writes where <linux/fuse.h> says it does (a READ's fuse_read_in at
// op_in, payload_sz in ring_ent_in_out), and the SQE's command and
// cmd_op land in the bytes the kernel reads.
func TestEntryViews(t *testing.T) {
	mem := make([]uint64, hdrSpace/8) // 8-byte aligned, as an entry's mmap
	b := unsafe.Slice((*byte)(unsafe.Pointer(&mem[0])), hdrSpace)
	e := &Entry{mem: b, Hdr: b[:HeaderSize], hdr: (*ReqHeader)(unsafe.Pointer(&b[0]))}
	ne := binary.NativeEndian
	ne.PutUint32(b[4:], 15)               // in header: opcode READ
	ne.PutUint32(b[OpIn+16:], 4096)       // fuse_read_in.size
	ne.PutUint32(b[OpIn+32:], 0o4000)     // fuse_read_in.flags
	ne.PutUint32(b[HeaderSize-16:], 1234) // payload_sz
	r := InView[fuse.ReadIn](e)
	if e.Op() != 15 || r.Size != 4096 || r.Flags != 0o4000 || e.PayloadSize() != 1234 {
		t.Errorf("op %d, read size %d, flags %#o, payload %d; want 15, 4096, 0o4000, 1234", e.Op(), r.Size, r.Flags, e.PayloadSize())
	}

	var s sqe
	s.setCmdOp(cmdCommit)
	*s.fuseCmd() = cmdReq{CommitID: 0x1122334455667788, QID: 3}
	sb := unsafe.Slice((*byte)(unsafe.Pointer(&s)), unsafe.Sizeof(s))
	if op, id, qid := ne.Uint32(sb[8:]), ne.Uint64(sb[56:]), ne.Uint16(sb[64:]); op != cmdCommit || id != 0x1122334455667788 || qid != 3 {
		t.Errorf("SQE bytes: cmd_op %d, commit_id %#x, qid %d", op, id, qid)
	}
}
