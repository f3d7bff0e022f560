package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/transport/uring"
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
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(t), quiet)
	mx := metrics.New(func() (int, int, int) { return 0, 0, 0 })
	dir, m, err := mountTree(t, reg, root, MountOptions{Log: quiet, IOURing: mode, Metrics: mx})
	return dir, fake, m, err
}

// metricValue is the value of the sample name (with its labels, as the
// exposition format writes them) that m's metrics serve, 0 if none.
func metricValue(t *testing.T, m *Mount, name string) float64 {
	t.Helper()
	for _, line := range strings.Split(scrapeMetrics(t, m.root.metrics), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", name, err)
			}
			return f
		}
	}
	return 0
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
		dir, _, m, err := fakeMount(t, IOURingOn)
		if err != nil {
			t.Fatalf("mount with io_uring on: %v", err)
		}
		if m.rings.Load() == nil {
			t.Fatal("mounted without io_uring queues")
		}
		const served = "cdevfs_fuse_ring_requests_total"
		before := metricValue(t, m, served)
		names, err := os.ReadDir(dir)
		if err != nil {
			t.Fatalf("list the mount: %v", err)
		}
		if !slices.ContainsFunc(names, func(e os.DirEntry) bool { return e.Name() == "tun" }) {
			t.Errorf("listing: %v, want tun in it", names)
		}
		if after := metricValue(t, m, served); after <= before {
			t.Fatalf("a listing was not answered through the ring (%v requests before, %v after)", before, after)
		}

		// More blocked readers than entries, spread over the queues, in
		// a burst: every read must reach the daemon, none left in the
		// kernel's queue list behind entries that blocked reads hold
		// (docs/transport.md, "Stranded requests and kicks").
		nq := m.rings.Load().Queues()
		for _, n := range []int{2*uring.Entries*nq + 3, 8*uring.Entries*nq + 3} {
			t.Run(fmt.Sprintf("%d blocked reads", n), func(t *testing.T) {
				blockedReadsReachDaemon(t, n)
			})
		}
	})
	if now := openFDs(t); now != fds {
		t.Errorf("%d fds open after unmount, %d before", now, fds)
	}
}

// blockedReadsReachDaemon blocks n reads at once on n clones of a fresh
// mount (the fake's devices have no fd, so each READ is handed off and
// holds its entry), checks that the daemon holds every one, then answers
// them with packets.
func blockedReadsReachDaemon(t *testing.T, n int) {
	t.Helper()
	dir, fake, m, err := fakeMount(t, IOURingOn)
	if err != nil {
		t.Fatalf("mount with io_uring on: %v", err)
	}
	b := openBurst(t, dir, n)
	b.start()
	deadline := time.Now().Add(5 * time.Second)
	for m.rings.Load().Held() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if h := m.rings.Load().Held(); h < n {
		kicks, _ := ringKicks(t, m)
		t.Errorf("the daemon holds %d of %d blocked reads 5 s after they were made (%d kicks answered): %d stranded in the kernel's queue list, want none", h, n, kicks, n-h)
	}
	// The kicks' round ends once nothing is left in the list.
	kicksSettle(t, m)
	if err := unix.Statfs(dir, new(unix.Statfs_t)); err != nil {
		t.Errorf("statfs of the mount after kick rounds: %v; want go-fuse's answer, not a kick's", err)
	}
	b.answer(t, fake)
}

// TestURingKickThatMissesEndsRound: a kick that cannot reach its queue
// (here the mountpoint leads elsewhere after a lazy unmount, as when the
// daemon may not run on the queue's CPU) ends its round instead of
// leaving it open, and the reads stranded for want of kicks are answered
// all the same once packets come and their queue commits again.
func TestURingKickThatMissesEndsRound(t *testing.T) {
	setURing(t, "Y")
	dir, fake, m, err := fakeMount(t, IOURingOn)
	if err != nil {
		t.Fatalf("mount with io_uring on: %v", err)
	}
	n := 2*uring.Entries*m.rings.Load().Queues() + 3
	b := openBurst(t, dir, n)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	b.start()
	deadline := time.Now().Add(5 * time.Second)
	for _, missed := ringKicks(t, m); missed == 0 && time.Now().Before(deadline); _, missed = ringKicks(t, m) {
		time.Sleep(10 * time.Millisecond)
	}
	if kicks, missed := ringKicks(t, m); missed == 0 || kicks != 0 {
		t.Errorf("kicks answered %d, missed %d after a lazy unmount; want none answered, some missed", kicks, missed)
	}
	kicksSettle(t, m)
	b.answer(t, fake)
}

