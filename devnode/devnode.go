// Package devnode is the cdev layer of cdevfs: a registry of named device
// nodes with FreeBSD devfs semantics.
//
//   - References (dev_ref/dev_rel): a node's Device is released (its fd
//     closed) only after the last reference is dropped. Who holds one:
//     the registry while the name is linked; every caller of Lookup or
//     Clone until it calls Rel; every open handle from Open to Close.
//   - Exclusive open (TUN_OPEN): one opener holds a node at a time. An
//     opener that finds the holder closing waits, a bounded time, for
//     that close to end, so that a close the caller has seen return
//     frees the node (Open, Closing).
//   - In-flight operations (si_threadcount): every device method runs
//     between Enter and Exit. Destroy waits for the count to drain.
//   - Destroy is a barrier (destroy_dev): mark dying, revoke, drain, unlink,
//     destroy the backing object, drop the registry's reference.
//   - DestroySched defers that barrier to a worker (destroy_dev_sched), for
//     callers that are themselves an in-flight operation (a last close).
//   - Clone handlers (dev_clone) create a node for a name on demand and
//     return it with one reference held for the caller (FreeBSD's
//     MAKEDEV_REF), so the node cannot be destroyed between publication
//     and use.
//
// Lock order: a cloner's own lock (outside this package) → Registry.mu →
// Node.mu. Device methods are never called with Registry.mu or Node.mu held.
package devnode

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Device is the driver side of a node (cdevsw and softc together).
// Implementations must be safe for concurrent use.
type Device interface {
	// Open attaches an opener. devnode guarantees exclusivity: Open is
	// never called while the node is already open.
	Open(ctx context.Context) error
	// Close detaches the last opener (like tunclose(): link down, keep).
	Close() error
	// Revoke wakes every blocked operation; from then on they fail with
	// ENXIO. It must not block.
	Revoke()
	// Destroy removes the backing object. It must call unlink while
	// holding whatever serializes creation of the same name, so that a
	// creator never sees the name half freed.
	Destroy(unlink func()) error
	// Release frees what the device holds (its fd). Called once, when the
	// last reference is dropped.
	Release()
}

// IO is implemented by devices that carry data, one packet per call.
// Read blocks unless nonblock; ctx ending ends it with EINTR.
type IO interface {
	Read(ctx context.Context, p []byte, nonblock bool) (int, error)
	Write(ctx context.Context, p []byte) (int, error)
}

// Ioctler is implemented by devices with ioctls. in holds the command's
// input (its size is encoded in cmd); out must be filled completely. pid
// is the caller's. Unknown commands fail with ENOTTY.
type Ioctler interface {
	Ioctl(ctx context.Context, cmd uint32, pid uint32, in, out []byte) error
}

// Poller is implemented by devices whose readiness can be waited for.
// Poll returns poll(2) revents (POLLIN when a packet is queued, POLLOUT
// always, POLLERR|POLLHUP once gone). With wake not nil the device keeps
// it and calls it on every later readiness change (each new packet, and
// the revoke) until the device is closed; a later wake replaces it.
type Poller interface {
	Poll(wake func()) uint32
}

// ReadWaiter is implemented by devices whose blocking Read waits for one
// file descriptor to turn readable. ReadFD returns it (-1 if there is
// none): a caller that is in flight (between Enter and Exit) on an open
// node may wait for it itself, with poll(2) or io_uring, and then Read
// with nonblock set, instead of blocking a thread in Read. The fd stays
// open while the node is open and the caller in flight (the device is
// closed only by the last close, released only after a drain); the
// caller must not close it. A wait that outlives a revoke is the caller's
// to end: the registry's revoke hook says when (SetRevokeHook).
type ReadWaiter interface {
	ReadFD() int
}

// Flags is a node's state. All of it lives in Node.flags under Node.mu.
type Flags uint32

const (
	// FlagOpen: an opener holds the node (TUN_OPEN); opens are exclusive.
	FlagOpen Flags = 1 << iota
	// FlagDying: destroy has begun (TUN_DYING, FreeBSD's sentinel for a
	// racing open); new operations fail with ENXIO.
	FlagDying
	// FlagTransient: destroy on last close (TUNSTRANSIENT).
	FlagTransient
	// FlagGone: destroy finished; the name is unlinked.
	FlagGone
	// FlagClosing: the holder's file has been closed through one of its
	// descriptors since it opened (Closing): its last close may be on
	// its way, and an opener waits for it a bounded time (Open).
	FlagClosing
)

