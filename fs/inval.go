package fs

import (
	"log/slog"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
)

// invalidator tells the kernel when what it caches of the tree goes stale.
// Entries and attributes are cached for cacheTimeout (so that READDIRPLUS
// answers `ls -l` and a path walk costs no round trip); the price is that
// every change cdevfs makes behind the kernel's back is pushed here: a
// destroyed name (FUSE_NOTIFY_INVAL_ENTRY, so the next walk looks it up
// afresh and clones or misses), a name the rules now hide (the same), and
// attributes the rules changed (FUSE_NOTIFY_INVAL_INODE). A chmod through
// the mount needs nothing: its reply carries the new attributes.
//
// Notifications are written from a goroutine of their own, never from the
// code that makes the change. The kernel handles INVAL_ENTRY under the
// directory's inode lock, which a LOOKUP in that directory holds until we
// answer it; the names come from destroys that run under a cloner's lock,
// which that LOOKUP's handler may be waiting for (a clone of the same
// name). Writing the notification in the destroy would deadlock. A queued
// one is written after the destroy has let go of every lock, and the
// kernel orders it after any lookup that was in flight (it waits for the
// directory lock), so the entry that lookup left behind is dropped too.
type invalidator struct {
	dir *fs.Inode // the directory whose entries these are (the root)
	log *slog.Logger

	mu        sync.Mutex // guards q, stopped and abandoned
	q         []invalidation
	stopped   bool // nothing is cached any more (unmounted): drop everything
	abandoned bool // stop does not wait for run (abandon)

	wake chan struct{} // capacity 1: q became non-empty
	done chan struct{} // closed when run returns
}

type invalidation struct {
	name  string
	entry bool // drop the dentry name; otherwise the attributes of its inode
}

func newInvalidator(dir *fs.Inode, log *slog.Logger) *invalidator {
	v := &invalidator{dir: dir, log: log, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go v.run()
	return v
}

// entry queues the invalidation of name's dentry. It never blocks.
func (v *invalidator) entry(name string) { v.push(invalidation{name: name, entry: true}) }

// attrs queues the invalidation of the attributes of name's inode.
func (v *invalidator) attrs(name string) { v.push(invalidation{name: name}) }

func (v *invalidator) push(i invalidation) {
	if v == nil { // not mounted yet: the kernel caches nothing
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.stopped { // and wake is closed
		return
	}
	v.q = append(v.q, i)
	select {
	case v.wake <- struct{}{}:
	default:
	}
}

// stop drops what is queued and waits for the goroutine to end (unless
// abandon came first). Called once the mount is gone, before /dev/fuse
// is closed.
func (v *invalidator) stop() {
	if v.halt() {
		<-v.done
	}
}

// abandon drops what is queued and ends the goroutine without waiting
// for it, now or in a later stop: the notification it writes may wait
// for ever, for a directory whose lock a request stranded on a failed
// io_uring queue holds (Mount.Unmount).
func (v *invalidator) abandon() {
	v.mu.Lock()
	v.abandoned = true
	v.mu.Unlock()
	v.halt()
}

// halt stops the goroutine, once, and says whether to wait for it.
func (v *invalidator) halt() (wait bool) {
	v.mu.Lock()
	already := v.stopped
	v.stopped, v.q = true, nil
	wait = !v.abandoned
	v.mu.Unlock()
	if !already {
		close(v.wake)
	}
	return wait
}

func (v *invalidator) run() {
	defer close(v.done)
	for range v.wake {
		for {
			v.mu.Lock()
			q := v.q
			v.q = nil
			v.mu.Unlock()
			if len(q) == 0 {
				break
			}
			for _, i := range q {
				if e := v.send(i); e != 0 && e != syscall.ENOENT && e != syscall.ENODEV {
					v.log.Debug("cache invalidation refused", "name", i.name, "entry", i.entry, "errno", e)
				}
			}
		}
	}
}

// send writes one notification. ENOENT means the kernel had nothing
// cached under that name or node, which is fine, as is ENODEV from a
// connection that is gone; anything else is logged, at debug level.
func (v *invalidator) send(i invalidation) syscall.Errno {
	if i.entry {
		return v.dir.NotifyEntry(i.name)
	}
	if ch := v.dir.GetChild(i.name); ch != nil {
		return ch.NotifyContent(-1, 0) // offset < 0: attributes only
	}
	return 0
}
