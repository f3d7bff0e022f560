// Package fs is the go-fuse tree of cdevfs: the root directory, the static
// nodes (null, zero, ...), the clone nodes tun and tap, one node per
// interface, and open handles that proxy to the devices of package devnode.
//
// Nodes here hold no lock of their own; devnode's lock order applies.
package fs

import (
	"context"
	"crypto/rand"
	"log/slog"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Root is the mount's root directory.
type Root struct {
	fs.Inode
	reg       *devnode.Registry
	log       *slog.Logger
	cloneable func(name string) bool // a name some cloner would create
	clones    map[string]bool        // clone node names: "tun", "tap"
	statics   []string               // names of the static children, in readdir order
	mtime     time.Time

	// notifyPoll sends FUSE_NOTIFY_POLL; set by New before serving.
	notifyPoll func(kh uint64)
}

var (
	_ = (fs.NodeLookuper)((*Root)(nil))
	_ = (fs.NodeReaddirer)((*Root)(nil))
	_ = (fs.NodeGetattrer)((*Root)(nil))
	_ = (fs.NodeOnAdder)((*Root)(nil))
)

// NewRoot returns the root of a tree serving reg's nodes; clones lists
// the clone node names (the cloners' prefixes) and cloneable tells which
// names a cloner would create (for logging refusals).
func NewRoot(reg *devnode.Registry, clones []string, cloneable func(string) bool, log *slog.Logger) *Root {
	r := &Root{reg: reg, log: log, cloneable: cloneable, clones: make(map[string]bool), mtime: time.Now()}
	for _, c := range clones {
		r.clones[c] = true
	}
	return r
}

// Static inode numbers; device nodes get theirs from devnode (>= 1<<32).
const (
	inoNull = 2 + iota
	inoZero
	inoFull
	inoRandom
	inoURandom
	inoFd
	inoStdin
	inoStdout
	inoStderr
	inoCloneBase
)

// OnAdd builds the static children once the root is mounted.
func (r *Root) OnAdd(ctx context.Context) {
	add := func(name string, ino uint64, mode uint32, ops fs.InodeEmbedder) {
		r.AddChild(name, r.NewPersistentInode(ctx, ops, fs.StableAttr{Mode: mode, Ino: ino}), false)
		r.statics = append(r.statics, name)
	}
	for i, s := range []struct {
		name string
		kind staticKind
	}{{"null", kindNull}, {"zero", kindZero}, {"full", kindFull}, {"random", kindRandom}, {"urandom", kindRandom}} {
		add(s.name, uint64(inoNull+i), syscall.S_IFREG, &staticNode{kind: s.kind, mtime: r.mtime})
	}
	for i, l := range []struct{ name, target string }{
		{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
	} {
		add(l.name, uint64(inoFd+i), syscall.S_IFLNK, &fs.MemSymlink{Data: []byte(l.target),
			Attr: fuse.Attr{Mode: syscall.S_IFLNK | 0777, Nlink: 1, Mtime: uint64(r.mtime.Unix())}})
	}
	i := 0
	for c := range r.clones {
		add(c, uint64(inoCloneBase+i), syscall.S_IFREG, &cloneNode{root: r, prefix: c})
		i++
	}
}

// Getattr implements fs.NodeGetattrer.
func (r *Root) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0755
	out.Nlink = 2
	setTimes(&out.Attr, r.mtime)
	return 0
}

// Readdir implements fs.NodeReaddirer: the static nodes and the live
// device nodes. It never creates anything.
func (r *Root) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	nodes := r.reg.List()
	entries := make([]fuse.DirEntry, 0, len(r.statics)+len(nodes))
	for _, name := range r.statics {
		ch := r.GetChild(name)
		entries = append(entries, fuse.DirEntry{Name: name, Mode: ch.Mode(), Ino: ch.StableAttr().Ino})
	}
	for _, n := range nodes {
		entries = append(entries, fuse.DirEntry{Name: n.Name(), Mode: syscall.S_IFREG, Ino: n.Ino()})
	}
	return fs.NewListDirStream(entries), 0
}

// Lookup implements fs.NodeLookuper. A static name is served from the
// tree; a device name is looked up in the registry, and a free valid unit
// is created for a privileged caller (FreeBSD's clone on lookup). An
// unprivileged caller sees only what exists.
func (r *Root) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if ch := r.GetChild(name); ch != nil && ch.StableAttr().Ino < 1<<32 {
		if g, ok := ch.Operations().(fs.NodeGetattrer); ok {
			var a fuse.AttrOut
			g.Getattr(ctx, nil, &a)
			out.Attr = a.Attr
		}
		return ch, 0
	}
	n, err := r.reg.Get(name)
	if err != nil {
		c := caller(ctx)
		if !privileged(c) {
			if r.cloneable(name) {
				r.log.Warn("refused clone", "unit", name, "reason", "caller not privileged", "pid", c.Pid, "uid", c.Uid)
			}
			return nil, syscall.ENOENT
		}
		// A racing creator's node comes back from the cloner itself.
		n, err = r.reg.Lookup(ctx, name)
		if err != nil {
			if e := errno(err); e != syscall.ENOENT {
				r.log.Warn("refused clone", "unit", name, "error", err, "pid", c.Pid, "uid", c.Uid)
				return nil, e
			}
			return nil, syscall.ENOENT
		}
	}
	defer n.Rel() // the inode keeps a plain pointer; operations take their own reference
	d := &devNode{root: r, node: n}
	d.fill(&out.Attr)
	return r.NewInode(ctx, d, fs.StableAttr{Mode: syscall.S_IFREG, Ino: n.Ino()}), 0
}

