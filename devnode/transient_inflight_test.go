package devnode_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
)

// TestTransientCloseReturnsWhileOperationDrains: the last close of a
// transient node returns at once although another operation on the node
// is still in flight (held open here by Enter without Exit); the node is
// dying at once (opens fail with ENXIO), and the deferred destroy finishes
// only after that operation exits (docs/design.md, "last close of a
// transient node").
func TestTransientCloseReturnsWhileOperationDrains(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	n := e.lookup(t, "tun6")
	if err := n.Open(ctx); err != nil {
		t.Fatalf("Open: %v", err)
	}
	n.SetTransient(true)
	if err := n.Enter(); err != nil { // an operation in flight: a blocked read, say
		t.Fatalf("Enter: %v", err)
	}
	closed := async(func() error { return n.Close(context.Background()) })
	if err := recv(t, closed, "transient Close with an operation in flight (must not wait)"); err != nil {
		t.Fatalf("Close = %v, want nil", err)
	}
	if err := n.Open(ctx); !errors.Is(err, devnode.ErrDying) {
		t.Fatalf("Open after the transient close = %v, want ErrDying (ENXIO)", err)
	}
	select {
	case <-n.Destroyed():
		t.Fatal("destroy finished while an operation was still in flight")
	case <-time.After(100 * time.Millisecond):
	}
	n.Exit()
	select {
	case <-n.Destroyed():
	case <-time.After(5 * time.Second):
		t.Fatal("destroy did not finish after the operation exited")
	}
	n.Rel() // the lookup's reference
	e.reg.DrainSched()
}
