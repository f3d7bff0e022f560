// Package fs is the go-fuse tree of cdevfs: the root directory, the
// kernel's devices (null, zero, ...) as character device nodes, the clone
// nodes tun and tap, one node per interface, and open handles that proxy
// to the devices of package devnode.
//
// Nodes here hold no lock of their own; devnode's lock order applies.
package fs

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/kdev"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/rules"
	"github.com/cdevfs/cdevfs/transport"
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
	devices   []kdev.Device          // the kernel's devices served; set before mounting
	statics   []staticChild          // the static children, in readdir order; set by OnAdd, then read-only
	mtime     time.Time

	// rules is the devfs ruleset in force (nil: none), applied to every
	// entry when it is made and to all of them by SetRules.
	rules atomic.Pointer[rules.Ruleset]

	// files are the open device handles by go-fuse's fh (Files).
	files fhTable
	// metrics counts opens, packets and errors; set by New (nil: none).
	metrics *metrics.Metrics
	// users are the entries callers made in the root (userentry.go), and
	// userInos numbers them: never reused, between the static entries'
	// numbers and devnode's.
	users    userSet
	userInos atomic.Uint64
	// refusals logs refused actions at a bounded rate per caller (refuse.go).
	refusals *refusalLog
	// stale answers path operations that reach a destroyed node
	// (stale.go).
	stale *staleAnswers
	// mount is the mount serving the tree (set by New before serving, and
	// again by a remount): Revoked tells it, from any goroutine, so that
	// READs its transport waits for outside the device end.
	mount atomic.Pointer[Mount]
	// inval pushes cache invalidations to the kernel; set by New once
	// mounted (nil before: nothing is cached yet). Unlinked reads it from
	// any goroutine.
	inval atomic.Pointer[invalidator]
	// byIno orders the device nodes for the listing (rootdir.go); Linking
	// and Unlinked tell it of every change of names.
	byIno inoIndex
}

var (
	_ = (transport.Files)((*Root)(nil))
	_ = (fs.NodeLookuper)((*Root)(nil))
	_ = (fs.NodeGetattrer)((*Root)(nil))
	_ = (fs.NodeOnAdder)((*Root)(nil))
	_ = (fs.NodeOpendirHandler)((*Root)(nil))

	_ devnode.Observer = (*Root)(nil)
)

// NewRoot returns the root of a tree serving reg's nodes; clones lists
// the clone node names (the cloners' prefixes), cloneable tells which
// names a cloner would create (the names a lookup may clone), and policy decides
// which callers are privileged. The root observes reg (Registry.Observe):
// it sets each new node's attributes from the rules, drops a destroyed
// name from the kernel's cache, and ends the waits on a revoked device.
func NewRoot(reg *devnode.Registry, clones []string, cloneable func(string) bool, policy *privilege.Policy, log *slog.Logger) *Root {
	r := &Root{reg: reg, log: log, policy: policy, cloneable: cloneable, clones: make(map[string]bool), mtime: time.Now()}
	r.refusals = newRefusalLog(log, time.Now)
	r.stale = newStaleAnswers(time.Now)
	r.userInos.Store(userInoBase)
	for _, c := range clones {
		r.clones[c] = true
	}
	for _, name := range kdev.Defaults {
		d, err := kdev.Sys("/sys").Lookup(name)
		if err != nil {
			log.Warn("kernel device left out", "device", name, "error", err)
			continue
		}
		r.devices = append(r.devices, d)
	}
	reg.Observe(r)
	return r
}

// Linking implements devnode.Observer: device nodes get the rules before
// their name is published (FreeBSD runs devfs_rules_apply before a new
// entry is visible). It runs as the name is linked, under the registry's
// lock, so the listing hears of it in time.
func (r *Root) Linking(name string, a *devnode.Attr) {
	applyRules(r.rules.Load(), name, a)
	r.byIno.changed()
}

