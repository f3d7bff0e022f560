package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// requireFuse skips a test that needs a real FUSE mount where it cannot
// run, but fails it in CI, where it must.
func requireFuse(t *testing.T) {
	t.Helper()
	var why error
	if os.Geteuid() != 0 {
		why = errors.New("not root")
	} else if _, err := os.Stat("/dev/fuse"); err != nil {
		why = err
	}
	if why != nil {
		testenv.Unavailable(t, "FUSE", why)
	}
}

// TestInvalidationDuringLookupDoesNotDeadlock: the kernel handles an
// INVAL_ENTRY under the directory's lock, which a LOOKUP in flight holds
// until it is answered. Here a LOOKUP of tun7 is held in the daemon (its
// clone is blocked) while a destroy queues the invalidation of another
// name; once the clone goes on, the LOOKUP must be answered: the blocked
// invalidation must not keep replies from being written.
func TestInvalidationDuringLookupDoesNotDeadlock(t *testing.T) {
	requireFuse(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	fake := cloner.NewFake()
	entered, release := make(chan struct{}), make(chan struct{})
	fake.FailCreate = func(name string) error {
		if name == "tun7" {
			close(entered)
			<-release
		}
		return nil
	}
	cloner.New(cloner.Tun, fake, reg, 0, quiet)
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(t), quiet)
	dir := t.TempDir()
	m, err := New(dir, root, MountOptions{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		reg.Shutdown(context.Background(), nil)
		m.Close()
	}()
	// dev0 is made without a cloner, so destroying it needs no cloner lock.
	dev0, err := reg.Make("dev0", &loopDev{}, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dev0")); err != nil {
		t.Fatal(err)
	}

	// The LOOKUP runs in a child, so that it can be killed (which ends
	// the request and frees the directory) if the daemon is stuck.
	stat := exec.Command("stat", filepath.Join(dir, "tun7"))
	if err := stat.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- stat.Wait() }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		stat.Process.Kill()
		<-exited
		t.Fatal("the LOOKUP of tun7 never reached the cloner")
	}
	if err := dev0.Destroy(context.Background()); err != nil {
		t.Fatal(err)
	}
	dev0.Rel()
	time.Sleep(100 * time.Millisecond) // the invalidation of dev0 now waits in the kernel for the directory
	close(release)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("stat tun7: %v, want success", err)
		}
	case <-time.After(5 * time.Second):
		// The LOOKUP was read by the daemon, so no signal ends it: only
		// aborting the connection frees the kernel and this process.
		abortFuse(t, st.Dev)
		<-exited
		t.Fatal("deadlock: the LOOKUP of tun7 was not answered within 5s of its clone going on")
	}
	if _, err := os.Stat(filepath.Join(dir, "dev0")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat dev0 after its destroy: %v, want ENOENT", err)
	}
}

// abortFuse aborts the FUSE connection of the mount whose device is dev,
// through the fusectl filesystem: the way out of a deadlocked mount that
// no signal can end.
func abortFuse(t *testing.T, dev uint64) {
	abort := filepath.Join(fusectl(t), fmt.Sprint(unix.Minor(dev)), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Logf("abort the FUSE connection: %v", err)
	}
}

// fuseWaiting is the number of requests the FUSE connection of the mount
// whose device is dev has sent and not had answered (fusectl's waiting;
// ctl is where fusectl is).
func fuseWaiting(t *testing.T, ctl string, dev uint64) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(ctl, fmt.Sprint(unix.Minor(dev)), "waiting"))
	if err != nil {
		t.Fatalf("the connection's count of waiting requests: %v", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("fusectl's waiting: %v", err)
	}
	return n
}

// fusectl is where the fusectl filesystem is: /sys/fs/fuse/connections,
// or a mount of it made here for the test if nothing is mounted there.
func fusectl(t *testing.T) string {
	ctl := "/sys/fs/fuse/connections"
	if entries, err := os.ReadDir(ctl); err == nil && len(entries) > 0 {
		return ctl
	}
	ctl = t.TempDir()
	if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil {
		t.Logf("mount fusectl: %v", err)
		return ctl
	}
	t.Cleanup(func() { unix.Unmount(ctl, unix.MNT_DETACH) })
	return ctl
}

// TestFirstRequestsAfterInit: requests the kernel holds until INIT is
// answered reach the daemon the moment the reply is written. Under the
// race detector, the reader that serves one must see what go-fuse learnt
// from INIT through the Go memory model, not only through the kernel's
// ordering. Each mount has stats of its root waiting for INIT.
func TestFirstRequestsAfterInit(t *testing.T) {
	requireFuse(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	const mounts, statters = 50, 4
	served := 0 // stats answered by a mount
	for range mounts {
		reg := devnode.NewRegistry()
		cloner.New(cloner.Tun, cloner.NewFake(), reg, 0, quiet)
		root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(t), quiet)
		dir := t.TempDir()
		var under unix.Stat_t
		if err := unix.Stat(dir, &under); err != nil {
			t.Fatal(err)
		}
		var stop atomic.Bool
		done := make(chan int)
		for range statters {
			go func() {
				n := 0
				for !stop.Load() {
					var st unix.Stat_t
					if unix.Stat(dir, &st) == nil && st.Dev != under.Dev {
						n++
					}
				}
				done <- n
			}()
		}
		m, err := New(dir, root, MountOptions{Log: quiet})
		stop.Store(true)
		for range statters {
			served += <-done
		}
		reg.Shutdown(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		m.Close()
	}
	if served == 0 {
		t.Errorf("no stat reached any of %d mounts: the test raced nothing", mounts)
	}
}
