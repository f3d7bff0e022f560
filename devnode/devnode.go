// Package devnode is the cdev layer of cdevfs: a registry of named device
// nodes with FreeBSD devfs semantics.
//
//   - References (dev_ref/dev_rel): a node's Device is released (its fd
//     closed) only after the last reference is dropped. Who holds one:
//     the registry while the name is linked; every caller of Lookup or
//     Clone until it calls Rel; every open handle from Open to Close.
//   - Exclusive open (TUN_OPEN): one opener holds a node at a time. An
//     opener that finds the holder closing waits, a bounded time, for
//     that close to end, so that a close the caller has seen return
//     frees the node (Open, Closing).
//   - In-flight operations (si_threadcount): every device method runs
//     between Enter and Exit. Destroy waits for the count to drain.
//   - Destroy is a barrier (destroy_dev): mark dying, revoke, drain, unlink,
//     destroy the backing object, drop the registry's reference.
//   - DestroySched defers that barrier to a worker (destroy_dev_sched), for
//     callers that are themselves an in-flight operation (a last close).
//   - Clone handlers (dev_clone) create a node for a name on demand and
//     return it with one reference held for the caller (FreeBSD's
//     MAKEDEV_REF), so the node cannot be destroyed between publication
//     and use.
//
// Lock order: a cloner's own lock (outside this package) → Registry.mu →
// Node.mu. Device methods are never called with Registry.mu or Node.mu held.
package devnode

import (
	"context"
)

// Device is the driver side of a node (cdevsw and softc together).
// Implementations must be safe for concurrent use.
type Device interface {
	// Open attaches an opener. devnode guarantees exclusivity: Open is
	// never called while the node is already open.
	Open(ctx context.Context) error
	// Close detaches the last opener (like tunclose(): link down, keep).
	Close() error
	// Revoke wakes every blocked operation; from then on they fail with
	// ENXIO. It must not block.
	Revoke()
	// Destroy removes the backing object. It must call unlink while
	// holding whatever serializes creation of the same name, so that a
	// creator never sees the name half freed.
	Destroy(unlink func()) error
	// Release frees what the device holds (its fd). Called once, when the
	// last reference is dropped.
	Release()
}

// IO is implemented by devices that carry data, one packet per call.
// Read blocks unless nonblock; ctx ending ends it with EINTR.
type IO interface {
	Read(ctx context.Context, p []byte, nonblock bool) (int, error)
	Write(ctx context.Context, p []byte) (int, error)
}

// Ioctler is implemented by devices with ioctls. in holds the command's
// input (its size is encoded in cmd); out must be filled completely. pid
// is the caller's. Unknown commands fail with ENOTTY.
type Ioctler interface {
	Ioctl(ctx context.Context, cmd uint32, pid uint32, in, out []byte) error
}

// Poller is implemented by devices whose readiness can be waited for.
// Poll returns poll(2) revents (POLLIN when a packet is queued, POLLOUT
// always, POLLERR|POLLHUP once gone). With wake not nil the device keeps
// it and calls it on every later readiness change (each new packet, and
// the revoke) until the device is closed; a later wake replaces it.
type Poller interface {
	Poll(wake func()) uint32
}

// ReadWaiter is implemented by devices whose blocking Read waits for one
// file descriptor to turn readable. ReadFD returns it (-1 if there is
// none): a caller that is in flight (between Enter and Exit) on an open
// node may wait for it itself, with poll(2) or io_uring, and then Read
// with nonblock set, instead of blocking a thread in Read. The fd stays
// open while the node is open and the caller in flight (the device is
// closed only by the last close, released only after a drain); the
// caller must not close it. A wait that outlives a revoke is the caller's
// to end: the registry's observer is told when (Observer.Revoked).
type ReadWaiter interface {
	ReadFD() int
}
