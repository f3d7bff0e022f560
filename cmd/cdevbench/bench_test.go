package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// requireKernel skips where the benchmark cannot run, but fails in CI,
// where it must (as cmd/cdevfs's kernel tests do).
func requireKernel(t *testing.T) {
	t.Helper()
	err := func() error {
		if os.Geteuid() != 0 {
			return errors.New("not root")
		}
		for _, dev := range []string{"/dev/fuse", "/dev/net/tun"} {
			if _, err := os.Stat(dev); err != nil {
				return err
			}
		}
		for _, tool := range []string{"unshare", "ip", "ls", "go"} {
			if _, err := exec.LookPath(tool); err != nil {
				return err
			}
		}
		return nil
	}()
	if err != nil {
		testenv.Unavailable(t, "kernel", err)
	}
}

// TestSmoke runs the whole benchmark briefly and checks that the table
// has every row.
func TestSmoke(t *testing.T) {
	requireKernel(t)
	dir := t.TempDir()
	bench, cdevfs := filepath.Join(dir, "cdevbench"), filepath.Join(dir, "cdevfs")
	for _, b := range [][]string{{"-o", bench, "."}, {"-o", cdevfs, "../cdevfs"}} {
		if out, err := exec.Command("go", append([]string{"build"}, b...)...).CombinedOutput(); err != nil {
			t.Fatalf("go build %v: %v\n%s", b, err, out)
		}
	}
	out, err := exec.Command(bench, "-cdevfs", cdevfs, "-rounds", "400", "-duration", "200ms",
		"-clones", "20", "-openclose", "50", "-scale", "20,40").CombinedOutput()
	if err != nil {
		t.Fatalf("cdevbench: %v\n%s", err, out)
	}
	table := string(out)
	for _, row := range []string{
		"clone to first packet, median of 20",
		"ls -l, 20 nodes", "daemon RSS per interface, 20", "lookup+open of tun19, 20",
		"ping-pong p50, 400 round trips", "ping-pong p99, 400 round trips",
		"pipelined 64B, 1 outstanding", "pipelined 64B, 8 outstanding", "pipelined 64B, 64 outstanding",
		"pipelined 1400B, 1 outstanding", "pipelined 1400B, 8 outstanding", "pipelined 1400B, 64 outstanding",
		"open/close of an existing node",
		"ls -l, 40 nodes", "daemon RSS per interface, 40", "lookup+open of tun39, 40",
	} {
		if !strings.Contains(table, row) {
			t.Errorf("no row %q in the table:\n%s", row, table)
		}
	}
	if !strings.Contains(table, "native") || !strings.Contains(table, "ratio") || !strings.Contains(table, "min-relay") ||
		!strings.Contains(table, "min-uring") {
		t.Errorf("table header incomplete:\n%s", table)
	}
	// min-uring is measured only where the fuse module carries FUSE over
	// io_uring; elsewhere its column says n/a, and the header why.
	if ok, why := uringAvailable(); !ok && !strings.Contains(table, "min-uring: n/a, "+why) {
		t.Errorf("no word in the header on why min-uring is n/a (%s):\n%s", why, table)
	}
	if !strings.Contains(table, "machine floor: a thread round trip") {
		t.Errorf("no machine floor line:\n%s", table)
	}
	if !strings.Contains(table, "cdevfs column: served over ") {
		t.Errorf("no word in the header on the cdevfs column's transport:\n%s", table)
	}
	t.Logf("\n%s", table)
}

// TestThreadRoundTrip: the machine floor is measured on one CPU and, where
// there are two, across them; a side that cannot start (a CPU that does
// not exist) ends the measurement with its error instead of leaving the
// other side waiting.
func TestThreadRoundTrip(t *testing.T) {
	cpus := []int{0}
	if runtime.NumCPU() > 1 {
		cpus = append(cpus, 1)
	}
	for _, cpu := range cpus {
		d, err := threadRoundTrip(cpu, 200)
		if err != nil || d <= 0 || d > time.Second {
			t.Errorf("threadRoundTrip(%d, 200) = %v, %v; want a p50 above 0 and under 1 s", cpu, d, err)
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := threadRoundTrip(1023, 200)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("threadRoundTrip on CPU 1023 succeeded; want the pinning's error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("threadRoundTrip on CPU 1023 still waiting after 10 s; want it to end with an error")
	}
}
