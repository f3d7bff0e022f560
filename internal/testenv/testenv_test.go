package testenv

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// recorder is a testing.TB that records how a test was ended.
type recorder struct {
	testing.TB
	how, msg string
}

func (r *recorder) Helper()                      {}
func (r *recorder) Fatalf(f string, args ...any) { r.how, r.msg = "fail", fmt.Sprintf(f, args...) }
func (r *recorder) Skipf(f string, args ...any)  { r.how, r.msg = "skip", fmt.Sprintf(f, args...) }

// TestUnavailableFailsInCIOnly: a kernel test that cannot run fails in CI
// (CI=true) and is skipped elsewhere, saying what it needed and why.
func TestUnavailableFailsInCIOnly(t *testing.T) {
	for _, tc := range []struct{ ci, want string }{{"true", "fail"}, {"", "skip"}, {"false", "skip"}} {
		t.Setenv("CI", tc.ci)
		r := &recorder{TB: t}
		Unavailable(r, "FUSE", errors.New("no /dev/fuse"))
		if r.how != tc.want || !strings.Contains(r.msg, "FUSE test cannot run") || !strings.Contains(r.msg, "no /dev/fuse") {
			t.Errorf("CI=%q: ended with %s %q; want %s naming FUSE and the reason", tc.ci, r.how, r.msg, tc.want)
		}
	}
}
