package cloner

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
)

// Racing lookups of one free name: the creation is
// serialized by the cloner lock, so exactly one interface is created and
// every caller, winner or loser, gets the winner's node with a reference
// of its own (a loser's Get missed the node; the clone handler then hands
// out the existing node, like tunclone() does).
func TestRacingLookupsCreateOnce(t *testing.T) {
	const (
		rounds  = 200
		callers = 8
	)
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	for round := 0; round < rounds; round++ {
		start := make(chan struct{})
		nodes := make([]*devnode.Node, callers)
		errs := make([]error, callers)
		var wg sync.WaitGroup
		for i := 0; i < callers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				nodes[i], errs[i] = e.reg.Lookup(ctx, "tun5")
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: caller %d: Lookup(tun5) = %v, want the node (created by it or by the winner)", round, i, err)
			}
		}
		for i, n := range nodes {
			if n != nodes[0] {
				t.Fatalf("round %d: caller %d got node %s ino %d, caller 0 got ino %d: two nodes for one name",
					round, i, n.Name(), n.Ino(), nodes[0].Ino())
			}
		}
		n := nodes[0]
		if l := e.fake.Len(); l != 1 || !e.fake.Exists("tun5") {
			t.Fatalf("round %d: fake kernel has %d interfaces (tun5 exists: %v), want exactly tun5", round, l, e.fake.Exists("tun5"))
		}
		if u := e.c.UnitsInUse(); u != 1 {
			t.Fatalf("round %d: UnitsInUse() = %d, want 1", round, u)
		}
		if r := n.Refs(); r != 1+callers {
			t.Fatalf("round %d: Refs() = %d, want %d (registry + one per caller)", round, r, 1+callers)
		}
		if l := e.reg.Live(); l != 1 {
			t.Fatalf("round %d: Live() = %d, want 1", round, l)
		}
		for _, n := range nodes {
			n.Rel()
		}
		if err := n.Destroy(ctx); err != nil {
			t.Fatalf("round %d: Destroy: %v", round, err)
		}
		if n.Refs() != 0 || e.reg.Live() != 0 || e.fake.Len() != 0 || e.c.UnitsInUse() != 0 {
			t.Fatalf("round %d: after destroy refs %d, live %d, interfaces %d, units %d, want all 0",
				round, n.Refs(), e.reg.Live(), e.fake.Len(), e.c.UnitsInUse())
		}
	}
	e.shutdownClean(t)
}

// Racing creators through the clone node with a specific name (made
// already open): exactly one wins, the others get EEXIST, one interface.
func TestRacingOpenClonesOfOneNameCreateOnce(t *testing.T) {
	const (
		rounds  = 100
		callers = 8
	)
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	for round := 0; round < rounds; round++ {
		start := make(chan struct{})
		nodes := make([]*devnode.Node, callers)
		errs := make([]error, callers)
		var wg sync.WaitGroup
		for i := 0; i < callers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				nodes[i], errs[i] = e.reg.Clone(ctx, "tun5")
			}()
		}
		close(start)
		wg.Wait()
		var winner *devnode.Node
		for i, err := range errs {
			switch {
			case err == nil && winner == nil:
				winner = nodes[i]
			case err == nil:
				t.Fatalf("round %d: two creators of tun5 both succeeded (ino %d and %d)", round, winner.Ino(), nodes[i].Ino())
			case !errors.Is(err, syscall.EEXIST):
				t.Fatalf("round %d: losing creator got %v, want EEXIST", round, err)
			}
		}
		if winner == nil {
			t.Fatalf("round %d: no creator of tun5 succeeded", round)
		}
		if l := e.fake.Len(); l != 1 {
			t.Fatalf("round %d: fake kernel has %d interfaces, want 1", round, l)
		}
		e.destroy(t, winner)
		if e.fake.Len() != 0 || e.c.UnitsInUse() != 0 || e.reg.Live() != 0 {
			t.Fatalf("round %d: after destroy: %d interfaces, %d units, %d live", round, e.fake.Len(), e.c.UnitsInUse(), e.reg.Live())
		}
	}
	e.shutdownClean(t)
}