// closeWait bounds an opener's wait for a closing holder's last close
// (Open). It covers the daemon's handling of that close, which includes
// the device's detach (a tun close waits out an RCU grace period), with
// room for a loaded machine; when another descriptor still holds the
// file, it is what the first opener waits before its EBUSY.
const closeWait = time.Second

// Errors returned by this package; Errno maps them for the FUSE boundary.
var (
	ErrNotFound = fmt.Errorf("devnode: no such node: %w", syscall.ENOENT)
	ErrBusy     = fmt.Errorf("devnode: node is open: %w", syscall.EBUSY)
	ErrClosing  = fmt.Errorf("devnode: node is open, its holder closing: %w", syscall.EBUSY)
	ErrDying    = fmt.Errorf("devnode: node is being destroyed: %w", syscall.ENXIO)
	ErrExists   = fmt.Errorf("devnode: name exists: %w", syscall.EEXIST)
	ErrClosed   = fmt.Errorf("devnode: registry is shut down: %w", syscall.ENXIO)
)

// Node is one named device.
type Node struct {
	name string
	ino  uint64
	reg  *Registry
	dev  Device

	// refs counts references (see the package comment for the owners).
	// Zero means released: TryRef fails, never resurrects.
	refs atomic.Int64

	// attr is the node's owner, mode, times and hidden flag (FreeBSD's
	// si_uid, si_gid, si_mode, si_*time, and the DE_WHITEOUT of its one
	// devfs entry): set at Make (through the registry's policy), changed
	// by SetAttr and UpdateAttr.
	attr Attr

	mu    sync.Mutex // guards flags, busy, drained, released, destroyed, attr, cause
	flags Flags
	cause Cause // what made the node dying; set with FlagDying
	busy  int   // in-flight operations (si_threadcount)
	// drained, if not nil, is closed (and cleared) when busy drops to 0:
	// a draining destroy makes it, so the packet path's Exit allocates
	// nothing while no destroy waits.
	drained chan struct{}
	// released, if not nil, is closed (and cleared) when the holder's
	// open ends or the node starts dying: an opener waiting for a closing
	// holder makes it (Open), so a close allocates nothing while no
	// opener waits. Within one holder's open it is one channel, so a
	// waiter can tell whether the holder it waited for is still there.
	released chan struct{}
	// abandoned is closed and replaced when a destroy gives up (EINTR), so
	// a destroy waiting for that one can take over.
	abandoned chan struct{}
	// destroyed is closed when the destroy barrier has finished.
	destroyed chan struct{}
}

// Name is the node's name in the registry, e.g. "tun3".
func (n *Node) Name() string { return n.name }

// Ino is a number unique to this node for the registry's life: a node
// recreated under the same name gets a new one, so stale kernel inodes
// never alias a fresh device.
func (n *Node) Ino() uint64 { return n.ino }

// Attr is a node's owner, mode (permission bits), times and whether
// devfs rules hide it. cdevfs serves one mount per registry, so the
// attributes FreeBSD keeps per devfs entry (de_uid, de_mode, DE_WHITEOUT)
// live here with the node.
type Attr struct {
	Mode                uint32
	Uid, Gid            uint32
	Atime, Mtime, Ctime time.Time
	Hidden              bool
}

// Attr returns the node's attributes.
func (n *Node) Attr() Attr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.attr
}

// SetAttr replaces the node's attributes.
func (n *Node) SetAttr(a Attr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.attr = a
}

// UpdateAttr changes the node's attributes with f in one critical
// section, so that a chmod and a rules reload racing on the same node
// never lose one another's change. f runs under Node.mu: it must not
// block or call back into the node.
func (n *Node) UpdateAttr(f func(*Attr)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	f(&n.attr)
}

// Device returns the node's driver.
func (n *Node) Device() Device { return n.dev }

// Flags returns a snapshot of the node's state.
func (n *Node) Flags() Flags {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.flags
}

// Refs returns the current reference count (for tests and metrics).
func (n *Node) Refs() int64 { return n.refs.Load() }

// TryRef takes a reference unless the node has already been released.
// A CAS loop, never "check then increment" (gVisor's TryIncRef).
func (n *Node) TryRef() bool {
	for {
		r := n.refs.Load()
		if r <= 0 {
			return false
		}
		if n.refs.CompareAndSwap(r, r+1) {
			return true
		}
	}
}