// Unlinked implements devnode.Observer: a destroyed name must not outlive
// its node in the kernel's cache.
func (r *Root) Unlinked(name string) {
	r.byIno.changed()
	r.inval.Load().entry(name)
}

// Revoked implements devnode.Observer: a READ parked on a ring waits
// outside the device, so a revoke must end it, or the destroy's drain
// waits for ever.
func (r *Root) Revoked(n *devnode.Node) {
	if m := r.mount.Load(); m != nil {
		m.revoked(n)
	}
}

// File implements transport.Files.
func (r *Root) File(fh uint64) transport.File {
	if h := r.files.get(fh); h != nil {
		return h
	}
	return nil // not a nil *handle in a non-nil interface
}

// AddDevice adds one of the kernel's devices to the tree, beside the
// defaults (kdev.Defaults) that NewRoot found; before mounting. A name the
// tree has already, or that a cloner owns, is an error.
func (r *Root) AddDevice(d kdev.Device) error {
	taken := r.clones[d.Name] || r.cloneable(d.Name)
	for _, l := range links {
		taken = taken || l.name == d.Name
	}
	for _, o := range r.devices {
		taken = taken || o.Name == d.Name
	}
	if taken {
		return fmt.Errorf("device %s: the tree has a %s already", d, d.Name)
	}
	r.devices = append(r.devices, d)
	return nil
}

// SetRules makes rs the ruleset in force (nil: none) and applies it to
// every entry, static and device, as `devfs rule applyset` does. Rules
// change only what they set: an entry keeps a chmod, or a hide, that no
// rule of rs overrides. Devices made concurrently get rs too: Linking
// reads the new ruleset under the registry's lock, and a node made before
// that is in the List below.
func (r *Root) SetRules(rs *rules.Ruleset) {
	r.rules.Store(rs)
	for _, e := range r.statics {
		r.reapply(rs, e.name, e.store)
	}
	r.users.each(nil, func(dir *userDir, ch *fs.Inode) {
		e := userEntryOf(ch)
		if dir == nil {
			r.reapply(rs, e.name, e.store)
			return
		}
		// Below the root the kernel is told at once: a lookup there
		// never waits on a clone, so nothing can hold the directory.
		if changed, _, _ := reapplyAttrs(rs, e.name, e.store); changed {
			ch.NotifyContent(-1, 0)
			dir.NotifyEntry(e.name[len(dir.name)+1:])
		}
	})
	for _, n := range r.reg.List() {
		r.reapply(rs, n.Name(), n)
	}
}