// Wildcard clones racing lookups of specific names: every created node
// has its own name and interface, and the units in use match (never two
// interfaces with one name, no unit leaked).
func TestRacingClonesAndLookupsDistinctNames(t *testing.T) {
	const workers = 16
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	start := make(chan struct{})
	nodes := make([]*devnode.Node, workers)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if i%2 == 0 {
				nodes[i], errs[i] = e.reg.Clone(ctx, "tun")
			} else {
				nodes[i], errs[i] = e.reg.Lookup(ctx, fmt.Sprintf("tun%d", i/2))
			}
		}()
	}
	close(start)
	wg.Wait()
	distinct := map[*devnode.Node]bool{}
	byName := map[string]*devnode.Node{}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("worker %d: %v", i, err)
		}
		n := nodes[i]
		distinct[n] = true
		if o, ok := byName[n.Name()]; ok && o != n {
			t.Fatalf("two nodes named %s", n.Name())
		}
		byName[n.Name()] = n
	}
	if e.fake.Len() != len(distinct) || e.c.UnitsInUse() != len(distinct) || int(e.reg.Live()) != len(distinct) {
		t.Fatalf("%d distinct nodes but %d interfaces, %d units, %d live", len(distinct), e.fake.Len(), e.c.UnitsInUse(), e.reg.Live())
	}
	for name := range byName {
		if !e.fake.Exists(name) {
			t.Fatalf("node %s has no interface", name)
		}
	}
	e.shutdownClean(t)
	for _, n := range nodes {
		n.Rel()
	}
	if e.reg.Live() != 0 {
		t.Fatalf("Live() = %d after all references dropped, want 0", e.reg.Live())
	}
}

