// Package ratelimit bounds how often each caller, known by its uid, may
// have an event reported (a log line), and how often all callers together
// may, and counts what it suppresses so that the next report can say so.
//
// It is keyed by uid, not pid: a caller can take new pids at will, not
// new uids (a user with a range of subordinate uids can use many, which
// the cap over all callers bounds). The table of callers is bounded too,
// so that no caller can grow the daemon's memory.
package ratelimit

import (
	"sync"
	"time"
)

// Rate is a token bucket: Burst (at least 1) events at once, then one
// every Every.
type Rate struct {
	Burst int
	Every time.Duration
}

// bucket is a token bucket kept as the time it will be full again (the
// "theoretical arrival time" of GCRA): one field, no float, and a bucket
// whose time has passed is exactly a fresh one.
type bucket struct{ full time.Time }

// allows reports whether b has a token at now.
func (b *bucket) allows(now time.Time, r Rate) bool {
	return b.full.Sub(now) <= time.Duration(r.Burst-1)*r.Every
}

// take spends one token; allows must have said there is one.
func (b *bucket) take(now time.Time, r Rate) {
	if b.full.Before(now) {
		b.full = now
	}
	b.full = b.full.Add(r.Every)
}

// idle reports whether b is full at now, as if it had never been used.
func (b *bucket) idle(now time.Time) bool { return !b.full.After(now) }

// caller is one uid's bucket and the events suppressed since its last
// allowed one.
type caller struct {
	bucket
	suppressed uint64
}

// Verdict is what Allow decided about one event.
type Verdict struct {
	// OK: report the event.
	OK bool
	// Suppressed is how many of this caller's events were suppressed
	// since its last reported one (set only when OK).
	Suppressed uint64
	// Others is how many events were suppressed, since an earlier
	// report said so, of callers the limiter no longer tracks or could
	// not track: their counts would otherwise never be told (set only
	// when OK).
	Others uint64
}

// Limiter decides which events are reported. It is safe for concurrent
// use.
type Limiter struct {
	per, all Rate
	max      int
	now      func() time.Time

	mu      sync.Mutex
	global  bucket
	callers map[uint32]*caller
	// untracked is the bucket shared by callers that found the table
	// full; their suppressed events go to others.
	untracked bucket
	others    uint64
	// swept is when the table was last swept of idle callers: a sweep
	// walks the whole table, so a full table of busy callers is swept
	// at most once per per.Every, not for each event.
	swept time.Time
}

// New returns a limiter that reports a caller's events at rate per, all
// callers' at rate all, and tracks at most max callers; now is the clock.
func New(per, all Rate, max int, now func() time.Time) *Limiter {
	return &Limiter{per: per, all: all, max: max, now: now, callers: make(map[uint32]*caller)}
}

// Allow decides whether to report an event of the caller with uid.
func (l *Limiter) Allow(uid uint32) Verdict {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	c := l.lookup(uid, now)
	if c == nil {
		return l.allowUntracked(now)
	}
	// A token is taken only when both buckets have one, so that the
	// global cap does not use up a caller's share.
	if !c.allows(now, l.per) || !l.global.allows(now, l.all) {
		c.suppressed++
		return Verdict{}
	}
	c.take(now, l.per)
	l.global.take(now, l.all)
	v := Verdict{OK: true, Suppressed: c.suppressed, Others: l.others}
	c.suppressed, l.others = 0, 0
	return v
}

// allowUntracked is Allow for a caller that has no room in the table.
func (l *Limiter) allowUntracked(now time.Time) Verdict {
	if !l.untracked.allows(now, l.per) || !l.global.allows(now, l.all) {
		l.others++
		return Verdict{}
	}
	l.untracked.take(now, l.per)
	l.global.take(now, l.all)
	v := Verdict{OK: true, Others: l.others}
	l.others = 0
	return v
}

// lookup returns uid's entry, making one if the table has room (after
// sweeping it of idle callers if it is full); nil if it has none.
func (l *Limiter) lookup(uid uint32, now time.Time) *caller {
	if c := l.callers[uid]; c != nil {
		return c
	}
	if len(l.callers) >= l.max && now.Sub(l.swept) >= l.per.Every {
		l.swept = now
		for u, c := range l.callers {
			// An idle caller is as good as a new one, but for a count
			// not yet told: that goes to others.
			if c.idle(now) {
				l.others += c.suppressed
				delete(l.callers, u)
			}
		}
	}
	if len(l.callers) >= l.max {
		return nil
	}
	c := &caller{}
	l.callers[uid] = c
	return c
}
