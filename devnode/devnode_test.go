package devnode_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
)

// How long a test waits for something that must happen; and how long it
// watches for something that must not happen (a blocked Destroy).
const (
	waitLong  = 5 * time.Second
	waitShort = 50 * time.Millisecond
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// countingBackend wraps the fake kernel to count each link's Close calls,
// i.e. when a node's device is released.
type countingBackend struct {
	*cloner.Fake
	mu    sync.Mutex
	links map[string][]*countingLink
}

type countingLink struct {
	cloner.Link
	closes atomic.Int32
}

func (l *countingLink) Close() error {
	l.closes.Add(1)
	return l.Link.Close()
}

func (b *countingBackend) Create(name string, kind cloner.Kind, attach bool) (cloner.Link, error) {
	l, err := b.Fake.Create(name, kind, attach)
	if err != nil {
		return nil, err
	}
	cl := &countingLink{Link: l}
	b.mu.Lock()
	b.links[name] = append(b.links[name], cl)
	b.mu.Unlock()
	return cl, nil
}

// link returns the latest link created for name.
func (b *countingBackend) link(t *testing.T, name string) *countingLink {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	ls := b.links[name]
	if len(ls) == 0 {
		t.Fatalf("no link was ever created for %s", name)
	}
	return ls[len(ls)-1]
}

type env struct {
	reg  *devnode.Registry
	be   *countingBackend
	fake *cloner.Fake
	c    *cloner.Cloner
	once sync.Once
}

// newEnv is a registry with a tun cloner on the fake kernel; the registry
// is shut down when the test ends, if the test did not do it.
func newEnv(t *testing.T) *env {
	t.Helper()
	reg := devnode.NewRegistry()
	fake := cloner.NewFake()
	be := &countingBackend{Fake: fake, links: map[string][]*countingLink{}}
	e := &env{reg: reg, be: be, fake: fake, c: cloner.New(cloner.Tun, be, reg, 0, quiet)}
	t.Cleanup(func() { e.shutdown(nil) })
	return e
}

// observer is a devnode.Observer for tests: each method calls its func,
// if it is set.
type observer struct {
	linking  func(name string, a *devnode.Attr)
	unlinked func(name string)
	revoked  func(n *devnode.Node)
}

var _ devnode.Observer = (*observer)(nil)

func (o *observer) Linking(name string, a *devnode.Attr) {
	if o.linking != nil {
		o.linking(name, a)
	}
}

func (o *observer) Unlinked(name string) {
	if o.unlinked != nil {
		o.unlinked(name)
	}
}

func (o *observer) Revoked(n *devnode.Node) {
	if o.revoked != nil {
		o.revoked(n)
	}
}

func (e *env) shutdown(between func()) {
	e.once.Do(func() { e.reg.Shutdown(context.Background(), between) })
}

// finish shuts down and checks that nothing is left.
func (e *env) finish(t *testing.T) {
	t.Helper()
	e.shutdown(nil)
	if v := e.fake.Violations(); len(v) != 0 {
		t.Errorf("fake kernel saw fd-discipline violations: %q", v)
	}
	if l := e.fake.Len(); l != 0 {
		t.Errorf("fake kernel has %d interfaces after Shutdown, want 0", l)
	}
	if l := e.reg.Live(); l != 0 {
		t.Errorf("Live() = %d after Shutdown, want 0 (a reference leaked)", l)
	}
}

func (e *env) lookup(t *testing.T, name string) *devnode.Node {
	t.Helper()
	n, err := e.reg.Lookup(context.Background(), name)
	if err != nil {
		t.Fatalf("Lookup(%s): %v", name, err)
	}
	return n
}

// enter starts an in-flight operation on n and returns its Exit, which
// may be called more than once: tests defer it, so that a failing test
// never leaves an operation in flight for the cleanup's Shutdown to hang on.
func enter(t *testing.T, n *devnode.Node) (exit func()) {
	t.Helper()
	if err := n.Enter(); err != nil {
		t.Fatalf("Enter(%s): %v", n.Name(), err)
	}
	return sync.OnceFunc(n.Exit)
}

func listed(reg *devnode.Registry, n *devnode.Node) bool {
	return slices.Contains(reg.List(), n)
}

// waitFlag polls until n has flag f set.
func waitFlag(t *testing.T, n *devnode.Node, f devnode.Flags) {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for n.Flags()&f == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s never got flag %b (flags %b)", n.Name(), f, n.Flags())
		}
		time.Sleep(time.Millisecond)
	}
}

// async runs f in a goroutine and returns a channel with its result.
func async(f func() error) <-chan error {
	c := make(chan error, 1)
	go func() { c <- f() }()
	return c
}

