package fs

import (
	"context"
	"errors"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/transport"
)

// An open of a device whose holder is closing waits for that close
// (devnode.Node.Open): FUSE sends the last close, RELEASE, after the
// closer's close(2) or exit has returned, so without the wait a reopen
// right after a close could find the node still open. A transport whose
// thread must not wait (an io_uring queue's: the RELEASE may be queued
// behind the OPEN on that very queue) says so with transport.OpenNoWait
// in the OPEN's flags, and serves the OPEN again where it may wait if it
// would have waited (transport.Conn.ServeQueued).

// openNode opens device node n for a new handle, waiting for a closing
// holder unless flags carry transport.OpenNoWait; then it answers
// transport.ErrnoOpenWouldWait instead.
func openNode(ctx context.Context, n *devnode.Node, flags uint32) error {
	if flags&transport.OpenNoWait == 0 {
		return n.Open(ctx)
	}
	err := n.TryOpen(ctx)
	if errors.Is(err, devnode.ErrClosing) {
		return transport.ErrnoOpenWouldWait
	}
	return err
}
