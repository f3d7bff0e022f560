package cloner

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// fakeEnv is a registry with a tun cloner on the in-memory fake kernel.
type fakeEnv struct {
	reg  *devnode.Registry
	fake *Fake
	c    *Cloner
	once sync.Once // Shutdown is called once
}

// shutdown shuts the registry down once (the test's own call or the
// cleanup's, whichever comes first).
func (e *fakeEnv) shutdown(between func()) {
	e.once.Do(func() { e.reg.Shutdown(context.Background(), between) })
}

// newFakeEnv makes a fakeEnv whose registry is shut down when the test
// ends (if the test did not do it itself), so its worker never leaks.
func newFakeEnv(t *testing.T, maxUnit int) *fakeEnv {
	t.Helper()
	reg := devnode.NewRegistry()
	fake := NewFake()
	e := &fakeEnv{reg: reg, fake: fake, c: New(Tun, fake, reg, maxUnit, quietLog)}
	t.Cleanup(func() { e.shutdown(nil) })
	return e
}

// names lists the registry's live node names.
func (e *fakeEnv) names() []string {
	var out []string
	for _, n := range e.reg.List() {
		out = append(out, n.Name())
	}
	return out
}

// destroy ends a node a test holds: close if open, destroy, drop the
// caller's reference.
func (e *fakeEnv) destroy(t *testing.T, n *devnode.Node) {
	t.Helper()
	if n.Flags()&devnode.FlagOpen != 0 {
		if err := n.Close(context.Background()); err != nil {
			t.Fatalf("Close(%s) = %v, want nil", n.Name(), err)
		}
	}
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatalf("Destroy(%s) = %v, want nil", n.Name(), err)
	}
	n.Rel()
}

func (e *fakeEnv) noViolations(t *testing.T) {
	t.Helper()
	if v := e.fake.Violations(); len(v) != 0 {
		t.Errorf("fake kernel saw fd-discipline violations: %q", v)
	}
}

// shutdownClean shuts the registry down and checks nothing is left.
func (e *fakeEnv) shutdownClean(t *testing.T) {
	t.Helper()
	e.shutdown(nil)
	if n := e.fake.Len(); n != 0 {
		t.Errorf("after Shutdown the fake kernel has %d interfaces, want 0", n)
	}
	if u := e.c.UnitsInUse(); u != 0 {
		t.Errorf("after Shutdown UnitsInUse() = %d, want 0", u)
	}
	e.noViolations(t)
}

func TestCloneAllocatesLowestFreeUnit(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	var nodes []*devnode.Node
	for i, want := range []string{"tun0", "tun1", "tun2"} {
		n, err := e.reg.Clone(ctx, "tun")
		if err != nil {
			t.Fatalf("clone #%d: %v, want %s", i, err, want)
		}
		if n.Name() != want {
			t.Fatalf("clone #%d gave %s, want %s", i, n.Name(), want)
		}
		if n.Flags()&devnode.FlagOpen == 0 {
			t.Errorf("%s from the clone node is not open, want made already open", n.Name())
		}
		if !e.fake.Exists(want) {
			t.Errorf("%s was handed out but the fake kernel has no such interface", want)
		}
		nodes = append(nodes, n)
	}
	if u := e.c.UnitsInUse(); u != 3 {
		t.Fatalf("UnitsInUse() = %d after three clones, want 3", u)
	}

	// Destroying tun1 frees unit 1; the next clone reuses it.
	old := nodes[1]
	e.destroy(t, old)
	if e.fake.Exists("tun1") {
		t.Fatalf("tun1 still in the fake kernel after its destroy")
	}
	if u := e.c.UnitsInUse(); u != 2 {
		t.Fatalf("UnitsInUse() = %d after destroying tun1, want 2", u)
	}
	n, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("clone after destroying tun1: %v", err)
	}
	if n.Name() != "tun1" {
		t.Fatalf("clone after destroying tun1 gave %s, want the freed tun1", n.Name())
	}
	if n.Ino() == old.Ino() {
		t.Errorf("recreated tun1 has the old node's Ino %d, want a fresh one", n.Ino())
	}
	nodes[1] = n
	n3, err := e.reg.Clone(ctx, "tun")
	if err != nil || n3.Name() != "tun3" {
		t.Fatalf("next clone = %v, %v, want tun3", n3, err)
	}
	nodes = append(nodes, n3)
	if got, want := e.names(), []string{"tun0", "tun1", "tun2", "tun3"}; !slices.Equal(got, want) {
		t.Errorf("List() = %v, want %v", got, want)
	}
	e.shutdownClean(t)
	for _, n := range nodes {
		_ = n.Close(context.Background())
		n.Rel()
	}
	if l := e.reg.Live(); l != 0 {
		t.Errorf("Live() = %d after every reference was dropped, want 0", l)
	}
}