func recv(t *testing.T, c <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-c:
		return err
	case <-time.After(waitLong):
		t.Fatalf("%s did not return within %v", what, waitLong)
		return nil
	}
}

func notYet(t *testing.T, c <-chan error, what string) {
	t.Helper()
	select {
	case err := <-c:
		t.Fatalf("%s returned (%v) while it must still wait", what, err)
	case <-time.After(waitShort):
	}
}

// Seed 002: a clone handler returns the node with a reference for the
// caller besides the registry's (MAKEDEV_REF); the device is released
// exactly once, after the last reference is dropped.
func TestReferenceContract(t *testing.T) {
	for _, tc := range []struct {
		name string
		get  func(*env) (*devnode.Node, error)
	}{
		{"Clone", func(e *env) (*devnode.Node, error) { return e.reg.Clone(context.Background(), "tun") }},
		{"Lookup", func(e *env) (*devnode.Node, error) { return e.reg.Lookup(context.Background(), "tun0") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			n, err := tc.get(e)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if r := n.Refs(); r != 2 {
				t.Fatalf("Refs() = %d right after %s, want 2 (registry + caller)", r, tc.name)
			}
			if l := e.reg.Live(); l != 1 {
				t.Fatalf("Live() = %d, want 1", l)
			}
			link := e.be.link(t, n.Name())
			if tc.name == "Clone" {
				if err := n.Close(context.Background()); err != nil {
					t.Fatalf("Close: %v", err)
				}
			}
			n.Rel()
			if r := n.Refs(); r != 1 {
				t.Fatalf("Refs() = %d after the caller's Rel, want 1 (the registry's)", r)
			}
			if c := link.closes.Load(); c != 0 {
				t.Fatalf("link closed %d times while the registry still holds the node, want 0", c)
			}
			if err := n.Destroy(context.Background()); err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			if r := n.Refs(); r != 0 {
				t.Fatalf("Refs() = %d after Destroy, want 0", r)
			}
			if c := link.closes.Load(); c != 1 {
				t.Fatalf("link closed %d times after the last reference, want exactly 1", c)
			}
			if n.TryRef() {
				t.Fatalf("TryRef on a released node succeeded, want false (no resurrection)")
			}
			if r := n.Refs(); r != 0 {
				t.Fatalf("Refs() = %d after a failed TryRef, want 0", r)
			}
			if _, err := e.reg.Get(n.Name()); !errors.Is(err, devnode.ErrNotFound) {
				t.Fatalf("Get of a destroyed name = %v, want ErrNotFound", err)
			}
			if e.fake.Exists(n.Name()) {
				t.Fatalf("interface %s still exists after Destroy", n.Name())
			}
			select {
			case <-n.Destroyed():
			default:
				t.Fatalf("Destroyed() not closed after Destroy returned")
			}
			e.finish(t)
			if c := link.closes.Load(); c != 1 {
				t.Fatalf("link closed %d times in all, want exactly 1", c)
			}
		})
	}
}

// The device is released only when the last reference goes, even if that
// is long after the destroy.
func TestReleaseAfterLastReference(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun1")
	link := e.be.link(t, "tun1")
	if !n.TryRef() { // an extra holder, e.g. an inode
		t.Fatalf("TryRef on a live node failed")
	}
	if r := n.Refs(); r != 3 {
		t.Fatalf("Refs() = %d, want 3", r)
	}
	n.Rel() // the lookup's reference
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if r := n.Refs(); r != 1 {
		t.Fatalf("Refs() = %d after Destroy with an extra holder, want 1", r)
	}
	if c := link.closes.Load(); c != 0 {
		t.Fatalf("link closed %d times while a reference is held, want 0", c)
	}
	if e.fake.Exists("tun1") {
		t.Fatalf("interface still exists after Destroy; only the fd may outlive it")
	}
	if e.reg.Live() != 1 {
		t.Fatalf("Live() = %d, want 1 until the last Rel", e.reg.Live())
	}
	if !n.TryRef() {
		t.Fatalf("TryRef on a destroyed but referenced node failed, want it to succeed")
	}
	n.Rel()
	n.Rel() // the last reference
	if c := link.closes.Load(); c != 1 {
		t.Fatalf("link closed %d times after the last Rel, want exactly 1", c)
	}
	if e.reg.Live() != 0 {
		t.Fatalf("Live() = %d after the last Rel, want 0", e.reg.Live())
	}
	e.finish(t)
}

func TestRelBelowZeroPanics(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	n.Rel()
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Errorf("Rel of a released node did not panic")
		}
		e.finish(t)
	}()
	n.Rel()
}

