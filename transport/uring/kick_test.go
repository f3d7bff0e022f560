package uring

import (
	"errors"
	"syscall"
	"testing"

	"github.com/cdevfs/cdevfs/internal/fusewire"
)

// TestKickMatch: a queue knows its kicks by the opcode (STATFS) and the
// sender's tid, which the kick's thread stores while its statfs is in
// flight; nothing else is taken for a kick.
func TestKickMatch(t *testing.T) {
	var k kicker
	a, b := k.sent(), k.sent()
	a.tid.Store(101)
	b.tid.Store(102)
	returned := k.sent() // its thread is done: tid cleared
	for _, tc := range []struct {
		name string
		op   uint32
		pid  uint32
		want *kickOut
	}{
		{"first kick", fusewire.OpStatfs, 101, a},
		{"second kick", fusewire.OpStatfs, 102, b},
		{"a statfs from another thread", fusewire.OpStatfs, 103, nil},
		{"a lookup from a kick's thread", fusewire.OpLookup, 101, nil},
		{"a sender outside the pid namespace", fusewire.OpStatfs, 0, nil},
	} {
		if got := k.match(tc.op, tc.pid); got != tc.want {
			t.Errorf("%s: match(op %d, pid %d) = %p, want %p", tc.name, tc.op, tc.pid, got, tc.want)
		}
	}
	if returned.tid.Load() != 0 || k.match(fusewire.OpStatfs, 0) != nil {
		t.Error("a kick whose thread stored no tid matched a request with pid 0")
	}
}

// TestKickReturned: a kick back unanswered is a miss, and ends the round,
// unless its statfs failed because the connection ended (it was aborted
// under it): that is no sign that kicks cannot reach the queue.
func TestKickReturned(t *testing.T) {
	for _, tc := range []struct {
		name       string
		answered   bool
		err        error
		wantMissed bool
	}{
		{"answered", true, nil, false},
		{"went elsewhere", false, nil, true},
		{"could not pin its thread", false, errors.New("pin a thread to CPU 1: invalid argument"), true},
		{"the connection was aborted", false, syscall.ENOTCONN, false},
		{"the queues were being torn down", false, syscall.ECONNABORTED, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := kicker{lastEntry: -1}
			k.ranLow()
			if !k.due(1) {
				t.Fatal("no kick due after the queue ran low with a request held")
			}
			o := k.sent()
			o.answered, o.err = tc.answered, tc.err
			if got := k.returned(o); got != tc.wantMissed {
				t.Errorf("returned = %v, want %v", got, tc.wantMissed)
			}
			if want := map[bool]int{true: 1}[tc.wantMissed]; k.missed != want {
				t.Errorf("missed = %d, want %d", k.missed, want)
			}
			if len(k.out) != 0 {
				t.Errorf("%d kicks still out after the only one returned", len(k.out))
			}
			if !tc.answered && k.roundOn {
				t.Error("the round goes on after a kick came back unanswered")
			}
		})
	}
}

// TestKickRound: a round starts when READs take the queue low, goes on
// while a kick's entry fetches a stranded request after its commit, and
// ends after kickEmptyEnd kicks in a row fetched nothing.
func TestKickRound(t *testing.T) {
	k := kicker{lastEntry: -1}
	if k.due(1) {
		t.Fatal("a kick is due before the queue ran low")
	}
	k.ranLow()
	if k.due(0) {
		t.Fatal("a kick is due with no request holding an entry")
	}
	if !k.due(1) {
		t.Fatal("no kick due after the queue ran low with a request held")
	}
	// The first kick is answered in entry 3, and its commit fetches a
	// stranded request: the round goes on.
	o := k.sent()
	k.answered(3, o)
	k.noteSubmitted(true)
	if !k.due(1) {
		t.Fatal("no second kick after the first was answered")
	}
	k.fetched(3, nil) // a request from the list came to entry 3
	o = k.sent()
	k.answered(5, o)
	k.noteSubmitted(true)
	// Now kickEmptyEnd kicks in a row fetch nothing.
	for i := range kickEmptyEnd {
		if !k.due(1) {
			t.Fatalf("no kick due after %d empty kicks, want %d before the round ends", i, kickEmptyEnd)
		}
		o = k.sent()
		k.answered(7+i, o)
		k.noteSubmitted(true)
	}
	if k.due(1) || k.roundOn {
		t.Errorf("a round goes on after %d kicks in a row fetched nothing", kickEmptyEnd)
	}
}
