package cloner

import (
	"context"
	"slices"
	"syscall"
	"testing"

	"github.com/cdevfs/cdevfs/bsdtun"
	"github.com/cdevfs/cdevfs/devnode"
)

// LinkAppeared gives a node to a tun/tap of the cloner's kind and name
// that has none, and to nothing else (table of what the watch can see).
func TestLinkAppearedAdoptsOnlyItsOwnKind(t *testing.T) {
	cases := []struct {
		name    string
		kind    Kind
		owner   Owner
		tuntap  bool
		adopted bool
	}{
		{"tun7", Tun, OwnerNone, true, true},   // ip tuntap add dev tun7 mode tun
		{"tun7", Tun, OwnerSelf, true, true},   // left by a killed cdevfs of this mountpoint
		{"tun7", Tun, OwnerOther, true, false}, // another cdevfs's
		{"tun7", Tap, OwnerNone, true, false},  // a tap named like a tun
		{"tun7", Tun, OwnerNone, false, false}, // another driver (ifb, dummy)
		{"tun07", Tun, OwnerNone, true, false}, // not a unit name
		{"tun", Tun, OwnerNone, true, false},   // the clone node's name
		{"foo0", Tun, OwnerNone, true, false},
	}
	for _, tc := range cases {
		t.Run(tc.name+"/"+tc.kind.Prefix()+"/"+map[Owner]string{OwnerNone: "none", OwnerSelf: "self", OwnerOther: "other"}[tc.owner], func(t *testing.T) {
			e := newFakeEnv(t, 0)
			info := e.fake.AddExternal(tc.name, tc.kind, tc.owner)
			info.TunTap = tc.tuntap
			e.c.LinkAppeared(info)
			e.c.LinkAppeared(info) // events repeat: still one node
			got := slices.Contains(e.names(), tc.name)
			if got != tc.adopted {
				t.Fatalf("node for %s after LinkAppeared: %v, want %v (nodes %v)", tc.name, got, tc.adopted, e.names())
			}
			if want := map[bool]int{true: 1, false: 0}[tc.adopted]; e.c.UnitsInUse() != want {
				t.Errorf("units in use = %d, want %d", e.c.UnitsInUse(), want)
			}
		})
	}
}

// An adopted foreign interface survives its node's destroy and the
// cloner refuses to make it transient; one left by our own daemon is
// deleted like one we made.
func TestAdoptedForeignInterfaceIsNeverDeleted(t *testing.T) {
	e := newFakeEnv(t, 0)
	e.c.LinkAppeared(e.fake.AddExternal("tun7", Tun, OwnerNone))
	e.c.LinkAppeared(e.fake.AddExternal("tun8", Tun, OwnerSelf))
	ctx := context.Background()
	for _, name := range []string{"tun7", "tun8"} {
		n, err := e.reg.Get(name)
		if err != nil {
			t.Fatalf("Get(%s) = %v, want the adopted node", name, err)
		}
		if err := n.Open(ctx); err != nil {
			t.Fatalf("Open(%s) = %v", name, err)
		}
		in := []byte{1, 0, 0, 0}
		err = n.Device().(devnode.Ioctler).Ioctl(ctx, bsdtun.TUNSTRANSIENT, 1, in, nil)
		if want := map[string]error{"tun7": syscall.EPERM, "tun8": nil}[name]; err != want {
			t.Errorf("TUNSTRANSIENT on %s = %v, want %v", name, err, want)
		}
		n.SetTransient(false)
		if err := n.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := n.Destroy(ctx); err != nil {
			t.Fatal(err)
		}
		n.Rel()
	}
	if !e.fake.Exists("tun7") {
		t.Error("the administrator's tun7 was deleted with its node")
	}
	if e.fake.Exists("tun8") {
		t.Error("tun8, ours from before a crash, outlived its destroy")
	}
	if v := e.fake.Violations(); len(v) > 0 {
		t.Errorf("fd discipline: %v", v)
	}
}

// The watch's race with a destroy: `ip link del tun1` then `ip tuntap add
// dev tun1` while tun1's node is still being destroyed. The new
// interface's event finds the unit taken and is ignored; the destroy,
// once it frees the unit, looks the name up again and adopts it.
func TestInterfaceAddedDuringDestroyIsAdopted(t *testing.T) {
	e := newFakeEnv(t, 0)
	ctx := context.Background()
	n, err := e.reg.Lookup(ctx, "tun1")
	if err != nil {
		t.Fatal(err)
	}
	old := n.Device().(*device).link.Index()
	n.Rel()
	hold, held := make(chan struct{}), make(chan struct{})
	e.reg.SetDestroyHook(func(*devnode.Node) {
		close(held)
		<-hold
	})
	e.fake.DeleteExternal("tun1")
	e.c.LinkDeleted(old)
	<-held // the destroy has drained and waits before freeing the unit
	info := e.fake.AddExternal("tun1", Tun, OwnerNone)
	e.c.LinkAppeared(info)
	close(hold)
	e.reg.DrainSched()
	e.reg.SetDestroyHook(func(*devnode.Node) {})
	n, err = e.reg.Get("tun1")
	if err != nil {
		t.Fatalf("Get(tun1) after the destroy = %v, want the node of the new interface", err)
	}
	defer n.Rel()
	if got := n.Device().(*device).link.Index(); got != info.Index {
		t.Errorf("tun1's node is ifindex %d, want the new interface's %d", got, info.Index)
	}
}
