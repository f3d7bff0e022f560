package devnode_test

import (
	"context"
	"sync"
	"testing"

	"github.com/cdevfs/cdevfs/devnode"
)

// TestObserverLinkingAtMake: a new node is published with the
// attributes its observer's Linking set (a hidden node is never visible
// unhidden), and defaults to root:root 0600 with all three times set.
func TestObserverLinkingAtMake(t *testing.T) {
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil)
	n0, err := reg.Make("x0", &blockingDevice{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer n0.Rel()
	a := n0.Attr()
	if a.Mode != 0600 || a.Uid != 0 || a.Gid != 0 || a.Hidden || a.Ctime.IsZero() || !a.Atime.Equal(a.Ctime) || !a.Mtime.Equal(a.Ctime) {
		t.Errorf("default attributes %+v, want root:root 0600, visible, times set", a)
	}
	var seen []string
	reg.Observe(&observer{linking: func(name string, a *devnode.Attr) {
		seen = append(seen, name) // under the registry's lock: no race
		if name == "x1" {
			a.Mode, a.Gid, a.Hidden = 0660, 20, true
		}
	}})
	n1, err := reg.Make("x1", &blockingDevice{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer n1.Rel()
	if a := n1.Attr(); a.Mode != 0660 || a.Gid != 20 || !a.Hidden {
		t.Errorf("x1 attributes %+v, want Linking's 0660 gid 20 hidden", a)
	}
	if len(seen) != 1 || seen[0] != "x1" {
		t.Errorf("Linking saw %v, want [x1]", seen)
	}
}

// TestUpdateAttrIsAtomic: concurrent read-modify-writes of different
// fields (a chmod and a chown, say) never lose one another.
func TestUpdateAttrIsAtomic(t *testing.T) {
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil)
	n, err := reg.Make("x0", &blockingDevice{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Rel()
	var wg sync.WaitGroup
	const rounds = 1000
	for _, f := range []func(*devnode.Attr){
		func(a *devnode.Attr) { a.Uid++ },
		func(a *devnode.Attr) { a.Gid++ },
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				n.UpdateAttr(f)
			}
		}()
	}
	wg.Wait()
	if a := n.Attr(); a.Uid != rounds || a.Gid != rounds {
		t.Errorf("uid %d gid %d, want %d each", a.Uid, a.Gid, rounds)
	}
}