// The clone node's scan starts at the lowest unit that may be free:
// destroys below it and adoptions at or above it must keep it right.
func TestCloneLowestFreeAfterDestroysAndAdoptions(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	clone := func(want string) *devnode.Node {
		t.Helper()
		n, err := e.reg.Clone(ctx, "tun")
		if err != nil || n.Name() != want {
			t.Fatalf("clone = %v, %v, want %s", n, err, want)
		}
		return n
	}
	var held []*devnode.Node
	n0, n1, n2 := clone("tun0"), clone("tun1"), clone("tun2")
	e.destroy(t, n2)
	e.destroy(t, n0)
	held = append(held, n1, clone("tun0"), clone("tun2"))
	// Adopted units fill the range: tun4 leaves a gap at 3, tun3 closes it.
	e.c.LinkAppeared(e.fake.AddExternal("tun4", Tun, OwnerNone))
	held = append(held, clone("tun3"))
	e.destroy(t, held[len(held)-1])
	held = held[:len(held)-1]
	e.c.LinkAppeared(e.fake.AddExternal("tun3", Tun, OwnerNone))
	held = append(held, clone("tun5"))
	e.shutdown(nil) // the adopted tun3 and tun4 stay: not made by cdevfs
	for _, n := range held {
		_ = n.Close(ctx)
		n.Rel()
	}
}

func TestCloneSkipsForeignNameWithoutLeak(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	e.fake.Taken["tun0"] = true
	e.fake.Taken["tun1"] = true

	n, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("clone with tun0, tun1 taken by a foreign device: %v", err)
	}
	if n.Name() != "tun2" {
		t.Fatalf("clone with tun0, tun1 taken gave %s, want tun2", n.Name())
	}
	if u := e.c.UnitsInUse(); u != 1 {
		t.Fatalf("UnitsInUse() = %d, want 1: the skipped units must stay free", u)
	}
	if e.fake.Exists("tun0") || e.fake.Exists("tun1") {
		t.Fatalf("the foreign names were touched")
	}

	// Once the foreign devices are gone their units are handed out again.
	delete(e.fake.Taken, "tun0")
	delete(e.fake.Taken, "tun1")
	m, err := e.reg.Clone(ctx, "tun")
	if err != nil || m.Name() != "tun0" {
		t.Fatalf("clone after the foreign tun0 went away = %v, %v, want tun0 (unit 0 was leaked?)", m, err)
	}
	k, err := e.reg.Clone(ctx, "tun")
	if err != nil || k.Name() != "tun1" {
		t.Fatalf("next clone = %v, %v, want tun1", k, err)
	}
	if u := e.c.UnitsInUse(); u != 3 {
		t.Fatalf("UnitsInUse() = %d, want 3", u)
	}
	e.shutdownClean(t)
	for _, n := range []*devnode.Node{n, m, k} {
		n.Rel()
	}
}

