package fs

import (
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// A path operation that reaches a destroyed or hidden device node is
// answered ESTALE (devNode.stale): the kernel then walks the path once
// more, revalidating every entry (do_filp_open and vfs_statx retry with
// LOOKUP_REVAL), and acts on what the name is now. It retries only once:
// if the node the second walk found is destroyed before the operation
// reaches it (a destroy between its LOOKUP and its OPEN), a second ESTALE
// would reach the program, which no program expects of a local
// filesystem. staleAnswers remembers, per calling thread, the last name
// answered ESTALE, so that the retry gets the answer a race with a destroy
// gets on FreeBSD's devfs instead: ENXIO for an open (devfs_open of a
// vnode whose cdev is gone), ENOENT for a stat or a chmod.
//
// The kernel passes the caller's thread id, and a thread makes one system
// call at a time, so a second stale answer for the same thread and name
// within staleRetryWindow is that call's retry. An open that gets past
// the check (its retry found a live node) ends the call, and the thread
// is forgotten; a stat or chmod that does is not told apart from the
// GETATTR of an open's permission check, so its thread is remembered for
// the window, and a later call of it that meets another destroy of the
// same name inside the window is answered as a retry: a race with a
// destroy, told as one. A caller outside the daemon's pid namespace has
// thread id 0 and is always answered ESTALE.
const (
	staleRetryWindow = time.Second
	// staleThreads bounds the threads remembered (about 64 kB): any
	// caller can meet a hidden node, and none may grow the daemon's
	// memory. A thread that finds the table full is not remembered, and
	// its retry may get ESTALE.
	staleThreads = 1024
)

// staleAnswers decides what a path operation that met a stale node is
// answered. It is safe for concurrent use.
type staleAnswers struct {
	now func() time.Time

	// remembered is len(byThread), read without mu so that an open
	// forgets its thread at the cost of an atomic load while none is
	// remembered.
	remembered atomic.Int32

	mu sync.Mutex
	// byThread is, per thread id, the name it was last answered ESTALE
	// for and when; guarded by mu, at most staleThreads entries.
	byThread map[uint32]staleAnswer
	// swept is when byThread was last swept of answers past the window:
	// a sweep walks the whole table, so a full table is swept at most
	// once a window. Guarded by mu.
	swept time.Time
}

type staleAnswer struct {
	name string
	at   time.Time
}

func newStaleAnswers(now func() time.Time) *staleAnswers {
	return &staleAnswers{now: now, byThread: make(map[uint32]staleAnswer)}
}

// answer returns the errno for a path operation of thread tid that reached
// the stale node of name: ESTALE, or final if it is the kernel's retry of
// an operation already answered ESTALE.
func (s *staleAnswers) answer(tid uint32, name string, final syscall.Errno) syscall.Errno {
	if tid == 0 {
		return syscall.ESTALE
	}
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	last, known := s.byThread[tid]
	if known && last.name == name && now.Sub(last.at) < staleRetryWindow {
		s.deleteLocked(tid)
		return final
	}
	if !known && len(s.byThread) >= staleThreads {
		if now.Sub(s.swept) < staleRetryWindow {
			return syscall.ESTALE
		}
		s.sweepLocked(now)
		if len(s.byThread) >= staleThreads {
			return syscall.ESTALE
		}
	}
	s.byThread[tid] = staleAnswer{name: name, at: now}
	s.remembered.Store(int32(len(s.byThread)))
	return syscall.ESTALE
}

// forget ends what is remembered of thread tid: its system call got past
// the stale check.
func (s *staleAnswers) forget(tid uint32) {
	if s.remembered.Load() == 0 {
		return
	}
	s.mu.Lock()
	s.deleteLocked(tid)
	s.mu.Unlock()
}

// deleteLocked forgets thread tid. s.mu must be held.
func (s *staleAnswers) deleteLocked(tid uint32) {
	delete(s.byThread, tid)
	s.remembered.Store(int32(len(s.byThread)))
}

// sweepLocked forgets the answers older than the retry window. s.mu must
// be held.
func (s *staleAnswers) sweepLocked(now time.Time) {
	s.swept = now
	for tid, a := range s.byThread {
		if now.Sub(a.at) >= staleRetryWindow {
			s.deleteLocked(tid)
		}
	}
}