// The destroy barrier waits for in-flight operations; meanwhile the node
// is dying: opens are ENXIO, Enter fails.
func TestDestroyWaitsForInFlight(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	done := async(func() error { return n.Destroy(context.Background()) })
	waitFlag(t, n, devnode.FlagDying)
	notYet(t, done, "Destroy with an operation in flight")

	if err := n.Open(context.Background()); !errors.Is(err, devnode.ErrDying) || !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("Open of a dying node = %v, want ErrDying (ENXIO)", err)
	}
	if err := n.Enter(); !errors.Is(err, devnode.ErrDying) {
		t.Fatalf("Enter on a dying node = %v, want ErrDying", err)
	}
	if listed(e.reg, n) {
		t.Fatalf("a dying node is listed, want it hidden")
	}
	if !e.fake.Exists("tun0") {
		t.Fatalf("interface deleted before the in-flight operation ended")
	}
	exit()
	if err := recv(t, done, "Destroy after Exit"); err != nil {
		t.Fatalf("Destroy = %v, want nil", err)
	}
	if f := n.Flags(); f&devnode.FlagGone == 0 || f&devnode.FlagDying != 0 {
		t.Fatalf("flags after Destroy = %b, want FlagGone only", f)
	}
	if e.fake.Exists("tun0") {
		t.Fatalf("interface still exists after Destroy")
	}
	if err := n.Enter(); !errors.Is(err, devnode.ErrDying) {
		t.Fatalf("Enter on a destroyed node = %v, want ErrDying", err)
	}
	if err := n.Open(context.Background()); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("Open of a destroyed node = %v, want ENXIO", err)
	}
	// A second destroy of a finished node returns at once.
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("second Destroy = %v, want nil", err)
	}
	n.Rel()
	e.finish(t)
}

// Destroy interrupted while an operation is still in flight is abandoned
// with EINTR and the node lives on.
func TestDestroyInterruptedWhileBusyLivesOn(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	ctx, cancel := context.WithCancel(context.Background())
	done := async(func() error { return n.Destroy(ctx) })
	waitFlag(t, n, devnode.FlagDying)
	notYet(t, done, "Destroy with an operation in flight")
	cancel()
	err := recv(t, done, "interrupted Destroy")
	if !errors.Is(err, syscall.EINTR) {
		t.Fatalf("interrupted Destroy = %v, want an error wrapping EINTR", err)
	}
	if f := n.Flags(); f&(devnode.FlagDying|devnode.FlagGone) != 0 {
		t.Fatalf("flags after an abandoned destroy = %b, want neither dying nor gone", f)
	}
	if !listed(e.reg, n) {
		t.Fatalf("node not listed after an abandoned destroy")
	}
	if !e.fake.Exists("tun0") {
		t.Fatalf("interface deleted by an abandoned destroy")
	}
	if r := n.Refs(); r != 2 {
		t.Fatalf("Refs() = %d after an abandoned destroy, want 2", r)
	}
	exit()
	if err := n.Open(context.Background()); err != nil {
		t.Fatalf("Open after an abandoned destroy = %v, want nil", err)
	}
	if m := e.lookup(t, "tun0"); m != n {
		t.Fatalf("Lookup after an abandoned destroy gave another node")
	} else {
		m.Rel()
	}
	if err := n.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// The node can still be destroyed for real.
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy after the abandoned one = %v, want nil", err)
	}
	n.Rel()
	e.finish(t)
}

// Seed 001: a destroy whose ctx ends after the operations drained goes on.
func TestDestroyInterruptedAfterDrainProceeds(t *testing.T) {
	e := newEnv(t)
	// Cancelled before the call, nothing in flight: proceeds.
	n := e.lookup(t, "tun0")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := n.Destroy(ctx); err != nil {
		t.Fatalf("Destroy with a cancelled ctx and nothing in flight = %v, want nil", err)
	}
	if n.Flags()&devnode.FlagGone == 0 || e.fake.Exists("tun0") {
		t.Fatalf("Destroy with a cancelled ctx did not finish")
	}
	n.Rel()

	// Cancelled while waiting, right after the last Exit: both the drain
	// and the signal are pending; the destroy must go on either way.
	for i := 0; i < 100; i++ {
		n := e.lookup(t, "tun0")
		exit := enter(t, n)
		defer exit()
		ctx, cancel := context.WithCancel(context.Background())
		done := async(func() error { return n.Destroy(ctx) })
		waitFlag(t, n, devnode.FlagDying)
		exit()
		cancel()
		if err := recv(t, done, "Destroy"); err != nil {
			t.Fatalf("iteration %d: Destroy interrupted after the operations drained = %v, want nil", i, err)
		}
		if n.Flags()&devnode.FlagGone == 0 || e.fake.Exists("tun0") {
			t.Fatalf("iteration %d: destroy did not finish", i)
		}
		n.Rel()
	}
	e.finish(t)
}