func TestCreateFailureLeavesNothing(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	first, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	calls := 0
	e.fake.FailCreate = func(name string) error {
		calls++
		return syscall.ENOMEM
	}
	beforeUnits, beforeLive, beforeLen := e.c.UnitsInUse(), e.reg.Live(), e.fake.Len()

	for _, tc := range []struct {
		what string
		do   func() (*devnode.Node, error)
	}{
		{"Clone(tun)", func() (*devnode.Node, error) { return e.reg.Clone(ctx, "tun") }},
		{"Lookup(tun4)", func() (*devnode.Node, error) { return e.reg.Lookup(ctx, "tun4") }},
	} {
		n, err := tc.do()
		if err == nil {
			t.Fatalf("%s with a failing backend gave %s, want an error", tc.what, n.Name())
		}
		if !errors.Is(err, syscall.ENOMEM) {
			t.Errorf("%s error = %v, want the backend's ENOMEM", tc.what, err)
		}
		if u := e.c.UnitsInUse(); u != beforeUnits {
			t.Errorf("%s failed but UnitsInUse() went %d -> %d", tc.what, beforeUnits, u)
		}
		if l := e.reg.Live(); l != beforeLive {
			t.Errorf("%s failed but Live() went %d -> %d", tc.what, beforeLive, l)
		}
		if l := e.fake.Len(); l != beforeLen {
			t.Errorf("%s failed but the fake kernel went from %d to %d interfaces", tc.what, beforeLen, l)
		}
		if got := e.names(); !slices.Equal(got, []string{"tun0"}) {
			t.Errorf("%s failed but List() = %v, want [tun0]", tc.what, got)
		}
	}
	if calls != 2 {
		t.Errorf("backend Create called %d times, want 2 (a hard failure is not retried on the next unit)", calls)
	}

	e.fake.FailCreate = nil
	n, err := e.reg.Clone(ctx, "tun")
	if err != nil || n.Name() != "tun1" {
		t.Fatalf("clone after the backend recovered = %v, %v, want tun1", n, err)
	}
	e.shutdownClean(t)
	first.Rel()
	n.Rel()
}

func TestLookupOfForeignNameIsEEXIST(t *testing.T) {
	e := newFakeEnv(t, 0)
	e.fake.Taken["tun3"] = true
	n, err := e.reg.Lookup(context.Background(), "tun3")
	if err == nil {
		t.Fatalf("Lookup(tun3) with tun3 taken by a foreign device gave a node, want EEXIST")
	}
	if !errors.Is(err, syscall.EEXIST) {
		t.Fatalf("Lookup(tun3) = %v, want an error wrapping EEXIST", err)
	}
	_ = n
	if e.fake.Len() != 0 || e.c.UnitsInUse() != 0 || e.reg.Live() != 0 || len(e.names()) != 0 {
		t.Fatalf("failed lookup left something: %d interfaces, %d units, %d live nodes, names %v",
			e.fake.Len(), e.c.UnitsInUse(), e.reg.Live(), e.names())
	}
	e.shutdownClean(t)
}

func TestCloneExhaustedIsENOSPC(t *testing.T) {
	e := newFakeEnv(t, 2) // units 0, 1, 2
	ctx := context.Background()
	var nodes []*devnode.Node
	for i := 0; i <= 2; i++ {
		n, err := e.reg.Clone(ctx, "tun")
		if err != nil {
			t.Fatalf("clone #%d with max unit 2: %v", i, err)
		}
		nodes = append(nodes, n)
	}
	n, err := e.reg.Clone(ctx, "tun")
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("clone with every unit in use = %v, %v, want ENOSPC", n, err)
	}
	if e.fake.Len() != 3 || e.c.UnitsInUse() != 3 || e.reg.Live() != 3 {
		t.Fatalf("ENOSPC left something behind: %d interfaces, %d units, %d live nodes, want 3 each",
			e.fake.Len(), e.c.UnitsInUse(), e.reg.Live())
	}
	// A unit over the maximum does not exist at all.
	if _, err := e.reg.Lookup(ctx, "tun3"); !errors.Is(err, devnode.ErrNotFound) {
		t.Fatalf("Lookup(tun3) with max unit 2 = %v, want ErrNotFound", err)
	}
	e.shutdownClean(t)
	for _, n := range nodes {
		n.Rel()
	}
}

// Every free unit held by a foreign device is still ENOSPC, and no unit is
// leaked for the attempts.
func TestCloneAllUnitsForeignIsENOSPC(t *testing.T) {
	e := newFakeEnv(t, 2)
	for _, name := range []string{"tun0", "tun1", "tun2"} {
		e.fake.Taken[name] = true
	}
	if n, err := e.reg.Clone(context.Background(), "tun"); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("clone with every name foreign = %v, %v, want ENOSPC", n, err)
	}
	if e.fake.Len() != 0 || e.c.UnitsInUse() != 0 || e.reg.Live() != 0 {
		t.Fatalf("ENOSPC left %d interfaces, %d units, %d live nodes, want 0",
			e.fake.Len(), e.c.UnitsInUse(), e.reg.Live())
	}
	e.shutdownClean(t)
}

