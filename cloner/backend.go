package cloner

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Kind is the kind of interface a cloner makes.
type Kind int

const (
	// Tun carries raw IP packets.
	Tun Kind = iota
	// Tap carries Ethernet frames.
	Tap
)

// Prefix is the kind's name prefix and clone node name.
func (k Kind) Prefix() string {
	if k == Tap {
		return "tap"
	}
	return "tun"
}

// MaxPacket is the largest packet a write may carry (the MRU).
const MaxPacket = 65535

// Backend errors. A Link returns ErrGone once the kernel has deleted its
// interface behind our back (the fd fails), ErrRevoked once Wake was called.
var (
	ErrGone    = errors.New("cloner: interface is gone")
	ErrRevoked = fmt.Errorf("cloner: device revoked: %w", syscall.ENXIO)
)

// Backend makes real interfaces. The Linux one talks to /dev/net/tun and
// netlink; the fake one keeps packets in memory for unit tests.
type Backend interface {
	// Create makes the interface name exclusively: if any device of that
	// name exists it fails with an error wrapping EEXIST and touches
	// nothing. With attach the creating fd stays attached (the caller is
	// opening it); otherwise the interface is left persistent and closed.
	// The interface carries the backend's ownership mark.
	Create(name string, kind Kind, attach bool) (Link, error)
	// Adopt re-reads the interface with ifindex index from the kernel (a
	// watch event may be stale) and returns a closed Link for it and what
	// it is now. The Link attaches with the interface's own flags and,
	// unless info.Owner is OwnerSelf, never sets it down or deletes it.
	Adopt(index int) (Link, LinkInfo, error)
	// Find describes the interface named name, if there is one.
	Find(name string) (LinkInfo, error)
}

// BatchDeleter is a Backend that deletes many interfaces faster at once
// than one by one (the Linux one, at shutdown).
type BatchDeleter interface {
	// DeleteMany deletes the interfaces with these ifindexes; one already
	// gone is not an error.
	DeleteMany(indexes []int) error
}

// Owner says who made an interface, by the ownership mark it carries
// (the interface alias on Linux): the kernel keeps it across a crash of
// the daemon, so a restarted cdevfs knows its own interfaces.
type Owner int

const (
	// OwnerNone: made outside cdevfs (ip tuntap add, another program).
	OwnerNone Owner = iota
	// OwnerSelf: made by this cdevfs (the same mark), perhaps before a
	// crash.
	OwnerSelf
	// OwnerOther: made by another cdevfs instance (another mark).
	OwnerOther
)

// LinkInfo is an interface as the kernel describes it to the watch.
type LinkInfo struct {
	Name    string
	Index   int
	TunTap  bool // a tun/tap device; false for any other driver
	Kind    Kind // Tun or Tap, if TunTap
	Persist bool // IFF_PERSIST: it outlives its last fd
	Owner   Owner
}

// Watcher hears the kernel's link changes (see Linux.Watch).
type Watcher struct {
	// Appeared is called for every interface the kernel announces (new,
	// renamed or changed), and once for each existing one at start.
	Appeared func(LinkInfo)
	// Deleted is called with the ifindex of every interface removed.
	Deleted func(index int)
	// Error hears of a failing subscription (lost messages) and of a
	// failed attempt to resubscribe.
	Error func(error)
	// Known lists the ifindexes the watcher has nodes for. Before each
	// full dump the watch asks, so that an interface deleted while events
	// were being lost, which no event will ever report, is reported
	// Deleted when the dump lacks it. Nil: the watcher holds nothing.
	Known func() []int
	// Resynced, if not nil, is told that events were lost and the watch
	// has resubscribed and reconciled the watcher with a full dump.
	Resynced func()
}

// Link is one interface made by a Backend.
type Link interface {
	// Name is the name it was created with (the node's name; the kernel
	// name may change with a rename).
	Name() string
	// Index is the kernel's interface index (0 for a fake).
	Index() int
	// Attach opens the interface for I/O (a no-op if the creating fd is
	// still attached). It fails with ErrGone if the interface no longer
	// is the one we created, and with EBUSY if someone else holds it.
	Attach(ctx context.Context) error
	// Detach sets the interface down (unless it was adopted from outside
	// cdevfs: then it is left as its maker left it) and closes the fd;
	// the interface stays.
	Detach() error
	// Read reads one packet into p (truncating it), blocking unless
	// nonblock. ctx ending gives EINTR; Wake gives ErrRevoked.
	Read(ctx context.Context, p []byte, nonblock bool) (int, error)
	// Write writes one packet.
	Write(ctx context.Context, p []byte) (int, error)
	// Wake makes every blocked and future Read and Write fail with
	// ErrRevoked. It does not block.
	Wake()
	// Readable reports whether a packet is queued for Read.
	Readable() (bool, error)
	// Watch makes the link call wake on every new packet and on Wake,
	// until Detach or Close; a later call replaces wake.
	Watch(wake func())
	// MTU reads the interface's MTU and whether it is up.
	MTU() (mtu int, up bool, err error)
	// SetMTU sets the interface's MTU.
	SetMTU(mtu int) error
	// Delete removes the interface from the kernel.
	Delete() error
	// Close releases the fd, if any. Called once, last.
	Close() error
}
