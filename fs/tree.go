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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/rules"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Root is the mount's root directory.
type Root struct {
	fs.Inode
	reg       *devnode.Registry
	log       *slog.Logger
	policy    *privilege.Policy      // who holds which capability
	cloneable func(name string) bool // a name some cloner would create
	clones    map[string]bool        // clone node names: "tun", "tap"
	statics   []*entry               // the static children, in readdir order; set by OnAdd, then read-only
	mtime     time.Time

	// rules is the devfs ruleset in force (nil: none), applied to every
	// entry when it is made and to all of them by SetRules.
	rules atomic.Pointer[rules.Ruleset]

	// notifyPoll sends FUSE_NOTIFY_POLL; set by New before serving.
	notifyPoll func(kh uint64)
	// fhs is the transport's fast-path table; set by New before serving.
	fhs *fhTable
	// metrics counts opens, packets and errors; set by New (nil: none).
	metrics *metrics.Metrics
	// tr is the transport serving the tree (set by New before serving, and
	// again by a remount): the registry's revoke hook tells it, from any
	// goroutine, so that READs it parks outside the device end (uring.go).
	tr atomic.Pointer[transport]
	// inval pushes cache invalidations to the kernel; set by New once
	// mounted (nil before: nothing is cached yet). The registry's unlink
	// hook reads it from any goroutine.
	inval atomic.Pointer[invalidator]
}

var (
	_ = (fs.NodeLookuper)((*Root)(nil))
	_ = (fs.NodeGetattrer)((*Root)(nil))
	_ = (fs.NodeOnAdder)((*Root)(nil))
	_ = (fs.NodeOpendirHandler)((*Root)(nil))
)

// NewRoot returns the root of a tree serving reg's nodes; clones lists
// the clone node names (the cloners' prefixes), cloneable tells which
// names a cloner would create (for logging refusals), and policy decides
// which callers are privileged.
func NewRoot(reg *devnode.Registry, clones []string, cloneable func(string) bool, policy *privilege.Policy, log *slog.Logger) *Root {
	r := &Root{reg: reg, log: log, policy: policy, cloneable: cloneable, clones: make(map[string]bool), mtime: time.Now()}
	for _, c := range clones {
		r.clones[c] = true
	}
	// Device nodes get the rules before their name is published (FreeBSD
	// runs devfs_rules_apply before a new entry is visible).
	reg.SetAttrPolicy(func(name string, a *devnode.Attr) { applyRules(r.rules.Load(), name, a) })
	// A destroyed name must not outlive its node in the kernel's cache.
	reg.SetUnlinkHook(func(name string) { r.inval.Load().entry(name) })
	// A READ parked on a ring waits outside the device: a revoke must end
	// it, or the destroy's drain waits for ever.
	reg.SetRevokeHook(func(n *devnode.Node) {
		if t := r.tr.Load(); t != nil {
			t.uring.Load().revoked(n)
		}
	})
	return r
}

// SetRules makes rs the ruleset in force (nil: none) and applies it to
// every entry, static and device, as `devfs rule applyset` does. Rules
// change only what they set: an entry keeps a chmod, or a hide, that no
// rule of rs overrides. Devices made concurrently get rs too: the
// registry's policy reads the new ruleset under the registry's lock, and
// a node made before that is in the List below.
func (r *Root) SetRules(rs *rules.Ruleset) {
	r.rules.Store(rs)
	for _, e := range r.statics {
		r.reapply(rs, e.name, e.store)
	}
	for _, n := range r.reg.List() {
		r.reapply(rs, n.Name(), n)
	}
}

// reapply applies rs to one entry and tells the kernel what changed: a
// name now hidden must stop resolving, new owner or mode must show.
func (r *Root) reapply(rs *rules.Ruleset, name string, s attrStore) {
	var was, now devnode.Attr
	s.UpdateAttr(func(a *devnode.Attr) {
		was = *a
		applyRules(rs, name, a)
		now = *a
	})
	switch {
	case now.Hidden && !was.Hidden:
		r.inval.Load().entry(name)
	case now.Mode != was.Mode || now.Uid != was.Uid || now.Gid != was.Gid:
		// The inode's attributes, and the entry too: a LOOKUP in flight
		// may carry the old attributes into the cache after INVAL_INODE
		// (which does not wait for it), but INVAL_ENTRY waits for the
		// directory and drops what that LOOKUP left.
		v := r.inval.Load()
		v.attrs(name)
		v.entry(name)
	}
}