// A destroy waiting for another one that is then abandoned takes over
// instead of waiting forever.
func TestDestroyWaiterTakesOverAbandonedDestroy(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	ctx, cancel := context.WithCancel(context.Background())
	first := async(func() error { return n.Destroy(ctx) })
	waitFlag(t, n, devnode.FlagDying)
	second := async(func() error { return n.Destroy(context.Background()) })
	notYet(t, second, "second Destroy")
	cancel()
	if err := recv(t, first, "interrupted Destroy"); !errors.Is(err, syscall.EINTR) {
		t.Fatalf("interrupted Destroy = %v, want EINTR", err)
	}
	// The second destroy now owns the barrier: the node stays dying.
	waitFlag(t, n, devnode.FlagDying)
	notYet(t, second, "second Destroy with the operation still in flight")
	exit()
	if err := recv(t, second, "second Destroy"); err != nil {
		t.Fatalf("second Destroy = %v, want nil", err)
	}
	if n.Flags()&devnode.FlagGone == 0 || e.fake.Exists("tun0") {
		t.Fatalf("the taken-over destroy did not finish")
	}
	n.Rel()
	e.finish(t)
}

// A destroy waiting for another one gives up with EINTR when its own ctx
// ends; the first one is unaffected.
func TestDestroyWaiterInterrupted(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	first := async(func() error { return n.Destroy(context.Background()) })
	waitFlag(t, n, devnode.FlagDying)
	ctx, cancel := context.WithCancel(context.Background())
	second := async(func() error { return n.Destroy(ctx) })
	notYet(t, second, "second Destroy")
	cancel()
	if err := recv(t, second, "second Destroy"); !errors.Is(err, syscall.EINTR) {
		t.Fatalf("interrupted waiting Destroy = %v, want EINTR", err)
	}
	if n.Flags()&devnode.FlagDying == 0 {
		t.Fatalf("the first destroy was abandoned by the waiter's signal")
	}
	exit()
	if err := recv(t, first, "first Destroy"); err != nil {
		t.Fatalf("first Destroy = %v, want nil", err)
	}
	n.Rel()
	e.finish(t)
}

func TestExclusiveOpen(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	n := e.lookup(t, "tun0")
	if err := n.Open(ctx); err != nil {
		t.Fatalf("first Open: %v", err)
	}
	if n.Flags()&devnode.FlagOpen == 0 {
		t.Fatalf("FlagOpen not set after Open")
	}
	if err := n.Open(ctx); !errors.Is(err, devnode.ErrBusy) || !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("second Open = %v, want ErrBusy (EBUSY)", err)
	}
	if err := n.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n.Flags()&devnode.FlagOpen != 0 {
		t.Fatalf("FlagOpen still set after Close")
	}
	if !e.fake.Exists("tun0") || !listed(e.reg, n) {
		t.Fatalf("last close of a non-transient node destroyed it; want it kept")
	}
	if err := n.Open(ctx); err != nil {
		t.Fatalf("Open after Close = %v, want nil", err)
	}
	if err := n.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// The clone node's node is made already open.
	c, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("Clone: %v", err)
	}
	if err := c.Open(ctx); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("Open of a node made open by the clone node = %v, want EBUSY", err)
	}
	if err := c.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c.Rel()
	n.Rel()
	e.finish(t)
}

// blockingDevice is a Device whose Close blocks until released, to catch
// an Open that attaches while the previous opener is still detaching.
type blockingDevice struct {
	closing    chan struct{} // closed when Close starts
	release    chan struct{} // Close returns once this is closed
	opens      atomic.Int32
	closes     atomic.Int32
	overlap    atomic.Bool // Open called while a Close was running
	inClose    atomic.Bool
	releases   atomic.Int32
	closeOnce  sync.Once
	destroyErr error
}

func (d *blockingDevice) Open(ctx context.Context) error {
	if d.inClose.Load() {
		d.overlap.Store(true)
	}
	d.opens.Add(1)
	return nil
}

func (d *blockingDevice) Close() error {
	d.inClose.Store(true)
	defer d.inClose.Store(false)
	d.closes.Add(1)
	d.closeOnce.Do(func() { close(d.closing) })
	<-d.release
	return nil
}

func (d *blockingDevice) Revoke()                     {}
func (d *blockingDevice) Destroy(unlink func()) error { unlink(); return d.destroyErr }
func (d *blockingDevice) Release()                    { d.releases.Add(1) }

