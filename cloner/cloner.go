// Package cloner is the if_clone layer of cdevfs: it turns names into
// units, creates and destroys interfaces through a Backend, and serializes
// both per cloner so that two racing creators of one name never both
// succeed and a destroy never races a create of the same unit.
//
// Lock order: Cloner.mu → devnode.Registry.mu → devnode.Node.mu.
package cloner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
	"golang.org/x/sys/unix"
)

// Cloner creates the tunN (or tapN) interfaces of one kind on demand.
type Cloner struct {
	kind Kind
	be   Backend
	reg  *devnode.Registry
	max  int
	log  *slog.Logger
	ev   Events // nil: nobody counts

	// mu is the cloner lock (OpenBSD's if_cloners_lock): it is
	// held across unit allocation, interface creation and node publication,
	// and across unlink, interface deletion and unit release, so each is
	// atomic to the others. It guards units.
	mu      sync.Mutex
	units   map[int]bool    // units in use: a node exists or is being made
	lowFree int             // every unit below it is in units: the clone node's scan starts here
	byIndex map[int]*device // live devices by kernel ifindex, for the netlink watch
	retired bool            // the namespace is gone: nothing is made any more

	destroyOrphans bool // set before the watch starts; see DestroyOrphans
}

// DestroyOrphans makes the cloner delete, instead of adopt, the
// interfaces with its own mark that it finds at start (left by a daemon
// that was killed). Call it before the watch starts.
func (c *Cloner) DestroyOrphans(on bool) { c.destroyOrphans = on }

// New returns a cloner for kind and registers it as a clone handler.
func New(kind Kind, be Backend, reg *devnode.Registry, maxUnit int, log *slog.Logger) *Cloner {
	if maxUnit <= 0 {
		maxUnit = DefaultMaxUnit
	}
	if log == nil {
		log = slog.Default()
	}
	c := &Cloner{kind: kind, be: be, reg: reg, max: maxUnit, log: log,
		units: make(map[int]bool), byIndex: make(map[int]*device)}
	reg.AddCloner(c.Clone)
	return c
}

// Events is told of every interface created, revoked and destroyed (the
// daemon's metrics).
type Events interface {
	Created()
	Revoked()
	Destroyed()
}

// SetEvents sets who is told of creates, revokes and destroys. Call it
// before the cloner is used.
func (c *Cloner) SetEvents(e Events) { c.ev = e }

// Kind is the kind of interface this cloner makes.
func (c *Cloner) Kind() Kind { return c.kind }

// UnitsInUse is the number of allocated units (for tests and metrics).
func (c *Cloner) UnitsInUse() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.units)
}

