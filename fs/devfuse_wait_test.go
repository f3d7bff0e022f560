package fs

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// devfuseWaitBound is the devfuse loop's bound on READs waiting on a
// thread each (transport/devfuse maxWaits).
const devfuseWaitBound = 64

// TestWaitingReadEnds: over /dev/fuse, a blocking READ of a device with a
// ReadWaiter fd waits on its reader's thread, and ends in each of the
// ways a blocked read ends: with the packet that comes; with ENXIO when
// the node is destroyed (the root's Observer.Revoked); with EINTR when
// its reader is signalled, also when the INTERRUPT reaches the daemon
// before the READ waits (the kernel queues it again until it finds the
// READ); and without an answer when the mount goes away under it.
func TestWaitingReadEnds(t *testing.T) {
	requireFuse(t)
	for _, tc := range []struct {
		name string
		end  func(t *testing.T, d *pipeDev, n *devnode.Node, m *Mount)
		// early: signal the reader while its READ is on the reader's
		// thread, before it waits.
		early   bool
		want    string
		wantErr error
	}{
		{name: "packet", end: func(t *testing.T, d *pipeDev, n *devnode.Node, m *Mount) {
			if _, err := unix.Write(d.w, []byte("a packet")); err != nil {
				t.Fatal(err)
			}
		}, want: "a packet"},
		{name: "destroy", end: func(t *testing.T, d *pipeDev, n *devnode.Node, m *Mount) {
			go n.Destroy(context.Background())
		}, wantErr: syscall.ENXIO},
		{name: "interrupt before the wait", early: true, wantErr: syscall.EINTR},
		{name: "abort", end: func(t *testing.T, d *pipeDev, n *devnode.Node, m *Mount) {
			var st unix.Stat_t
			if err := unix.Stat(m.Dir(), &st); err != nil {
				t.Fatal(err)
			}
			abortFuse(t, st.Dev)
			select {
			case <-m.loop.Stopped():
			case <-time.After(2 * time.Second):
				t.Error("the loop's readers did not stop within 2 s of the abort: the READ waiting on one was not ended")
			}
		}, wantErr: syscall.ECONNABORTED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, n, m, fd := mountPipeDev(t, IOURingOff)
			tid, got := make(chan int, 1), make(chan readResult, 1)
			if tc.early {
				// The device is asked for its fd on the reader's
				// thread, before the READ is registered as waiting.
				dev.signalBeforeWait(tid)
			}
			go readOnThread(fd, tid, got)
			if !tc.early {
				testenv.WaitFor(t, "the blocking read to wait on its reader's thread", func() bool { return dev.waits.Load() > 0 })
				time.Sleep(20 * time.Millisecond) // from asking the fd to poll(2)
				tc.end(t, dev, n, m)
			}
			expectRead(t, "waiting", dev, got, tc.want, tc.wantErr)
			if dev.waits.Load() == 0 {
				t.Error("the read never waited on its reader's thread (the device was never asked for its fd)")
			}
		})
	}
}

// TestWaitingReadsAreBounded: each READ that waits on a reader's thread
// holds a thread, so past the bound blocking READs wait in go-fuse
// instead, as goroutines; every one of them still gets its packet.
func TestWaitingReadsAreBounded(t *testing.T) {
	requireFuse(t)
	dev, _, _, fd := mountPipeDev(t, IOURingOff)

	const readers = devfuseWaitBound + 8
	got := make(chan error, readers)
	for range readers {
		go func() {
			buf := make([]byte, 1)
			_, err := unix.Read(fd, buf)
			got <- err
		}()
	}
	testenv.WaitFor(t, "every READ to reach the device", func() bool { return dev.waits.Load() >= readers })
	testenv.WaitFor(t, "the bound of READs to wait on readers' threads", func() bool { return threadsPolling() >= devfuseWaitBound })
	time.Sleep(200 * time.Millisecond) // any more would wait by now
	if w := threadsPolling(); w != devfuseWaitBound {
		t.Errorf("%d READs wait on readers' threads, want the bound, %d", w, devfuseWaitBound)
	}
	for i := range readers {
		if _, err := unix.Write(dev.w, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for range readers {
		select {
		case err := <-got:
			if err != nil {
				t.Errorf("blocked read: %v, want a packet", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a blocked read got no packet within 5 s")
		}
	}
}

// threadsPolling counts the process's threads in poll(2) on two fds, as
// a READ waiting on its reader's thread is (the device's fd and the
// reader's eventfd): nothing else in the test process polls so.
func threadsPolling() int {
	want := fmt.Sprintf("%d ", unix.SYS_PPOLL)
	tasks, _ := os.ReadDir("/proc/self/task")
	n := 0
	for _, task := range tasks {
		b, _ := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if f := strings.Fields(string(b)); strings.HasPrefix(string(b), want) && len(f) > 2 && f[2] == "0x2" {
			n++
		}
	}
	return n
}