// Every lifecycle operation racing on one name for a couple of seconds.
// Each reference a goroutine takes is released exactly once; at the end
// everything must be back to zero and the fake kernel must have seen no
// double close and no operation on a closed link.
func TestConcurrentLifecycleOneName(t *testing.T) {
	const (
		name     = "tun3"
		workers  = 12
		duration = 1500 * time.Millisecond
	)
	e := newFakeEnv(t, 0)
	ctx := context.Background()

	var (
		seenMu sync.Mutex
		seen   = map[*devnode.Node]bool{}
		stop   atomic.Bool
		opens  atomic.Int64
		ios    atomic.Int64
		errMu  sync.Mutex
		errs   []string
	)
	see := func(n *devnode.Node) {
		seenMu.Lock()
		seen[n] = true
		seenMu.Unlock()
	}
	bad := func(format string, args ...any) {
		errMu.Lock()
		if len(errs) < 20 {
			errs = append(errs, fmt.Sprintf(format, args...))
		}
		errMu.Unlock()
	}
	// use runs an opened node's I/O and closes it; the caller still owns
	// its reference.
	use := func(r *rand.Rand, n *devnode.Node) {
		opens.Add(1)
		if r.IntN(3) == 0 {
			n.SetTransient(true)
		}
		pkt := []byte("packet")
		buf := make([]byte, 64)
		for k := r.IntN(4); k > 0; k-- {
			if err := n.Enter(); err != nil {
				if !errors.Is(err, devnode.ErrDying) {
					bad("Enter = %v, want nil or ErrDying", err)
				}
				break
			}
			io := n.Device().(devnode.IO)
			if _, err := io.Write(ctx, pkt); err != nil && !errors.Is(err, syscall.ENXIO) {
				bad("Write = %v, want nil or ENXIO", err)
			}
			rctx, cancel := context.WithTimeout(ctx, time.Duration(r.IntN(500))*time.Microsecond)
			_, err := io.Read(rctx, buf, r.IntN(2) == 0)
			cancel()
			if err != nil && !errors.Is(err, syscall.ENXIO) && !errors.Is(err, syscall.EINTR) && !errors.Is(err, syscall.EAGAIN) {
				bad("Read = %v, want nil, ENXIO, EINTR or EAGAIN", err)
			}
			ios.Add(1)
			n.Exit()
		}
		if err := n.Close(context.Background()); err != nil && !errors.Is(err, ErrGone) {
			bad("Close = %v", err)
		}
	}

	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 42))
			for !stop.Load() {
				switch op := r.IntN(20); {
				case op < 8: // lookup, open, I/O, close, rel
					n, err := e.reg.Lookup(ctx, name)
					if err != nil {
						bad("Lookup(%s) = %v, want a node", name, err)
						continue
					}
					see(n)
					switch err := n.Open(ctx); {
					case err == nil:
						use(r, n)
					case errors.Is(err, syscall.EBUSY), errors.Is(err, syscall.ENXIO):
					default:
						bad("Open = %v, want nil, EBUSY or ENXIO", err)
					}
					n.Rel()
				case op < 10: // the clone node with a specific name: made open
					n, err := e.reg.Clone(ctx, name)
					if err != nil {
						if !errors.Is(err, syscall.EEXIST) {
							bad("Clone(%s) = %v, want a node or EEXIST", name, err)
						}
						continue
					}
					see(n)
					use(r, n)
					n.Rel()
				case op < 13: // destroy, sometimes with a ctx that ends early
					n, err := e.reg.Get(name)
					if err != nil {
						continue
					}
					see(n)
					dctx, cancel := ctx, context.CancelFunc(func() {})
					if r.IntN(2) == 0 {
						dctx, cancel = context.WithTimeout(ctx, time.Duration(r.IntN(200))*time.Microsecond)
					}
					if err := n.Destroy(dctx); err != nil && !errors.Is(err, syscall.EINTR) {
						bad("Destroy = %v, want nil or EINTR", err)
					}
					cancel()
					n.Rel()
				case op < 15: // deferred destroy
					n, err := e.reg.Get(name)
					if err != nil {
						continue
					}
					see(n)
					e.reg.DestroySched(n, devnode.ReasonDeleted)
					n.Rel()
				case op < 18:
					_ = e.fake.Inject(name, []byte("incoming"))
				case op < 19: // ip link del
					e.fake.DeleteExternal(name)
				default:
					if u := e.c.UnitsInUse(); u > 1 {
						bad("UnitsInUse() = %d with one name in play", u)
					}
					runtime.Gosched()
				}
			}
		}()
	}
	time.Sleep(duration)
	stop.Store(true)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("workers did not stop within 10s: a lifecycle operation hangs")
	}
	for _, s := range errs {
		t.Error(s)
	}

	e.reg.DrainSched()
	shut := make(chan struct{})
	go func() { e.shutdown(nil); close(shut) }()
	select {
	case <-shut:
	case <-time.After(10 * time.Second):
		t.Fatalf("Shutdown did not return within 10s")
	}

	e.noViolations(t)
	for n := range seen {
		if r := n.Refs(); r != 0 {
			t.Errorf("node %s ino %d has %d references left, want 0", n.Name(), n.Ino(), r)
		}
		if n.Flags()&devnode.FlagGone == 0 {
			t.Errorf("node %s ino %d flags %b after Shutdown, want FlagGone", n.Name(), n.Ino(), n.Flags())
		}
	}
	if l := e.reg.Live(); l != 0 {
		t.Errorf("Live() = %d, want 0", l)
	}
	if l := e.fake.Len(); l != 0 {
		t.Errorf("fake kernel has %d interfaces left, want 0", l)
	}
	if u := e.c.UnitsInUse(); u != 0 {
		t.Errorf("UnitsInUse() = %d, want 0", u)
	}
	t.Logf("%d nodes, %d opens, %d I/O rounds", len(seen), opens.Load(), ios.Load())
	if len(seen) < 2 || opens.Load() == 0 {
		t.Errorf("the race did not exercise the lifecycle: %d nodes, %d opens", len(seen), opens.Load())
	}
}