// Clone is the clone handler (devnode.CloneFunc): the bare prefix creates
// the lowest free unit, "prefixN" creates unit N. The node is returned
// with a reference for the caller.
func (c *Cloner) Clone(ctx context.Context, name string, open bool) (*devnode.Node, error) {
	unit, wildcard, ok := ParseName(c.kind.Prefix(), name, c.max)
	if !ok || (wildcard && !open) {
		// The bare prefix is the clone node: only opening it allocates a
		// unit. A lookup of it must not create (and leak) some tunN.
		return nil, devnode.ErrNotFound
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.retired {
		return nil, fmt.Errorf("cloner: %s: the network namespace is gone: %w", name, syscall.ENXIO)
	}
	if !wildcard {
		if c.units[unit] {
			// A node of this name exists: a racing creator got it first
			// (the caller's Get missed it). Under c.mu the node is still
			// linked and holds the registry's reference, so hand it out
			// with a reference for the caller, like tunclone() does for
			// an existing device. It cannot be given
			// out already open, though.
			if !open {
				if n, err := c.reg.Get(name); err == nil {
					return n, nil
				}
			}
			return nil, fmt.Errorf("cloner: %s: %w", name, syscall.EEXIST)
		}
		return c.createLocked(ctx, unit, open)
	}
	// Lowest free unit. A unit whose name some other device already has
	// in the kernel is skipped, not leaked: it stays free.
	for u := c.lowFree; u <= c.max; u++ {
		if c.units[u] {
			continue
		}
		n, err := c.createLocked(ctx, u, open)
		if errors.Is(err, syscall.EEXIST) {
			continue
		}
		return n, err
	}
	return nil, fmt.Errorf("cloner: no free %s unit: %w", c.kind.Prefix(), syscall.ENOSPC)
}

// createLocked makes unit u; the unit is marked used only if a node is
// published, so a failed create never leaks it. Called with c.mu held.
// ctx's actor (devnode.WithActor) is logged as the creator.
func (c *Cloner) createLocked(ctx context.Context, u int, open bool) (*devnode.Node, error) {
	name := fmt.Sprintf("%s%d", c.kind.Prefix(), u)
	link, err := c.be.Create(name, c.kind, open)
	if err != nil {
		return nil, fmt.Errorf("cloner: create %s: %w", name, err)
	}
	n, err := c.publishLocked(u, link, false, open)
	if err != nil {
		_ = link.Delete()
		_ = link.Close()
		return nil, err
	}
	attrs := []any{"unit", name, "ifindex", link.Index()}
	if a, ok := devnode.ActorFrom(ctx); ok {
		attrs = append(attrs, "pid", a.Pid, "uid", a.Uid)
	}
	c.log.Info("create", attrs...)
	if c.ev != nil {
		c.ev.Created()
	}
	return n, nil
}

// publishLocked makes the node of unit u on link and marks the unit used.
// Called with c.mu held.
func (c *Cloner) publishLocked(u int, link Link, foreign, open bool) (*devnode.Node, error) {
	d := &device{c: c, unit: u, link: link, foreign: foreign, st: bsdState{mode: defaultMode(c.kind)}}
	n, err := c.reg.Make(link.Name(), d, open)
	if err != nil {
		return nil, fmt.Errorf("cloner: publish %s: %w", link.Name(), err)
	}
	d.node.Store(n)
	c.units[u] = true
	for c.units[c.lowFree] {
		c.lowFree++
	}
	if i := link.Index(); i > 0 {
		c.byIndex[i] = d
	}
	return n, nil
}

// LinkAppeared is told by the netlink watch of an interface the kernel
// has. One of this cloner's kind and name that has no node gets one:
//   - made outside cdevfs (ip tuntap add): adopted as foreign; opening it
//     attaches with its own flags, closing leaves it as it was, and
//     cdevfs never deletes it;
//   - carrying our own mark (left by a killed daemon): adopted as ours,
//     or deleted if DestroyOrphans;
//   - carrying another cdevfs's mark: left alone.
//
// A device of another driver or kind with a name of ours gets no node;
// opening that name is EBUSY (the exclusive create finds it taken).
//
// A rename (the same ifindex under a new name) is treated by who made
// the interface:
//   - one cdevfs made (or left by a killed cdevfs) keeps its node and
//     node name, as FreeBSD's /dev/tunN keeps its name when the ifnet is
//     renamed (tunrename() in if_tuntap.c only adds a best-effort alias,
//     which cdevfs does not make); a unit name it is renamed to gets no
//     node, and opening that name is EBUSY (the kernel has it);
//   - an adopted one was adopted by its name, so its node leaves the tree
//     under the old name (revoked, the interface kept), and it is adopted
//     again under the new name if that is a free unit name of this kind;
//     renamed to anything else, it has no node.
func (c *Cloner) LinkAppeared(info LinkInfo) {
	if !info.TunTap || info.Kind != c.kind {
		return
	}
	c.mu.Lock()
	renamed := c.renamedLocked(info)
	if u, wild, ok := ParseName(c.kind.Prefix(), info.Name, c.max); ok && !wild && info.Owner != OwnerOther {
		c.adoptLocked(u, info)
	}
	c.mu.Unlock()
	if renamed != nil {
		c.log.Info("rename", "unit", renamed.link.Name(), "ifindex", info.Index, "to", info.Name)
		renamed.leave(reasonRenamed)
	}
}

// reasonRenamed is the destroy reason of an adopted interface's node
// once the interface is renamed.
const reasonRenamed = "adopted interface renamed outside cdevfs"

// renamedLocked finds the adopted device whose interface info now names
// otherwise, and lets go of its ifindex so that the interface can be
// adopted again under its new name; the caller then destroys the old
// node. Called with c.mu held.
func (c *Cloner) renamedLocked(info LinkInfo) *device {
	d := c.byIndex[info.Index]
	if d == nil || !d.foreign || d.link.Name() == info.Name {
		return nil
	}
	delete(c.byIndex, info.Index)
	return d
}

// adoptLocked gives the interface info a node as unit u, if it has none.
// Called with c.mu held.
func (c *Cloner) adoptLocked(u int, info LinkInfo) {
	if c.retired || c.units[u] || c.byIndex[info.Index] != nil {
		// Ours already (the event of our own create), or the name is
		// taken: by a node being destroyed, whose Destroy then looks
		// the name up again (rescanLocked).
		return
	}
	// Events lag: the interface may have gone, or changed, since.
	link, now, err := c.be.Adopt(info.Index)
	if err != nil || now.Name != info.Name || now.Kind != c.kind || now.Owner == OwnerOther {
		if link != nil {
			_ = link.Close()
		}
		return
	}
	own := now.Owner == OwnerSelf
	if own && c.destroyOrphans {
		err := link.Delete()
		_ = link.Close()
		c.log.Info("destroy", "unit", info.Name, "ifindex", info.Index, "reason", "left by a previous cdevfs", "error", err)
		return
	}
	n, err := c.publishLocked(u, link, !own, false)
	if err != nil {
		_ = link.Close()
		return
	}
	n.Rel() // Make's reference for the caller: nobody opened it
	reason := "made outside cdevfs"
	if own {
		reason = "left by a previous cdevfs"
	}
	c.log.Info("adopt", "unit", info.Name, "ifindex", info.Index, "reason", reason)
}

// DeleteCreated deletes, in one batch where the backend can, the
// interfaces of every cloner in cs that cdevfs made (adopted foreign ones
// stay). It is the "destroy" step of shutdown, run after the unmount and
// before the nodes' destroys, which then find their interfaces gone.
func DeleteCreated(be BatchDeleter, cs ...*Cloner) error {
	var idx []int
	for _, c := range cs {
		c.mu.Lock()
		for i, d := range c.byIndex {
			if !d.foreign {
				idx = append(idx, i)
			}
		}
		c.mu.Unlock()
	}
	return be.DeleteMany(idx)
}

// rescanLocked adopts an interface named like unit u that appeared while
// the unit was still taken by a node being destroyed: its watch event was
// ignored then. Called with c.mu held.
func (c *Cloner) rescanLocked(u int) {
	if c.retired {
		return
	}
	if info, err := c.be.Find(fmt.Sprintf("%s%d", c.kind.Prefix(), u)); err == nil &&
		info.TunTap && info.Kind == c.kind && info.Owner != OwnerOther {
		c.adoptLocked(u, info)
	}
}

// Retire is for a network namespace that is gone (ip netns del): it
// refuses every later clone with ENXIO, and destroys every node of this
// cloner now (revoking open handles), deleting the interfaces cdevfs made,
// so that the daemon holds nothing of the namespace (as a VNET jail's
// teardown destroys its cloned interfaces).
func (c *Cloner) Retire(ctx context.Context) {
	c.mu.Lock()
	c.retired = true
	var nodes []*devnode.Node
	for _, d := range c.byIndex {
		if n := d.node.Load(); n != nil && n.TryRef() {
			nodes = append(nodes, n)
		}
	}
	c.mu.Unlock()
	// Destroy also waits for a destroy already under way elsewhere.
	ctx = devnode.WithReason(ctx, devnode.ReasonNetnsGone)
	for _, n := range nodes {
		_ = n.Destroy(ctx)
		n.Rel()
	}
}

// device is the devnode.Device of one interface.
type device struct {
	c       *Cloner
	unit    int
	link    Link
	foreign bool                         // adopted, not made by cdevfs: never deleted
	node    atomic.Pointer[devnode.Node] // set once, right after Make

	mu sync.Mutex // guards st
	st bsdState
}

var (
	_ devnode.Device     = (*device)(nil)
	_ devnode.IO         = (*device)(nil)
	_ devnode.Poller     = (*device)(nil)
	_ devnode.ReadWaiter = (*device)(nil)
)

func (d *device) Open(ctx context.Context) error {
	err := d.link.Attach(ctx)
	if errors.Is(err, ErrGone) {
		d.gone()
		return fmt.Errorf("cloner: %s: %w", d.link.Name(), syscall.ENXIO)
	}
	return err
}

// Close is tunclose() without the destroy: set down, detach, keep.
func (d *device) Close() error { return d.link.Detach() }

// Revoke wakes blocked operations; it logs why the node is going.
func (d *device) Revoke() {
	d.link.Wake()
	d.logCause("revoke")
	if d.c.ev != nil {
		d.c.ev.Revoked()
	}
}

// logCause logs one line for msg ("revoke", "destroy", "forget") with
// the unit and what started the node's destroy: the reason and, for a
// transient last close, the closer's pid and uid.
func (d *device) logCause(msg string, more ...any) {
	attrs := []any{"unit", d.link.Name(), "ifindex", d.link.Index()}
	if n := d.node.Load(); n != nil {
		c := n.Cause()
		attrs = append(attrs, "reason", c.Reason)
		if c.HasActor {
			attrs = append(attrs, "pid", c.Actor.Pid, "uid", c.Actor.Uid)
		}
	}
	d.c.log.Info(msg, append(attrs, more...)...)
}

// Destroy deletes the interface and frees its unit under the cloner lock,
// unlinking the node in the same critical section.
func (d *device) Destroy(unlink func()) error {
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	unlink()
	err := d.link.Delete()
	// The fd goes now, not at the last reference (a handle may stay open
	// long after): it holds the interface's network namespace, which a
	// deleted namespace needs to be freed.
	_ = d.link.Detach()
	delete(d.c.units, d.unit)
	d.c.lowFree = min(d.c.lowFree, d.unit)
	if d.c.byIndex[d.link.Index()] == d {
		delete(d.c.byIndex, d.link.Index())
	}
	if n := d.node.Load(); n == nil || n.Cause().Reason != devnode.ReasonShutdown {
		// At shutdown nothing can be published any more: no rescan.
		defer d.c.rescanLocked(d.unit)
	}
	if d.foreign {
		d.logCause("forget", "kept", "not made by cdevfs")
	} else {
		d.logCause("destroy")
		if d.c.ev != nil {
			d.c.ev.Destroyed()
		}
	}
	return err
}

func (d *device) Release() { _ = d.link.Close() }

// Poll implements devnode.Poller.
func (d *device) Poll(wake func()) uint32 {
	if wake != nil {
		d.link.Watch(wake)
	}
	readable, err := d.link.Readable()
	if err != nil {
		_ = d.check(err)
		return unix.POLLERR | unix.POLLHUP
	}
	rev := uint32(unix.POLLOUT | pollWrNorm)
	if readable {
		rev |= unix.POLLIN | pollRdNorm
	}
	return rev
}

// ReadFD implements devnode.ReadWaiter: the tun fd, which a packet makes
// readable (in TUNSIFHEAD mode too: readHead reads the same fd), for a
// link that has one (the Linux backend's).
func (d *device) ReadFD() int {
	if w, ok := d.link.(interface{ ReadFD() int }); ok {
		return w.ReadFD()
	}
	return -1
}

func (d *device) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	if d.headMode() {
		return d.readHead(ctx, p, nonblock)
	}
	n, err := d.link.Read(ctx, p, nonblock)
	return n, d.check(err)
}

