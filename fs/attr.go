package fs

import (
	"context"
	"sync"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/rules"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// attrStore is where an entry's owner, mode, times and hidden flag live:
// the devnode.Node of a device, a memAttr for the static entries.
type attrStore interface {
	Attr() devnode.Attr
	UpdateAttr(func(*devnode.Attr))
}

var (
	_ attrStore = (*devnode.Node)(nil)
	_ attrStore = (*memAttr)(nil)
)

// memAttr holds the attributes of a static entry (null, tun, stdin...),
// for the life of the mount.
type memAttr struct {
	mu sync.Mutex
	a  devnode.Attr
}

func newMemAttr(mode uint32, t time.Time) *memAttr {
	return &memAttr{a: devnode.Attr{Mode: mode, Atime: t, Mtime: t, Ctime: t}}
}

// Attr implements attrStore.
func (m *memAttr) Attr() devnode.Attr {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.a
}

// UpdateAttr implements attrStore.
func (m *memAttr) UpdateAttr(f func(*devnode.Attr)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f(&m.a)
}

// entry is what every file of the tree has, whatever it serves: a name,
// attributes, and the permission checks FreeBSD's devfs makes with
// them (devfs_access, devfs_setattr). Node types embed it for Getattr
// and Setattr.
type entry struct {
	root  *Root
	name  string
	typ   uint32 // the file type: S_IFREG, S_IFLNK, S_IFDIR, S_IFCHR...
	size  uint64 // a symlink's length
	rdev  uint32 // a device node's number (unix.Mkdev), what the kernel opens
	store attrStore
}

var (
	_ = (fs.NodeGetattrer)((*entry)(nil))
	_ = (fs.NodeSetattrer)((*entry)(nil))
)

func (e *entry) hidden() bool { return e.store.Attr().Hidden }

func (e *entry) fill(out *fuse.Attr) {
	a := e.store.Attr()
	out.Mode = e.typ | a.Mode
	out.Nlink = 1
	out.Size = e.size
	out.Rdev = e.rdev
	out.Uid, out.Gid = a.Uid, a.Gid
	out.Atime, out.Atimensec = uint64(a.Atime.Unix()), uint32(a.Atime.Nanosecond())
	out.Mtime, out.Mtimensec = uint64(a.Mtime.Unix()), uint32(a.Mtime.Nanosecond())
	out.Ctime, out.Ctimensec = uint64(a.Ctime.Unix()), uint32(a.Ctime.Nanosecond())
}

// Getattr implements fs.NodeGetattrer.
func (e *entry) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	e.fill(&out.Attr)
	return 0
}

// checkOpen is the permission check of open(2): EACCES, logged, unless
// the mode lets the caller open with flags. The kernel has checked the
// mode already (default_permissions); what this one refuses besides is a
// capability the policy does not count (creds) and attributes the kernel
// cached before a rules reload reached it.
func (e *entry) checkOpen(ctx context.Context, flags uint32) syscall.Errno {
	cr := e.root.credsOf(ctx)
	if !cr.permitted(e.store.Attr(), accessWant(flags)) {
		e.root.refuse(ctx, "open", e.name, "reason", "permission")
		return syscall.EACCES
	}
	return 0
}

// Setattr implements fs.NodeSetattrer: chmod, chown, utimes (touch) and
// truncation, checked as Linux checks them (setattr_prepare, chown_ok,
// chgrp_ok, may_setattr), which is also what FreeBSD's devfs_setattr
// allows: the owner may chmod and set times, only the privileged may
// give a node away. The change lasts for the entry's life; a refusal is
// logged, one line.
func (e *entry) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	cr := e.root.credsOf(ctx)
	cr.loadGroups() // /proc is read before the entry's lock is taken
	var ref *refusal
	now := time.Now()
	e.store.UpdateAttr(func(a *devnode.Attr) {
		next := *a
		if ref = setattr(cr, &next, &in.SetAttrInCommon, now); ref == nil {
			*a = next
		}
	})
	if ref != nil {
		e.root.refuse(ctx, ref.action, e.name, "reason", ref.reason)
		return ref.errno
	}
	e.fill(&out.Attr)
	return 0
}