// A new opener must not attach while the last opener's Close is still
// detaching the device (the detach would then cut the new opener off).
func TestOpenDuringCloseIsBusy(t *testing.T) {
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil)
	d := &blockingDevice{closing: make(chan struct{}), release: make(chan struct{})}
	n, err := reg.Make("x0", d, true)
	if err != nil {
		t.Fatalf("Make: %v", err)
	}
	releaseClose := sync.OnceFunc(func() { close(d.release) })
	defer releaseClose()
	closed := async(func() error { return n.Close(context.Background()) })
	select {
	case <-d.closing:
	case <-time.After(waitLong):
		t.Fatalf("device Close never called")
	}
	if err := n.Open(context.Background()); !errors.Is(err, devnode.ErrBusy) {
		t.Fatalf("Open while the previous Close is detaching = %v, want ErrBusy", err)
	}
	releaseClose()
	if err := recv(t, closed, "Close"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if d.overlap.Load() {
		t.Fatalf("device Open was called while its Close was running")
	}
	if err := n.Open(context.Background()); err != nil {
		t.Fatalf("Open after Close finished = %v, want nil", err)
	}
	if d.opens.Load() != 1 || d.closes.Load() != 1 {
		t.Fatalf("device opens %d closes %d, want 1 and 1", d.opens.Load(), d.closes.Load())
	}
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if d.closes.Load() != 1 {
		t.Fatalf("Destroy called the device's Close; destroy owns the device")
	}
	if err := n.Close(context.Background()); err != nil {
		t.Fatalf("Close of a destroyed node = %v, want nil", err)
	}
	n.Rel()
	if d.releases.Load() != 1 {
		t.Fatalf("device released %d times, want 1", d.releases.Load())
	}
}

// Last close of a transient node: Close returns at once, the node dies at
// once, the destroy runs on the worker; then the name is gone and a new
// lookup makes a fresh node.
func TestTransientLastClose(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	entered := make(chan *devnode.Node, 1)
	release := make(chan struct{})
	releaseHook := sync.OnceFunc(func() { close(release) })
	defer releaseHook()
	e.reg.SetDestroyHook(func(n *devnode.Node) {
		entered <- n
		<-release
	})
	n := e.lookup(t, "tun4")
	if err := n.Open(ctx); err != nil {
		t.Fatalf("Open: %v", err)
	}
	n.SetTransient(true)
	if n.Flags()&devnode.FlagTransient == 0 {
		t.Fatalf("SetTransient(true) did not set FlagTransient")
	}
	closed := async(func() error { return n.Close(context.Background()) })
	if err := recv(t, closed, "Close of a transient node (must not wait for its destroy)"); err != nil {
		t.Fatalf("Close = %v, want nil", err)
	}
	// Close has returned; the destroy is still held in the hook.
	if err := n.Open(ctx); !errors.Is(err, devnode.ErrDying) {
		t.Fatalf("Open right after the transient last close = %v, want ErrDying (ENXIO)", err)
	}
	var hooked *devnode.Node
	select {
	case hooked = <-entered:
	case <-time.After(waitLong):
		t.Fatalf("the scheduled destroy never ran")
	}
	if hooked != n {
		t.Fatalf("destroy hook ran for %s, want %s", hooked.Name(), n.Name())
	}
	select {
	case <-n.Destroyed():
		t.Fatalf("destroy finished while its hook is blocked")
	default:
	}
	if !e.fake.Exists("tun4") {
		t.Fatalf("interface deleted before the hook was released")
	}
	if listed(e.reg, n) {
		t.Fatalf("dying transient node is listed")
	}
	// A lookup of the dying name returns the dying node, not a new one.
	if m := e.lookup(t, "tun4"); m != n {
		t.Fatalf("Lookup of a dying name made a new node before the old one was unlinked")
	} else {
		if err := m.Open(ctx); !errors.Is(err, syscall.ENXIO) {
			t.Fatalf("Open of the dying node = %v, want ENXIO", err)
		}
		m.Rel()
	}
	releaseHook()
	e.reg.DrainSched()
	if n.Flags()&devnode.FlagGone == 0 {
		t.Fatalf("node not gone after DrainSched")
	}
	if e.fake.Exists("tun4") {
		t.Fatalf("interface tun4 still exists after the transient destroy")
	}
	if _, err := e.reg.Get("tun4"); !errors.Is(err, devnode.ErrNotFound) {
		t.Fatalf("Get(tun4) after the transient destroy = %v, want ErrNotFound", err)
	}
	if r := n.Refs(); r != 1 {
		t.Fatalf("Refs() = %d after the scheduled destroy, want 1 (the caller's)", r)
	}
	m := e.lookup(t, "tun4")
	if m == n || m.Ino() == n.Ino() {
		t.Fatalf("Lookup(tun4) after the transient destroy gave the old node (ino %d), want a fresh one", n.Ino())
	}
	if m.Flags()&(devnode.FlagTransient|devnode.FlagDying|devnode.FlagOpen) != 0 {
		t.Fatalf("fresh node has flags %b, want none", m.Flags())
	}
	if err := m.Open(ctx); err != nil {
		t.Fatalf("Open of the fresh node = %v, want nil", err)
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	n.Rel()
	m.Rel()
	e.finish(t)
}

// DestroySched from inside an in-flight operation does not deadlock: the
// node dies at once and is destroyed once the operation exits.
func TestDestroySchedFromInFlight(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	e.reg.DestroySched(n, devnode.ReasonDeleted)
	e.reg.DestroySched(n, devnode.ReasonDeleted) // a second request is a no-op
	if err := n.Open(context.Background()); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("Open after DestroySched = %v, want ENXIO", err)
	}
	time.Sleep(waitShort)
	if !e.fake.Exists("tun0") {
		t.Fatalf("scheduled destroy did not wait for the in-flight operation")
	}
	exit()
	e.reg.DrainSched()
	if n.Flags()&devnode.FlagGone == 0 || e.fake.Exists("tun0") {
		t.Fatalf("scheduled destroy did not finish after Exit")
	}
	if r := n.Refs(); r != 1 {
		t.Fatalf("Refs() = %d, want 1 (the caller's)", r)
	}
	n.Rel()
	e.finish(t)
}

