package fs

import (
	"encoding/binary"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// handlelessDir serves the opens of directories whose handles hold
// nothing between READDIRs without keeping a go-fuse handle for each.
// go-fuse keeps a handle from every OPENDIR to its RELEASEDIR: about
// 4.3 KB (a pooled 4 KiB buffer of 100 entries, for replaying an
// interrupted READDIR, and its table entry), so a user holding directory
// fds, which any user of the mount may, would grow the daemon by that
// much a fd, past 370 MB at 80,000. A directory whose listing is resumed
// from the kernel's offset alone (the root's, rootdir.go) says so with
// fopenHandleless in its open flags, and then:
//
//   - the handle go-fuse opened for the OPENDIR is released at once, and
//     the kernel gets fh 0, which go-fuse takes for "no handle" in any
//     request that carries it (it numbers its handles from 1);
//   - a READDIR or READDIRPLUS of fh 0 is served on a handle go-fuse
//     opens for that request alone, and seeks to the request's offset;
//   - a RELEASEDIR of fh 0 is answered here: there is nothing to release.
//
// An open directory then costs the daemon nothing, and a READDIR an open
// and a release inside it. Other directories keep their handles.
type handlelessDir struct{ ps *fuse.ProtocolServer }

// fopenHandleless, in the open flags a directory's OpendirHandle returns,
// says its handles hold nothing between READDIRs. The kernel never sees
// it: a flag of ours, far above the FOPEN_ ones.
const fopenHandleless = 1 << 31

// FUSE opcodes and sizes of the directory requests (<linux/fuse.h>).
const (
	opOpendir       = 27
	opReaddir       = 28
	opReleasedir    = 29
	opReaddirplus   = 44
	opendirInLen    = inHeaderLen + 8  // struct fuse_open_in
	opendirOutLen   = 16 + 16          // struct fuse_open_out after the reply header: fh at 16, open_flags at 24
	releasedirInLen = inHeaderLen + 24 // struct fuse_release_in: fh at 40
)

// owns reports whether serve answers the request in.
func (h handlelessDir) owns(op uint32, in []byte) bool {
	switch op {
	case opOpendir:
		return len(in) >= opendirInLen
	case opReaddir, opReaddirplus:
		return len(in) >= readInLen && binary.NativeEndian.Uint64(in[40:]) == 0
	case opReleasedir:
		return len(in) >= releasedirInLen && binary.NativeEndian.Uint64(in[40:]) == 0
	}
	return false
}

// serve answers a request owns accepted, building the reply in out, as
// go-fuse's HandleRequest does.
func (h handlelessDir) serve(op uint32, in, out []byte) (int, fuse.Status) {
	ne := binary.NativeEndian
	switch op {
	case opOpendir:
		n, st := h.ps.HandleRequest([][]byte{in}, [][]byte{out})
		if st.Ok() && n >= opendirOutLen && ne.Uint32(out[4:]) == 0 && ne.Uint32(out[24:])&fopenHandleless != 0 {
			h.release(in, ne.Uint64(out[16:]))
			ne.PutUint64(out[16:], 0)
			ne.PutUint32(out[24:], ne.Uint32(out[24:])&^fopenHandleless)
		}
		return n, st
	case opReleasedir:
		ne.PutUint32(out[0:], 16)
		ne.PutUint32(out[4:], 0)
		copy(out[8:16], in[8:16])
		return 16, fuse.OK
	}
	fh, e := h.open(in)
	if e != 0 {
		return errorReply(in, out, e), fuse.OK
	}
	ne.PutUint64(in[40:], fh)
	n, st := h.ps.HandleRequest([][]byte{in}, [][]byte{out})
	h.release(in, fh)
	return n, st
}

// open opens the directory in go-fuse for the request in (its unique,
// nodeid and caller) and returns the handle's fh.
func (h handlelessDir) open(in []byte) (uint64, syscall.Errno) {
	var req [opendirInLen]byte
	headerFor(req[:], in, opOpendir)
	binary.NativeEndian.PutUint32(req[inHeaderLen:], syscall.O_RDONLY|syscall.O_DIRECTORY)
	var rep [opendirOutLen]byte
	n, st := h.ps.HandleRequest([][]byte{req[:]}, [][]byte{rep[:]})
	switch {
	case !st.Ok():
		return 0, syscall.Errno(st)
	case n < 16:
		return 0, syscall.EIO
	case binary.NativeEndian.Uint32(rep[4:]) != 0:
		return 0, syscall.Errno(-int32(binary.NativeEndian.Uint32(rep[4:])))
	case n < opendirOutLen:
		return 0, syscall.EIO
	}
	return binary.NativeEndian.Uint64(rep[16:]), 0
}

// release releases go-fuse's handle fh, opened for the request in.
func (h handlelessDir) release(in []byte, fh uint64) {
	var req [releasedirInLen]byte
	headerFor(req[:], in, opReleasedir)
	binary.NativeEndian.PutUint64(req[40:], fh)
	var rep [16]byte
	_, _ = h.ps.HandleRequest([][]byte{req[:]}, [][]byte{rep[:]})
}

// headerFor fills the header of req, a request the daemon makes for the
// kernel's request in: in's unique, nodeid and caller, the opcode op, and
// no extensions (in's are not copied).
func headerFor(req, in []byte, op uint32) {
	copy(req[:inHeaderLen], in[:inHeaderLen])
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint32(req[4:], op)
	binary.NativeEndian.PutUint16(req[36:], 0) // total_extlen
}
