// Package transport serves one FUSE connection's requests, whatever
// carries them: it answers each request, as read(2) on /dev/fuse gives
// it, into a reply buffer, handing most to go-fuse's protocol server and
// answering the packet path (READ, WRITE, POLL of device files) itself.
// The carriers are packages of their own: transport/devfuse reads
// requests from /dev/fuse, transport/uring takes them from
// FUSE-over-io_uring queues. The tree is reached only through go-fuse
// and the small Files interface (files.go).
//
// Owning the request loop is what lets cdevfs answer FUSE_POLL, which
// go-fuse's own server refuses with ENOSYS, serve a packet without an
// allocation, and carry requests over io_uring.
package transport

import (
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Conn is one FUSE connection: the /dev/fuse fd, the go-fuse protocol
// server behind it, and whether and why it stopped being served.
type Conn struct {
	dev     *os.File
	ps      *fuse.ProtocolServer
	files   Files
	notify  *Notifier
	log     *slog.Logger
	metrics *metrics.Metrics // request latency; nil counts nothing

	// fast serves device READs and WRITEs without go-fuse; off under
	// --debug, so that go-fuse logs every request.
	fast bool
	// bufSize is the size a request buffer needs: the largest WRITE
	// and its headers.
	bufSize int

	inited      chan struct{} // closed once INIT is answered
	initOnce    sync.Once
	ringsAsked  bool // the INIT reply asked for io_uring; written before inited closes
	interrupter atomic.Pointer[interrupterBox]

	// ended is closed, once, when the connection stops being served: the
	// kernel ended it (an unmount, an abort through fusectl, or the fd's
	// close) or a carrier failed, endErr saying how (written before ended
	// is closed).
	ended   chan struct{}
	endOnce sync.Once
	endErr  error
}

// Options configure a Conn.
type Options struct {
	Log      *slog.Logger
	Metrics  *metrics.Metrics
	Debug    bool // no fast path: go-fuse sees (and logs) every READ and WRITE
	MaxWrite int  // the largest WRITE the mount allows
}

// An Interrupter takes the INTERRUPTs for requests that a carrier holds
// outside go-fuse (transport/uring's parked READs).
type Interrupter interface {
	// Interrupt serves INTERRUPT request in, its reply (if any) in out.
	Interrupt(in, out []byte) int
}

type interrupterBox struct{ i Interrupter }

// Sizes of the bodies the fast path reads and writes.
const (
	sizeofWriteIn  = int(unsafe.Sizeof(fuse.WriteIn{}))
	sizeofWriteOut = int(unsafe.Sizeof(fuse.WriteOut{}))
	sizeofPollOut  = int(unsafe.Sizeof(fusewire.PollOut{}))
	sizeofIoctlIn  = int(unsafe.Sizeof(fuse.IoctlIn{}))
	sizeofIoctlOut = int(unsafe.Sizeof(fuse.IoctlOut{}))
)

// NewConn serves the connection on dev through ps, whose tree gives the
// device files; n writes its notifications.
func NewConn(dev *os.File, ps *fuse.ProtocolServer, files Files, n *Notifier, o Options) *Conn {
	return &Conn{dev: dev, ps: ps, files: files, notify: n, log: o.Log, metrics: o.Metrics,
		fast: !o.Debug, bufSize: o.MaxWrite + 64*1024, inited: make(chan struct{}), ended: make(chan struct{})}
}

// Dev is the /dev/fuse fd.
func (c *Conn) Dev() *os.File { return c.dev }

// Log is where the connection logs.
func (c *Conn) Log() *slog.Logger { return c.log }

// Metrics counts the requests (nil: nothing).
func (c *Conn) Metrics() *metrics.Metrics { return c.metrics }

// Files are the tree's device files.
func (c *Conn) Files() Files { return c.files }

// Fast says whether device READs skip go-fuse.
func (c *Conn) Fast() bool { return c.fast }

// BufSize is the size of a buffer that holds any request.
func (c *Conn) BufSize() int { return c.bufSize }

// SetInterrupter routes INTERRUPTs to i from now on.
func (c *Conn) SetInterrupter(i Interrupter) { c.interrupter.Store(&interrupterBox{i}) }

// InitAnswered is told by the carrier once the reply to INIT, reply, is
// written: the kernel now sends other requests.
func (c *Conn) InitAnswered(reply []byte) {
	c.initOnce.Do(func() {
		if o := fusewire.OutBody[fuse.InitOut](reply); o != nil && fusewire.Status(reply) == 0 {
			c.ringsAsked = o.Flags2&uint32(fuse.CAP_OVER_IO_URING>>32) != 0
		}
		close(c.inited)
	})
}

// Inited is closed once INIT is answered.
func (c *Conn) Inited() <-chan struct{} { return c.inited }

// RingsAsked says whether the INIT reply asked for FUSE over io_uring
// (go-fuse asks when told to and the kernel offered it). Valid once
// Inited is closed.
func (c *Conn) RingsAsked() bool { return c.ringsAsked }

// End says the connection stopped being served, the first time with err
// (nil: the kernel ended it).
func (c *Conn) End(err error) {
	c.endOnce.Do(func() {
		c.endErr = err
		close(c.ended)
	})
}

// Ended is closed when the connection stops being served.
func (c *Conn) Ended() <-chan struct{} { return c.ended }

// Err says why Ended is closed; nil while it is open.
func (c *Conn) Err() error {
	select {
	case <-c.ended:
		return c.endErr
	default:
		return nil
	}
}

// Serve serves request in, as read(2) on /dev/fuse gives it, and builds
// the reply in out; n is its length, 0 for none. Unless mayBlock, a READ
// the fast path does not answer is left alone (blocked is true): it may
// wait for a packet, and the caller must not.
func (c *Conn) Serve(in, out []byte, mayBlock bool) (n int, blocked bool) {
	hdr := fusewire.Header(in)
	if hdr == nil {
		c.log.Error("short FUSE request", "bytes", len(in))
		return 0, false
	}
	start := time.Now()
	op := hdr.Opcode
	defer c.answerPanic(in, out, &n)
	if c.fast {
		if n, ok := c.fastPath(op, in, out); ok {
			c.metrics.Request(op, start) // the request's latency (fast path included)
			return n, false
		}
	}
	if op == fusewire.OpRead && !mayBlock {
		return 0, true
	}
	defer c.metrics.Request(op, start)
	if r := fusewire.View[fuse.ReadIn](in); op == fusewire.OpRead && r != nil {
		// Device files are streams (FOPEN_STREAM): the offset means
		// nothing, and go-fuse's Read does not pass the file's flags. Put
		// the flags where the offset was, so a file sees O_NONBLOCK as it
		// is now (fcntl and FIONBIO change it without telling us).
		r.Offset = uint64(r.Flags)
	}
	switch {
	case op == fusewire.OpInterrupt && c.interrupter.Load() != nil:
		n = c.interrupter.Load().i.Interrupt(in, out)
	case op == fusewire.OpPoll:
		n = c.poll(in, out)
	case op >= fusewire.OpSetxattr && op <= fusewire.OpRemovexattr:
		// No node has extended attributes. ENOSYS (go-fuse would answer
		// ENODATA every time) makes the kernel stop asking for the
		// connection's life: `ls -l` asks for security.selinux on every
		// entry, a daemon round trip each that a large tree pays for.
		n = fusewire.ErrorReply(in, out, syscall.ENOSYS)
	case op == fusewire.OpIoctl && isIdentify(in):
		// The private command is ours alone: a user's ioctl(2) with the
		// same number is refused, so a file never mistakes it for ours.
		n = fusewire.ErrorReply(in, out, syscall.ENOTTY)
	default:
		var ok bool
		if dirs := (handlelessDirs{c}); dirs.owns(op, in) {
			n, ok = dirs.serve(op, in, out)
		} else {
			n, ok = c.ServeGoFuse(in, out)
		}
		if !ok {
			n = fusewire.ErrorReply(in, out, syscall.EIO)
		}
		if op == fusewire.OpOpen && fusewire.Status(out[:n]) == 0 {
			if o := fusewire.OutBody[fuse.OpenOut](out[:n]); o != nil {
				c.identify(in, o.Fh)
			}
		}
	}
	return n, false
}

// ServeGoFuse has go-fuse serve request in, the reply in out. ok is
// false (and logged) if go-fuse could not parse it.
func (c *Conn) ServeGoFuse(in, out []byte) (n int, ok bool) {
	n, st := c.ps.HandleRequest([][]byte{in}, [][]byte{out})
	if !st.Ok() {
		c.log.Error("FUSE request not handled", "opcode", fusewire.Opcode(in), "status", st)
		return n, false
	}
	return n, true
}

// ServeQueued is Serve for a carrier whose thread must not block (an
// io_uring queue's): besides a READ that must wait for a packet, it
// leaves an OPEN that must wait for a closing holder (blocked is true),
// with in as it came, to be served where it may wait. The RELEASE that
// OPEN waits for may be queued behind it on the same thread.
func (c *Conn) ServeQueued(in, out []byte) (n int, blocked bool) {
	o := fusewire.View[fuse.OpenIn](in)
	if o == nil || o.Opcode != fusewire.OpOpen {
		return c.Serve(in, out, false)
	}
	flags := o.Flags
	o.Flags |= OpenNoWait
	n, _ = c.Serve(in, out, false)
	o.Flags = flags
	if fusewire.Status(out[:n]) == ErrnoOpenWouldWait {
		return 0, true
	}
	return n, false
}

// answerPanic, deferred by Serve, answers a request whose handling here
// panicked as go-fuse answers one whose handler did: EIO, logged at ERROR
// and counted. The tree is not left half-changed: nothing on these paths
// changes it.
func (c *Conn) answerPanic(in, out []byte, n *int) {
	if r := recover(); r != nil {
		PanicHandler(c.log, c.metrics)(r)
		*n = fusewire.ErrorReply(in, out, syscall.EIO)
	}
}

// PanicHandler answers a request whose handler panicked: EIO, a line at
// ERROR with the stack, and the panic counted. A panic is a bug, never a
// client's doing; go-fuse's own handler would log it where only --debug
// shows it.
func PanicHandler(log *slog.Logger, m *metrics.Metrics) func(any) fuse.Status {
	return func(r any) fuse.Status {
		m.Panicked()
		log.Error("panic in a FUSE request handler", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		return fuse.EIO
	}
}

// fastPath serves READ, WRITE and POLL of a device file without go-fuse:
// the fh is looked up in the tree's Files, a READ reads the packet
// straight into the reply buffer, a WRITE writes the request's payload,
// and nothing is allocated. ok is false for anything else, and for a
// blocking READ with no packet queued (go-fuse then serves it, with its
// interrupt handling).
func (c *Conn) fastPath(op uint32, in, out []byte) (n int, ok bool) {
	switch op {
	case fusewire.OpRead:
		r := fusewire.View[fuse.ReadIn](in)
		if r == nil {
			return 0, false
		}
		f := c.files.File(r.Fh)
		if f == nil || fusewire.OutHeaderSize+int(r.Size) > len(out) {
			return 0, false
		}
		n, wait := ReadReply(f, in, out, int(r.Size), r.Flags&syscall.O_NONBLOCK != 0)
		return n, !wait
	case fusewire.OpWrite:
		w := fusewire.View[fuse.WriteIn](in)
		if w == nil {
			return 0, false
		}
		body := in[sizeofWriteIn:]
		f := c.files.File(w.Fh)
		if f == nil || int(w.Size) > len(body) {
			return 0, false
		}
		m, e := f.WriteNow(body[:w.Size])
		if e != 0 {
			return fusewire.ErrorReply(in, out, e), true
		}
		*fusewire.OutBody[fuse.WriteOut](out) = fuse.WriteOut{Size: uint32(m)}
		return fusewire.Reply(out, w.Unique, 0, sizeofWriteOut), true
	case fusewire.OpPoll:
		return c.poll(in, out), true
	}
	return 0, false
}

// ReadReply answers a READ of size bytes on device file f: one packet
// straight into out's body, or the error; in is the request. wait says
// no packet is queued and a blocking READ must wait: nothing was built.
// It allocates nothing.
func ReadReply(f File, in, out []byte, size int, nonblock bool) (n int, wait bool) {
	m, e, wait := f.ReadNow(out[fusewire.OutHeaderSize:fusewire.OutHeaderSize+size], nonblock)
	switch {
	case wait:
		return 0, true
	case e != 0:
		return fusewire.ErrorReply(in, out, e), false
	}
	return fusewire.Reply(out, fusewire.Header(in).Unique, 0, m), false
}

// poll answers FUSE_POLL. A file that is not a device file (a directory,
// a file a user made) is always ready, as the kernel reports a file
// without poll support (DEFAULT_POLLMASK).
func (c *Conn) poll(in, out []byte) int {
	p := fusewire.View[fusewire.PollIn](in)
	if p == nil {
		return fusewire.ErrorReply(in, out, syscall.EINVAL)
	}
	revents := uint32(DefaultPollMask)
	if f := c.files.File(p.Fh); f != nil {
		revents = f.Poll(p.Kh, p.Flags&fusewire.PollScheduleNotify != 0, c.notify)
	}
	*fusewire.OutBody[fusewire.PollOut](out) = fusewire.PollOut{Revents: revents}
	return fusewire.Reply(out, p.Unique, 0, sizeofPollOut)
}

// Poll masks (<poll.h>); DefaultPollMask is what a file without poll
// support reports (DEFAULT_POLLMASK).
const (
	PollIn          = 0x1
	PollOut         = 0x4
	PollErr         = 0x8
	PollHup         = 0x10
	PollNval        = 0x20
	PollRdNorm      = 0x40
	PollWrNorm      = 0x100
	DefaultPollMask = PollIn | PollOut | PollRdNorm | PollWrNorm
)

// identify tells the device file go-fuse registered under fh for the
// OPEN request in its fh (Files), before the reply is written, so before
// any READ can carry fh: an IOCTL with IdentifyCmd, which go-fuse routes
// by fh like any other. Files of other kinds do not know the command.
func (c *Conn) identify(open []byte, fh uint64) {
	if fh == 0 {
		return
	}
	var buf [sizeofIoctlIn]byte
	req := fusewire.View[fuse.IoctlIn](buf[:])
	req.InHeader = headerFor(open, fusewire.OpIoctl, len(buf))
	req.Fh, req.Cmd, req.Arg = fh, IdentifyCmd, fh
	var rep [fusewire.OutHeaderSize + sizeofIoctlOut]byte
	_, _ = c.ps.HandleRequest([][]byte{buf[:]}, [][]byte{rep[:]})
}

// headerFor is the header of a request of size bytes the daemon makes
// for the kernel's request in: in's unique, nodeid and caller, the opcode
// op, and no extensions (in's are not copied).
func headerFor(in []byte, op uint32, size int) fuse.InHeader {
	h := *fusewire.Header(in)
	h.Length, h.Opcode, h.TotalExtlen = uint32(size), op, 0
	return h
}

func isIdentify(in []byte) bool {
	r := fusewire.View[fuse.IoctlIn](in)
	return r != nil && r.Cmd == IdentifyCmd
}
