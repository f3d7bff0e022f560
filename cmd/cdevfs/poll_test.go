package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// quietNamespace turns IPv6 off in the daemon's namespace, so the kernel
// sends no router solicitations that would make an "empty" queue non-empty.
func (d *daemon) quietNamespace() {
	d.t.Helper()
	for _, k := range []string{"all", "default"} {
		cmd := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(d.cmd.Process.Pid)+"/ns/net",
			"sysctl", "-q", "-w", "net.ipv6.conf."+k+".disable_ipv6=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			d.t.Fatalf("sysctl: %v %s", err, out)
		}
	}
}

// TestPollWithTimeouts: poll(2) reports no event on an empty queue, POLLOUT
// at once, and POLLIN soon after a packet arrives.
func TestPollWithTimeouts(t *testing.T) {
	d := startDaemon(t)
	d.quietNamespace()
	if _, err := os.Stat(d.path("tun1")); err != nil {
		t.Fatal(err)
	}
	d.configure("tun1")
	out, err := client("pollers", "poll", d.path("tun1")).CombinedOutput()
	if err != nil {
		t.Fatalf("pollers poll: %v\n%s", err, out)
	}
	t.Logf("POLLIN after write: %s", strings.TrimSpace(string(out)))
	f := strings.Fields(string(out)) // latency_us p50 N p99 N max N
	if len(f) == 7 {
		if p50, _ := strconv.ParseFloat(f[2], 64); p50 > 1000 {
			t.Errorf("median POLLIN latency %vus, want within 1 ms of the packet", p50)
		}
	}
}

// TestEdgeTriggeredEpollMissesNothing: a client using EPOLLET and
// nonblocking reads receives 10,000 replies; a missed edge would hang it.
func TestEdgeTriggeredEpollMissesNothing(t *testing.T) {
	d := startDaemon(t)
	d.quietNamespace()
	if _, err := os.Stat(d.path("tun2")); err != nil {
		t.Fatal(err)
	}
	d.configure("tun2")
	n := "10000"
	if testing.Short() {
		n = "1000"
	}
	out, err := client("pollers", "epollet", d.path("tun2"), n).CombinedOutput()
	if err != nil {
		t.Fatalf("pollers epollet: %v\n%s", err, out)
	}
	t.Log(strings.TrimSpace(string(out)))
}

// TestSelectReportsExactlyTheReadyNode: select(2) over three nodes after a
// packet is queued on one of them.
func TestSelectReportsExactlyTheReadyNode(t *testing.T) {
	d := startDaemon(t)
	d.quietNamespace()
	for _, n := range []string{"tun1", "tun2", "tun3"} {
		if _, err := os.Stat(d.path(n)); err != nil {
			t.Fatal(err)
		}
	}
	d.configure("tun2") // the only one with the 198.18.0.1 peer 198.18.0.2 addresses
	for _, n := range []string{"tun1", "tun3"} {
		d.mustIP("link", "set", n, "up")
	}
	out, err := client("pollers", "select", d.path("tun1"), d.path("tun2"), d.path("tun3")).CombinedOutput()
	if err != nil {
		t.Fatalf("pollers select: %v\n%s", err, out)
	}
}

// TestRevokeWakesPoller: a poll(2) without timeout ends with POLLERR or
// POLLHUP when the interface is deleted.
func TestRevokeWakesPoller(t *testing.T) {
	d := startDaemon(t)
	if _, err := os.Stat(d.path("tun5")); err != nil {
		t.Fatal(err)
	}
	cmd := client("pollers", "revoke", d.path("tun5"))
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || sc.Text() != "waiting" {
		t.Fatalf("pollers revoke did not start: %q", sc.Text())
	}
	time.Sleep(100 * time.Millisecond)
	d.mustIP("link", "del", "tun5")
	start := time.Now()
	sc.Scan()
	line := sc.Text()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("pollers revoke: %v, last line %q", err, line)
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Errorf("poller woke %v after the delete, want promptly", el)
	}
	if !strings.Contains(line, "POLLERR") && !strings.Contains(line, "POLLHUP") {
		t.Errorf("revents = %q, want POLLERR or POLLHUP", line)
	}
}

