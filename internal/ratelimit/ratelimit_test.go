package ratelimit

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// clock is a fake clock the tests move by hand.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// step is one event: after waiting, the caller uid asks; want is the
// verdict it must get.
type step struct {
	wait time.Duration
	uid  uint32
	want Verdict
}

var (
	yes  = Verdict{OK: true}
	no   = Verdict{}
	told = func(suppressed, others uint64) Verdict {
		return Verdict{OK: true, Suppressed: suppressed, Others: others}
	}
)

// repeat is n events of uid with no wait between them.
func repeat(n int, uid uint32, want Verdict) []step {
	s := make([]step, n)
	for i := range s {
		s[i] = step{uid: uid, want: want}
	}
	return s
}

func seq(parts ...[]step) []step {
	var s []step
	for _, p := range parts {
		s = append(s, p...)
	}
	return s
}

func TestAllow(t *testing.T) {
	perSec := func(burst int) Rate { return Rate{Burst: burst, Every: time.Second} }
	lavish := Rate{Burst: 1000, Every: time.Millisecond}
	for _, c := range []struct {
		name     string
		per, all Rate
		max      int
		steps    []step
	}{
		{
			name: "a caller gets its burst, then is suppressed",
			per:  perSec(3), all: lavish, max: 10,
			steps: seq(repeat(3, 1, yes), repeat(2, 1, no)),
		},
		{
			name: "the next line after suppression tells how many were suppressed",
			per:  perSec(3), all: lavish, max: 10,
			steps: seq(repeat(3, 1, yes), repeat(5, 1, no),
				[]step{{wait: time.Second, uid: 1, want: told(5, 0)}, {uid: 1, want: no}},
				[]step{{wait: time.Second, uid: 1, want: told(1, 0)}}),
		},
		{
			name: "tokens come back one per Every",
			per:  perSec(3), all: lavish, max: 10,
			steps: seq(repeat(3, 1, yes),
				[]step{{wait: 1999 * time.Millisecond, uid: 1, want: yes}, {uid: 1, want: no}},
				[]step{{wait: time.Millisecond, uid: 1, want: told(1, 0)}, {uid: 1, want: no}}),
		},
		{
			name: "an idle caller has no more than its burst",
			per:  perSec(3), all: lavish, max: 10,
			steps: seq([]step{{wait: time.Hour, uid: 1, want: yes}}, repeat(2, 1, yes), repeat(1, 1, no)),
		},
		{
			name: "callers do not share a bucket",
			per:  perSec(2), all: lavish, max: 10,
			steps: seq(repeat(2, 1, yes), repeat(1, 1, no), repeat(2, 2, yes), repeat(1, 2, no)),
		},
		{
			name: "the global cap bounds all callers, without spending a caller's share",
			per:  perSec(2), all: perSec(3), max: 10,
			steps: seq(repeat(2, 1, yes), repeat(1, 2, yes), repeat(5, 3, no),
				// One global token back, and uid 3's own were not
				// spent by the five the global cap suppressed.
				[]step{{wait: time.Second, uid: 3, want: told(5, 0)}}),
		},
		{
			name: "callers beyond a full table share one bucket, their count told on the next line",
			per:  perSec(2), all: lavish, max: 2,
			steps: seq(repeat(2, 1, yes), repeat(2, 2, yes),
				repeat(1, 3, yes), repeat(1, 4, yes), repeat(2, 5, no),
				// Callers 1 and 2 are busy (not idle): not swept.
				[]step{{wait: time.Second, uid: 6, want: told(0, 2)}},
				[]step{{uid: 1, want: yes}}),
		},
		{
			name: "an idle caller is swept from a full table, its untold count going to others",
			per:  perSec(2), all: lavish, max: 1,
			steps: seq(repeat(2, 1, yes), repeat(3, 1, no),
				// Idle after 2 s: its 3 are told by whoever reports next.
				[]step{{wait: 2 * time.Second, uid: 2, want: told(0, 3)}},
				repeat(1, 2, yes), repeat(1, 2, no)),
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := &clock{t: time.Unix(1e9, 0)}
			l := New(c.per, c.all, c.max, clk.now)
			for i, s := range c.steps {
				clk.t = clk.t.Add(s.wait)
				if got := l.Allow(s.uid); got != s.want {
					t.Fatalf("step %d (uid %d after %v): got %+v, want %+v", i, s.uid, s.wait, got, s.want)
				}
			}
		})
	}
}

// TestTableIsBounded: callers with ever new uids never hold more than
// max entries, and every event is either reported or counted.
func TestTableIsBounded(t *testing.T) {
	clk := &clock{t: time.Unix(1e9, 0)}
	const max = 64
	l := New(Rate{Burst: 10, Every: time.Second}, Rate{Burst: 100, Every: 10 * time.Millisecond}, max, clk.now)
	var reported, counted uint64
	const events = 100000
	for i := range events {
		clk.t = clk.t.Add(time.Millisecond)
		v := l.Allow(uint32(i))
		if v.OK {
			reported++
		}
		counted += v.Suppressed + v.Others
		if n := len(l.callers); n > max {
			t.Fatalf("after %d callers the table holds %d, want at most %d", i+1, n, max)
		}
	}
	for _, c := range l.callers {
		counted += c.suppressed
	}
	counted += l.others
	if reported+counted != events {
		t.Errorf("%d events reported and %d counted as suppressed, want %d in all", reported, counted, events)
	}
	// 100 s at 100 lines a second after a burst of 100.
	if reported > 100+100*100 {
		t.Errorf("%d events reported in 100 s, want at most %d", reported, 100+100*100)
	}
}

// TestConcurrentCallers: the limiter under -race, with every event
// either reported or counted.
func TestConcurrentCallers(t *testing.T) {
	l := New(Rate{Burst: 10, Every: time.Second}, Rate{Burst: 100, Every: 10 * time.Millisecond}, 8, time.Now)
	var mu sync.Mutex
	var reported, counted uint64
	var wg sync.WaitGroup
	const callers, each = 16, 1000
	for g := range callers {
		wg.Go(func() {
			var r, c uint64
			for range each {
				v := l.Allow(uint32(g))
				if v.OK {
					r++
				}
				c += v.Suppressed + v.Others
			}
			mu.Lock()
			reported, counted = reported+r, counted+c
			mu.Unlock()
		})
	}
	wg.Wait()
	for _, c := range l.callers {
		counted += c.suppressed
	}
	counted += l.others
	if got := reported + counted; got != callers*each {
		t.Errorf("%d reported + %d counted = %d, want %d", reported, counted, got, callers*each)
	}
}

func ExampleLimiter() {
	now := time.Unix(0, 0)
	l := New(Rate{Burst: 2, Every: time.Second}, Rate{Burst: 100, Every: time.Millisecond}, 1024,
		func() time.Time { return now })
	for range 5 {
		fmt.Printf("%+v\n", l.Allow(1000))
	}
	now = now.Add(time.Second)
	fmt.Printf("%+v\n", l.Allow(1000))
	// Output:
	// {OK:true Suppressed:0 Others:0}
	// {OK:true Suppressed:0 Others:0}
	// {OK:false Suppressed:0 Others:0}
	// {OK:false Suppressed:0 Others:0}
	// {OK:false Suppressed:0 Others:0}
	// {OK:true Suppressed:3 Others:0}
}