// Rel drops a reference (dev_rel); the last one releases the device.
func (n *Node) Rel() {
	switch r := n.refs.Add(-1); {
	case r == 0:
		n.dev.Release()
		n.reg.live.Add(-1)
	case r < 0:
		panic(fmt.Sprintf("devnode: %s: reference count below zero", n.name))
	}
}

// Enter starts an in-flight operation; it fails with ErrDying once destroy
// has begun. Every Enter that succeeds must be paired with Exit.
func (n *Node) Enter() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.flags&(FlagDying|FlagGone) != 0 {
		return ErrDying
	}
	n.busy++
	return nil
}

// Exit ends an in-flight operation and wakes a destroy waiting to drain.
func (n *Node) Exit() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.busy--
	if n.busy < 0 {
		panic(fmt.Sprintf("devnode: %s: in-flight count below zero", n.name))
	}
	if n.busy == 0 && n.drained != nil {
		close(n.drained)
		n.drained = nil
	}
}

// Open marks the node open and attaches the caller to the device. The
// caller must hold a reference, which the open handle then owns until
// Close. An open of a node whose holder is closing (Closing) waits for
// that close, up to closeWait, and then takes the node or fails with
// ErrBusy; ctx ending ends the wait with EINTR. Any other second open is
// ErrBusy at once; an open of a dying node is ErrDying, never a
// half-dead handle.
func (n *Node) Open(ctx context.Context) error { return n.open(ctx, true) }

// TryOpen is Open for a caller that must not block: where Open would
// wait for a closing holder it fails with ErrClosing, and the caller
// may try Open where it can wait.
func (n *Node) TryOpen(ctx context.Context) error { return n.open(ctx, false) }

func (n *Node) open(ctx context.Context, wait bool) error {
	if err := n.claim(ctx, wait); err != nil {
		return err
	}
	defer n.Exit()
	if err := n.dev.Open(ctx); err != nil {
		n.mu.Lock()
		n.endOpenLocked()
		n.mu.Unlock()
		return err
	}
	return nil
}

// claim marks the node open and in flight for an opener, waiting for a
// closing holder's close if wait.
//
// The wait makes close(2) mean closed, as on BSD, where close is
// synchronous. A FUSE file's last close reaches the daemon after the
// closer's close(2), or its exit, has returned: fuse_release sends
// RELEASE in the background and returns, so a reopen's OPEN can come
// first. Every close of a descriptor is reported before it returns
// (fuse_flush sends FLUSH from filp_close and waits for the answer), and
// that is what Closing records. It cannot tell the last close from that
// of a copy (a dup, a forked child's): the wait is bounded, and a holder
// that outlives it still holds the file, so its Closing is cleared and
// openers after this one fail at once until the next.
func (n *Node) claim(ctx context.Context, wait bool) error {
	var bound *time.Timer // from the first wait on
	expired := false
	for {
		// One critical section for "not dying", "not open" and the
		// in-flight count: checked in two, a transient last close could
		// run between them (clearing FlagOpen and setting FlagDying) and
		// this opener would get the dying node (the race FreeBSD's deferred
		// transient destroy guards against; caught by
		// TestTransientCloseRacingOpen).
		n.mu.Lock()
		f := n.flags
		switch {
		case f&(FlagDying|FlagGone) != 0:
			n.mu.Unlock()
			return ErrDying
		case f&FlagOpen == 0:
			n.flags |= FlagOpen
			n.busy++
			n.mu.Unlock()
			return nil
		case f&FlagClosing == 0 || expired:
			n.mu.Unlock()
			return ErrBusy
		case !wait:
			n.mu.Unlock()
			return ErrClosing
		}
		if n.released == nil {
			n.released = make(chan struct{})
		}
		released := n.released
		n.mu.Unlock()
		if bound == nil {
			bound = time.NewTimer(closeWait)
			defer bound.Stop()
		}
		select {
		case <-released:
		case <-bound.C:
			n.outlived(released)
			expired = true
		case <-ctx.Done():
			return fmt.Errorf("devnode: waiting for the holder of %s to close: %w", n.name, syscall.EINTR)
		}
	}
}

