//go:build linux

package cloner

// Tests of the netlink watch with the cloners, against the real kernel,
// each in a network namespace of its own (ip netns add) inside the
// suite's private one, so that its events and interfaces are its alone:
//
//	unshare --net --mount -- go test -race -run LinuxWatch ./cloner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"github.com/vishvananda/netlink"
)

var wtSeq atomic.Int32

// watchEnv is a daemon's view of one namespace (a marked backend, tun and
// tap cloners, the watch) and an administrator in it (out: a backend
// without a mark, whose interfaces are made outside cdevfs).
type watchEnv struct {
	ns       string
	b, out   *Linux
	reg      *devnode.Registry
	tun, tap *Cloner

	// gate, while held by the test, stops the watch in its next
	// Appeared: the watch takes no events and the socket fills.
	gate    sync.Mutex
	deaf    bool
	resyncs atomic.Int64

	mu     sync.Mutex
	errs   []error
	awaits map[string]chan struct{} // interface names whose Appeared a barrier waits for
}

// wtNetns makes a network namespace (ip netns add) for the test, deleted
// with what is left in it when the test ends.
func wtNetns(t *testing.T) string {
	t.Helper()
	ltRequireNetns(t)
	ns := fmt.Sprintf("cdevfs-w%d-%d", os.Getpid(), wtSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		ltUnavailable(t, "ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	return ns
}

// newWatchEnv makes a namespace and starts the watch in it. Everything is
// undone at the end of the test: the watch stopped, the registry shut
// down, the backends closed, the namespace (and what is left in it)
// deleted.
func newWatchEnv(t *testing.T) *watchEnv {
	t.Helper()
	e := &watchEnv{ns: wtNetns(t), awaits: make(map[string]chan struct{})}
	var err error
	if e.b, err = NewLinux(LinuxOptions{Netns: e.ns, Mark: MarkPrefix + "watch-test"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.b.Close)
	if e.out, err = NewLinux(LinuxOptions{Netns: e.ns}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.out.Close)
	e.reg = devnode.NewRegistry()
	e.tun = New(Tun, e.b, e.reg, 0, quietLog)
	e.tap = New(Tap, e.b, e.reg, 0, quietLog)
	done := make(chan struct{})
	stopped, err := e.b.Watch(done, Watcher{
		Appeared: func(info LinkInfo) {
			e.gate.Lock()
			e.gate.Unlock()
			e.tun.LinkAppeared(info)
			e.tap.LinkAppeared(info)
			e.mu.Lock()
			if ch := e.awaits[info.Name]; ch != nil {
				close(ch)
				delete(e.awaits, info.Name)
			}
			e.mu.Unlock()
		},
		Deleted: func(index int) {
			e.tun.LinkDeleted(index)
			e.tap.LinkDeleted(index)
		},
		Error: func(err error) {
			e.mu.Lock()
			e.errs = append(e.errs, err)
			e.mu.Unlock()
		},
		Known:    func() []int { return append(e.tun.LinkIndexes(), e.tap.LinkIndexes()...) },
		Resynced: func() { e.resyncs.Add(1) },
	})
	if err != nil {
		e.reg.Shutdown(context.Background(), nil)
		t.Fatalf("Watch: %v", err)
	}
	t.Cleanup(func() {
		e.hear()
		close(done)
		<-stopped // no callback from here on: the deletions below are ours
		e.reg.Shutdown(context.Background(), func() {
			if err := DeleteCreated(e.b, e.tun, e.tap); err != nil {
				t.Errorf("DeleteCreated: %v", err)
			}
		})
	})
	return e
}

// deafen stops the watch at its next Appeared; hear lets it go on.
func (e *watchEnv) deafen() {
	e.gate.Lock()
	e.deaf = true
}

func (e *watchEnv) hear() {
	if e.deaf {
		e.deaf = false
		e.gate.Unlock()
	}
}

// errors lists the errors the watch reported.
func (e *watchEnv) errors() []error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.errs)
}

// add makes an interface outside cdevfs (as `ip tuntap add` does) and
// returns its ifindex.
func (e *watchEnv) add(t *testing.T, name string, kind Kind) int {
	t.Helper()
	l, err := e.out.Create(name, kind, false)
	if err != nil {
		t.Fatalf("make %s outside cdevfs: %v", name, err)
	}
	_ = l.Close()
	return l.Index()
}

// link is a handle on the interface with ifindex index, for netlink calls.
func (e *watchEnv) link(index int) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: index}}
}

