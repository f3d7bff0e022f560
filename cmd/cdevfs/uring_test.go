package main

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// TestOverIOURing runs the tests of the packet path, of blocking, waking
// and interrupting, and of teardown with the daemon's FUSE requests
// carried over io_uring (--io-uring on), enable_uring set to Y for the
// test (it is machine-wide, and put back after). The rest of the suite
// runs over whichever transport the machine's setting gives (auto: over
// /dev/fuse in CI).
func TestOverIOURing(t *testing.T) {
	requireKernel(t)
	testenv.SetURing(t, "Y")
	daemonFlags = []string{"--io-uring", "on"}
	defer func() { daemonFlags = nil }()

	t.Run("RequestsGoOverTheRing", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "metrics.sock")
		d := startDaemon(t, "--metrics", "unix:"+sock)
		if !strings.Contains(d.log(), "FUSE over io_uring") {
			t.Errorf("no word in the log of FUSE over io_uring:\n%s", d.log())
		}
		before := scrape(t, sock)["cdevfs_fuse_ring_requests_total"]
		fd := openDev(t, d.path("tun3"))
		d.configure("tun3")
		if _, err := syscall.Write(fd, echoRequest("198.18.0.2", "198.18.0.1", 1, 8)); err != nil {
			t.Fatalf("write echo request: %v", err)
		}
		syscall.Close(fd)
		if after := scrape(t, sock)["cdevfs_fuse_ring_requests_total"]; after < before+3 {
			t.Errorf("ring requests %v before a lookup, open and write, %v after; want at least 3 more", before, after)
		}
	})
	// A READ that finds no packet is parked in its queue's ring (a poll of
	// the tun fd), not handed to a thread, and is answered with the packet
	// that comes: the echo reply to a request written after it blocked.
	t.Run("BlockedReadIsParked", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "metrics.sock")
		d := startDaemon(t, "--metrics", "unix:"+sock)
		fd := openDev(t, d.path("tun5"))
		defer syscall.Close(fd)
		d.configure("tun5")
		before := scrape(t, sock)["cdevfs_fuse_ring_parked_reads_total"]
		type result struct {
			pkt []byte
			err error
		}
		got := make(chan result, 1)
		go func() {
			buf := make([]byte, 2048)
			for {
				n, err := readRetry(fd, buf)
				if err != nil || n >= 21 && buf[9] == 1 && buf[20] == 0 { // ICMP echo reply
					got <- result{buf[:max(n, 0)], err}
					return
				}
			}
		}()
		deadline := time.Now().Add(5 * time.Second)
		for scrape(t, sock)["cdevfs_fuse_ring_parked_reads_total"] < before+1 {
			if time.Now().After(deadline) {
				t.Fatalf("no READ parked 5 s after a read blocked (parked reads %v, before %v)", scrape(t, sock)["cdevfs_fuse_ring_parked_reads_total"], before)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if _, err := syscall.Write(fd, echoRequest("198.18.0.2", "198.18.0.1", 7, 32)); err != nil {
			t.Fatalf("write echo request: %v", err)
		}
		select {
		case r := <-got:
			if r.err != nil {
				t.Fatalf("parked read ended with %v, want the echo reply", r.err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("parked read not answered 5 s after the echo request went out")
		}
		// Answered from the park, not by the fallback to a goroutine.
		if strings.Contains(d.log(), "poll failed") {
			t.Errorf("a parked READ fell back to a goroutine:\n%s", d.log())
		}
	})
	for _, tc := range []struct {
		name string
		test func(*testing.T)
	}{
		{"ICMPEchoThroughNode", TestICMPEchoThroughNode},
		{"ReadWriteEdges", TestReadWriteEdges},
		{"CloneNodeGivesLowestFreeUnit", TestCloneNodeGivesLowestFreeUnit},
		{"DestroyRevokesBlockedReader", TestDestroyRevokesBlockedReader},
		{"InterruptedReadEnds", TestInterruptedReadEnds},
		{"ShutdownRevokesAndCleansUp", TestShutdownRevokesAndCleansUp},
		{"CachedEntryFollowsDestroy", TestCachedEntryFollowsDestroy},
		{"PollWithTimeouts", TestPollWithTimeouts},
		{"EdgeTriggeredEpollMissesNothing", TestEdgeTriggeredEpollMissesNothing},
		{"RevokeWakesPoller", TestRevokeWakesPoller},
		{"NonblockingReads", TestNonblockingReads},
		{"TransientCloseRacingOpen", TestTransientCloseRacingOpen},
		{"CrashRestartAdoptsOwnInterfaces", TestCrashRestartAdoptsOwnInterfaces},
		{"SigtermWithManyHandlesIsQuick", TestSigtermWithManyHandlesIsQuick},
	} {
		t.Run(tc.name, tc.test)
	}
}