// outlived clears FlagClosing of a holder that outlived an opener's
// wait, if it is still the holder the opener waited for (released is
// still its channel): it holds the file through another descriptor.
func (n *Node) outlived(released chan struct{}) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.released == released {
		n.flags &^= FlagClosing
	}
}

// Closing records that the holder's file has just been closed through
// one of its descriptors, so its last close may follow, reported after
// the closer has returned (see claim). A node that is not open, or is
// dying, ignores it.
func (n *Node) Closing() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.flags&(FlagOpen|FlagDying|FlagGone) == FlagOpen {
		n.flags |= FlagClosing
	}
}

// endOpenLocked ends the holder's open and wakes the openers waiting
// for it. Called with n.mu held.
func (n *Node) endOpenLocked() {
	n.flags &^= FlagOpen | FlagClosing
	n.wakeOpenersLocked()
}

// wakeOpenersLocked wakes the openers waiting for a closing holder: its
// open has ended, or the node is dying. Called with n.mu held.
func (n *Node) wakeOpenersLocked() {
	if n.released != nil {
		close(n.released)
		n.released = nil
	}
}

// Close is the last close of an open node: like tunclose() it detaches
// and keeps the device, unless the node is transient, in which case the
// node dies at once (new opens fail with ENXIO) and the destroy is queued
// to the registry's worker so that the closing thread never waits on it
// (FreeBSD defers it to a taskqueue). Close does not drop the handle's reference: the caller does.
// ctx carries the closer (WithActor), recorded as a transient destroy's
// cause.
func (n *Node) Close(ctx context.Context) error {
	n.mu.Lock()
	dying := n.flags&(FlagDying|FlagGone) != 0
	transient := n.flags&FlagTransient != 0
	if dying || transient {
		n.endOpenLocked()
	}
	if transient && !dying {
		// Dying in the same critical section that ends the open, so no
		// opener can slip in between and get a half-dead handle.
		n.flags |= FlagDying
		n.cause = causeFrom(ctx, ReasonTransientClose)
	}
	n.mu.Unlock()
	if dying {
		return nil // destroy owns the device now
	}
	if transient {
		n.reg.schedDying(n)
		return nil
	}
	if err := n.Enter(); err != nil {
		n.clearOpen()
		return nil // lost a race with destroy, which detaches for us
	}
	defer n.Exit()
	// FlagOpen stays set until the device is detached: a new opener must
	// not attach before this close detaches (it would detach the new one).
	defer n.clearOpen()
	return n.dev.Close()
}

func (n *Node) clearOpen() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.endOpenLocked()
}

// SetTransient sets or clears the transient flag (TUNSTRANSIENT).
func (n *Node) SetTransient(on bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if on {
		n.flags |= FlagTransient
	} else {
		n.flags &^= FlagTransient
	}
}

// Destroyed is closed once the node's destroy has finished.
func (n *Node) Destroyed() <-chan struct{} { return n.destroyed }

// markDying sets FlagDying and records why; it reports false if destroy
// already began.
func (n *Node) markDying(c Cause) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.flags&(FlagDying|FlagGone) != 0 {
		return false
	}
	n.flags |= FlagDying
	n.cause = c
	n.wakeOpenersLocked()
	return true
}

// Destroy is the destroy barrier (destroy_dev): mark dying, revoke, wait
// for in-flight operations to drain, unlink the name, destroy the backing
// object and drop the registry's reference. If another destroy is already
// under way it waits for that one. If ctx ends while operations are still
// in flight the destroy is abandoned with EINTR and the node lives on;
// but if they have drained by then it proceeds, so a signal to a closer
// whose destroy has drained does not abandon it (as FreeBSD's tun_destroy()).
func (n *Node) Destroy(ctx context.Context) error {
	for {
		n.mu.Lock()
		began := n.flags&(FlagDying|FlagGone) != 0
		if !began {
			n.flags |= FlagDying
			n.cause = causeFrom(ctx, ReasonDestroy)
			n.wakeOpenersLocked()
		}
		abandoned := n.abandoned
		n.mu.Unlock()
		if !began {
			break
		}
		select {
		case <-n.destroyed:
			return nil
		case <-abandoned:
			// The destroy under way gave up: take it over.
		case <-ctx.Done():
			return fmt.Errorf("devnode: waiting for destroy of %s: %w", n.name, syscall.EINTR)
		}
	}
	if err := n.revokeDrain(ctx); err != nil {
		return err
	}
	return n.finish()
}