// ringKicks gives the kicks the mount's queues answered and the kicks
// that missed, as the metrics count them.
func ringKicks(t *testing.T, m *Mount) (answered, missed int) {
	t.Helper()
	return int(metricValue(t, m, `cdevfs_fuse_ring_kicks_total{result="answered"}`)),
		int(metricValue(t, m, `cdevfs_fuse_ring_kicks_total{result="missed"}`))
}

// kicksSettle fails the test unless the queues stop sending kicks within
// 2 s: a round of kicks ends.
func kicksSettle(t *testing.T, m *Mount) {
	t.Helper()
	last, lastMissed := ringKicks(t, m)
	for settled := time.Now().Add(2 * time.Second); ; {
		time.Sleep(100 * time.Millisecond)
		kicks, missed := ringKicks(t, m)
		if kicks == last && missed == lastMissed {
			return
		}
		if time.Now().After(settled) {
			t.Errorf("kicks answered went from %d to %d (missed from %d to %d) in the last 100 ms, 2 s after the burst: a round of kicks that does not end", last, kicks, lastMissed, missed)
			return
		}
		last, lastMissed = kicks, missed
	}
}

// burst is n reads, each on a clone of its own (tun0 to tunN-1), made
// at once.
type burst struct {
	fds   []int
	got   []string
	errs  []error
	wg    sync.WaitGroup
	start func()
}

// openBurst opens the clones and readies the reads; start makes them.
func openBurst(t *testing.T, dir string, n int) *burst {
	t.Helper()
	b := &burst{fds: make([]int, n), got: make([]string, n), errs: make([]error, n)}
	for i := range n {
		fd, err := unix.Open(filepath.Join(dir, "tun"), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open clone node #%d: %v", i, err)
		}
		b.fds[i] = fd
		t.Cleanup(func() { unix.Close(fd) })
	}
	begin := make(chan struct{})
	b.start = sync.OnceFunc(func() { close(begin) })
	for i, fd := range b.fds {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			buf := make([]byte, 2048)
			<-begin
			k, err := unix.Read(fd, buf)
			for err == unix.EINTR { // the runtime's preemption signal interrupts the FUSE read
				k, err = unix.Read(fd, buf)
			}
			b.got[i], b.errs[i] = string(buf[:max(k, 0)]), err
		}()
	}
	t.Cleanup(b.start) // a test that stops early must not leave them waiting
	return b
}

