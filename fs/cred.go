package fs

import (
	"context"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// caller returns the FUSE caller of a request.
func caller(ctx context.Context) fuse.Caller {
	if c, ok := fuse.FromContext(ctx); ok {
		return *c
	}
	return fuse.Caller{}
}

// withActor returns ctx carrying the FUSE caller as devnode's actor, so
// that the cloner's create and destroy logs name the process behind them.
func withActor(ctx context.Context) context.Context {
	c := caller(ctx)
	return devnode.WithActor(ctx, devnode.Actor{Pid: c.Pid, Uid: c.Uid})
}

// askedCaps are the capabilities the tree ever asks about.
var askedCaps = privilege.Of(privilege.Chown, privilege.DacOverride, privilege.DacReadSearch,
	privilege.Fowner, privilege.Fsetid, privilege.NetAdmin, privilege.Mknod)

// creds are a FUSE caller's credentials. The kernel passes the uid, gid
// and pid (thread id); the supplementary groups and the capabilities come
// from /proc, read at most once per request and only when a check needs
// them. The kernel checks modes and ownership first (the mount option
// default_permissions); the daemon checks again with these, the facts
// the kernel's checks use, but with capabilities counted only in the
// user namespaces that own the mount and the network namespace (the
// kernel counts a capability in the caller's own user namespace if the
// node's owner and group are mapped there).
type creds struct {
	uid, gid, pid uint32
	policy        *privilege.Policy

	// Read from /proc by load; loaded says whether that was tried. A
	// caller whose /proc entry cannot be read (outside the daemon's pid
	// namespace) has no supplementary group and no capability.
	loaded bool
	proc   *privilege.Creds // nil if unreadable
	groups []uint32         // supplementary, read from proc when first asked
	held   privilege.Set    // of askedCaps, where the policy checks each
}

// credsOf returns the caller's credentials for r's privilege policy.
func (r *Root) credsOf(ctx context.Context) *creds {
	c := caller(ctx)
	return &creds{uid: c.Uid, gid: c.Gid, pid: c.Pid, policy: r.policy}
}

func (c *creds) load() {
	if c.loaded {
		return
	}
	c.loaded = true
	pc, err := privilege.ReadCreds(c.pid)
	if err != nil {
		return
	}
	c.held = c.policy.Held(pc, askedCaps)
	c.proc = pc
}

// has reports whether the caller holds cp where it counts (privilege's
// Policy); uid 0 alone holds nothing.
func (c *creds) has(cp privilege.Cap) bool {
	c.load()
	return c.held.Has(cp)
}

// loadGroups reads the supplementary groups, if they were not given.
func (c *creds) loadGroups() {
	c.load()
	if c.groups == nil && c.proc != nil {
		c.groups, _ = c.proc.Groups()
	}
}

// mayClone reports whether the caller may create interfaces:
// CAP_NET_ADMIN in the owner of the network namespace they are made in,
// as tun's own TUNSETIFF asks (docs/design.md, "Open, close, destroy").
func (c *creds) mayClone() bool { return c.has(privilege.NetAdmin) }

// inGroup reports whether gid is the caller's primary group or one of its
// supplementary groups (FUSE passes only the primary one).
func (c *creds) inGroup(gid uint32) bool {
	if c.gid == gid {
		return true
	}
	c.loadGroups()
	for _, g := range c.groups {
		if g == gid {
			return true
		}
	}
	return false
}

// permitted checks want (a mask of 4 read, 2 write, 1 exec) against an
// entry's mode and owner as the kernel's generic_permission does: the
// owner's bits for the owner, else the group's bits for a member of the
// group, else the others' bits; failing those, CAP_DAC_OVERRIDE lets in
// anything but an exec of a file with no x bit, and CAP_DAC_READ_SEARCH a
// read.
func (c *creds) permitted(a devnode.Attr, want uint32) bool {
	var bits uint32
	switch {
	case c.uid == a.Uid:
		bits = a.Mode >> 6
	case c.inGroup(a.Gid):
		bits = a.Mode >> 3
	default:
		bits = a.Mode
	}
	if bits&7&want == want {
		return true
	}
	if (want&1 == 0 || a.Mode&0111 != 0) && c.has(privilege.DacOverride) {
		return true
	}
	return want == 4 && c.has(privilege.DacReadSearch)
}

// owns reports whether the caller may act as the entry's owner for chmod
// and utimes: the owner itself, or CAP_FOWNER (inode_owner_or_capable).
func (c *creds) owns(a devnode.Attr) bool {
	return c.uid == a.Uid || c.has(privilege.Fowner)
}

// accessWant maps open flags to the permission bits they need; O_TRUNC
// needs write permission whatever the access mode, as in Linux's
// build_open_flags.
func accessWant(flags uint32) uint32 {
	var want uint32
	switch flags & syscall.O_ACCMODE {
	case syscall.O_WRONLY:
		want = 2
	case syscall.O_RDWR:
		want = 6
	default:
		want = 4
	}
	if flags&syscall.O_TRUNC != 0 {
		want |= 2
	}
	return want
}
