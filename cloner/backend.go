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
	Create(name string, kind Kind, attach bool) (Link, error)
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
	// Detach sets the interface down and closes the fd; the interface stays.
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
