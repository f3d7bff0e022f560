package devnode

import (
	"context"
	"errors"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// CloneFunc creates the node for name on demand (dev_clone). It returns
// ErrNotFound when name is not its own, and otherwise a node made with
// Registry.Make, with one reference held for the caller (MAKEDEV_REF).
// open is true when the caller will open the node at once (the clone
// node): the node is then made already open, so no racing opener by name
// can take it first.
type CloneFunc func(ctx context.Context, name string, open bool) (*Node, error)

// Observer is told of the changes to a registry's names and nodes that
// the layer above must follow: the fs tree sets a node's attributes from
// its rules, drops the kernel's cached entry for a name that goes, and
// ends the waits it holds on a revoked device. A registry has at most one
// observer (Registry.Observe). Its methods must be quick and must not
// block.
type Observer interface {
	// Linking sets the attributes of the node being made for name, as the
	// name is linked and before it is published, so no caller ever sees a
	// node without them (a hidden node is never visible, not even for a
	// moment): FreeBSD runs devfs_rules_apply, in devfs_populate, before
	// a new entry is visible. a starts as root:root 0600 with all three
	// times set. Linking runs under the registry's lock: it must not call
	// the registry. Whoever changes what Linking decides must re-apply it
	// to the nodes that exist: a Make that runs concurrently either sees
	// the new decision or is in List by the time the caller lists.
	Linking(name string, a *Attr)

	// Unlinked is told a node's name right after the name is unlinked, in
	// a destroy, before the backing object goes; not a name that a newer
	// node has taken since. It runs without the registry's lock but
	// inside Device.Destroy, under the cloner's lock: it must not block or
	// call the registry (the fs layer queues a kernel invalidation).
	Unlinked(name string)

	// Revoked is told every node right after its device is revoked
	// (Device.Revoke), and before the destroy waits for its in-flight
	// operations: whoever waits for a device on a node's behalf outside
	// Device.Read (ReadWaiter) must end that wait when told, or the drain
	// waits for ever. The node is dying by then, so no new operation
	// starts. Revoked runs without the registry's lock, in the destroying
	// goroutine: it must not block.
	Revoked(n *Node)
}

// Registry is the devfs name table.
type Registry struct {
	mu      sync.Mutex // guards nodes, cloners, closed, observer
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
	// observer (nil: none) is told of each node linked, unlinked and
	// revoked (Observe). Guarded by mu; Linking is called under mu,
	// Unlinked and Revoked are read under mu and called without it.
	observer Observer
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

// Observe makes o the registry's observer, in place of any before it; a
// nil o means none. The layer above calls it once, before it serves
// (fs.NewRoot); the nodes made before are not shown to o.
func (r *Registry) Observe(o Observer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.observer = o
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
	if r.observer != nil {
		r.observer.Linking(name, &n.attr)
	}
	r.nodes[name] = n
	r.live.Add(1)
	return n, nil
}

// unlink removes n's name, if it is still n's, and tells the observer.
func (r *Registry) unlink(n *Node) {
	r.mu.Lock()
	mine := r.nodes[n.name] == n
	if mine {
		delete(r.nodes, n.name)
	}
	o := r.observer
	r.mu.Unlock()
	if mine && o != nil {
		o.Unlinked(n.name)
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

// List returns the live nodes (not dying, not gone), sorted by name.
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
