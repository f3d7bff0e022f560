// Package testenv holds the project's rules for tests that need the real
// kernel (root, /dev/fuse, /dev/net/tun, io_uring): where such a test
// cannot run it is skipped, except in CI (CI=true), where every kernel
// test must run and a missing piece is a failure.
package testenv

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
)

// Unavailable ends t, which needs what (a kernel feature, a device, a
// tool) and cannot have it because of why: a failure in CI, a skip
// elsewhere.
func Unavailable(t testing.TB, what string, why any) {
	t.Helper()
	msg := fmt.Sprintf("%s test cannot run", what)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s in CI: %v", msg, why)
		return // a testing.TB whose Fatalf returns (a test's recorder)
	}
	t.Skipf("%s here: %v", msg, why)
}

// SetURing sets the fuse module's enable_uring to v ("Y" or "N") for the
// rest of t and puts the old value back when t ends (it is machine-wide,
// and decides what the next mounts are offered in INIT).
func SetURing(t testing.TB, v string) {
	t.Helper()
	restore, err := fuseuring.SetEnable(v)
	if err != nil {
		Unavailable(t, "FUSE over io_uring", err)
	}
	t.Cleanup(func() {
		if err := restore(); err != nil {
			t.Errorf("restore enable_uring: %v", err)
		}
	})
}

// WaitFor polls cond every 10 ms for up to 5 s, and fails t, naming
// what it waited for, if cond never held.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
