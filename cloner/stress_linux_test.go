//go:build linux

package cloner

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/vishvananda/netlink"
)

// TestStressWatcherRacesDevicePaths (issue 5, point 6): 8 workers for 10 s
// mix opens (by name and through the clone node), I/O, closes (some
// transient), destroys, `ip link del` and `ip tuntap add` on a few names,
// against the real kernel and the real netlink watch. At the end, once
// quiet: no node without its interface, no tun interface (cdevfs's or an
// administrator's) without its node, every reference count back to the
// registry's one, and the unit count equal to the node count.
func TestStressWatcherRacesDevicePaths(t *testing.T) {
	ltRequireNetns(t)
	duration := 10 * time.Second
	if testing.Short() {
		duration = 2 * time.Second
	}
	b, err := NewLinux(LinuxOptions{Mark: MarkPrefix + "stress"})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	reg := devnode.NewRegistry()
	c := New(Tun, b, reg, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	done := make(chan struct{})
	var watchErrs atomic.Int64
	stopped, err := b.Watch(done, Watcher{Appeared: c.LinkAppeared, Deleted: c.LinkDeleted,
		Error: func(error) { watchErrs.Add(1) }, Known: c.LinkIndexes})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"tun0", "tun1", "tun2", "tun3"}
	var ops [6]atomic.Int64 // open, clone, ip link del, ip tuntap add, destroy, transient close
	ctx := context.Background()
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for time.Now().Before(deadline) {
				name := names[rand.IntN(len(names))]
				switch r := rand.IntN(100); {
				case r < 35: // open by name, I/O, close
					n, err := reg.Lookup(ctx, name)
					if err != nil {
						continue
					}
					if n.Open(ctx) == nil {
						ops[0].Add(1)
						if rand.IntN(4) == 0 {
							n.SetTransient(true)
							ops[5].Add(1)
						}
						if n.Enter() == nil {
							if io, ok := n.Device().(devnode.IO); ok {
								_, _ = io.Read(ctx, buf, true)
							}
							n.Exit()
						}
						_ = n.Close(context.Background())
					}
					n.Rel()
				case r < 45: // open of the clone node
					n, err := reg.Clone(ctx, "tun")
					if err != nil {
						continue
					}
					ops[1].Add(1)
					_ = n.Close(context.Background())
					n.Rel()
				case r < 65: // ip link del
					if exec.Command("ip", "link", "del", name).Run() == nil {
						ops[2].Add(1)
					}
				case r < 85: // ip tuntap add (ip(8) itself: netlink.LinkAdd leaks its fd when
					// the interface is deleted between its TUNSETIFF and TUNSETOWNER)
					if exec.Command("ip", "tuntap", "add", "dev", name, "mode", "tun").Run() == nil {
						ops[3].Add(1)
					}
				default: // destroy (as a transient last close does)
					n, err := reg.Get(name)
					if err != nil {
						continue
					}
					dctx, cancel := context.WithTimeout(ctx, time.Second)
					if n.Destroy(dctx) == nil {
						ops[4].Add(1)
					}
					cancel()
					n.Rel()
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("ops: %d opens, %d clone opens, %d ip link del, %d ip tuntap add, %d destroys, %d transient closes; %d watch errors",
		ops[0].Load(), ops[1].Load(), ops[2].Load(), ops[3].Load(), ops[4].Load(), ops[5].Load(), watchErrs.Load())

	// Quiet now: let the scheduled destroys and the last events land.
	var problems []string
	for try := 0; try < 30; try++ {
		reg.DrainSched()
		time.Sleep(100 * time.Millisecond)
		reg.DrainSched()
		if problems = stressInvariants(t, b, reg, c); len(problems) == 0 {
			break
		}
	}
	if len(problems) > 0 {
		t.Errorf("after the stress, once quiet:\n%s", strings.Join(problems, "\n"))
	}
	close(done)
	<-stopped // no watch callback from here on: the deletions below are ours
	reg.Shutdown(ctx, func() {
		if err := DeleteCreated(b, c); err != nil {
			t.Errorf("DeleteCreated: %v", err)
		}
	})
	for _, l := range stressLinks(t, b) {
		if l.Attrs().Alias == MarkPrefix+"stress" {
			t.Errorf("interface %s made by cdevfs left after shutdown", l.Attrs().Name)
		}
		netlink.LinkDel(l)
	}
}

// stressLinks lists the tun interfaces of the namespace.
func stressLinks(t *testing.T, b *Linux) []netlink.Link {
	t.Helper()
	links, err := b.nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []netlink.Link
	for _, l := range links {
		if _, ok := l.(*netlink.Tuntap); ok {
			out = append(out, l)
		}
	}
	return out
}

// stressInvariants lists what is wrong between the tree and the kernel.
func stressInvariants(t *testing.T, b *Linux, reg *devnode.Registry, c *Cloner) []string {
	var problems []string
	nodes := reg.List()
	byName := make(map[string]*devnode.Node)
	for _, n := range nodes {
		byName[n.Name()] = n
		d, ok := n.Device().(*device)
		if !ok {
			problems = append(problems, fmt.Sprintf("node %s: device %T", n.Name(), n.Device()))
			continue
		}
		if l, err := b.nl.LinkByIndex(d.link.Index()); err != nil || l.Attrs().Name != n.Name() {
			problems = append(problems, fmt.Sprintf("node %s has no interface (ifindex %d: %v)", n.Name(), d.link.Index(), err))
		}
		if r := n.Refs(); r != 1 {
			problems = append(problems, fmt.Sprintf("node %s holds %d references, want the registry's 1", n.Name(), r))
		}
		if f := n.Flags(); f&devnode.FlagOpen != 0 {
			problems = append(problems, fmt.Sprintf("node %s still open (flags %v)", n.Name(), f))
		}
	}
	for _, l := range stressLinks(t, b) {
		n := byName[l.Attrs().Name]
		if n == nil {
			problems = append(problems, fmt.Sprintf("interface %s (alias %q) has no node", l.Attrs().Name, l.Attrs().Alias))
			continue
		}
		if d := n.Device().(*device); d.link.Index() != l.Attrs().Index {
			problems = append(problems, fmt.Sprintf("node %s is ifindex %d, the interface is %d", n.Name(), d.link.Index(), l.Attrs().Index))
		}
	}
	if u := c.UnitsInUse(); u != len(nodes) {
		problems = append(problems, fmt.Sprintf("%d units in use for %d nodes", u, len(nodes)))
	}
	if live := reg.Live(); live != int64(len(nodes)) {
		problems = append(problems, fmt.Sprintf("%d nodes live (made, not released) for %d listed", live, len(nodes)))
	}
	return problems
}