// TestGoClientReadDeadline: a Go program opening a node with os.OpenFile
// (Go's poller: O_NONBLOCK and edge-triggered epoll) times out a read with
// SetReadDeadline, and then reads a packet when one comes.
func TestGoClientReadDeadline(t *testing.T) {
	d := startDaemon(t)
	d.quietNamespace()
	if _, err := os.Stat(d.path("tun6")); err != nil {
		t.Fatal(err)
	}
	d.configure("tun6")
	f, err := os.OpenFile(d.path("tun6"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 2048)
	if err := f.SetReadDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
		t.Fatalf("SetReadDeadline: %v (the file is not in Go's poller)", err)
	}
	start := time.Now()
	_, err = f.Read(buf)
	el := time.Since(start)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read of an empty queue with a deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	if el < 250*time.Millisecond || el > 2*time.Second {
		t.Errorf("deadline read took %v, want about 300ms", el)
	}
	for i := 0; i < 20; i++ {
		f.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := f.Write(echoRequest("198.18.0.2", "198.18.0.1", uint16(i), 16)); err != nil {
			t.Fatal(err)
		}
		n, err := f.Read(buf)
		if err != nil || n < 28 || buf[20] != 0 {
			t.Fatalf("round %d: read = %d, %v; want the echo reply (a hang here is a missed edge)", i, n, err)
		}
	}
}

// procStatus reads VmRSS (KiB) and Threads from /proc/PID/status.
func procStatus(t *testing.T, pid int) (rssKiB, threads int) {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "VmRSS:" {
			rssKiB, _ = strconv.Atoi(f[1])
		}
		if len(f) >= 2 && f[0] == "Threads:" {
			threads, _ = strconv.Atoi(f[1])
		}
	}
	return
}

// TestThousandPollersCost: 1,000 concurrent pollers (one process polling
// 1,000 cloned tun fds) need no goroutine or thread per waiter: the
// daemon's thread count stays flat. Reports RSS and threads.
func TestThousandPollersCost(t *testing.T) {
	if testing.Short() {
		t.Skip("creates 1,000 interfaces")
	}
	d := startDaemon(t)
	d.quietNamespace()
	pid := d.cmd.Process.Pid
	rss0, thr0 := procStatus(t, pid)
	cmd := client("pollers", "many", d.path("tun"), "1000", "3000")
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || sc.Text() != "polling" {
		cmd.Wait()
		t.Fatalf("pollers many did not start polling: %q", sc.Text())
	}
	time.Sleep(1500 * time.Millisecond) // all 1,000 are waiting now
	rss1, thr1 := procStatus(t, pid)
	sc.Scan()
	if err := cmd.Wait(); err != nil || sc.Text() != "poll returned 0" {
		t.Fatalf("pollers many: %v, %q; want a 3 s poll with no event", err, sc.Text())
	}
	t.Logf("daemon (race-instrumented build): idle RSS %d KiB, %d threads; with 1,000 interfaces and 1,000 waiting pollers RSS %d KiB, %d threads",
		rss0, thr0, rss1, thr1)
	if thr1 > thr0+20 {
		t.Errorf("threads went from %d to %d with 1,000 pollers: a thread per waiter?", thr0, thr1)
	}
}

// TestNonblockingReads: O_NONBLOCK at open makes a read of an empty queue
// EAGAIN; FIONBIO (which the VFS handles without asking the daemon: the
// daemon sees the flag in each READ) turns it on and off on an open handle.
func TestNonblockingReads(t *testing.T) {
	d := startDaemon(t)
	d.quietNamespace()
	fd, err := syscall.Open(d.path("tun4"), syscall.O_RDWR|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	if _, err := readRetry(fd, buf); err != syscall.EAGAIN {
		t.Errorf("O_NONBLOCK read of an empty queue = %v, want EAGAIN", err)
	}
	syscall.Close(fd)
	fd = reopen(t, d.path("tun4"))
	defer syscall.Close(fd)
	d.configure("tun4")
	fionbio := func(on int32) {
		if e := ioctlPtr(fd, 0x5421 /* FIONBIO */, unsafe.Pointer(&on)); e != 0 {
			t.Fatalf("FIONBIO %d: %v", on, e)
		}
	}
	fionbio(1)
	if _, err := readRetry(fd, buf); err != syscall.EAGAIN {
		t.Errorf("read after FIONBIO 1 = %v, want EAGAIN", err)
	}
	fionbio(0)
	done := make(chan error, 1)
	go func() {
		for {
			n, err := readRetry(fd, buf)
			if err != nil || (n > 20 && buf[9] == 1 && buf[20] == 0) {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		t.Fatalf("read after FIONBIO 0 returned %v at once, want it to block", err)
	case <-time.After(200 * time.Millisecond):
	}
	if _, err := syscall.Write(fd, echoRequest("198.18.0.2", "198.18.0.1", 1, 8)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("blocking read = %v, want the echo reply", err)
		}
	case <-time.After(3 * time.Second):
		t.Error("blocking read got no echo reply")
	}
}