func TestLookupInvalidNamesCreateNothing(t *testing.T) {
	e := newFakeEnv(t, 0)
	for _, name := range []string{"tun01", "tun-1", "tun+1", "tunx", "tun32768", "tap0", "tun", "", "null"} {
		n, err := e.reg.Lookup(context.Background(), name)
		if !errors.Is(err, devnode.ErrNotFound) || !errors.Is(err, syscall.ENOENT) {
			t.Errorf("Lookup(%q) = %v, %v, want ErrNotFound (ENOENT)", name, n, err)
		}
	}
	if e.fake.Len() != 0 || e.c.UnitsInUse() != 0 || e.reg.Live() != 0 {
		t.Fatalf("invalid lookups left %d interfaces, %d units, %d live nodes", e.fake.Len(), e.c.UnitsInUse(), e.reg.Live())
	}
	e.shutdownClean(t)
}

func TestLookupExistingGivesSameNode(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	a, err := e.reg.Lookup(ctx, "tun7")
	if err != nil {
		t.Fatalf("Lookup(tun7): %v", err)
	}
	if a.Flags()&devnode.FlagOpen != 0 {
		t.Errorf("a node created by lookup is open, want closed")
	}
	b, err := e.reg.Lookup(ctx, "tun7")
	if err != nil {
		t.Fatalf("second Lookup(tun7): %v", err)
	}
	if a != b {
		t.Fatalf("second Lookup(tun7) gave another node (Ino %d vs %d), want the same", a.Ino(), b.Ino())
	}
	if r := a.Refs(); r != 3 {
		t.Errorf("Refs() = %d with two lookups outstanding, want 3 (registry + 2 callers)", r)
	}
	if e.fake.Len() != 1 {
		t.Errorf("fake kernel has %d interfaces, want 1", e.fake.Len())
	}
	// The clone node cannot hand out an existing name already open.
	if n, err := e.reg.Clone(ctx, "tun7"); !errors.Is(err, syscall.EEXIST) {
		t.Errorf("Clone(tun7) of an existing name = %v, %v, want EEXIST", n, err)
	}
	a.Rel()
	b.Rel()
	e.shutdownClean(t)
}

func TestTunAndTapClonersShareRegistry(t *testing.T) {
	e := newFakeEnv(t, 0)
	tap := New(Tap, e.fake, e.reg, 0, quietLog)
	if tap.Kind() != Tap || e.c.Kind() != Tun {
		t.Fatalf("Kind() = %v / %v, want Tap / Tun", tap.Kind(), e.c.Kind())
	}
	ctx := context.Background()
	a, err := e.reg.Clone(ctx, "tap")
	if err != nil || a.Name() != "tap0" {
		t.Fatalf("Clone(tap) = %v, %v, want tap0", a, err)
	}
	b, err := e.reg.Clone(ctx, "tun")
	if err != nil || b.Name() != "tun0" {
		t.Fatalf("Clone(tun) = %v, %v, want tun0", b, err)
	}
	if tap.UnitsInUse() != 1 || e.c.UnitsInUse() != 1 {
		t.Fatalf("UnitsInUse tap %d tun %d, want 1 each", tap.UnitsInUse(), e.c.UnitsInUse())
	}
	e.shutdown(nil)
	if e.fake.Len() != 0 || tap.UnitsInUse() != 0 || e.c.UnitsInUse() != 0 {
		t.Fatalf("after Shutdown: %d interfaces, tap units %d, tun units %d, want 0", e.fake.Len(), tap.UnitsInUse(), e.c.UnitsInUse())
	}
	a.Rel()
	b.Rel()
}