func setTimes(a *fuse.Attr, t time.Time) {
	s, ns := uint64(t.Unix()), uint32(t.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = s, s, s
	a.Atimensec, a.Mtimensec, a.Ctimensec = ns, ns, ns
}

// devNode is the inode of one device (tunN, tapN).
type devNode struct {
	fs.Inode
	root *Root
	node *devnode.Node // no reference: operations take one with TryRef
}

var (
	_ = (fs.NodeOpener)((*devNode)(nil))
	_ = (fs.NodeGetattrer)((*devNode)(nil))
	_ = (fs.NodeAccesser)((*devNode)(nil))
)

func (d *devNode) fill(a *fuse.Attr) {
	at := d.node.Attr()
	a.Mode = syscall.S_IFREG | at.Mode
	a.Nlink = 1
	a.Uid, a.Gid = at.Uid, at.Gid
	a.Ino = d.node.Ino()
	setTimes(a, at.Ctime)
}

// Getattr implements fs.NodeGetattrer.
func (d *devNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.fill(&out.Attr)
	return 0
}

// Access implements fs.NodeAccesser.
func (d *devNode) Access(ctx context.Context, mask uint32) syscall.Errno {
	var a fuse.Attr
	d.fill(&a)
	if !permitted(caller(ctx), a.Mode, a.Uid, a.Gid, mask&7) {
		return syscall.EACCES
	}
	return 0
}

// Open implements fs.NodeOpener: an exclusive open of the device (like
// tunopen()); EBUSY if it is open, ENXIO if it is being destroyed.
func (d *devNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	var a fuse.Attr
	d.fill(&a)
	c := caller(ctx)
	if !permitted(c, a.Mode, a.Uid, a.Gid, accessWant(flags)) {
		d.root.log.Warn("refused open", "unit", d.node.Name(), "reason", "permission", "pid", c.Pid, "uid", c.Uid)
		return nil, 0, syscall.EACCES
	}
	if !d.node.TryRef() { // the handle's reference, dropped on release
		return nil, 0, syscall.ENXIO
	}
	if err := d.node.Open(ctx); err != nil {
		d.node.Rel()
		return nil, 0, errno(err)
	}
	return newHandle(d.node, d.root.notifyPoll), handleFlags, 0
}

// cloneNode is /dev/tun or /dev/tap: opening it creates the lowest free
// unit and hands the opener that device (TUNGIFNAME tells which).
type cloneNode struct {
	fs.Inode
	root   *Root
	prefix string
}

var (
	_ = (fs.NodeOpener)((*cloneNode)(nil))
	_ = (fs.NodeGetattrer)((*cloneNode)(nil))
)

// Getattr implements fs.NodeGetattrer.
func (c *cloneNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0600
	out.Nlink = 1
	setTimes(&out.Attr, c.root.mtime)
	return 0
}

// Open implements fs.NodeOpener. Cloning needs privilege whatever the
// clone node's mode.
func (c *cloneNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	cl := caller(ctx)
	if !privileged(cl) {
		c.root.log.Warn("refused clone", "unit", c.prefix, "reason", "caller not privileged", "pid", cl.Pid, "uid", cl.Uid)
		return nil, 0, syscall.EPERM
	}
	n, err := c.root.reg.Clone(ctx, c.prefix) // made open, with the handle's reference
	if err != nil {
		c.root.log.Warn("refused clone", "unit", c.prefix, "error", err, "pid", cl.Pid, "uid", cl.Uid)
		return nil, 0, errno(err)
	}
	return newHandle(n, c.root.notifyPoll), handleFlags, 0
}

// staticKind says which classic device a static node is.
type staticKind int

const (
	kindNull staticKind = iota
	kindZero
	kindFull
	kindRandom
)

// staticNode is null, zero, full, random or urandom, as on Linux.
type staticNode struct {
	fs.Inode
	kind  staticKind
	mtime time.Time
}

var (
	_ = (fs.NodeOpener)((*staticNode)(nil))
	_ = (fs.NodeGetattrer)((*staticNode)(nil))
	_ = (fs.NodeReader)((*staticNode)(nil))
	_ = (fs.NodeWriter)((*staticNode)(nil))
	_ = (fs.NodeSetattrer)((*staticNode)(nil))
)

// Getattr implements fs.NodeGetattrer.
func (s *staticNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0666
	out.Nlink = 1
	setTimes(&out.Attr, s.mtime)
	return 0
}

// Setattr implements fs.NodeSetattrer: truncation (`> /dev/null`) is a no-op.
func (s *staticNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return s.Getattr(ctx, f, out)
}

// Open implements fs.NodeOpener.
func (s *staticNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

// Read implements fs.NodeReader.
func (s *staticNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	switch s.kind {
	case kindNull:
		return fuse.ReadResultData(nil), 0
	case kindRandom:
		rand.Read(dest)
	default:
		clear(dest)
	}
	return fuse.ReadResultData(dest), 0
}

// Write implements fs.NodeWriter.
func (s *staticNode) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if s.kind == kindFull {
		return 0, syscall.ENOSPC
	}
	return uint32(len(data)), 0
}
