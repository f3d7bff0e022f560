package transport

import (
	"syscall"
	"unsafe"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// handlelessDir serves the opens of directories whose handles hold
// nothing between READDIRs without keeping a go-fuse handle for each.
// go-fuse keeps a handle from every OPENDIR to its RELEASEDIR: about
// 4.3 KB (a pooled 4 KiB buffer of 100 entries, for replaying an
// interrupted READDIR, and its table entry), so a user holding directory
// fds, which any user of the mount may, would grow the daemon by that
// much a fd, past 370 MB at 80,000. A directory whose listing is resumed
// from the kernel's offset alone (the root's) says so with
// FopenHandleless in its open flags, and then:
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
type handlelessDirs struct{ c *Conn }

// Sizes of the directory requests and replies.
const (
	sizeofOpenIn    = int(unsafe.Sizeof(fuse.OpenIn{}))
	sizeofOpenOut   = int(unsafe.Sizeof(fuse.OpenOut{}))
	sizeofReleaseIn = int(unsafe.Sizeof(fuse.ReleaseIn{}))
)

// owns reports whether serve answers the request in.
func (d handlelessDirs) owns(op uint32, in []byte) bool {
	switch op {
	case fusewire.OpOpendir:
		return fusewire.View[fuse.OpenIn](in) != nil
	case fusewire.OpReaddir, fusewire.OpReaddirplus:
		r := fusewire.View[fuse.ReadIn](in)
		return r != nil && r.Fh == 0
	case fusewire.OpReleasedir:
		r := fusewire.View[fuse.ReleaseIn](in)
		return r != nil && r.Fh == 0
	}
	return false
}

// serve answers a request owns accepted, building the reply in out, as
// go-fuse's HandleRequest does; ok as ServeGoFuse's.
func (d handlelessDirs) serve(op uint32, in, out []byte) (n int, ok bool) {
	switch op {
	case fusewire.OpOpendir:
		n, ok := d.c.ServeGoFuse(in, out)
		if !ok || fusewire.Status(out[:n]) != 0 {
			return n, ok
		}
		if o := fusewire.OutBody[fuse.OpenOut](out[:n]); o != nil && o.OpenFlags&FopenHandleless != 0 {
			d.release(in, o.Fh)
			o.Fh = 0
			o.OpenFlags &^= FopenHandleless
		}
		return n, true
	case fusewire.OpReleasedir:
		return fusewire.Reply(out, fusewire.Header(in).Unique, 0, 0), true
	}
	fh, e := d.open(in)
	if e != 0 {
		return fusewire.ErrorReply(in, out, e), true
	}
	r := fusewire.View[fuse.ReadIn](in)
	r.Fh = fh
	n, ok = d.c.ServeGoFuse(in, out)
	d.release(in, fh)
	return n, ok
}

// open opens the directory in go-fuse for the request in (its unique,
// nodeid and caller) and returns the handle's fh.
func (d handlelessDirs) open(in []byte) (uint64, syscall.Errno) {
	var req [sizeofOpenIn]byte
	o := fusewire.View[fuse.OpenIn](req[:])
	o.InHeader = headerFor(in, fusewire.OpOpendir, len(req))
	o.Flags = syscall.O_RDONLY | syscall.O_DIRECTORY
	var rep [fusewire.OutHeaderSize + sizeofOpenOut]byte
	n, ok := d.c.ServeGoFuse(req[:], rep[:])
	if !ok {
		return 0, syscall.EIO
	}
	if e := fusewire.Status(rep[:n]); e != 0 {
		return 0, e
	}
	out := fusewire.OutBody[fuse.OpenOut](rep[:n])
	if out == nil {
		return 0, syscall.EIO
	}
	return out.Fh, 0
}

// release releases go-fuse's handle fh, opened for the request in.
func (d handlelessDirs) release(in []byte, fh uint64) {
	var req [sizeofReleaseIn]byte
	r := fusewire.View[fuse.ReleaseIn](req[:])
	r.InHeader = headerFor(in, fusewire.OpReleasedir, len(req))
	r.Fh = fh
	var rep [fusewire.OutHeaderSize]byte
	_, _ = d.c.ServeGoFuse(req[:], rep[:])
}
