package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"syscall"

	"github.com/cdevfs/cdevfs/devnode"
)

// An open of a device whose holder is closing waits for that close
// (devnode.Node.Open): FUSE sends the last close, RELEASE, after the
// closer's close(2) or exit has returned, so without the wait a reopen
// right after a close could find the node still open. An io_uring
// queue's thread must not wait: the RELEASE may be queued behind the
// OPEN on that very queue, and everything else on its CPU would stall.
// Such an OPEN is served in two steps: first on the queue's thread,
// told not to wait, and, only if it would have waited, again on a
// goroutine of its own.

const (
	// openNoWait, set by a queue in an OPEN's flags, tells the tree that
	// the OPEN must not wait. The kernel never sends the bit: open(2)
	// keeps only VALID_OPEN_FLAGS, all far below it.
	openNoWait = 1 << 31
	// errOpenWouldWait answers an OPEN told not to wait whose node's
	// holder is closing. The queue takes the answer back and never sends
	// it (serveQueued).
	errOpenWouldWait = syscall.ERESTART
	openInLen        = inHeaderLen + 8 // struct fuse_open_in: flags at 40
)

// openNode opens device node n for a new handle, waiting for a closing
// holder unless flags carry openNoWait; then it answers errOpenWouldWait
// instead.
func openNode(ctx context.Context, n *devnode.Node, flags uint32) error {
	if flags&openNoWait == 0 {
		return n.Open(ctx)
	}
	err := n.TryOpen(ctx)
	if errors.Is(err, devnode.ErrClosing) {
		return errOpenWouldWait
	}
	return err
}

// serveQueued is serve for a request on an io_uring queue's thread,
// which must not block: besides a READ that must wait for a packet, it
// leaves an OPEN that must wait for a closing holder (blocked is true),
// with in as it came, to be served where it may wait.
func (t *transport) serveQueued(in, out []byte) (n int, blocked bool) {
	ne := binary.NativeEndian
	if len(in) < openInLen || ne.Uint32(in[4:]) != opOpen {
		return t.serve(in, out, false)
	}
	flags := ne.Uint32(in[inHeaderLen:])
	ne.PutUint32(in[inHeaderLen:], flags|openNoWait)
	n, _ = t.serve(in, out, false)
	ne.PutUint32(in[inHeaderLen:], flags)
	if n >= 16 && int32(ne.Uint32(out[4:])) == -int32(errOpenWouldWait) {
		return 0, true
	}
	return n, false
}
