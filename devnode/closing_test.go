package devnode_test

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
)

// The bound of an opener's wait for a closing holder is 1 s (closeWait);
// quick is what an answer that must not wait for it may take.
const (
	bound = time.Second
	quick = bound / 2
)

// makeOpen makes a node on a blockingDevice, open as a clone node's is;
// its Close blocks until the test closes d.release.
func makeOpen(t *testing.T, reg *devnode.Registry, name string) (*devnode.Node, *blockingDevice) {
	t.Helper()
	d := &blockingDevice{closing: make(chan struct{}), release: make(chan struct{})}
	n, err := reg.Make(name, d, true)
	if err != nil {
		t.Fatalf("Make: %v", err)
	}
	return n, d
}

func newReg(t *testing.T) *devnode.Registry {
	reg := devnode.NewRegistry()
	t.Cleanup(func() { reg.Shutdown(context.Background(), nil) })
	return reg
}

// timed runs f and returns how long it took and its error.
func timed(f func() error) (time.Duration, error) {
	start := time.Now()
	err := f()
	return time.Since(start), err
}

// An open that finds the holder closing waits for the holder's close,
// all of it (the device's detach too), and then takes the node.
func TestOpenWaitsForClosingHolder(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	defer n.Rel()
	ctx := context.Background()
	n.Closing()
	if n.Flags()&devnode.FlagClosing == 0 {
		t.Fatalf("flags %b after Closing of an open node, want FlagClosing", n.Flags())
	}
	opened := async(func() error { return n.Open(ctx) })
	notYet(t, opened, "Open of a node whose holder is closing")
	closed := async(func() error { return n.Close(ctx) })
	<-d.closing
	notYet(t, opened, "Open while the holder's Close is detaching")
	close(d.release)
	if err := recv(t, closed, "Close"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := recv(t, opened, "Open"); err != nil {
		t.Fatalf("Open after the closing holder closed = %v, want nil", err)
	}
	if d.overlap.Load() {
		t.Fatalf("device Open was called while its Close was running")
	}
	if f := n.Flags(); f&devnode.FlagOpen == 0 || f&devnode.FlagClosing != 0 {
		t.Fatalf("flags %b after the waiter's Open, want FlagOpen without FlagClosing (the new holder has closed nothing)", f)
	}
	if took, err := timed(func() error { return n.Open(ctx) }); !errors.Is(err, devnode.ErrBusy) || took > quick {
		t.Fatalf("Open of the new holder's node = %v in %v, want ErrBusy at once", err, took)
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// A holder that outlives the wait still holds the node through another
// descriptor: the opener fails with EBUSY once the bound has passed, and
// the openers after it at once, until the holder is closing again.
func TestClosingHolderOutlivesWait(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	close(d.release)
	defer n.Rel()
	ctx := context.Background()
	n.Closing()
	took, err := timed(func() error { return n.Open(ctx) })
	if !errors.Is(err, devnode.ErrBusy) || !errors.Is(err, syscall.EBUSY) || took < bound*9/10 {
		t.Fatalf("Open while the holder stays = %v after %v, want ErrBusy after the %v bound", err, took, bound)
	}
	if f := n.Flags(); f&devnode.FlagOpen == 0 || f&devnode.FlagClosing != 0 {
		t.Fatalf("flags %b after the wait ran out, want FlagOpen without FlagClosing", f)
	}
	if took, err := timed(func() error { return n.Open(ctx) }); !errors.Is(err, devnode.ErrBusy) || took > quick {
		t.Fatalf("next Open = %v in %v, want ErrBusy at once", err, took)
	}
	n.Closing()
	if err := n.TryOpen(ctx); !errors.Is(err, devnode.ErrClosing) {
		t.Fatalf("TryOpen after a new Closing = %v, want ErrClosing", err)
	}
	if d.opens.Load() != 0 {
		t.Fatalf("device opened %d times, want 0", d.opens.Load())
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// TryOpen never waits: ErrClosing (EBUSY) where Open would wait, and the
// holder stays closing for an Open that may.
func TestTryOpenDoesNotWait(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	close(d.release)
	defer n.Rel()
	ctx := context.Background()
	if err := n.TryOpen(ctx); !errors.Is(err, devnode.ErrBusy) {
		t.Fatalf("TryOpen of an open node = %v, want ErrBusy", err)
	}
	n.Closing()
	took, err := timed(func() error { return n.TryOpen(ctx) })
	if !errors.Is(err, devnode.ErrClosing) || !errors.Is(err, syscall.EBUSY) || took > quick {
		t.Fatalf("TryOpen of a node whose holder is closing = %v in %v, want ErrClosing (EBUSY) at once", err, took)
	}
	if n.Flags()&devnode.FlagClosing == 0 {
		t.Fatalf("TryOpen cleared FlagClosing; an Open must still wait")
	}
	opened := async(func() error { return n.Open(ctx) })
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := recv(t, opened, "Open"); err != nil {
		t.Fatalf("Open after the holder closed = %v, want nil", err)
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// The wait ends with EINTR when the opener's context ends (a FUSE
// INTERRUPT), and the holder keeps the node, still closing.
func TestOpenWaitInterrupted(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	close(d.release)
	defer n.Rel()
	n.Closing()
	ctx, cancel := context.WithCancel(context.Background())
	opened := async(func() error { return n.Open(ctx) })
	notYet(t, opened, "Open of a node whose holder is closing")
	cancel()
	took, err := timed(func() error { return recv(t, opened, "interrupted Open") })
	if !errors.Is(err, syscall.EINTR) || took > quick {
		t.Fatalf("Open whose context ended = %v after %v more, want EINTR at once", err, took)
	}
	if f := n.Flags(); f&devnode.FlagOpen == 0 || f&devnode.FlagClosing == 0 {
		t.Fatalf("flags %b after an interrupted wait, want the holder's FlagOpen and FlagClosing kept", f)
	}
	if err := n.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// An opener waiting for a closing holder of a node that starts dying
// gets ENXIO at once, never the dying node.
func TestOpenWaitEndsInDestroy(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	close(d.release)
	defer n.Rel()
	ctx := context.Background()
	n.Closing()
	opened := async(func() error { return n.Open(ctx) })
	notYet(t, opened, "Open of a node whose holder is closing")
	reg.DestroySched(n, "test")
	took, err := timed(func() error { return recv(t, opened, "Open") })
	if !errors.Is(err, devnode.ErrDying) || took > quick {
		t.Fatalf("waiting Open of a node being destroyed = %v after %v more, want ErrDying at once", err, took)
	}
	reg.DrainSched()
	if d.opens.Load() != 0 {
		t.Fatalf("device opened %d times, want 0", d.opens.Load())
	}
}

// Closing concerns only the holder it was told of: ignored on a node
// nobody holds, forgotten when that holder's open ends.
func TestClosingEndsWithItsHolder(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	n := e.lookup(t, "tun0")
	n.Closing()
	if err := n.Open(ctx); err != nil {
		t.Fatalf("Open after Closing of a node nobody held = %v, want nil", err)
	}
	if took, err := timed(func() error { return n.Open(ctx) }); !errors.Is(err, devnode.ErrBusy) || took > quick {
		t.Fatalf("second Open = %v in %v, want ErrBusy at once (Closing of no holder must be ignored)", err, took)
	}
	n.Closing()
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if f := n.Flags(); f&(devnode.FlagOpen|devnode.FlagClosing) != 0 {
		t.Fatalf("flags %b after Close, want neither FlagOpen nor FlagClosing", f)
	}
	if err := n.Open(ctx); err != nil {
		t.Fatalf("Open after Close = %v, want nil", err)
	}
	if took, err := timed(func() error { return n.Open(ctx) }); !errors.Is(err, devnode.ErrBusy) || took > quick {
		t.Fatalf("Open of the next holder's node = %v in %v, want ErrBusy at once (its holder closed nothing)", err, took)
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	n.Rel()
	e.finish(t)
}

// Openers waiting together for one closing holder: exactly one takes
// the node when the holder closes, the others fail with EBUSY at once.
func TestWaitingOpenersOneWins(t *testing.T) {
	reg := newReg(t)
	n, d := makeOpen(t, reg, "x0")
	close(d.release)
	defer n.Rel()
	ctx := context.Background()
	n.Closing()
	const openers = 8
	var wg sync.WaitGroup
	errs := make(chan error, openers)
	for range openers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- n.Open(ctx)
		}()
	}
	time.Sleep(waitShort)
	start := time.Now()
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait()
	if took := time.Since(start); took > quick {
		t.Fatalf("openers returned %v after the holder closed, want at once", took)
	}
	close(errs)
	won := 0
	for err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, devnode.ErrBusy):
			t.Errorf("a losing opener got %v, want ErrBusy", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d openers took the node, want exactly 1", won)
	}
	if d.opens.Load() != 1 {
		t.Fatalf("device opened %d times, want 1", d.opens.Load())
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}
