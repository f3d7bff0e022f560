package fs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// setURing needs a FUSE mount, and sets the fuse module's enable_uring to
// v ("Y" or "N") for the test (testenv.SetURing).
func setURing(t *testing.T, v string) {
	t.Helper()
	requireFuse(t)
	testenv.SetURing(t, v)
}

// fakeMount mounts a tree of tun nodes over the fake backend at a
// temporary directory, unmounted and closed when the test ends.
func fakeMount(t *testing.T, mode IOURing) (string, *cloner.Fake, *Mount, error) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	fake := cloner.NewFake()
	cloner.New(cloner.Tun, fake, reg, 0, quiet)
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, quiet)
	dir := t.TempDir()
	m, err := New(dir, root, MountOptions{Log: quiet, IOURing: mode})
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		return dir, fake, nil, err
	}
	t.Cleanup(func() {
		reg.Shutdown(context.Background(), nil)
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		m.Close()
	})
	return dir, fake, m, nil
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestURingCarriesRequests: with enable_uring on, a mount's requests go
// through its io_uring queues (and are answered right): lookups,
// listings, clones, packets both ways, and more blocking reads at once
// than a queue has entries to begin with, each answered when its packet
// comes. Unmounting leaves no fd behind.
func TestURingCarriesRequests(t *testing.T) {
	setURing(t, "Y")
	fds := openFDs(t)
	t.Run("mounted", func(t *testing.T) {
		dir, fake, m, err := fakeMount(t, IOURingOn)
		if err != nil {
			t.Fatalf("mount with io_uring on: %v", err)
		}
		if m.t.uring.Load() == nil {
			t.Fatal("mounted without io_uring queues")
		}
		before := m.t.ringServed()
		names, err := os.ReadDir(dir)
		if err != nil {
			t.Fatalf("list the mount: %v", err)
		}
		if !slices.ContainsFunc(names, func(e os.DirEntry) bool { return e.Name() == "tun" }) {
			t.Errorf("listing: %v, want tun in it", names)
		}
		if after := m.t.ringServed(); after <= before {
			t.Fatalf("a listing was not answered through the ring (%d requests before, %d after)", before, after)
		}

		// More blocked readers than entries, spread over the queues.
		nq := len(m.t.uring.Load().queues)
		n := 2*ringEntries*nq + 3
		fdsOf := make([]int, n)
		for i := range n {
			fd, err := unix.Open(filepath.Join(dir, "tun"), unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatalf("open clone node #%d: %v", i, err)
			}
			fdsOf[i] = fd
			defer unix.Close(fd)
		}
		var wg sync.WaitGroup
		got := make([]string, n)
		errs := make([]error, n)
		for i, fd := range fdsOf {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 2048)
				k, err := unix.Read(fd, b)
				for err == unix.EINTR { // the runtime's preemption signal interrupts the FUSE read
					k, err = unix.Read(fd, b)
				}
				got[i], errs[i] = string(b[:max(k, 0)]), err
			}()
		}
		time.Sleep(200 * time.Millisecond) // every read blocks, each holding an entry
		held, kicks := 0, []int32{}
		for _, uq := range m.t.uring.Load().queues {
			held += int(uq.entries.Load())
			kicks = append(kicks, uq.kicks.Load())
		}
		// A known limit (README, "FUSE over io_uring"): a burst of
		// blocking reads can leave some waiting in the kernel's queue
		// list, which kicks only partly drain; they are fetched when a
		// request on their queue is answered (the packets below).
		if held < n+ringMinWaiting {
			t.Logf("known limit: %d entries with %d reads blocked (kicks %v): about %d reads still in the kernel's queue list", held, n, kicks, n+ringMinWaiting-held)
		}
		for i := range n {
			if err := fake.Inject(fmt.Sprintf("tun%d", i), []byte(fmt.Sprintf("packet %d", i))); err != nil {
				t.Fatal(err)
			}
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("blocked reads not answered 10 s after their packets came")
		}
		for i := range n {
			if want := fmt.Sprintf("packet %d", i); errs[i] != nil || got[i] != want {
				t.Errorf("read on tun%d: %q, %v; want %q", i, got[i], errs[i], want)
			}
		}
		for _, fd := range fdsOf {
			if k, err := unix.Write(fd, []byte("an outgoing packet")); err != nil || k != 18 {
				t.Errorf("write: %d, %v; want 18", k, err)
			}
		}
	})
	if now := openFDs(t); now != fds {
		t.Errorf("%d fds open after unmount, %d before", now, fds)
	}
}

// TestURingModes: off (the default) never asks for io_uring; with
// enable_uring off, auto serves over /dev/fuse and on refuses to mount,
// saying why; with it on, auto takes it.
func TestURingModes(t *testing.T) {
	if (MountOptions{}).IOURing != IOURingOff {
		t.Errorf("the default mode is %v, want off", (MountOptions{}).IOURing)
	}
	setURing(t, "N")
	if _, _, m, err := fakeMount(t, IOURingAuto); err != nil || m.t.uring.Load() != nil {
		t.Errorf("auto with enable_uring=N: %v; want a mount over /dev/fuse", err)
	}
	_, _, _, err := fakeMount(t, IOURingOn)
	if err == nil || !strings.Contains(err.Error(), "enable_uring=N") {
		t.Errorf("on with enable_uring=N: %v; want an error naming enable_uring", err)
	}
	setURing(t, "Y")
	if _, _, m, err := fakeMount(t, IOURingOff); err != nil || m.t.uring.Load() != nil {
		t.Errorf("off with enable_uring=Y: %v; want a mount over /dev/fuse", err)
	}
	if _, _, m, err := fakeMount(t, IOURingAuto); err != nil || m.t.uring.Load() == nil {
		t.Errorf("auto with enable_uring=Y: %v; want a mount over io_uring", err)
	}
}

// TestRemountSameRootListsOnce: auto mode's fallback mounts the same root
// a second time (when the io_uring queues fail after INIT); its listing
// must not show the static nodes twice.
func TestRemountSameRootListsOnce(t *testing.T) {
	requireFuse(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil)
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, quiet)
	for round := range 2 {
		dir := t.TempDir()
		m, err := New(dir, root, MountOptions{Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		names, err := os.ReadDir(dir)
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, e := range names {
			if seen[e.Name()] {
				t.Errorf("mount %d of the same root lists %s twice", round+1, e.Name())
			}
			seen[e.Name()] = true
		}
	}
}