// rename renames the interface with ifindex index (ip link set name).
func (e *watchEnv) rename(t *testing.T, index int, to string) {
	t.Helper()
	if err := e.out.nl.LinkSetName(e.link(index), to); err != nil {
		t.Fatalf("rename ifindex %d to %s: %v", index, to, err)
	}
}

// del deletes the interface with ifindex index (ip link del).
func (e *watchEnv) del(t *testing.T, index int) {
	t.Helper()
	if err := e.out.nl.LinkDel(e.link(index)); err != nil {
		t.Fatalf("delete ifindex %d: %v", index, err)
	}
}

// addNonTun makes an interface of another driver and returns its ifindex.
func (e *watchEnv) addNonTun(t *testing.T, name string) int {
	t.Helper()
	var outs []string
	for _, typ := range []string{"dummy", "ifb", "bridge"} {
		out, err := exec.Command("ip", "-n", e.ns, "link", "add", name, "type", typ).CombinedOutput()
		if err == nil {
			l, err := e.out.nl.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			return l.Attrs().Index
		}
		outs = append(outs, typ+": "+strings.TrimSpace(string(out)))
	}
	t.Fatalf("cannot make a non-tun interface %s: %s", name, strings.Join(outs, "; "))
	return 0
}

// barrier returns once the watch has handled every event the kernel sent
// before it, and every destroy they scheduled is done: it makes a tun
// with a name that is no unit's and waits for its Appeared, which comes
// after theirs (one goroutine delivers the events in order).
func (e *watchEnv) barrier(t *testing.T) {
	t.Helper()
	name := fmt.Sprintf("sync%d", wtSeq.Add(1))
	ch := make(chan struct{})
	e.mu.Lock()
	e.awaits[name] = ch
	e.mu.Unlock()
	index := e.add(t, name, Tun)
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("the watch did not report %s within 10s", name)
	}
	e.del(t, index)
	e.reg.DrainSched()
}

// tree maps the registry's node names to their interfaces' ifindexes.
func (e *watchEnv) tree() map[string]int {
	m := make(map[string]int)
	for _, n := range e.reg.List() {
		if d, ok := n.Device().(*device); ok {
			m[n.Name()] = d.link.Index()
		}
	}
	return m
}

// kernel maps the names of the namespace's tun and tap interfaces to
// their ifindexes.
func (e *watchEnv) kernel(t *testing.T) map[string]int {
	t.Helper()
	links, err := e.out.linkList()
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]int)
	for _, l := range links {
		if _, ok := l.(*netlink.Tuntap); ok {
			m[l.Attrs().Name] = l.Attrs().Index
		}
	}
	return m
}

// wtFlood makes an interface whose changes are only events (no unit has
// its name), up, so that every change of its alias is announced
// (netdev_state_change()), and returns its ifindex.
func wtFlood(t *testing.T, b *Linux) int {
	t.Helper()
	l, err := b.Create("flood0", Tun, false)
	if err != nil {
		t.Fatal(err)
	}
	_ = l.Close()
	if err := b.nl.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: l.Index()}}); err != nil {
		t.Fatal(err)
	}
	return l.Index()
}