func TestDeviceIO(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	n, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	dev := n.Device().(devnode.IO)
	buf := make([]byte, 8)

	if err := e.fake.Inject("tun0", []byte("0123456789")); err != nil {
		t.Fatalf("Inject: %v", err)
	}
	if got, err := dev.Read(ctx, buf, false); err != nil || string(buf[:got]) != "01234567" {
		t.Fatalf("Read of a 10-byte packet into 8 bytes = %d %q, %v, want 8 \"01234567\" (truncated)", got, buf[:got], err)
	}
	if _, err := dev.Read(ctx, buf, true); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("nonblocking Read with nothing queued = %v, want EAGAIN (the truncated rest is dropped)", err)
	}
	tctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	_, err = dev.Read(tctx, buf, false)
	cancel()
	if !errors.Is(err, syscall.EINTR) {
		t.Fatalf("blocking Read ended by its ctx = %v, want EINTR", err)
	}
	if got, err := dev.Write(ctx, []byte("pkt")); got != 3 || err != nil {
		t.Fatalf("Write(3 bytes) = %d, %v, want 3, nil", got, err)
	}
	if got, err := dev.Write(ctx, nil); got != 0 || err != nil {
		t.Fatalf("Write(empty) = %d, %v, want 0, nil", got, err)
	}
	if _, err := dev.Write(ctx, make([]byte, MaxPacket+1)); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Write over the MRU = %v, want EIO", err)
	}
	if got, err := dev.Write(ctx, make([]byte, MaxPacket)); got != MaxPacket || err != nil {
		t.Fatalf("Write of exactly the MRU = %d, %v, want %d, nil", got, err, MaxPacket)
	}
	_ = n.Close(context.Background())
	n.Rel()
	e.shutdownClean(t)
}

// An interface deleted behind our back (ip link del) revokes its node: a
// blocked reader gets ENXIO, the node is destroyed by the worker, its unit
// freed, and the name can be created afresh.
func TestExternalDeleteRevokesNode(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	n, err := e.reg.Clone(ctx, "tun")
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	errc := make(chan error, 1)
	entered := make(chan struct{})
	go func() {
		if err := n.Enter(); err != nil {
			errc <- err
			return
		}
		close(entered)
		_, err := n.Device().(devnode.IO).Read(ctx, make([]byte, 16), false)
		n.Exit()
		errc <- err
	}()
	<-entered
	e.fake.DeleteExternal("tun0")
	select {
	case err := <-errc:
		if !errors.Is(err, syscall.ENXIO) {
			t.Fatalf("blocked Read after ip link del = %v, want ENXIO", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("blocked Read did not return after ip link del")
	}
	e.reg.DrainSched()
	if f := n.Flags(); f&devnode.FlagGone == 0 {
		t.Fatalf("node flags %b after ip link del and DrainSched, want FlagGone", f)
	}
	if len(e.names()) != 0 || e.c.UnitsInUse() != 0 {
		t.Fatalf("after ip link del: names %v, units %d, want none", e.names(), e.c.UnitsInUse())
	}
	_ = n.Close(context.Background())
	n.Rel()
	if e.reg.Live() != 0 {
		t.Fatalf("Live() = %d, want 0", e.reg.Live())
	}
	m, err := e.reg.Lookup(ctx, "tun0")
	if err != nil {
		t.Fatalf("Lookup(tun0) after the old one was revoked: %v", err)
	}
	if m == n || m.Ino() == n.Ino() {
		t.Fatalf("Lookup(tun0) gave the revoked node, want a fresh one")
	}
	m.Rel()
	e.shutdownClean(t)
}

// Opening a node whose interface was deleted behind our back is ENXIO and
// schedules the node's destroy.
func TestOpenOfExternallyDeletedIsENXIO(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	n, err := e.reg.Lookup(ctx, "tun2")
	if err != nil {
		t.Fatalf("Lookup(tun2): %v", err)
	}
	e.fake.DeleteExternal("tun2")
	if err := n.Open(ctx); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("Open after ip link del = %v, want ENXIO", err)
	}
	if err := n.Open(ctx); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("second Open after ip link del = %v, want ENXIO", err)
	}
	e.reg.DrainSched()
	if len(e.names()) != 0 || e.c.UnitsInUse() != 0 {
		t.Fatalf("after ip link del and a failed open: names %v, units %d, want none", e.names(), e.c.UnitsInUse())
	}
	n.Rel()
	e.shutdownClean(t)
}
