package fs

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Entries callers make: directories (where a container runtime mounts
// devpts, shm and mqueue), symlinks, empty files (mount targets such as
// console) and device nodes. FreeBSD's devfs lets root make directories
// and symlinks in it (DE_USER entries: devfs_mkdir, devfs_symlink) and
// removes them for real, where a remove of its own entries hides them; a
// runtime's tmpfs /dev lets it make anything. Here only a privileged
// caller (mayChangeTree; CAP_MKNOD too for a device node) makes or
// removes one, a name a cloner owns cannot be taken, the rules apply to
// them by their path from the root, and they last for the mount's life.

// userSet is the entries callers made in one directory: the root (beside
// cdevfs's own) or a userDir.
type userSet struct {
	mu      sync.Mutex           // guards entries; held from a check of a name to its insert or delete
	entries map[string]*fs.Inode // by name; nil until the first
}

func (s *userSet) get(name string) *fs.Inode {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.entries[name]
}

// inodes returns the entries in inode number order (the order they were
// made in).
func (s *userSet) inodes() []*fs.Inode {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := make([]*fs.Inode, 0, len(s.entries))
	for _, ch := range s.entries {
		l = append(l, ch)
	}
	slices.SortFunc(l, func(a, b *fs.Inode) int { return cmp.Compare(a.StableAttr().Ino, b.StableAttr().Ino) })
	return l
}

// next returns the first entry of s after position pos (an inode
// number) that the rules do not hide, named relative to dir (the path of
// s's directory, "" for the root); ok is false past the end.
func (s *userSet) next(pos uint64, dir string) (de fuse.DirEntry, ok bool) {
	for _, ch := range s.inodes() { // in position order
		if ino, e := ch.StableAttr().Ino, userEntryOf(ch); ino > pos && !e.hidden() {
			name := e.name
			if dir != "" {
				name = name[len(dir)+1:]
			}
			return fuse.DirEntry{Name: name, Mode: e.typ, Ino: ino, Off: ino}, true
		}
	}
	return de, false
}

// each calls f with every entry of s and of the directories below it,
// and the directory it is in (nil for s's own).
func (s *userSet) each(dir *userDir, f func(dir *userDir, ch *fs.Inode)) {
	for _, ch := range s.inodes() {
		f(dir, ch)
		if d, ok := ch.Operations().(*userDir); ok {
			d.users.each(d, f)
		}
	}
}

// userEntryOf returns the entry of a node a caller made.
func userEntryOf(ch *fs.Inode) *entry { return ch.Operations().(userNode).userEntry() }

// userNode is every node type a caller can make.
type userNode interface{ userEntry() *entry }

func (e *entry) userEntry() *entry { return e }

// newUser describes an entry to make.
type newUser struct {
	action string // what the caller does: mkdir, symlink, create, mknod
	typ    uint32 // S_IFDIR, S_IFLNK, S_IFREG, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK
	mode   uint32 // permission bits, the kernel having applied the umask
	rdev   uint32 // a device node's number
	target string // a symlink's
}

// makeUser makes entry name in set, the directory at dir ("" for the
// root), for the caller of ctx.
func (r *Root) makeUser(ctx context.Context, set *userSet, dir, name string, nu newUser, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	path := name
	if dir != "" {
		path = dir + "/" + name
	}
	cr := r.credsOf(ctx)
	if !cr.mayChangeTree() {
		r.refuse(ctx, nu.action, path, "reason", "caller not privileged")
		return nil, syscall.EPERM
	}
	if (nu.typ == syscall.S_IFCHR || nu.typ == syscall.S_IFBLK) && !cr.has(privilege.Mknod) {
		r.refuse(ctx, nu.action, path, "reason", "no CAP_MKNOD")
		return nil, syscall.EPERM
	}
	// A name cdevfs has reaches here only for a unit that does not exist
	// yet (the kernel answers EEXIST for what does). EPERM, not EEXIST:
	// tools meeting EEXIST stat the name, which would clone the unit.
	if dir == "" && r.ownsName(name) {
		r.refuse(ctx, nu.action, path, "reason", "a cloner's name")
		return nil, syscall.EPERM
	}
	set.mu.Lock()
	defer set.mu.Unlock()
	if set.entries[name] != nil {
		return nil, syscall.EEXIST
	}
	now := time.Now()
	m := &memAttr{a: devnode.Attr{Mode: nu.mode & 07777, Uid: cr.uid, Gid: cr.gid, Atime: now, Mtime: now, Ctime: now}}
	applyRules(r.rules.Load(), path, &m.a)
	e := entry{root: r, name: path, typ: nu.typ, size: uint64(len(nu.target)), rdev: nu.rdev, store: m}
	var node fs.InodeEmbedder
	switch nu.typ {
	case syscall.S_IFDIR:
		node = &userDir{entry: e}
	case syscall.S_IFLNK:
		node = &symlinkNode{entry: e, target: []byte(nu.target)}
	case syscall.S_IFREG:
		node = &emptyFile{entry: e}
	default:
		node = &specialNode{entry: e}
	}
	ch := r.NewPersistentInode(ctx, node, fs.StableAttr{Mode: nu.typ, Ino: r.userInos.Add(1)})
	if set.entries == nil {
		set.entries = make(map[string]*fs.Inode)
	}
	set.entries[name] = ch
	userEntryOf(ch).fill(&out.Attr)
	return ch, 0
}

// ownsName reports whether a name of the root is cdevfs's: a static
// entry, a clone node, a unit a cloner has made or would make.
func (r *Root) ownsName(name string) bool {
	if r.static(name) != nil || r.clones[name] || r.cloneable(name) {
		return true
	}
	n, err := r.reg.Get(name)
	if err != nil {
		return false
	}
	n.Rel()
	return true
}

// removeUser removes entry name, a caller's, from set (dir as for
// makeUser): a directory must be empty, and rmdir removes directories
// only, unlink all else.
func (r *Root) removeUser(ctx context.Context, set *userSet, dir, name string, rmdir bool) syscall.Errno {
	path := name
	if dir != "" {
		path = dir + "/" + name
	}
	action := "unlink"
	if rmdir {
		action = "rmdir"
	}
	if !r.credsOf(ctx).mayChangeTree() {
		r.refuse(ctx, action, path, "reason", "caller not privileged")
		return syscall.EPERM
	}
	set.mu.Lock()
	defer set.mu.Unlock()
	ch := set.entries[name]
	if ch == nil {
		return syscall.ENOENT
	}
	d, isDir := ch.Operations().(*userDir)
	switch {
	case rmdir && !isDir:
		return syscall.ENOTDIR
	case !rmdir && isDir:
		return syscall.EISDIR
	case isDir && !d.users.empty():
		return syscall.ENOTEMPTY
	}
	delete(set.entries, name)
	ch.ForgetPersistent()
	return 0
}

func (s *userSet) empty() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries) == 0
}