// answer sends each read its packet and checks that every one gets it,
// then that each clone still takes a write.
func (b *burst) answer(t *testing.T, fake *cloner.Fake) {
	t.Helper()
	for i := range b.fds {
		if err := fake.Inject(fmt.Sprintf("tun%d", i), []byte(fmt.Sprintf("packet %d", i))); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("blocked reads not answered 10 s after their packets came")
	}
	for i := range b.fds {
		if want := fmt.Sprintf("packet %d", i); b.errs[i] != nil || b.got[i] != want {
			t.Errorf("read on tun%d: %q, %v; want %q", i, b.got[i], b.errs[i], want)
		}
	}
	for _, fd := range b.fds {
		if k, err := unix.Write(fd, []byte("an outgoing packet")); err != nil || k != 18 {
			t.Errorf("write: %d, %v; want 18", k, err)
		}
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
	if _, _, m, err := fakeMount(t, IOURingAuto); err != nil || m.rings.Load() != nil {
		t.Errorf("auto with enable_uring=N: %v; want a mount over /dev/fuse", err)
	}
	_, _, _, err := fakeMount(t, IOURingOn)
	if err == nil || !strings.Contains(err.Error(), "enable_uring=N") {
		t.Errorf("on with enable_uring=N: %v; want an error naming enable_uring", err)
	}
	setURing(t, "Y")
	if _, _, m, err := fakeMount(t, IOURingOff); err != nil || m.rings.Load() != nil {
		t.Errorf("off with enable_uring=Y: %v; want a mount over /dev/fuse", err)
	}
	if _, _, m, err := fakeMount(t, IOURingAuto); err != nil || m.rings.Load() == nil {
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
	root := NewRoot(reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(t), quiet)
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

// TestMountDoneWhenServingEnds: Done is closed, with Err nil, when the
// mount is unmounted under its owner (over /dev/fuse and over io_uring),
// and with the failure when an io_uring queue's ring fails, whose CPU's
// requests nothing would answer; the owner's Unmount and Close then end
// everything, and a request made after them fails instead of hanging.
func TestMountDoneWhenServingEnds(t *testing.T) {
	setURing(t, "Y")
	waitDone := func(t *testing.T, m *Mount, why string) {
		t.Helper()
		select {
		case <-m.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("Done still open 5 s after %s; want it closed", why)
		}
	}
	for _, mode := range []IOURing{IOURingOff, IOURingOn} {
		t.Run("unmounted/"+iouringNames[mode], func(t *testing.T) {
			dir, _, m, err := fakeMount(t, mode)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-m.Done():
				t.Fatal("Done closed on a mount being served")
			default:
			}
			if _, err := os.Stat(filepath.Join(dir, "tun0")); err != nil {
				t.Fatal(err)
			}
			if err := unix.Unmount(dir, 0); err != nil {
				t.Fatal(err)
			}
			waitDone(t, m, "an unmount")
			if err := m.Err(); err != nil {
				t.Errorf("Err after an unmount = %v, want nil", err)
			}
		})
	}
	t.Run("ring failed", func(t *testing.T) {
		// fd is held open across the failure: the unmount is then a lazy
		// one, and the mount's files still reach the connection. It is
		// closed after the mount's own cleanup (cleanups run last first),
		// whose Close aborts the connection: a close of it sends a FLUSH,
		// which on queue 0's CPU would otherwise wait for ever if this
		// test fails.
		fd := -1
		t.Cleanup(func() {
			if fd >= 0 {
				unix.Close(fd)
			}
		})
		dir, _, m, err := fakeMount(t, IOURingOn)
		if err != nil {
			t.Fatal(err)
		}
		fd, err = unix.Open(filepath.Join(dir, "tun0"), unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		dev := breakRings(t, m)
		// What the daemon does next (its shutdown's unmount and Close), then
		// a request from queue 0's CPU on the file still open: it must
		// fail, not wait for a queue that is gone.
		unmountAndClose(t, m, dev, "a ring failure")
		res := onCPU0(func() error {
			_, err := unix.Read(fd, make([]byte, 2048))
			return err
		})
		select {
		case err := <-res:
			if err != unix.ENOTCONN && err != unix.ECONNABORTED {
				t.Errorf("a read after the failed mount was closed = %v, want ENOTCONN or ECONNABORTED", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a read from CPU 0 still waiting 5 s after the failed mount was closed")
		}
	})
	t.Run("ring failed under a lookup", func(t *testing.T) {
		// A LOOKUP the kernel put on the failed queue holds the root's
		// lock until the connection ends, and an entry invalidation of
		// the root waits for that lock: Unmount, which waits for the
		// invalidation, must end the connection first (MNT_FORCE).
		dir, _, m, err := fakeMount(t, IOURingOn)
		if err != nil {
			t.Fatal(err)
		}
		dev := breakRings(t, m)
		// Until the kernel has cancelled the failed ring's entries, a
		// request may still be given one, and ends with ECANCELED when
		// it cannot be sent: the LOOKUP is made again until it waits.
		ctl := fusectl(t)
		var lookup <-chan error
		for try := 0; lookup == nil; try++ {
			if try == 50 {
				t.Fatal("a LOOKUP of tun7 from CPU 0 never waited on the failed queue: each ended with ECANCELED")
			}
			waiting0 := fuseWaiting(t, ctl, dev)
			l := onCPU0(func() error {
				var ts unix.Stat_t
				return unix.Stat(filepath.Join(dir, "tun7"), &ts)
			})
			select {
			case err := <-l:
				if err != unix.ECANCELED {
					t.Fatalf("the LOOKUP of tun7 from CPU 0 on a failed queue = %v, want it to wait", err)
				}
				continue
			case <-time.After(200 * time.Millisecond):
			}
			if n := fuseWaiting(t, ctl, dev); n <= waiting0 {
				t.Fatalf("a LOOKUP on the failed queue is not counted as waiting (%d, %d before)", n, waiting0)
			}
			lookup = l
		}
		m.inval.entry("tun1")
		var fuseFD int
		rc, err := m.conn.Dev().SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) { fuseFD = int(fd) })
		if !writingTo(fuseFD) {
			t.Fatal("the invalidation of tun1 is not waiting in write(2) on /dev/fuse 5 s after it was queued; want it waiting for the root's lock")
		}
		unmountAndClose(t, m, dev, "a ring failure, with a LOOKUP on the failed queue and an invalidation waiting for it")
		select {
		case err := <-lookup:
			if err != unix.ENOTCONN && err != unix.ECONNABORTED {
				t.Errorf("the LOOKUP on the failed queue ended with %v, want ENOTCONN or ECONNABORTED", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the LOOKUP on the failed queue still waiting 5 s after the mount was closed")
		}
	})
}

// unmountAndClose does what the daemon's shutdown does with m (Unmount,
// then Close) and fails if that takes more than 10 s (after names what
// came before, for the message). It then aborts the mount's connection
// (device dev), the only way out, so that the test's cleanups can run.
func unmountAndClose(t *testing.T, m *Mount, dev uint64, after string) {
	t.Helper()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		m.Close()
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		abortFuse(t, dev)
		select {
		case <-closed:
			t.Fatalf("Unmount and Close not done 10 s after %s (done once the connection was aborted)", after)
		case <-time.After(10 * time.Second):
			t.Fatalf("Unmount and Close not done 10 s after %s, nor 10 s after the connection was aborted", after)
		}
	}
}

// breakRings breaks the rings of the mount's io_uring queues as a ring
// can break, with no help from the daemon: each ring's fd is replaced by
// /dev/null (dup2), so that the next io_uring_enter of its queue fails
// (EOPNOTSUPP), and the ring itself goes once the enter waiting in it
// returns. A request from CPU 0 wakes queue 0 to that enter, and the
// test checks that the mount says so. It returns the mount's device
// (taken before: a stat from CPU 0 could wait on the failed queue).
func breakRings(t *testing.T, m *Mount) (dev uint64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(m.dir, &st); err != nil {
		t.Fatal(err)
	}
	null, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(null)
	rings := ringFDs(t)
	if len(rings) != m.rings.Load().Queues() {
		t.Fatalf("%d io_uring fds serve /dev/fuse, want one per queue (%d)", len(rings), m.rings.Load().Queues())
	}
	for _, fd := range rings {
		if err := unix.Dup3(null, fd, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	onCPU0(func() error { return unix.Statfs(m.dir, new(unix.Statfs_t)) }) // ends when the connection does
	select {
	case <-m.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done still open 5 s after queue 0's ring broke; want it closed")
	}
	if err := m.Err(); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("Err after a ring failure = %v, want it to wrap EOPNOTSUPP (io_uring_enter of a file that is no ring)", err)
	}
	return st.Dev
}

// ringFDs are this process's io_uring fds that hold /dev/fuse as a
// registered file (fdinfo's UserFiles): the queues' rings.
func ringFDs(t *testing.T) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:[io_uring]" {
			continue
		}
		info, _ := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if strings.Contains(string(info), "/dev/fuse") {
			fds = append(fds, fd)
		}
	}
	return fds
}

// writingTo waits up to 5 s for a thread of this process to be in
// write(2) on fd, and reports whether one is.
func writingTo(fd int) bool {
	want := fmt.Sprintf("%d 0x%x ", unix.SYS_WRITE, fd)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		tasks, _ := os.ReadDir("/proc/self/task")
		for _, task := range tasks {
			if b, _ := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall"); strings.HasPrefix(string(b), want) {
				return true
			}
		}
	}
	return false
}