// revokeDrain wakes blocked operations and waits for in-flight ones.
func (n *Node) revokeDrain(ctx context.Context) error {
	n.revoke()
	return n.drain(ctx)
}

// revoke wakes the operations blocked in the device, then tells the
// revoke hook, for the waits outside it (ReadWaiter).
func (n *Node) revoke() {
	n.dev.Revoke()
	n.reg.mu.Lock()
	f := n.reg.revokeHook
	n.reg.mu.Unlock()
	if f != nil {
		f(n)
	}
}

// finish ends a drained destroy: unlink, destroy the backing object, mark
// gone, drop the registry's reference.
func (n *Node) finish() error {
	n.reg.destroyHook(n)
	err := n.dev.Destroy(func() { n.reg.unlink(n) })
	n.mu.Lock()
	n.flags |= FlagGone
	n.flags &^= FlagDying | FlagOpen | FlagClosing
	n.wakeOpenersLocked()
	n.mu.Unlock()
	close(n.destroyed)
	n.Rel() // the registry's reference
	if err != nil {
		return fmt.Errorf("devnode: destroy %s: %w", n.name, err)
	}
	return nil
}

// drain waits for busy to reach zero (the node is dying, so it only falls).
func (n *Node) drain(ctx context.Context) error {
	for {
		n.mu.Lock()
		if n.busy == 0 {
			n.mu.Unlock()
			return nil
		}
		if n.drained == nil {
			n.drained = make(chan struct{})
		}
		ch := n.drained
		n.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			n.mu.Lock()
			if n.busy == 0 { // drained meanwhile: carry on
				n.mu.Unlock()
				return nil
			}
			n.flags &^= FlagDying
			close(n.abandoned)
			n.abandoned = make(chan struct{})
			busy := n.busy // read under n.mu
			n.mu.Unlock()
			return fmt.Errorf("devnode: destroy of %s abandoned with %d operations in flight: %w",
				n.name, busy, syscall.EINTR)
		}
	}
}

// CloneFunc creates the node for name on demand (dev_clone). It returns
// ErrNotFound when name is not its own, and otherwise a node made with
// Registry.Make, with one reference held for the caller (MAKEDEV_REF).
// open is true when the caller will open the node at once (the clone
// node): the node is then made already open, so no racing opener by name
// can take it first.
type CloneFunc func(ctx context.Context, name string, open bool) (*Node, error)

// Registry is the devfs name table.
type Registry struct {
	mu      sync.Mutex // guards nodes, cloners, closed
	nodes   map[string]*Node
	cloners []CloneFunc
	closed  bool

	nextIno atomic.Uint64
	live    atomic.Int64 // nodes not yet released (for leak checks)

	sched chan *Node // DestroySched queue
	// pending counts scheduled destroys not yet finished. Not a
	// WaitGroup: a destroy is scheduled (a netlink event, a transient
	// close) while DrainSched may be waiting, and a WaitGroup's Add from
	// zero must not race its Wait (the race detector caught it, in
	// TestStressWatcherRacesDevicePaths).
	pendingMu   sync.Mutex
	pendingZero *sync.Cond // broadcast when pending drops to 0; L is &pendingMu
	pending     int        // guarded by pendingMu
	workerDone  chan struct{}

	// destroyHook runs before a node's backing object is destroyed (tests
	// hold it to widen race windows).
	destroyHook func(*Node)
	// revokeHook is told each node right after its device is revoked,
	// before the drain waits (SetRevokeHook). Guarded by mu; called
	// without it.
	revokeHook func(*Node)

	// policy sets a new node's attributes before it is published (devfs
	// rules, devfs_rules_apply in FreeBSD's devfs_populate). Guarded by mu.
	policy func(name string, a *Attr)

	// unlinked is told each name whose node has just been unlinked, so
	// that the fs layer can drop the kernel's cached entry. Guarded by mu;
	// called without it.
	unlinked func(name string)
}

// NewRegistry returns an empty registry with its DestroySched worker
// running; Shutdown stops the worker.
func NewRegistry() *Registry {
	r := &Registry{
		nodes:       make(map[string]*Node),
		sched:       make(chan *Node, 256),
		workerDone:  make(chan struct{}),
		destroyHook: func(*Node) {},
	}
	r.pendingZero = sync.NewCond(&r.pendingMu)
	r.nextIno.Store(1 << 32) // far from the static nodes' numbers
	go r.worker()
	return r
}

