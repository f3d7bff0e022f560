package fs

import (
	"context"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The root's name operations. A devfs's names are the devices': nobody
// renames or links them, and only the privileged remove one, which
// hides it as FreeBSD's devfs_remove whites out a device's entry
// (DE_WHITEOUT): the device stays, the name stops resolving and listing
// until a rule unhides it (SIGHUP with an `unhide` rule) or, for a unit,
// its interface is made anew. Every refusal answers here, so no go-fuse
// default (which takes a missing Unlink method for success and drops the
// child) ever acts on the tree.

var (
	_ = (fs.NodeMkdirer)((*Root)(nil))
	_ = (fs.NodeSymlinker)((*Root)(nil))
	_ = (fs.NodeCreater)((*Root)(nil))
	_ = (fs.NodeMknoder)((*Root)(nil))
	_ = (fs.NodeUnlinker)((*Root)(nil))
	_ = (fs.NodeRmdirer)((*Root)(nil))
	_ = (fs.NodeRenamer)((*Root)(nil))
	_ = (fs.NodeLinker)((*Root)(nil))
)

// mayChangeTree reports whether the caller may add or remove names:
// CAP_DAC_OVERRIDE in the mount's user namespace, the capability that lets
// the kernel write a directory whose mode does not let one write (the
// root is treated as FreeBSD's devfs root, dr-xr-xr-x: uid 0 alone may
// not).
func (c *creds) mayChangeTree() bool { return c.has(privilege.DacOverride) }

// Mkdir implements fs.NodeMkdirer: a caller's directory (userentry.go).
func (r *Root) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return r.makeUser(ctx, &r.users, "", name, newUser{action: "mkdir", typ: syscall.S_IFDIR, mode: mode}, out)
}

// Symlink implements fs.NodeSymlinker: a caller's symlink.
func (r *Root) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return r.makeUser(ctx, &r.users, "", name, newUser{action: "symlink", typ: syscall.S_IFLNK, mode: 0777, target: target}, out)
}

// Create implements fs.NodeCreater: a caller's empty file. It is reached
// for a name the lookup did not find: an exclusive create of a free unit
// name (EEXIST: the cloner's) or any new name.
func (r *Root) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return r.createUser(ctx, &r.users, "", name, mode, out)
}

// Mknod implements fs.NodeMknoder: a caller's device node (CAP_MKNOD),
// FIFO, socket or empty file.
func (r *Root) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return r.makeUser(ctx, &r.users, "", name, mknodEntry(mode, dev), out)
}

// Unlink implements fs.NodeUnlinker: EPERM unless privileged; a
// privileged unlink hides one of cdevfs's entries (see above) and removes
// a caller's.
func (r *Root) Unlink(ctx context.Context, name string) syscall.Errno {
	return r.remove(ctx, "unlink", name, syscall.Errno(0))
}

// Rmdir implements fs.NodeRmdirer. The kernel sends RMDIR only for a
// directory (vfs_rmdir's may_delete answers ENOTDIR itself), and the
// root has none of its own, so this is a defence: EPERM unless
// privileged, then ENOTDIR.
func (r *Root) Rmdir(ctx context.Context, name string) syscall.Errno {
	return r.remove(ctx, "rmdir", name, syscall.ENOTDIR)
}

// remove is unlink (privileged: nil errno, hide) and rmdir (privileged:
// the errno given) of an existing entry.
func (r *Root) remove(ctx context.Context, action, name string, privileged syscall.Errno) syscall.Errno {
	if r.users.get(name) != nil {
		return r.removeUser(ctx, &r.users, "", name, action == "rmdir")
	}
	found := r.withEntry(name, func(store attrStore) {})
	if !found {
		return syscall.ENOENT
	}
	if !r.credsOf(ctx).mayChangeTree() {
		r.refuse(ctx, action, name, "reason", "caller not privileged")
		return syscall.EPERM
	}
	if privileged != 0 {
		return privileged
	}
	if !r.withEntry(name, func(store attrStore) { store.UpdateAttr(func(a *devnode.Attr) { a.Hidden = true }) }) {
		return syscall.ENOENT // destroyed meanwhile
	}
	r.inval.Load().entry(name)
	return 0
}

// Rename implements fs.NodeRenamer: EPERM. A device's name is what it is
// (a unit's name is its interface's); FreeBSD's devfs renames nothing.
func (r *Root) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if r.users.get(name) == nil && !r.withEntry(name, func(attrStore) {}) {
		return syscall.ENOENT
	}
	r.refuse(ctx, "rename", name, "reason", "entries keep their names")
	return syscall.EPERM
}

// Link implements fs.NodeLinker: EPERM, for everyone: a second name for
// a device would outlive the device's own (it is not removed with it).
func (r *Root) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	r.refuse(ctx, "link", name, "reason", "devices have one name")
	return nil, syscall.EPERM
}

// withEntry calls f with the attributes of the entry called name, static
// or device, hidden or not, and reports whether there is one.
func (r *Root) withEntry(name string, f func(attrStore)) bool {
	if sc := r.static(name); sc != nil {
		f(sc.store)
		return true
	}
	n, err := r.reg.Get(name)
	if err != nil {
		return false
	}
	defer n.Rel()
	f(n)
	return true
}