// lookupUser answers a lookup of name in set: ENOENT if there is none or
// the rules hide it.
func lookupUser(set *userSet, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	ch := set.get(name)
	if ch == nil {
		return nil, syscall.ENOENT
	}
	e := userEntryOf(ch)
	if e.hidden() {
		return nil, syscall.ENOENT
	}
	e.fill(&out.Attr)
	return ch, 0
}

// userDir is a directory a caller made. Only callers' entries live in
// it; no clone happens below the root.
type userDir struct {
	fs.Inode
	entry
	users userSet
}

var (
	_ = (fs.NodeLookuper)((*userDir)(nil))
	_ = (fs.NodeOpendirHandler)((*userDir)(nil))
	_ = (fs.NodeMkdirer)((*userDir)(nil))
	_ = (fs.NodeSymlinker)((*userDir)(nil))
	_ = (fs.NodeCreater)((*userDir)(nil))
	_ = (fs.NodeMknoder)((*userDir)(nil))
	_ = (fs.NodeUnlinker)((*userDir)(nil))
	_ = (fs.NodeRmdirer)((*userDir)(nil))
	_ = (fs.NodeRenamer)((*userDir)(nil))
	_ = (fs.NodeLinker)((*userDir)(nil))
	_ = (fs.NodeGetattrer)((*userDir)(nil))
	_ = (fs.NodeSetattrer)((*userDir)(nil))
)

// Lookup implements fs.NodeLookuper.
func (d *userDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return lookupUser(&d.users, name, out)
}

