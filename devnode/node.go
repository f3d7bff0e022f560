package devnode

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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
	// devfs entry): set at Make (through the registry's observer), changed
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
// registry's observer, for the waits outside it (ReadWaiter).
func (n *Node) revoke() {
	n.dev.Revoke()
	n.reg.mu.Lock()
	o := n.reg.observer
	n.reg.mu.Unlock()
	if o != nil {
		o.Revoked(n)
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
