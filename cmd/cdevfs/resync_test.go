package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// TestWatchResyncsAfterSIGSTOP is issue 21's report: the daemon stopped
// with SIGSTOP while interfaces are deleted and 1,000 made with
// `ip tuntap add`, and link events made until the kernel drops some for
// the daemon's watch; then SIGCONT. The daemon must resync (the metric
// moves), its tree must list the kernel's tun and tap interfaces, and the
// units deleted meanwhile must open again.
func TestWatchResyncsAfterSIGSTOP(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "metrics.sock")
	d := startDaemon(t, "--metrics", "unix:"+sock)
	for _, name := range []string{"tun0", "tun1"} { // cdevfs's
		if err := syscall.Access(d.path(name), 0); err != nil {
			t.Fatalf("lookup %s: %v", name, err)
		}
	}
	d.mustIP("tuntap", "add", "dev", "tun10", "mode", "tun")
	d.mustIP("tuntap", "add", "dev", "tun11", "mode", "tun")
	// An up interface announces every change of its alias.
	d.mustIP("tuntap", "add", "dev", "flood0", "mode", "tun")
	d.mustIP("link", "set", "flood0", "up")
	testenv.WaitFor(t, "tun10 and tun11 adopted", func() bool {
		ls := d.ls()
		return contains(ls, "tun10") && contains(ls, "tun11")
	})

	pid := d.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	cont := func() {
		if stopped {
			stopped = false
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	t.Cleanup(cont)
	start := time.Now()
	var batch strings.Builder
	batch.WriteString("link del tun1\nlink del tun11\n")
	const added = 1000
	for i := 0; i < added; i++ {
		fmt.Fprintf(&batch, "tuntap add dev %s%d mode %[1]s\n", []string{"tun", "tap"}[i%2], 100+i/2)
	}
	d.ipBatch(t, batch.String())
	events := 0
	for ; d.netlinkDrops(t) == 0; events += 1000 {
		if events >= 100000 {
			t.Fatalf("no link event dropped for the stopped daemon after %d changes", events)
		}
		batch.Reset()
		for i := 0; i < 1000; i++ {
			fmt.Fprintf(&batch, "link set flood0 alias f%d\n", events+i)
		}
		d.ipBatch(t, batch.String())
	}
	drops := d.netlinkDrops(t)
	deaf := time.Since(start)
	cont()
	released := time.Now()
	testenv.WaitFor(t, "a resync in the metrics", func() bool { return scrape(t, sock)["cdevfs_watch_resyncs_total"] >= 1 })
	resynced := time.Since(released)
	var want, got []string
	testenv.WaitFor(t, "the tree to list the kernel's tun and tap interfaces", func() bool {
		want = d.links()
		slices.Sort(want)
		got = nil
		for _, name := range d.ls() {
			if (strings.HasPrefix(name, "tun") || strings.HasPrefix(name, "tap")) && len(name) > 3 {
				got = append(got, name)
			}
		}
		slices.Sort(got)
		return slices.Equal(got, want)
	})
	t.Logf("stopped for %v: %d interfaces made, %d alias changes, %d events dropped; resync seen %v after SIGCONT",
		deaf.Round(time.Millisecond), added, events, drops, resynced.Round(time.Millisecond))
	if n := len(want); n != added+2 { // and tun0, tun10
		t.Errorf("%d tun/tap interfaces, want %d: %v", n, added+2, want)
	}
	for _, name := range []string{"tun1", "tun11"} {
		fd, err := openRetry(d.path(name))
		if err != nil {
			t.Errorf("open %s, deleted while the daemon was stopped: %v, want a new interface", name, err)
			continue
		}
		syscall.Close(fd)
	}
	if !strings.Contains(d.log(), "watch resynced") {
		t.Errorf("no resync in the log:\n%s", d.log())
	}
}

// ipBatch runs `ip -batch -` with the commands of batch in the daemon's
// network namespace.
func (d *daemon) ipBatch(t *testing.T, batch string) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(d.cmd.Process.Pid)+"/ns/net", "ip", "-batch", "-")
	cmd.Stdin = strings.NewReader(batch)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -batch: %v\n%s", err, out)
	}
}

// netlinkDrops is the number of link events the kernel dropped for the
// sockets of the daemon's namespace subscribed to RTMGRP_LINK (the
// daemon's watch alone), from that namespace's /proc/net/netlink.
func (d *daemon) netlinkDrops(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(d.cmd.Process.Pid)+"/ns/net", "cat", "/proc/net/netlink").CombinedOutput()
	if err != nil {
		t.Fatalf("/proc/net/netlink of the daemon's namespace: %v\n%s", err, out)
	}
	return testenv.LinkEventDrops(out)
}