// SetDestroyHook installs a function run in every destroy after the drain
// and before the backing object is destroyed. For tests.
func (r *Registry) SetDestroyHook(f func(*Node)) { r.destroyHook = f }

// SetRevokeHook installs f, called with every node right after its
// device is revoked (Device.Revoke) and before the destroy waits for its
// in-flight operations: whoever waits for a device on a node's behalf
// outside Device.Read (ReadWaiter) must end that wait when told, or the
// drain waits for ever. f must not block; it runs in the destroying
// goroutine.
func (r *Registry) SetRevokeHook(f func(*Node)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.revokeHook = f
}

// SetAttrPolicy installs f, which sets the attributes of every node
// made from now on before its name is published, so no caller ever sees
// a node without them (a hidden node is never visible, not even for a
// moment). f runs under the registry's lock: it must be quick and must
// not call the registry. Whoever changes what f decides must re-apply it
// to the nodes that exist: a Make that runs concurrently either sees the
// new decision or is in List by the time the caller lists.
func (r *Registry) SetAttrPolicy(f func(name string, a *Attr)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.policy = f
}

// SetUnlinkHook installs f, called with a node's name right after the
// name is unlinked (in a destroy, before the backing object goes). It
// runs inside Device.Destroy, under the cloner's lock: it must not block
// or call the registry (the fs layer queues a kernel invalidation).
func (r *Registry) SetUnlinkHook(f func(name string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unlinked = f
}

// AddCloner registers a clone handler (the dev_clone event handler).
func (r *Registry) AddCloner(f CloneFunc) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cloners = append(r.cloners, f)
}

// Make publishes a new node for dev under name. The node is returned with
// two references: the registry's, and one for the caller (MAKEDEV_REF).
// With open set the node starts open, owned by the caller's handle.
func (r *Registry) Make(name string, dev Device, open bool) (*Node, error) {
	n := &Node{
		name:      name,
		ino:       r.nextIno.Add(1),
		reg:       r,
		dev:       dev,
		abandoned: make(chan struct{}),
		destroyed: make(chan struct{}),
	}
	now := time.Now()
	n.attr = Attr{Mode: 0600, Atime: now, Mtime: now, Ctime: now} // docs/design.md: root:root 0600
	if open {
		n.flags |= FlagOpen
	}
	n.refs.Store(2)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	if _, ok := r.nodes[name]; ok {
		return nil, ErrExists
	}
	if r.policy != nil {
		r.policy(name, &n.attr)
	}
	r.nodes[name] = n
	r.live.Add(1)
	return n, nil
}

// unlink removes n's name, if it is still n's, and tells the unlink hook.
func (r *Registry) unlink(n *Node) {
	r.mu.Lock()
	mine := r.nodes[n.name] == n
	if mine {
		delete(r.nodes, n.name)
	}
	hook := r.unlinked
	r.mu.Unlock()
	if mine && hook != nil {
		hook(n.name)
	}
}

// Linked reports whether n is still the node its name resolves to. A
// node that is not has been unlinked by a destroy: a caller holding it
// through a stale path should walk the path again (the fs layer answers
// ESTALE, and the kernel retries the lookup).
func (n *Node) Linked() bool {
	n.reg.mu.Lock()
	defer n.reg.mu.Unlock()
	return n.reg.nodes[n.name] == n
}

// Get returns the node named name with a reference held for the caller,
// without cloning. A dying node is returned too: opening it fails with
// ENXIO, which is what a racing opener must see.
func (r *Registry) Get(name string) (*Node, error) {
	r.mu.Lock()
	n, ok := r.nodes[name]
	r.mu.Unlock()
	if !ok || !n.TryRef() {
		return nil, ErrNotFound
	}
	return n, nil
}

// Lookup is Get, and on a miss asks the clone handlers to create the name.
func (r *Registry) Lookup(ctx context.Context, name string) (*Node, error) {
	if n, err := r.Get(name); err == nil {
		return n, nil
	}
	return r.clone(ctx, name, false)
}

// Clone asks the clone handlers for a new node for name (a clone node's
// name such as "tun" means "the lowest free unit"), made already open for
// the caller.
func (r *Registry) Clone(ctx context.Context, name string) (*Node, error) {
	return r.clone(ctx, name, true)
}