// wouldHide reports whether the rules in force hide a new device called
// name. A hidden name is not cloned on lookup: FreeBSD's devfs_lookup
// would clone it and then answer ENOENT, leaving an interface nobody
// can reach through the mount; cdevfs answers ENOENT without creating.
func (r *Root) wouldHide(name string) bool {
	a := devnode.Attr{Mode: 0600}
	applyRules(r.rules.Load(), name, &a)
	return a.Hidden
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

// OnAdd builds the static children once the root is mounted, each with
// the rules in force applied.
func (r *Root) OnAdd(ctx context.Context) {
	// Afresh each time: a mount that falls back from io_uring mounts the
	// same root again.
	r.statics = nil
	// newEntry makes a static entry's attributes: the default mode,
	// root:root, then the rules.
	newEntry := func(name string, typ, mode uint32, size int) entry {
		m := newMemAttr(mode, r.mtime)
		applyRules(r.rules.Load(), name, &m.a)
		return entry{root: r, name: name, typ: typ, size: uint64(size), store: m}
	}
	add := func(e *entry, ino uint64, ops fs.InodeEmbedder) {
		r.AddChild(e.name, r.NewPersistentInode(ctx, ops, fs.StableAttr{Mode: e.typ, Ino: ino}), false)
		r.statics = append(r.statics, e)
	}
	for i, s := range []struct {
		name string
		kind staticKind
	}{{"null", kindNull}, {"zero", kindZero}, {"full", kindFull}, {"random", kindRandom}, {"urandom", kindRandom}} {
		n := &staticNode{entry: newEntry(s.name, syscall.S_IFREG, 0666, 0), kind: s.kind}
		add(&n.entry, uint64(inoNull+i), n)
	}
	for i, l := range []struct{ name, target string }{
		{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
	} {
		n := &symlinkNode{entry: newEntry(l.name, syscall.S_IFLNK, 0777, len(l.target)), target: []byte(l.target)}
		add(&n.entry, uint64(inoFd+i), n)
	}
	i := 0
	for c := range r.clones {
		n := &cloneNode{entry: newEntry(c, syscall.S_IFREG, 0600, 0), prefix: c}
		add(&n.entry, uint64(inoCloneBase+i), n)
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

// listing is the root's contents, read by rootDir: the static nodes and
// the live device nodes, except those the rules hide (FreeBSD's
// DE_WHITEOUT). It never creates anything.
func (r *Root) listing() fs.DirStream {
	nodes := r.reg.List()
	entries := make([]fuse.DirEntry, 0, len(r.statics)+len(nodes))
	for _, e := range r.statics {
		if e.hidden() {
			continue
		}
		ch := r.GetChild(e.name)
		entries = append(entries, fuse.DirEntry{Name: e.name, Mode: ch.Mode(), Ino: ch.StableAttr().Ino})
	}
	for _, n := range nodes {
		if n.Attr().Hidden {
			continue
		}
		entries = append(entries, fuse.DirEntry{Name: n.Name(), Mode: syscall.S_IFREG, Ino: n.Ino()})
	}
	return fs.NewListDirStream(entries)
}

// Lookup implements fs.NodeLookuper. A static name is served from the
// tree; a device name is looked up in the registry, and a free valid unit
// is created for a privileged caller (FreeBSD's clone on lookup). An
// unprivileged caller sees only what exists. A hidden entry does not
// exist (ENOENT), as in FreeBSD's devfs_lookup.
func (r *Root) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if ch := r.static(name); ch != nil {
		return r.staticEntry(ch, out)
	}
	n, err := r.reg.Get(name)
	if err != nil {
		var e syscall.Errno
		if n, e = r.cloneOnLookup(ctx, name); e != 0 {
			return nil, e
		}
	}
	return r.devEntry(ctx, n, out)
}

// lookupListed is Lookup for READDIRPLUS: only what exists. A listing
// never creates: a unit destroyed between the readdir and this lookup
// stays gone (Lookup would clone it again for a privileged `ls -l`).
func (r *Root) lookupListed(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if ch := r.static(name); ch != nil {
		return r.staticEntry(ch, out)
	}
	n, err := r.reg.Get(name)
	if err != nil {
		return nil, syscall.ENOENT
	}
	return r.devEntry(ctx, n, out)
}

// static returns the static child called name, if there is one.
func (r *Root) static(name string) *fs.Inode {
	if ch := r.GetChild(name); ch != nil && ch.StableAttr().Ino < 1<<32 {
		return ch
	}
	return nil
}

func (r *Root) staticEntry(ch *fs.Inode, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	e := ch.Operations().(entryNode).ent()
	if e.hidden() {
		return nil, syscall.ENOENT
	}
	e.fill(&out.Attr)
	return ch, 0
}

// cloneOnLookup creates name for a privileged caller, if a cloner makes
// such names and the rules would not hide it; the node comes back with a
// reference for the caller.
func (r *Root) cloneOnLookup(ctx context.Context, name string) (*devnode.Node, syscall.Errno) {
	c := caller(ctx)
	if !r.credsOf(ctx).mayClone() {
		if r.cloneable(name) {
			r.log.Warn("refused clone", "unit", name, "reason", "caller not privileged", "pid", c.Pid, "uid", c.Uid)
		}
		return nil, syscall.ENOENT
	}
	if r.wouldHide(name) {
		return nil, syscall.ENOENT
	}
	// A racing creator's node comes back from the cloner itself.
	n, err := r.reg.Lookup(withActor(ctx), name)
	if err != nil {
		if e := errno(err); e != syscall.ENOENT {
			r.log.Warn("refused clone", "unit", name, "error", err, "pid", c.Pid, "uid", c.Uid)
			return nil, e
		}
		return nil, syscall.ENOENT
	}
	return n, 0
}

// devEntry answers a lookup with device node n, whose reference it drops.
func (r *Root) devEntry(ctx context.Context, n *devnode.Node, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.Rel() // the inode keeps a plain pointer; operations take their own reference
	if n.Attr().Hidden {
		return nil, syscall.ENOENT
	}
	d := &devNode{entry: entry{root: r, name: n.Name(), typ: syscall.S_IFREG, store: n}, node: n}
	d.fill(&out.Attr)
	return r.NewInode(ctx, d, fs.StableAttr{Mode: syscall.S_IFREG, Ino: n.Ino()}), 0
}

// OpendirHandle implements fs.NodeOpendirHandler: the root's listing, with
// READDIRPLUS lookups that never clone.
func (r *Root) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &rootDir{root: r}, 0, 0
}

// rootDir is an open root directory. go-fuse serializes the calls on one
// handle, so it needs no lock of its own.
type rootDir struct {
	root *Root
	ds   fs.DirStream // made by the first read or a rewind
}

var (
	_ = (fs.FileReaddirenter)((*rootDir)(nil))
	_ = (fs.FileSeekdirer)((*rootDir)(nil))
	_ = (fs.FileReleasedirer)((*rootDir)(nil))
	_ = (fs.FileLookuper)((*rootDir)(nil))
)

// Readdirent implements fs.FileReaddirenter.
func (d *rootDir) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if d.ds == nil {
		d.ds = d.root.listing()
	}
	if !d.ds.HasNext() {
		return nil, 0
	}
	de, e := d.ds.Next()
	return &de, e
}

// Seekdir implements fs.FileSeekdirer: a rewind (offset 0) lists afresh,
// as rewinddir(3) must show entries made since the opendir.
func (d *rootDir) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if off == 0 || d.ds == nil {
		d.ds = d.root.listing()
	}
	if sd, ok := d.ds.(fs.FileSeekdirer); ok {
		return sd.Seekdir(ctx, off)
	}
	return syscall.ENOTSUP
}