// OpendirHandle implements fs.NodeOpendirHandler: what is there, less
// what the rules hide. Positions are inode numbers, as in the root's
// listing (rootdir.go), so the transport keeps no handle
// (handlelessDir).
func (d *userDir) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &dirReader{list: d}, transport.FopenHandleless, 0
}

// next implements positioned.
func (d *userDir) next(pos uint64) (fuse.DirEntry, bool) { return d.users.next(pos, d.name) }

// Mkdir implements fs.NodeMkdirer.
func (d *userDir) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return d.root.makeUser(ctx, &d.users, d.name, name, newUser{action: "mkdir", typ: syscall.S_IFDIR, mode: mode}, out)
}

// Symlink implements fs.NodeSymlinker.
func (d *userDir) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return d.root.makeUser(ctx, &d.users, d.name, name, newUser{action: "symlink", typ: syscall.S_IFLNK, mode: 0777, target: target}, out)
}

// Create implements fs.NodeCreater.
func (d *userDir) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return d.root.createUser(ctx, &d.users, d.name, name, mode, out)
}

// Mknod implements fs.NodeMknoder.
func (d *userDir) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return d.root.makeUser(ctx, &d.users, d.name, name, mknodEntry(mode, dev), out)
}

// Unlink implements fs.NodeUnlinker.
func (d *userDir) Unlink(ctx context.Context, name string) syscall.Errno {
	return d.root.removeUser(ctx, &d.users, d.name, name, false)
}

// Rmdir implements fs.NodeRmdirer.
func (d *userDir) Rmdir(ctx context.Context, name string) syscall.Errno {
	return d.root.removeUser(ctx, &d.users, d.name, name, true)
}

// Rename implements fs.NodeRenamer: EPERM, as for the root's entries.
func (d *userDir) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	d.root.refuse(ctx, "rename", d.name+"/"+name, "reason", "entries keep their names")
	return syscall.EPERM
}

// Link implements fs.NodeLinker: EPERM, as for the root's entries.
func (d *userDir) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	d.root.refuse(ctx, "link", d.name+"/"+name, "reason", "entries have one name")
	return nil, syscall.EPERM
}

// mknodEntry describes the entry mknod(2) asks for: mode carries the
// type (a plain file if none).
func mknodEntry(mode, dev uint32) newUser {
	typ := mode & syscall.S_IFMT
	if typ == 0 {
		typ = syscall.S_IFREG
	}
	return newUser{action: "mknod", typ: typ, mode: mode, rdev: dev}
}

// createUser makes an empty file and opens it (open(2) with O_CREAT).
func (r *Root) createUser(ctx context.Context, set *userSet, dir, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ch, e := r.makeUser(ctx, set, dir, name, newUser{action: "create", typ: syscall.S_IFREG, mode: mode}, out)
	if e != 0 {
		return nil, nil, 0, e
	}
	return ch, nil, fuse.FOPEN_DIRECT_IO, 0
}

// emptyFile is an empty file: one a caller made, or the default console.
// It is a mount target (a runtime bind-mounts a terminal over console)
// and holds no data: reads are at its end, writes find no space, as on a
// device with none.
type emptyFile struct {
	fs.Inode
	entry
}

var (
	_ = (fs.NodeOpener)((*emptyFile)(nil))
	_ = (fs.NodeReader)((*emptyFile)(nil))
	_ = (fs.NodeWriter)((*emptyFile)(nil))
	_ = (fs.NodeGetattrer)((*emptyFile)(nil))
	_ = (fs.NodeSetattrer)((*emptyFile)(nil))
)

// Open implements fs.NodeOpener.
func (f *emptyFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if e := f.checkOpen(ctx, flags); e != 0 {
		return nil, 0, e
	}
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

// Read implements fs.NodeReader: end of file.
func (f *emptyFile) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return fuse.ReadResultData(nil), 0
}

// Write implements fs.NodeWriter: ENOSPC.
func (f *emptyFile) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSPC
}

// specialNode is a device node, FIFO or socket a caller made with
// mknod(2): the kernel opens what it names (init_special_inode), so the
// daemon serves only its attributes.
type specialNode struct {
	fs.Inode
	entry
}

var (
	_ = (fs.NodeGetattrer)((*specialNode)(nil))
	_ = (fs.NodeSetattrer)((*specialNode)(nil))
)