// refusal is why a Setattr was refused: the action and reason for the
// log line, and the errno for the caller.
type refusal struct {
	action, reason string
	errno          syscall.Errno
}

// setattr applies in to a if the caller may make every change in it;
// otherwise it returns why not and a may be partly changed. Any change
// updates ctime, as on Linux and in FreeBSD's devfs_setattr.
// Every check is against the attributes before the change, as the
// kernel checks against the inode.
func setattr(c *creds, a *devnode.Attr, in *fuse.SetAttrInCommon, now time.Time) *refusal {
	orig := *a
	changed := false
	if uid, ok := in.GetUID(); ok {
		// chown_ok: the owner may "change" the owner to itself; anything
		// else needs CAP_CHOWN.
		if !(c.uid == orig.Uid && uid == orig.Uid) && !c.has(privilege.Chown) {
			return &refusal{"chown", "not privileged", syscall.EPERM}
		}
		a.Uid, changed = uid, true
	}
	if gid, ok := in.GetGID(); ok {
		// chgrp_ok: the owner may set the group to one of its own groups;
		// anything else needs CAP_CHOWN.
		if !(c.uid == orig.Uid && (gid == orig.Gid || c.inGroup(gid))) && !c.has(privilege.Chown) {
			return &refusal{"chown", "not privileged", syscall.EPERM}
		}
		a.Gid, changed = gid, true
	}
	if mode, ok := in.GetMode(); ok {
		if !c.owns(orig) {
			return &refusal{"chmod", "not owner", syscall.EPERM}
		}
		// setattr_prepare: S_ISGID is dropped unless the caller is in the
		// file's (new) group or has CAP_FSETID.
		if !c.inGroup(a.Gid) && !c.has(privilege.Fsetid) {
			mode &^= syscall.S_ISGID
		}
		a.Mode, changed = mode, true
	}
	atime, setA := in.GetATime()
	mtime, setM := in.GetMTime()
	if setA || setM {
		explicit := (setA && in.Valid&fuse.FATTR_ATIME_NOW == 0) || (setM && in.Valid&fuse.FATTR_MTIME_NOW == 0)
		switch {
		case c.owns(orig):
		case explicit:
			// Setting a given time needs ownership (setattr_prepare).
			return &refusal{"utimes", "not owner", syscall.EPERM}
		case !c.permitted(orig, 2):
			// Setting the current time is also allowed to a writer
			// (may_setattr's ATTR_TOUCH check): touch on a file one may
			// write.
			return &refusal{"utimes", "permission", syscall.EACCES}
		}
		if setA {
			a.Atime = atime
		}
		if setM {
			a.Mtime = mtime
		}
		changed = true
	}
	if _, ok := in.GetSize(); ok {
		// A device has no size: truncation (O_TRUNC, `> /dev/tun0`) is
		// a no-op, but truncate(2) by path still needs write permission.
		// With a file handle the open already checked it.
		if _, byFh := in.GetFh(); !byFh && !c.permitted(orig, 2) {
			return &refusal{"truncate", "permission", syscall.EACCES}
		}
	}
	if changed {
		a.Ctime = now
	}
	return nil
}

// applyRules runs rs on a's entry called name. Only what a rule sets
// changes (FreeBSD's devfs_rule_run); times are untouched.
func applyRules(rs *rules.Ruleset, name string, a *devnode.Attr) {
	ra := rules.Attr{Mode: a.Mode, Uid: a.Uid, Gid: a.Gid, Hidden: a.Hidden}
	rs.Apply(rules.Entry{Path: name}, &ra)
	a.Mode, a.Uid, a.Gid, a.Hidden = ra.Mode, ra.Uid, ra.Gid, ra.Hidden
}