func TestMakeDuplicateAndAfterShutdown(t *testing.T) {
	reg := devnode.NewRegistry()
	d1 := &blockingDevice{closing: make(chan struct{}), release: make(chan struct{})}
	n, err := reg.Make("x0", d1, false)
	if err != nil {
		t.Fatalf("Make: %v", err)
	}
	if _, err := reg.Make("x0", &blockingDevice{}, false); !errors.Is(err, devnode.ErrExists) {
		t.Fatalf("Make of an existing name = %v, want ErrExists", err)
	}
	if got := reg.List(); len(got) != 1 || got[0] != n {
		t.Fatalf("List() = %v, want [x0]", got)
	}
	reg.Shutdown(context.Background(), nil)
	if _, err := reg.Make("x1", &blockingDevice{}, false); !errors.Is(err, devnode.ErrClosed) {
		t.Fatalf("Make after Shutdown = %v, want ErrClosed", err)
	}
	if _, err := reg.Lookup(context.Background(), "x1"); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("Lookup after Shutdown = %v, want ErrClosed (ENXIO)", err)
	}
	if _, err := reg.Clone(context.Background(), "x"); !errors.Is(err, devnode.ErrClosed) {
		t.Fatalf("Clone after Shutdown = %v, want ErrClosed", err)
	}
	n.Rel()
	if d1.releases.Load() != 1 || reg.Live() != 0 {
		t.Fatalf("releases %d, live %d, want 1 and 0", d1.releases.Load(), reg.Live())
	}
}