func (r *Registry) clone(ctx context.Context, name string, open bool) (*Node, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	cloners := r.cloners
	r.mu.Unlock()
	for _, c := range cloners {
		n, err := c(ctx, name, open)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		return n, err
	}
	return nil, ErrNotFound
}

// List returns the names of the live nodes (not dying, not gone), sorted.
func (r *Registry) List() []*Node {
	r.mu.Lock()
	nodes := make([]*Node, 0, len(r.nodes))
	for _, n := range r.nodes {
		nodes = append(nodes, n)
	}
	r.mu.Unlock()
	out := nodes[:0]
	for _, n := range nodes {
		if n.Flags()&(FlagDying|FlagGone) == 0 {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// States counts the linked nodes by state: open, closed (neither open nor
// dying) and dying (destroy under way).
func (r *Registry) States() (open, closed, dying int) {
	r.mu.Lock()
	nodes := make([]*Node, 0, len(r.nodes))
	for _, n := range r.nodes {
		nodes = append(nodes, n)
	}
	r.mu.Unlock()
	for _, n := range nodes {
		switch f := n.Flags(); {
		case f&FlagDying != 0:
			dying++
		case f&FlagOpen != 0:
			open++
		case f&FlagGone == 0:
			closed++
		}
	}
	return open, closed, dying
}

// Live is the number of nodes made and not yet released.
func (r *Registry) Live() int64 { return r.live.Load() }

// DestroySched marks n dying at once, for reason, and queues its destroy
// to the worker (destroy_dev_sched). Safe to call from an in-flight
// operation of n. It reports whether it did: false if n was dying already.
func (r *Registry) DestroySched(n *Node, reason string) bool {
	if !n.markDying(Cause{Reason: reason}) {
		return false
	}
	r.schedDying(n)
	return true
}

// schedDying queues the destroy of n, which the caller has just marked
// dying itself.
func (r *Registry) schedDying(n *Node) {
	n.refs.Add(1) // the queue's reference (n is dying, not released: the registry still holds one); dropped by runSched
	r.pendingMu.Lock()
	r.pending++
	r.pendingMu.Unlock()
	select {
	case r.sched <- n:
	default:
		// Queue full: never block a closer; a goroutine does the same job.
		go r.runSched(n)
	}
}

func (r *Registry) worker() {
	defer close(r.workerDone)
	for n := range r.sched {
		r.runSched(n)
	}
}

func (r *Registry) runSched(n *Node) {
	defer r.schedFinished()
	defer n.Rel()
	if err := n.revokeDrain(context.Background()); err == nil {
		n.finish()
	}
}

func (r *Registry) schedFinished() {
	r.pendingMu.Lock()
	defer r.pendingMu.Unlock()
	if r.pending--; r.pending == 0 {
		r.pendingZero.Broadcast()
	}
}

// DrainSched waits until no scheduled destroy is left (destroy_dev_drain):
// every destroy scheduled before the call, and any scheduled meanwhile.
func (r *Registry) DrainSched() {
	r.pendingMu.Lock()
	defer r.pendingMu.Unlock()
	for r.pending > 0 {
		r.pendingZero.Wait()
	}
}

// Shutdown destroys every node in the fixed close order: stop accepting
// (no clone, no Make), revoke every node and drain its in-flight
// operations, run between (the caller unmounts there), then destroy the
// backing objects and stop the worker. A node whose destroy was already
// under way is waited for.
func (r *Registry) Shutdown(ctx context.Context, between func()) {
	r.mu.Lock()
	r.closed = true
	nodes := make([]*Node, 0, len(r.nodes))
	for _, n := range r.nodes {
		nodes = append(nodes, n)
	}
	r.mu.Unlock()

	var mine, others []*Node
	for _, n := range nodes {
		if n.markDying(Cause{Reason: ReasonShutdown}) {
			n.revoke()
			mine = append(mine, n)
		} else {
			others = append(others, n)
		}
	}
	for _, n := range mine {
		// Revoked operations return at once; wait without giving up.
		_ = n.drain(context.Background())
	}
	if between != nil {
		between()
	}
	for _, n := range mine {
		n.finish()
	}
	// Destroys already under way elsewhere: wait for them (or take one
	// over if it is abandoned), so nothing is left behind and no
	// DestroySched can still be queueing when the worker stops.
	for _, n := range others {
		_ = n.Destroy(context.Background())
	}
	r.DrainSched()
	close(r.sched)
	<-r.workerDone
}
