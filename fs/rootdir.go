package fs

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The root's listing: the static nodes and the live device nodes, except
// those the rules hide (FreeBSD's DE_WHITEOUT). It never creates anything.
//
// An entry's position in it (its d_off) is its inode number: unique in
// the tree, never reused (devnode numbers a recreated device anew) and
// below 1<<63 (the kernel keeps it in a signed file offset). The listing
// is in position order, so a listing resumed after the position of the
// last entry read lists every entry that stayed, once, whatever came and
// went meanwhile, and shows what exists as it is read. An open directory
// then needs nothing but the offset the kernel keeps, and the transport
// keeps no handle for it (handlelessDir).

// next returns the root's first listed entry after position pos; ok is
// false past the end.
func (r *Root) next(pos uint64) (de fuse.DirEntry, ok bool) {
	for _, sc := range r.statics {
		if ino := sc.inode.StableAttr().Ino; ino > pos && (!ok || ino < de.Off) && !sc.hidden() {
			de, ok = fuse.DirEntry{Name: sc.name, Mode: sc.typ, Ino: ino, Off: ino}, true
		}
	}
	if ude, uok := r.users.next(pos, ""); uok && (!ok || ude.Off < de.Off) {
		de, ok = ude, true
	}
	nodes := r.byIno.nodes(r.reg)
	i, found := slices.BinarySearchFunc(nodes, pos, func(n *devnode.Node, ino uint64) int { return cmp.Compare(n.Ino(), ino) })
	if found {
		i++
	}
	for ; i < len(nodes) && (!ok || nodes[i].Ino() < de.Off); i++ {
		if n := nodes[i]; n.Flags()&(devnode.FlagDying|devnode.FlagGone) == 0 && !n.Attr().Hidden {
			return fuse.DirEntry{Name: n.Name(), Mode: syscall.S_IFREG, Ino: n.Ino(), Off: n.Ino()}, true
		}
	}
	return de, ok
}

// inoIndex is the registry's live device nodes in inode number order,
// shared by every READDIR until the registry's names change. Made for
// each READDIR, it would cost a sort of every node each time: a listing
// of n devices, k to a READDIR, O(n² log n / k) (`ls -l` of 10,000 in
// seconds). What a node's entry shows besides its name (dying, gone,
// hidden) is read from the node as it is listed.
type inoIndex struct {
	gen  atomic.Uint64 // changed counts the changes of names
	snap atomic.Pointer[inoSnapshot]
	mu   sync.Mutex // one remake at a time
}

type inoSnapshot struct {
	gen   uint64    // inoIndex.gen when made, before the registry was read
	made  time.Time // a snapshot older than maxInoSnapshotAge is made again
	nodes []*devnode.Node
}

// maxInoSnapshotAge bounds what the index can miss: a node dying when it
// was made (List leaves it out) whose destroy is then abandoned (a
// signal to its destroyer before the drain) comes back with no change of
// names.
const maxInoSnapshotAge = time.Second

// changed says that a name was linked or unlinked: it must be called
// after an unlink, and no later than the link is published (the
// root's Observer.Linking runs in the same critical section), so a READDIR
// that comes after either sees it.
func (x *inoIndex) changed() { x.gen.Add(1) }

// nodes returns the index, made again if the names changed since.
func (x *inoIndex) nodes(reg *devnode.Registry) []*devnode.Node {
	if s := x.current(); s != nil {
		return s.nodes
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if s := x.current(); s != nil { // made meanwhile
		return s.nodes
	}
	s := &inoSnapshot{gen: x.gen.Load(), made: time.Now()}
	s.nodes = reg.List()
	slices.SortFunc(s.nodes, func(a, b *devnode.Node) int { return cmp.Compare(a.Ino(), b.Ino()) })
	x.snap.Store(s)
	return s.nodes
}

func (x *inoIndex) current() *inoSnapshot {
	s := x.snap.Load()
	if s == nil || s.gen != x.gen.Load() || time.Since(s.made) > maxInoSnapshotAge {
		return nil
	}
	return s
}

// OpendirHandle implements fs.NodeOpendirHandler: the root's listing, with
// READDIRPLUS lookups that never clone, and no handle kept.
func (r *Root) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return newRootDir(r), transport.FopenHandleless, 0
}

// positioned is a directory listed by position: next returns its first
// listed entry after position pos (an inode number), ok false past the
// end.
type positioned interface {
	next(pos uint64) (de fuse.DirEntry, ok bool)
}

// dirReader reads a directory's listing from a position. Every read
// looks at the directory afresh, so a rewind (or a read past the end)
// shows the entries made since. go-fuse serializes the calls on one
// handle, so it needs no lock of its own.
type dirReader struct {
	list positioned
	pos  uint64        // the position of the last entry read; 0: none
	de   fuse.DirEntry // that entry: go-fuse reads it until the next call
}

var (
	_ = (fs.FileReaddirenter)((*dirReader)(nil))
	_ = (fs.FileSeekdirer)((*dirReader)(nil))
	_ = (fs.FileLookuper)((*rootDir)(nil))
)

// Readdirent implements fs.FileReaddirenter.
func (d *dirReader) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	de, ok := d.list.next(d.pos)
	if !ok {
		return nil, 0
	}
	d.pos, d.de = de.Off, de
	return &d.de, 0
}

// Seekdir implements fs.FileSeekdirer.
func (d *dirReader) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	d.pos = off
	return 0
}

// rootDir is an open root: its listing, with READDIRPLUS lookups that
// never clone.
type rootDir struct {
	dirReader
	root *Root
}

func newRootDir(r *Root) *rootDir { return &rootDir{dirReader{list: r}, r} }

// Lookup implements fs.FileLookuper: READDIRPLUS's lookup of a listed name.
func (d *rootDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return d.root.lookupListed(ctx, name, out)
}
