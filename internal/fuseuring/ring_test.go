package fuseuring_test

import (
	"runtime"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// reapUntil waits for completions until want user data have all
// completed, and returns their results.
func reapUntil(t *testing.T, r *fuseuring.Ring, want ...uint64) map[uint64]int32 {
	t.Helper()
	got := map[uint64]int32{}
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.Reap(func(ud uint64, res int32) { got[ud] = res })
		done := true
		for _, w := range want {
			if _, ok := got[w]; !ok {
				done = false
			}
		}
		if done {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("completions %v after 5 s, want %v", got, want)
		}
		if err := r.Enter(false); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPollAddAndRemove: a poll completes with POLLIN once its fd turns
// readable, and not before; a poll removed completes with ECANCELED and
// its removal with 0 (the transport parks a READ on the first, and ends
// an interrupted park with the second).
//
// Both kinds of ring: a NewThreadRing (DEFER_TASKRUN, what a queue uses)
// posts completions only inside Enter, so Enter without waiting must
// still post the ones that are ready.
func TestPollAddAndRemove(t *testing.T) {
	for _, tc := range []struct {
		name    string
		newRing func(uint32) (*fuseuring.Ring, error)
	}{
		{"ring", fuseuring.NewRing},
		{"thread ring", fuseuring.NewThreadRing},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A thread ring refuses any thread but its maker's.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			r, err := tc.newRing(8)
			if err != nil {
				testenv.Unavailable(t, "io_uring", err)
			}
			defer r.Close()
			pollAddAndRemove(t, r)
		})
	}
}

func pollAddAndRemove(t *testing.T, r *fuseuring.Ring) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])

	r.PollAdd(p[0], unix.POLLIN, 1)
	if err := r.Enter(false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	r.Reap(func(ud uint64, res int32) { t.Errorf("completion %d (%d) before the pipe had data", ud, res) })
	if _, err := unix.Write(p[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	if res := reapUntil(t, r, 1)[1]; res < 0 || res&unix.POLLIN == 0 {
		t.Errorf("poll of a readable pipe = %d, want POLLIN set", res)
	}
	var b [1]byte
	unix.Read(p[0], b[:])

	r.PollAdd(p[0], unix.POLLIN, 2)
	if err := r.Enter(false); err != nil {
		t.Fatal(err)
	}
	r.PollRemove(2, 3)
	got := reapUntil(t, r, 2, 3)
	if got[2] != -int32(unix.ECANCELED) || got[3] != 0 {
		t.Errorf("removed poll = %d, removal = %d; want -ECANCELED (%d) and 0", got[2], got[3], -int32(unix.ECANCELED))
	}
}