// Shutdown revokes (a blocked reader gets ENXIO at once), drains, runs
// between while the interfaces still exist, then destroys everything.
func TestShutdownRevokesDrainsAndDestroys(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	n0, err := e.reg.Clone(ctx, "tun") // open via the clone node
	if err != nil {
		t.Fatalf("Clone: %v", err)
	}
	n1 := e.lookup(t, "tun1")
	if err := n1.Open(ctx); err != nil {
		t.Fatalf("Open(tun1): %v", err)
	}
	e.lookup(t, "tun2").Rel() // exists, not open, no caller reference
	names := []string{"tun0", "tun1", "tun2"}
	links := map[string]*countingLink{}
	for _, name := range names {
		links[name] = e.be.link(t, name)
	}

	var readerDone atomic.Bool
	entered := make(chan struct{})
	readErr := make(chan error, 1)
	go func() {
		if err := n0.Enter(); err != nil {
			readErr <- err
			return
		}
		close(entered)
		_, err := n0.Device().(devnode.IO).Read(ctx, make([]byte, 64), false)
		readerDone.Store(true)
		n0.Exit()
		readErr <- err
	}()
	<-entered
	time.Sleep(10 * time.Millisecond) // let it block in Read

	var betweenCalls atomic.Int32
	between := func() {
		betweenCalls.Add(1)
		if !readerDone.Load() {
			t.Errorf("between ran while a read was still in flight")
		}
		for _, name := range names {
			if !e.fake.Exists(name) {
				t.Errorf("interface %s deleted before between ran", name)
			}
		}
		for _, n := range []*devnode.Node{n0, n1} {
			if n.Flags()&devnode.FlagDying == 0 {
				t.Errorf("%s not dying during between", n.Name())
			}
			if err := n.Open(ctx); !errors.Is(err, syscall.ENXIO) {
				t.Errorf("Open(%s) during shutdown = %v, want ENXIO", n.Name(), err)
			}
		}
	}
	start := time.Now()
	shut := async(func() error { e.shutdown(between); return nil })
	select {
	case err := <-readErr:
		if !errors.Is(err, syscall.ENXIO) {
			t.Fatalf("blocked Read during Shutdown = %v, want an error wrapping ENXIO", err)
		}
	case <-time.After(waitLong):
		t.Fatalf("blocked Read not revoked by Shutdown")
	}
	recv(t, shut, "Shutdown")
	t.Logf("Shutdown took %v", time.Since(start))
	if betweenCalls.Load() != 1 {
		t.Fatalf("between called %d times, want 1", betweenCalls.Load())
	}
	if l := e.fake.Len(); l != 0 {
		t.Fatalf("fake kernel has %d interfaces after Shutdown, want 0", l)
	}
	if u := e.c.UnitsInUse(); u != 0 {
		t.Fatalf("UnitsInUse() = %d after Shutdown, want 0", u)
	}
	if len(e.reg.List()) != 0 {
		t.Fatalf("List() after Shutdown = %v, want empty", e.reg.List())
	}
	if links["tun2"].closes.Load() != 1 {
		t.Fatalf("tun2 (no holder) not released by Shutdown")
	}
	for _, n := range []*devnode.Node{n0, n1} {
		if links[n.Name()].closes.Load() != 0 {
			t.Fatalf("%s released while its handle still holds a reference", n.Name())
		}
		if err := n.Close(context.Background()); err != nil {
			t.Fatalf("Close(%s) after Shutdown = %v, want nil", n.Name(), err)
		}
		n.Rel()
		if r := n.Refs(); r != 0 {
			t.Fatalf("%s Refs() = %d, want 0", n.Name(), r)
		}
		if links[n.Name()].closes.Load() != 1 {
			t.Fatalf("%s released %d times, want 1", n.Name(), links[n.Name()].closes.Load())
		}
	}
	if _, err := e.reg.Lookup(ctx, "tun5"); !errors.Is(err, devnode.ErrClosed) {
		t.Fatalf("Lookup after Shutdown = %v, want ErrClosed", err)
	}
	e.finish(t)
}

// Shutdown waits for a destroy already under way elsewhere (a synchronous
// Destroy, a transient close's scheduled destroy) instead of returning
// with it unfinished.
func TestShutdownWaitsForDestroyUnderWay(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start func(t *testing.T, n *devnode.Node) <-chan error
	}{
		{"Destroy", func(t *testing.T, n *devnode.Node) <-chan error {
			return async(func() error { return n.Destroy(context.Background()) })
		}},
		{"TransientClose", func(t *testing.T, n *devnode.Node) <-chan error {
			if err := n.Open(context.Background()); err != nil {
				t.Fatalf("Open: %v", err)
			}
			n.SetTransient(true)
			return async(func() error { return n.Close(context.Background()) })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			hooked := make(chan *devnode.Node, 4)
			release := make(chan struct{})
			releaseHook := sync.OnceFunc(func() { close(release) })
			defer releaseHook()
			e.reg.SetDestroyHook(func(n *devnode.Node) {
				if n.Name() == "tun0" { // Shutdown's own destroy of tun9 passes
					hooked <- n
					<-release
				}
			})
			n := e.lookup(t, "tun0")
			e.lookup(t, "tun9").Rel()
			done := tc.start(t, n)
			select {
			case <-hooked:
			case <-time.After(waitLong):
				t.Fatalf("the destroy did not reach the hook")
			}
			shut := async(func() error { e.shutdown(nil); return nil })
			notYet(t, shut, "Shutdown with a destroy under way")
			releaseHook()
			recv(t, shut, "Shutdown")
			if err := recv(t, done, tc.name); err != nil {
				t.Fatalf("%s = %v, want nil", tc.name, err)
			}
			if n.Flags()&devnode.FlagGone == 0 {
				t.Fatalf("node not gone after Shutdown")
			}
			if l := e.fake.Len(); l != 0 {
				t.Fatalf("fake kernel has %d interfaces after Shutdown, want 0", l)
			}
			n.Rel()
			e.finish(t)
		})
	}
}