// reapply applies rs to one entry and tells the kernel what changed: a
// name now hidden must stop resolving, new owner or mode must show.
func (r *Root) reapply(rs *rules.Ruleset, name string, s attrStore) {
	_, was, now := reapplyAttrs(rs, name, s)
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

// reapplyAttrs applies rs to one entry's attributes: what they were, what
// they are, and whether they changed.
func reapplyAttrs(rs *rules.Ruleset, name string, s attrStore) (changed bool, was, now devnode.Attr) {
	s.UpdateAttr(func(a *devnode.Attr) {
		was = *a
		applyRules(rs, name, a)
		now = *a
	})
	changed = now.Hidden != was.Hidden || now.Mode != was.Mode || now.Uid != was.Uid || now.Gid != was.Gid
	return changed, was, now
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
	inoFd = 2 + iota
	inoStdin
	inoStdout
	inoStderr
	inoPtmx
	inoCore
	inoConsole
	inoCloneBase
	inoKernelBase = 1 << 16 // kernel devices, in Root.devices order
	userInoBase   = 1 << 20 // made by callers (Root.userInos)
)

// links are the default tree's symlinks.
var links = []struct{ name, target string }{
	{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
	// The OCI runtime spec's /dev links: ptmx leads into the devpts a
	// runtime mounts at pts (a directory it makes), core to the kernel's
	// memory image.
	{"ptmx", "pts/ptmx"}, {"core", "/proc/kcore"},
}

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
		ch := r.NewPersistentInode(ctx, ops, fs.StableAttr{Mode: e.typ, Ino: ino})
		r.AddChild(e.name, ch, false)
		r.statics = append(r.statics, staticChild{e, ch})
	}
	for i, d := range r.devices {
		n := &kernelNode{entry: newEntry(d.Name, syscall.S_IFCHR, d.Mode, 0)}
		n.rdev = d.Rdev()
		add(&n.entry, uint64(inoKernelBase+i), n)
	}
	for i, l := range links {
		n := &symlinkNode{entry: newEntry(l.name, syscall.S_IFLNK, 0777, len(l.target)), target: []byte(l.target)}
		add(&n.entry, uint64(inoFd+i), n)
	}
	// console: the mount target a runtime binds a terminal over when
	// one is asked for. crun does not make it when /dev is a bind mount
	// (runc does); a console of the kernel's, configured, takes its place.
	if !slices.ContainsFunc(r.devices, func(d kdev.Device) bool { return d.Name == "console" }) {
		n := &emptyFile{entry: newEntry("console", syscall.S_IFREG, 0600, 0)}
		add(&n.entry, inoConsole, n)
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

// Lookup implements fs.NodeLookuper. A static name is served from the
// tree; a device name is looked up in the registry, and a free valid unit
// is created for a privileged caller (FreeBSD's clone on lookup). An
// unprivileged caller sees only what exists. A hidden entry does not
// exist (ENOENT), as in FreeBSD's devfs_lookup.
func (r *Root) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if ch := r.static(name); ch != nil {
		return r.staticEntry(ch, out)
	}
	if r.users.get(name) != nil {
		return lookupUser(&r.users, name, out)
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
	if r.users.get(name) != nil {
		return lookupUser(&r.users, name, out)
	}
	n, err := r.reg.Get(name)
	if err != nil {
		return nil, syscall.ENOENT
	}
	return r.devEntry(ctx, n, out)
}

// staticChild is an entry of the default tree and its inode, which
// lives as long as the mount: the tree's own record of it, so that what
// go-fuse's child table loses (a FORGET, an unlink) the name keeps.
type staticChild struct {
	*entry
	inode *fs.Inode
}

// static returns the static child called name, or nil.
func (r *Root) static(name string) *staticChild {
	for i := range r.statics {
		if r.statics[i].name == name {
			return &r.statics[i]
		}
	}
	return nil
}

func (r *Root) staticEntry(sc *staticChild, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if sc.hidden() {
		return nil, syscall.ENOENT
	}
	sc.fill(&out.Attr)
	return sc.inode, 0
}

// cloneOnLookup creates name for a privileged caller, if a cloner makes
// such names and the rules would not hide it; the node comes back with a
// reference for the caller.
func (r *Root) cloneOnLookup(ctx context.Context, name string) (*devnode.Node, syscall.Errno) {
	cr := r.credsOf(ctx)
	// mkdir, mknod, symlink, link, rename, unlink and an exclusive
	// create of a free unit name look it up first: none of them may
	// leave an interface behind when it then fails.
	if !r.cloneable(name) || r.wouldHide(name) || makesName(cr.pid) {
		return nil, syscall.ENOENT
	}
	if !cr.mayClone() {
		r.refuse(ctx, "clone", name, "reason", "caller not privileged")
		return nil, syscall.ENOENT
	}
	// A racing creator's node comes back from the cloner itself.
	n, err := r.reg.Lookup(withActor(ctx), name)
	if err != nil {
		if e := errno(err); e != syscall.ENOENT {
			r.refuse(ctx, "clone", name, "error", err)
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

func setTimes(a *fuse.Attr, t time.Time) {
	s, ns := uint64(t.Unix()), uint32(t.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = s, s, s
	a.Atimensec, a.Mtimensec, a.Ctimensec = ns, ns, ns
}

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
	_ = (fs.NodeSetattrer)((*devNode)(nil))
)

func (d *devNode) fill(a *fuse.Attr) {
	d.entry.fill(a)
	a.Ino = d.node.Ino()
}

// stale reports whether d's device is no longer what its name resolves
// to: a destroy unlinked it, or the rules hide it, and the kernel reached
// it through a cached entry whose invalidation is still on its way
// (invalidator), or through a lookup that a destroy overtook. Only path
// operations answer it (staleErrno); a handle's operations keep their
// ENXIO.
func (d *devNode) stale() bool { return !d.node.Linked() || d.node.Attr().Hidden }

// staleErrno answers a path operation that reached d while stale: ESTALE,
// which makes the kernel walk the path again, revalidating (LOOKUP_REVAL),
// and act on what the name is now: a new unit for a privileged opener,
// ENOENT for anyone else; or final, if this is that walk's operation and
// it met a destroy too (staleAnswers). (An fstat of an O_PATH fd is not
// a walk, and the kernel does not retry it: it gets ESTALE.)
func (d *devNode) staleErrno(ctx context.Context, final syscall.Errno) syscall.Errno {
	return d.root.stale.answer(caller(ctx).Pid, d.name, final)
}

// Getattr implements fs.NodeGetattrer.
func (d *devNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if f == nil && d.stale() {
		return d.staleErrno(ctx, syscall.ENOENT)
	}
	d.fill(&out.Attr)
	return 0
}

// Setattr implements fs.NodeSetattrer: a chmod by path of a gone node
// must reach the node its name has now, not die with the old one.
func (d *devNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, byFh := in.GetFh(); !byFh && d.stale() {
		return d.staleErrno(ctx, syscall.ENOENT)
	}
	return d.entry.Setattr(ctx, f, in, out)
}

// Open implements fs.NodeOpener: an exclusive open of the device (like
// tunopen()); EACCES if the mode does not let the caller in, EBUSY if it
// is open, ENXIO if it is being destroyed, ESTALE once it is gone (or
// ENXIO, to the kernel's retry: staleErrno).
func (d *devNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if d.stale() {
		return nil, 0, d.staleErrno(ctx, syscall.ENXIO)
	}
	d.root.stale.forget(caller(ctx).Pid) // its call got past the check (staleAnswers)
	if e := d.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
	if !d.node.TryRef() { // the handle's reference, dropped on release
		return nil, 0, syscall.ENXIO
	}
	if err := openNode(ctx, d.node, flags); err != nil {
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
	_ = (fs.NodeSetattrer)((*cloneNode)(nil))
)

// Open implements fs.NodeOpener. Cloning needs privilege whatever the
// clone node's mode (EPERM), as FreeBSD's tun clone handler checks
// PRIV_NET_IFCREATE; and, as for any file, the mode must let the caller
// open it (EACCES), so a rule can keep even a CAP_NET_ADMIN user out.
func (c *cloneNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if !c.root.credsOf(ctx).mayClone() {
		c.root.refuse(ctx, "clone", c.prefix, "reason", "caller not privileged")
		return nil, 0, syscall.EPERM
	}
	if e := c.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
	n, err := c.root.reg.Clone(withActor(ctx), c.prefix) // made open, with the handle's reference
	if err != nil {
		c.root.refuse(ctx, "clone", c.prefix, "error", err)
		return nil, 0, errno(err)
	}
	c.root.metrics.Opened()
	return newHandle(n, c.root), handleFlags, 0
}

// kernelNode is one of the kernel's devices (null, zero, tty, those
// --device names): a character device inode with the kernel's device
// number. The kernel opens it itself, through its driver
// (init_special_inode), and checks the open against its mode (the mount's
// default_permissions): the daemon serves only its attributes.
type kernelNode struct {
	fs.Inode
	entry
}

var (
	_ = (fs.NodeGetattrer)((*kernelNode)(nil))
	_ = (fs.NodeSetattrer)((*kernelNode)(nil))
)

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
)

// Readlink implements fs.NodeReadlinker.
func (l *symlinkNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return l.target, 0
}