func (d *device) Write(ctx context.Context, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) > MaxPacket {
		return 0, fmt.Errorf("cloner: %d-byte packet over the MRU: %w", len(p), syscall.EIO)
	}
	if d.headMode() {
		return d.writeHead(ctx, p)
	}
	n, err := d.link.Write(ctx, p)
	return n, d.check(err)
}

// check turns a vanished interface into ENXIO and schedules the node's
// destroy: the kernel deleted the interface (ip link del), so the node
// is revoked like any destroyed one.
func (d *device) check(err error) error {
	if errors.Is(err, ErrGone) {
		d.gone()
		return fmt.Errorf("cloner: %s: %w", d.link.Name(), syscall.ENXIO)
	}
	return err
}

func (d *device) gone() { d.leave(devnode.ReasonDeleted) }

// leave schedules the node's destroy for reason.
func (d *device) leave(reason string) {
	if n := d.node.Load(); n != nil {
		d.c.reg.DestroySched(n, reason)
	}
}

// LinkDeleted is told by the netlink watch that the kernel deleted the
// interface with ifindex index: if it is one of ours, its node is revoked
// and destroyed (the unit becomes free), as for any destroy.
func (c *Cloner) LinkDeleted(index int) {
	c.mu.Lock()
	d := c.byIndex[index]
	c.mu.Unlock()
	if d != nil {
		d.gone()
	}
}

// LinkIndexes lists the ifindexes of the interfaces this cloner has nodes
// for (Watcher.Known).
func (c *Cloner) LinkIndexes() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	idx := make([]int, 0, len(c.byIndex))
	for i := range c.byIndex {
		idx = append(idx, i)
	}
	return idx
}

// POLLRDNORM and POLLWRNORM (<poll.h>), which x/sys/unix does not name.
const (
	pollRdNorm = 0x40
	pollWrNorm = 0x100
)

// defaultMode is the link mode a new device starts in (TUNSIFMODE).
func defaultMode(k Kind) uint32 {
	if k == Tap {
		return unix.IFF_BROADCAST | unix.IFF_MULTICAST
	}
	return unix.IFF_POINTOPOINT | unix.IFF_MULTICAST
}
