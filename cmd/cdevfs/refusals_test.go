package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The refusal log's bounds for one caller (fs/refuse.go).
const (
	refusalBurst = 10
	refusalEvery = time.Second
)

// TestRefusalFloodIsRateLimited: user nobody, refused as fast as it can
// ask (stat of random tunN names, then opens of tun, 2 s each), gets at
// most a burst of lines and then one a second into the log; its next
// line, a second later, tells how many were suppressed, so that the log
// accounts for every refusal; and the metric counts every one.
func TestRefusalFloodIsRateLimited(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "metrics.sock")
	d := startDaemon(t, "--allow-other", "--metrics", "unix:"+sock)
	// nobody needs to reach the mount and the client: both go in the
	// mount's parent, opened to others.
	parent := filepath.Dir(d.dir)
	letOthersIn(t, d)
	// The clone node open to all: the kernel checks its mode first
	// (default_permissions), and only an open it lets through reaches the
	// daemon, which refuses the clone.
	if err := os.Chmod(d.path("tun"), 0o666); err != nil {
		t.Fatal(err)
	}
	flood := filepath.Join(parent, "refusals")
	b, err := os.ReadFile(filepath.Join(binDir, "refusals"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(flood, b, 0o755); err != nil {
		t.Fatal(err)
	}
	before := len(refusalLines(d.log()))

	start := time.Now()
	var refused int
	for _, mode := range []string{"stat", "open"} {
		out, err := as(nobody, nobody, nil, fmt.Sprintf("exec %s %s %s 2", flood, mode, d.dir))
		if err != nil {
			t.Fatalf("refusals %s as nobody: %v\n%s", mode, err, out)
		}
		n, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(out), "refused "))
		if err != nil || n < 100 {
			t.Fatalf("refusals %s: output %q, want \"refused N\" with N at least 100", mode, out)
		}
		refused += n
	}
	// Once its bucket has a token again, the caller's next refusal is
	// logged with the count of those suppressed before it.
	time.Sleep(refusalEvery)
	if _, err := as(nobody, nobody, nil, "exec stat "+d.path("tun1")); err == nil {
		t.Fatalf("nobody's stat of tun1 succeeded, want ENOENT")
	}
	refused++
	elapsed := time.Since(start)

	// The last line may still be on its way to the log.
	var lines []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		lines = refusalLines(d.log())[before:]
		if len(lines) > 0 && strings.Contains(lines[len(lines)-1], "unit=tun1 ") || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	most := refusalBurst + int(elapsed/refusalEvery) + 1
	if len(lines) > most || len(lines) < refusalBurst {
		t.Errorf("%d refusals in %v logged %d lines, want %d to %d (a burst of %d, then one per %v)",
			refused, elapsed.Round(time.Millisecond), len(lines), refusalBurst, most, refusalBurst, refusalEvery)
	}
	suppressedRe := regexp.MustCompile(` suppressed=(\d+)`)
	logged := len(lines)
	for _, l := range lines {
		if m := suppressedRe.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			logged += n
		}
	}
	if logged != refused {
		t.Errorf("log accounts for %d refusals (lines plus their suppressed=N), want %d:\n%s",
			logged, refused, strings.Join(lines, "\n"))
	}
	m := scrape(t, sock)
	if got := m[`cdevfs_refusals_total{action="clone"}`]; got != float64(refused) {
		t.Errorf(`cdevfs_refusals_total{action="clone"} = %v, want %d (every refusal)`, got, refused)
	}
	t.Logf("%d refusals in %v: %d log lines", refused, elapsed.Round(time.Millisecond), len(lines))
}

// refusalLines picks the "refused clone" lines out of a text log.
func refusalLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="refused clone"`) {
			out = append(out, l)
		}
	}
	return out
}