// Shutdown takes over a destroy under way that is then abandoned.
func TestShutdownTakesOverAbandonedDestroy(t *testing.T) {
	e := newEnv(t)
	n := e.lookup(t, "tun0")
	exit := enter(t, n)
	defer exit()
	ctx, cancel := context.WithCancel(context.Background())
	first := async(func() error { return n.Destroy(ctx) })
	waitFlag(t, n, devnode.FlagDying)
	shut := async(func() error { e.shutdown(nil); return nil })
	notYet(t, shut, "Shutdown with an operation in flight")
	cancel()
	if err := recv(t, first, "interrupted Destroy"); !errors.Is(err, syscall.EINTR) {
		t.Fatalf("interrupted Destroy = %v, want EINTR", err)
	}
	notYet(t, shut, "Shutdown with an operation still in flight")
	exit()
	recv(t, shut, "Shutdown")
	if n.Flags()&devnode.FlagGone == 0 || e.fake.Exists("tun0") {
		t.Fatalf("Shutdown left the node whose destroy was abandoned")
	}
	n.Rel()
	e.finish(t)
}

// TestObserverUnlinkedAndLinked: the observer hears each destroyed name
// once, when the name goes (before the destroy returns), and not a name
// reused by a newer node; Linked turns false at the same moment.
func TestObserverUnlinkedAndLinked(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	var heard []string
	e.reg.Observe(&observer{unlinked: func(name string) {
		mu.Lock()
		defer mu.Unlock()
		heard = append(heard, name)
	}})
	n := e.lookup(t, "tun2")
	if !n.Linked() {
		t.Fatalf("Linked() = false for a live node, want true")
	}
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if n.Linked() {
		t.Fatalf("Linked() = true after Destroy, want false")
	}
	again := e.lookup(t, "tun2") // a new node under the same name
	if n.Linked() || !again.Linked() {
		t.Fatalf("after re-creating tun2: old Linked() = %v, new Linked() = %v, want false, true", n.Linked(), again.Linked())
	}
	n.Rel()
	again.Rel()
	mu.Lock()
	got := append([]string(nil), heard...)
	mu.Unlock()
	if len(got) != 1 || got[0] != "tun2" {
		t.Fatalf("Unlinked heard %q, want [tun2] exactly once", got)
	}
	e.finish(t)
	mu.Lock()
	defer mu.Unlock()
	if len(heard) != 2 {
		t.Fatalf("Unlinked heard %q after Shutdown, want the second tun2 too", heard)
	}
}

// Observer.Revoked is how a wait held outside Device.Read (ReadWaiter:
// the io_uring transport parks a READ on the device's fd) learns of a
// revoke: it must run after the node is dying and before the drain waits,
// in Destroy and in Shutdown alike, so that an operation it ends lets the
// drain finish. Here the in-flight operation's only way out is Revoked.
func TestObserverRevokedEndsWaitBeforeDrain(t *testing.T) {
	for _, tc := range []struct {
		how     string
		destroy func(e *env, n *devnode.Node) error
	}{
		{"Destroy", func(e *env, n *devnode.Node) error { return n.Destroy(context.Background()) }},
		{"Shutdown", func(e *env, n *devnode.Node) error { e.shutdown(nil); return nil }},
	} {
		how := tc.how
		t.Run(how, func(t *testing.T) {
			e := newEnv(t)
			n := e.lookup(t, "tun0")
			exit := enter(t, n)
			defer exit()
			heard := make(chan devnode.Flags, 4)
			e.reg.Observe(&observer{revoked: func(r *devnode.Node) {
				if r == n {
					heard <- r.Flags()
					exit() // what a parked wait does once told
				}
			}})
			done := async(func() error { return tc.destroy(e, n) })
			select {
			case f := <-heard:
				if f&devnode.FlagDying == 0 {
					t.Errorf("Revoked ran with flags %b, want FlagDying set (no new operation may start)", f)
				}
			case <-time.After(waitLong):
				t.Fatalf("%s never called Revoked with an operation in flight", how)
			}
			if err := recv(t, done, how+" after Revoked ended the operation"); err != nil {
				t.Fatalf("%s = %v, want nil", how, err)
			}
			if len(heard) != 0 {
				t.Errorf("Revoked called %d more times for one node, want once", len(heard))
			}
			n.Rel()
			e.finish(t)
		})
	}
}

// TestObserveNil: Observe(nil) takes the observer away, and a node made,
// revoked and unlinked after it is told to no one.
func TestObserveNil(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	var heard []string
	hear := func(s string) {
		mu.Lock()
		defer mu.Unlock()
		heard = append(heard, s)
	}
	e.reg.Observe(&observer{
		linking:  func(name string, _ *devnode.Attr) { hear("Linking " + name) },
		unlinked: func(name string) { hear("Unlinked " + name) },
		revoked:  func(n *devnode.Node) { hear("Revoked " + n.Name()) },
	})
	e.reg.Observe(nil)
	n := e.lookup(t, "tun1")
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	n.Rel()
	e.finish(t)
	mu.Lock()
	defer mu.Unlock()
	if len(heard) != 0 {
		t.Errorf("after Observe(nil) the old observer heard %q, want nothing", heard)
	}
}