// onCPU0 runs f on a thread of its own pinned to CPU 0, so that the
// requests f makes go to io_uring queue 0, and sends what f returns.
func onCPU0(f func() error) <-chan error {
	res := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread ends with the goroutine
		var set unix.CPUSet
		set.Set(0)
		_ = unix.SchedSetaffinity(0, &set)
		res <- f()
	}()
	return res
}

// TestUnmountLeavesOtherMounts: Unmount acts on the mount's own mount
// only. A tmpfs mounted over the mountpoint is left alone, healthy or
// with its io_uring queues failed (where Unmount forces: MNT_FORCE acts
// on whatever is topmost); Unmount says what covers it, and unmounts
// once that is gone.
func TestUnmountLeavesOtherMounts(t *testing.T) {
	setURing(t, "Y")
	for _, tc := range []struct {
		name   string
		mode   IOURing
		broken bool
	}{
		{"devfuse", IOURingOff, false},
		{"io_uring", IOURingOn, false},
		{"io_uring failed", IOURingOn, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, _, m, err := fakeMount(t, tc.mode)
			if err != nil {
				t.Fatal(err)
			}
			if tc.broken {
				breakRings(t, m)
			}
			if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
				t.Fatal(err)
			}
			covered := true
			defer func() {
				if covered {
					unix.Unmount(dir, unix.MNT_DETACH)
				}
			}()
			err = m.Unmount()
			if err == nil || !strings.Contains(err.Error(), "tmpfs") {
				t.Errorf("Unmount under a tmpfs = %v, want an error naming the tmpfs over it", err)
			}
			if fstype, _ := mountAt(dir); fstype != "tmpfs" {
				t.Fatalf("after Unmount the topmost mount at the mountpoint is %q, want the tmpfs left alone", fstype)
			}
			if err := unix.Unmount(dir, 0); err != nil {
				t.Fatal(err)
			}
			covered = false
			if err := m.Unmount(); err != nil {
				t.Errorf("Unmount once uncovered: %v", err)
			}
			if fstype, ok := mountAt(dir); ok {
				t.Errorf("after Unmount a %s mount is at the mountpoint, want none", fstype)
			}
		})
	}
}