// wtOverflow makes link events in b's namespace, by changing the alias
// of flood (an interface that is up), until the kernel has dropped some
// for the watch, and returns how many it made and how many were dropped.
func wtOverflow(t *testing.T, b *Linux, flood int) (events, drops int) {
	t.Helper()
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: flood}}
	for ; ; events += 100 {
		if drops = wtNetlinkDrops(t, b); drops > 0 {
			return events, drops
		}
		if events >= 200000 {
			t.Fatalf("no link event dropped after %d changes with the watch held", events)
		}
		for i := 0; i < 100; i++ {
			if err := b.nl.LinkSetAlias(link, fmt.Sprintf("flood %d", events+i)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// wtNetlinkDrops is the number of link events the kernel dropped for
// sockets of b's namespace subscribed to RTMGRP_LINK (there, the watch's
// alone), from the namespace's /proc/net/netlink.
func wtNetlinkDrops(t *testing.T, b *Linux) int {
	t.Helper()
	var table []byte
	if _, err := b.inNetns(func() (int, error) {
		var err error
		table, err = os.ReadFile("/proc/thread-self/net/netlink")
		return -1, err
	}); err != nil {
		t.Fatalf("read the namespace's /proc/net/netlink: %v", err)
	}
	return testenv.LinkEventDrops(table)
}

// nodeIndex is the ifindex of the node name's interface, or 0 if there
// is no such node.
func (e *watchEnv) nodeIndex(name string) int {
	n, err := e.reg.Get(name)
	if err != nil {
		return 0
	}
	defer n.Rel()
	return n.Device().(*device).link.Index()
}

// TestLinuxWatchRenames is what the tree shows when an interface is
// renamed (ip link set NAME name NEW), by who made it and what it is
// renamed to. cdevfs's own keep their nodes (FreeBSD's /dev/tunN keeps
// its name); adopted ones were adopted by name, so the old name leaves
// and the new one is adopted if it is a free unit name of their kind;
// an interface that is not a tun of the cloner's kind gets no node under
// any name, and the name answers EEXIST (EBUSY at the tree).
func TestLinuxWatchRenames(t *testing.T) {
	e := newWatchEnv(t)
	ctx := context.Background()
	clone := func(t *testing.T, name string) int {
		n, err := e.reg.Lookup(ctx, name)
		if err != nil {
			t.Fatalf("Lookup(%s) = %v, want a new interface", name, err)
		}
		defer n.Rel()
		return n.Device().(*device).link.Index()
	}
	var mgd8 int
	for _, tc := range []struct {
		desc string
		// setup makes the interface and returns its ifindex; from is its
		// name, to the name it is given.
		setup    func(t *testing.T) int
		from, to string
		nodes    []string // node names that must be the interface's
		absent   []string // names that must have no node
		busy     string   // a name whose lookup must fail with EEXIST
		check    func(t *testing.T)
	}{
		{"made by cdevfs, to a name no unit has", func(t *testing.T) int { return clone(t, "tun1") },
			"tun1", "mgd1", []string{"tun1"}, []string{"mgd1"}, "", nil},
		{"made by cdevfs, to a free unit name", func(t *testing.T) int { return clone(t, "tun2") },
			"tun2", "tun22", []string{"tun2"}, nil, "tun22", nil},
		{"left by a killed cdevfs (adopted as ours), to a name no unit has", func(t *testing.T) int {
			// Marked before it takes a unit name, so that it is adopted
			// as ours: an interface is announced before its alias is set.
			index := e.add(t, "orphan3", Tun)
			if err := e.out.nl.LinkSetAlias(e.link(index), e.b.mark); err != nil {
				t.Fatal(err)
			}
			e.rename(t, index, "tun3")
			return index
		}, "tun3", "mgd3", []string{"tun3"}, []string{"mgd3"}, "", nil},
		{"adopted, to a free unit name", func(t *testing.T) int { return e.add(t, "tun4", Tun) },
			"tun4", "tun44", []string{"tun44"}, []string{"tun4"}, "", nil},
		{"adopted, to a name no unit has", func(t *testing.T) int { return e.add(t, "tun5", Tun) },
			"tun5", "ext5", nil, []string{"tun5", "ext5"}, "", nil},
		{"adopted, to a unit name of the other kind", func(t *testing.T) int { return e.add(t, "tun6", Tun) },
			"tun6", "tap66", nil, []string{"tun6", "tap66"}, "tap66", nil},
		{"adopted tap, to a tun unit name", func(t *testing.T) int { return e.add(t, "tap7", Tap) },
			"tap7", "tun77", nil, []string{"tap7", "tun77"}, "tun77", nil},
		{"adopted, to the name of a renamed cdevfs interface's node", func(t *testing.T) int {
			// tun8 (cdevfs's) is renamed away and keeps its node; the
			// kernel name tun8 is free, the unit is not.
			mgd8 = clone(t, "tun8")
			e.rename(t, mgd8, "mgd8")
			return e.add(t, "tun9", Tun)
		}, "tun9", "tun8", nil, []string{"tun9"}, "", func(t *testing.T) {
			if got := e.nodeIndex("tun8"); got != mgd8 {
				t.Errorf("node tun8 is ifindex %d, want cdevfs's renamed mgd8, %d", got, mgd8)
			}
		}},
		{"not a tun, to a unit name", func(t *testing.T) int { return e.addNonTun(t, "nontun10") },
			"nontun10", "tun10", nil, []string{"tun10"}, "tun10", nil},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			index := tc.setup(t)
			e.barrier(t)
			e.rename(t, index, tc.to)
			e.barrier(t)
			for _, name := range tc.nodes {
				if got := e.nodeIndex(name); got != index {
					t.Errorf("after %s -> %s: node %s is ifindex %d, want the renamed interface's %d (0: no node)", tc.from, tc.to, name, got, index)
				}
			}
			for _, name := range tc.absent {
				if got := e.nodeIndex(name); got != 0 {
					t.Errorf("after %s -> %s: node %s exists (ifindex %d), want none", tc.from, tc.to, name, got)
				}
			}
			if tc.busy != "" {
				n, err := e.reg.Lookup(ctx, tc.busy)
				if err == nil {
					n.Rel()
				}
				if !errors.Is(err, syscall.EEXIST) {
					t.Errorf("after %s -> %s: Lookup(%s) = %v, want EEXIST (the kernel name is taken)", tc.from, tc.to, tc.busy, err)
				}
			}
			if tc.check != nil {
				tc.check(t)
			}
		})
	}
	if errs := e.errors(); len(errs) > 0 {
		t.Errorf("watch errors: %v", errs)
	}
}

// TestLinuxWatchResyncsAfterOverflow overflows the watch's socket for
// real: the watch is held in an Appeared while interfaces are deleted,
// renamed and 1,000 made outside cdevfs, and link events are made until
// the kernel reports dropping some. Let go, the watch must get ENOBUFS,
// resync, and leave the tree equal to the kernel's tun and tap
// interfaces; the units whose interfaces went meanwhile must open again.
func TestLinuxWatchResyncsAfterOverflow(t *testing.T) {
	e := newWatchEnv(t)
	ctx := context.Background()
	for _, name := range []string{"tun0", "tun1", "tun2", "tap0"} {
		n, err := e.reg.Lookup(ctx, name)
		if err != nil {
			t.Fatalf("Lookup(%s) = %v, want a new interface", name, err)
		}
		n.Rel()
	}
	for _, name := range []string{"tun10", "tun11", "tun12", "tun13"} {
		e.add(t, name, Tun)
	}
	e.add(t, "tap10", Tap)
	flood := wtFlood(t, e.out)
	e.barrier(t)
	before := e.tree()
	for _, name := range []string{"tun0", "tun1", "tun2", "tap0", "tun10", "tun11", "tun12", "tun13", "tap10"} {
		if before[name] == 0 {
			t.Fatalf("before the overflow: no node %s (tree %v)", name, before)
		}
	}

	e.deafen()
	start := time.Now()
	e.del(t, before["tun1"])  // cdevfs's
	e.del(t, before["tap0"])  // cdevfs's
	e.del(t, before["tun11"]) // adopted
	e.rename(t, before["tun12"], "tun20")
	e.rename(t, before["tun13"], "ext13")
	e.rename(t, before["tun2"], "mgd2")
	const added = 1000
	for i := 0; i < added; i++ {
		kind := Kind(i % 2)
		e.add(t, fmt.Sprintf("%s%d", kind.Prefix(), 100+i/2), kind)
	}
	events, drops := wtOverflow(t, e.out, flood)
	deaf := time.Since(start)
	e.hear()
	released := time.Now()
	for e.resyncs.Load() == 0 {
		if time.Since(released) > 10*time.Second {
			t.Fatalf("no resync 10s after the watch was let go (errors %v)", e.errors())
		}
		time.Sleep(5 * time.Millisecond)
	}
	resynced := time.Since(released)
	e.barrier(t)
	t.Logf("deaf for %v: %d interfaces made, %d alias changes, %d events dropped; resynced %v after, %d resync(s)",
		deaf.Round(time.Millisecond), added, events, drops, resynced.Round(time.Millisecond), e.resyncs.Load())

	var enobufs bool
	for _, err := range e.errors() {
		enobufs = enobufs || errors.Is(err, syscall.ENOBUFS)
	}
	if !enobufs {
		t.Errorf("watch errors %v, want one wrapping ENOBUFS", e.errors())
	}
	// The tree is the kernel's tun and tap interfaces named as units, and
	// cdevfs's renamed mgd2 under its node name tun2.
	want := make(map[string]int)
	for name, index := range e.kernel(t) {
		switch _, _, tun := ParseName("tun", name, DefaultMaxUnit); {
		case name == "mgd2":
			want["tun2"] = index
		case tun:
			want[name] = index
		default:
			if _, _, tap := ParseName("tap", name, DefaultMaxUnit); tap {
				want[name] = index
			}
		}
	}
	got := e.tree()
	for name, index := range want {
		if got[name] != index {
			t.Errorf("node %s: ifindex %d, want the kernel's %d (0: no node)", name, got[name], index)
		}
	}
	for name, index := range got {
		if want[name] == 0 {
			t.Errorf("node %s (ifindex %d) has no interface of that name in the kernel", name, index)
		}
	}
	if n := len(want); n != added+5 {
		t.Errorf("the kernel has %d tun/tap interfaces named as units, want %d", n, added+5)
	}
	for _, c := range []*Cloner{e.tun, e.tap} {
		if u, n := c.UnitsInUse(), len(c.LinkIndexes()); u != n {
			t.Errorf("%s cloner: %d units in use for %d interfaces", c.Kind().Prefix(), u, n)
		}
	}
	// The units whose interfaces went while the watch was deaf open again,
	// on new interfaces.
	for _, name := range []string{"tun1", "tap0", "tun11", "tun12", "tun13"} {
		n, err := e.reg.Lookup(ctx, name)
		if err != nil {
			t.Errorf("Lookup(%s) = %v, want a new interface", name, err)
			continue
		}
		if err := n.Open(ctx); err != nil {
			t.Errorf("Open(%s) = %v, want nil", name, err)
		} else if err := n.Close(ctx); err != nil {
			t.Errorf("Close(%s) = %v", name, err)
		}
		if i := n.Device().(*device).link.Index(); i == before[name] {
			t.Errorf("%s is still the old interface (ifindex %d)", name, i)
		}
		n.Rel()
	}
}

// TestLinuxWatchStopsWhileResubscribing: a watch that cannot subscribe
// again (its backend closed) reports each attempt and waits longer each
// time, and closing done ends it at once, not after its pause.
func TestLinuxWatchStopsWhileResubscribing(t *testing.T) {
	ns := wtNetns(t)
	b, err := NewLinux(LinuxOptions{Netns: ns})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	flood := wtFlood(t, b)
	var gate sync.Mutex
	errs := make(chan error, 64)
	done := make(chan struct{})
	stopped, err := b.Watch(done, Watcher{
		Appeared: func(LinkInfo) {
			gate.Lock()
			gate.Unlock()
		},
		Deleted: func(int) {},
		Error: func(err error) {
			select {
			case errs <- err:
			default:
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	gate.Lock() // the listing is done: the next event holds the watch
	wtOverflow(t, b, flood)
	b.Close() // every subscription fails from now on
	gate.Unlock()
	// The receive's ENOBUFS, then three failed attempts, each followed by
	// a pause (100, 200, 400 ms): stop during the third.
	for i := 0; i < 4; i++ {
		select {
		case err := <-errs:
			t.Logf("watch error: %v", err)
			if want := map[bool]syscall.Errno{true: syscall.ENOBUFS, false: syscall.ENXIO}[i == 0]; !errors.Is(err, want) {
				t.Fatalf("watch error %d: %v, want one wrapping %v", i, err, want)
			}
		case <-time.After(5 * time.Second):
			close(done)
			<-stopped
			t.Fatalf("%d watch errors in 5s, want 4", i)
		}
	}
	start := time.Now()
	close(done)
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the watch did not stop within 5s of done")
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Errorf("the watch stopped %v after done, want under 200ms (its pause was 400ms)", d)
	}
}