// Releasedir implements fs.FileReleasedirer.
func (d *rootDir) Releasedir(ctx context.Context, flags uint32) {
	if d.ds != nil {
		d.ds.Close()
	}
}

// Lookup implements fs.FileLookuper: READDIRPLUS's lookup of a listed name.
func (d *rootDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return d.root.lookupListed(ctx, name, out)
}

func setTimes(a *fuse.Attr, t time.Time) {
	s, ns := uint64(t.Unix()), uint32(t.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = s, s, s
	a.Atimensec, a.Mtimensec, a.Ctimensec = ns, ns, ns
}

// entryNode is a node of the tree with an entry (every one but the root).
type entryNode interface{ ent() *entry }

func (e *entry) ent() *entry { return e }

// devNode is the inode of one device (tunN, tapN). Its attributes live
// in the devnode.Node, so they last as long as the device.
type devNode struct {
	fs.Inode
	entry
	node *devnode.Node // no reference: operations take one with TryRef
}

var (
	_ = (fs.NodeOpener)((*devNode)(nil))
	_ = (fs.NodeGetattrer)((*devNode)(nil))
	_ = (fs.NodeAccesser)((*devNode)(nil))
	_ = (fs.NodeSetattrer)((*devNode)(nil))
	_ = (entryNode)((*devNode)(nil))
)

func (d *devNode) fill(a *fuse.Attr) {
	d.entry.fill(a)
	a.Ino = d.node.Ino()
}

// stale reports whether d's device is no longer what its name resolves
// to: a destroy unlinked it, or the rules hide it, and the kernel reached
// it through a cached entry whose invalidation is still on its way
// (invalidator). ESTALE makes the kernel walk the path again, revalidating
// (LOOKUP_REVAL), and act on what the name is now: a new unit for a
// privileged opener, ENOENT for anyone else. Only path operations answer
// it; a handle's operations keep their ENXIO. (A walk of an empty path,
// fstatat(AT_EMPTY_PATH) on an O_PATH fd, finds the same inode again, so
// such a caller sees the ESTALE.)
func (d *devNode) stale() bool { return !d.node.Linked() || d.node.Attr().Hidden }

// Getattr implements fs.NodeGetattrer.
func (d *devNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if f == nil && d.stale() {
		return syscall.ESTALE
	}
	d.fill(&out.Attr)
	return 0
}

// Setattr implements fs.NodeSetattrer: a chmod by path of a gone node
// must reach the node its name has now, not die with the old one.
func (d *devNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, byFh := in.GetFh(); !byFh && d.stale() {
		return syscall.ESTALE
	}
	return d.entry.Setattr(ctx, f, in, out)
}

// Access implements fs.NodeAccesser.
func (d *devNode) Access(ctx context.Context, mask uint32) syscall.Errno {
	if d.stale() {
		return syscall.ESTALE
	}
	return d.entry.Access(ctx, mask)
}

// Open implements fs.NodeOpener: an exclusive open of the device (like
// tunopen()); EACCES if the mode does not let the caller in, EBUSY if it
// is open, ENXIO if it is being destroyed, ESTALE once it is gone.
func (d *devNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if d.stale() {
		return nil, 0, syscall.ESTALE
	}
	if e := d.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
	if !d.node.TryRef() { // the handle's reference, dropped on release
		return nil, 0, syscall.ENXIO
	}
	if err := d.node.Open(ctx); err != nil {
		d.node.Rel()
		return nil, 0, errno(err)
	}
	d.root.metrics.Opened()
	return newHandle(d.node, d.root), handleFlags, 0
}

// cloneNode is /dev/tun or /dev/tap: opening it creates the lowest free
// unit and hands the opener that device (TUNGIFNAME tells which).
type cloneNode struct {
	fs.Inode
	entry
	prefix string
}

var (
	_ = (fs.NodeOpener)((*cloneNode)(nil))
	_ = (fs.NodeGetattrer)((*cloneNode)(nil))
	_ = (fs.NodeAccesser)((*cloneNode)(nil))
	_ = (fs.NodeSetattrer)((*cloneNode)(nil))
	_ = (entryNode)((*cloneNode)(nil))
)

// Open implements fs.NodeOpener. Cloning needs privilege whatever the
// clone node's mode (EPERM), as FreeBSD's tun clone handler checks
// PRIV_NET_IFCREATE; and, as for any file, the mode must let the caller
// open it (EACCES), so a rule can keep even a CAP_NET_ADMIN user out.
func (c *cloneNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	cl := caller(ctx)
	if !c.root.credsOf(ctx).mayClone() {
		c.root.log.Warn("refused clone", "unit", c.prefix, "reason", "caller not privileged", "pid", cl.Pid, "uid", cl.Uid)
		return nil, 0, syscall.EPERM
	}
	if e := c.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
	n, err := c.root.reg.Clone(withActor(ctx), c.prefix) // made open, with the handle's reference
	if err != nil {
		c.root.log.Warn("refused clone", "unit", c.prefix, "error", err, "pid", cl.Pid, "uid", cl.Uid)
		return nil, 0, errno(err)
	}
	c.root.metrics.Opened()
	return newHandle(n, c.root), handleFlags, 0
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
// Truncation (`> /dev/null`) is a no-op (entry.Setattr).
type staticNode struct {
	fs.Inode
	entry
	kind staticKind
}

var (
	_ = (fs.NodeOpener)((*staticNode)(nil))
	_ = (fs.NodeGetattrer)((*staticNode)(nil))
	_ = (fs.NodeAccesser)((*staticNode)(nil))
	_ = (fs.NodeReader)((*staticNode)(nil))
	_ = (fs.NodeWriter)((*staticNode)(nil))
	_ = (fs.NodeSetattrer)((*staticNode)(nil))
	_ = (entryNode)((*staticNode)(nil))
)

// Open implements fs.NodeOpener.
func (s *staticNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if e := s.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
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

// symlinkNode is fd, stdin, stdout or stderr: a symlink into /proc/self.
// Rules may hide it or give it an owner, as FreeBSD's rules do for devfs
// symlinks; its mode means nothing to Linux.
type symlinkNode struct {
	fs.Inode
	entry
	target []byte
}

var (
	_ = (fs.NodeReadlinker)((*symlinkNode)(nil))
	_ = (fs.NodeGetattrer)((*symlinkNode)(nil))
	_ = (fs.NodeSetattrer)((*symlinkNode)(nil))
	_ = (entryNode)((*symlinkNode)(nil))
)

// Readlink implements fs.NodeReadlinker.
func (l *symlinkNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return l.target, 0
}
