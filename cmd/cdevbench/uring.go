package main

// The minimal FUSE-over-io_uring relay ("min-uring"): the same instrument
// as the minimal relay in relay.go (one file "t" whose READ reads the tun
// fd and whose WRITE writes it), but with requests fetched and answered
// through io_uring instead of read(2)/write(2) on /dev/fuse, to measure
// what the io_uring transport of FUSE would lift.
//
// The protocol, and how the kernel serves the queues, is described in
// internal/fuseuring, which this relay shares with cdevfs's transport;
// like libfuse, each queue here has a thread of its own pinned to the
// queue's CPU (queue q on CPU q).
//
// A READ that finds the tun empty cannot block the queue's thread (every
// other request on that CPU would wait behind it): the entry is parked, an
// IORING_OP_POLL_ADD on the tun fd is armed in the same ring, and the
// parked READs are answered when it fires.

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

const (
	uringIf      = "uring0"
	uringDepth   = 8 // ring entries per queue
	uringPayload = 128 * 1024

	pollUserData = 1 << 63 // user_data of the tun poll; entries use their index
)

// uringAvailable says whether min-uring can run here, and if not why.
func uringAvailable() (bool, string) { return fuseuring.Available() }

// uringQueue is one queue: the shared ring and entries, the tun fd, and
// the READs parked until it has a packet.
type uringQueue struct {
	*fuseuring.Queue
	tfd      int
	parked   []int
	pollArmd bool
}

func newUringQueue(qid, ffd, tfd int) (*uringQueue, error) {
	fq, err := fuseuring.NewQueue(qid, ffd, 2*uringDepth, uringPayload)
	if err != nil {
		return nil, err
	}
	return &uringQueue{Queue: fq, tfd: tfd}, nil
}

func (q *uringQueue) armPoll() {
	if q.pollArmd {
		return
	}
	q.Ring.PollAdd(q.tfd, unix.POLLIN, pollUserData)
	q.pollArmd = true
}

// serveRead answers the READ in entry i from the tun fd, or reports that
// it would block.
func (q *uringQueue) serveRead(i int) bool {
	e := q.Ents[i]
	r := fuseuring.InView[fuse.ReadIn](e)
	m, err := unix.Read(q.tfd, e.Pay[:min(int(r.Size), uringPayload)])
	switch {
	case err == unix.EAGAIN && r.Flags&unix.O_NONBLOCK == 0:
		return false
	case err != nil:
		q.Reply(i, err.(unix.Errno), 0)
	default:
		q.Reply(i, 0, m)
	}
	return true
}

// handle serves the request that arrived in entry i.
func (q *uringQueue) handle(i int) {
	e := q.Ents[i]
	h := fusewire.Header(e.Hdr)
	paySz := e.PayloadSize()
	switch h.Opcode {
	case fusewire.OpLookup:
		if h.NodeId != 1 || string(e.Pay[:paySz]) != "t\x00" {
			q.Reply(i, unix.ENOENT, 0)
			return
		}
		o := fusewire.View[fuse.EntryOut](e.Pay)
		*o = fuse.EntryOut{NodeId: 2}
		relayAttr(&o.Attr, 2)
		q.Reply(i, 0, sizeofEntryOut)
	case fusewire.OpGetattr:
		o := fusewire.View[fuse.AttrOut](e.Pay)
		*o = fuse.AttrOut{}
		relayAttr(&o.Attr, h.NodeId)
		q.Reply(i, 0, sizeofAttrOut)
	case fusewire.OpOpen:
		*fusewire.View[fuse.OpenOut](e.Pay) = fuse.OpenOut{Fh: 1, OpenFlags: relayOpenFlags}
		q.Reply(i, 0, sizeofOpenOut)
	case fusewire.OpRead:
		if len(q.parked) > 0 || !q.serveRead(i) {
			q.parked = append(q.parked, i)
			q.armPoll()
		}
	case fusewire.OpWrite:
		w := fuseuring.InView[fuse.WriteIn](e)
		m, err := unix.Write(q.tfd, e.Pay[:min(int(w.Size), paySz)])
		if err != nil {
			q.Reply(i, err.(unix.Errno), 0)
			return
		}
		*fusewire.View[fuse.WriteOut](e.Pay) = fuse.WriteOut{Size: uint32(m)}
		q.Reply(i, 0, sizeofWriteOut)
	case fusewire.OpFlush, fusewire.OpRelease:
		q.Reply(i, 0, 0)
	default:
		q.Reply(i, unix.ENOSYS, 0)
	}
}

// register submits every entry's REGISTER and reports the first error the
// kernel gives back at once.
func (q *uringQueue) register() error {
	for range uringDepth {
		if _, err := q.AddEntry(); err != nil {
			return err
		}
	}
	for try := 0; ; try++ {
		if err := q.Ring.Enter(false); err != nil {
			return err
		}
		var ferr error
		again := false
		q.Ring.Reap(func(ud uint64, res int32) {
			if res == -int32(unix.EAGAIN) && try < 100 { // INIT not processed yet
				q.Retry(int(ud))
				again = true
			} else if ferr == nil {
				ferr = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER qid %d: %w", q.QID, unix.Errno(-res))
			}
		})
		if ferr != nil || !again {
			return ferr
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run serves the queue until the connection goes (ENOTCONN on teardown).
func (q *uringQueue) run() error {
	for {
		if err := q.Ring.Enter(true); err != nil {
			return err
		}
		var ferr error
		q.Ring.Reap(func(ud uint64, res int32) {
			if ud == pollUserData {
				q.pollArmd = false
				n := 0
				for _, i := range q.parked {
					if !q.serveRead(i) {
						break
					}
					n++
				}
				q.parked = q.parked[n:]
				if len(q.parked) > 0 {
					q.armPoll()
				}
				return
			}
			i := int(ud)
			switch {
			case res == 0:
				q.handle(i)
			case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
				q.Retry(i) // as libfuse does
			case ferr == nil:
				ferr = fmt.Errorf("qid %d: uring command: %w", q.QID, unix.Errno(-res))
			}
		})
		if ferr != nil {
			return ferr
		}
	}
}

// uringServe is the min-uring relay process: like relayServe, with the
// requests after INIT carried by io_uring.
func uringServe(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: cdevbench uring-serve DIR")
		return 2
	}
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "min-uring:", err); return 1 }
	nq, err := fuseuring.PossibleCPUs()
	if err != nil {
		return fail(err)
	}
	tfd, ffd, err := relayMount(uringIf, args[0])
	if err != nil {
		return fail(err)
	}
	// INIT, over /dev/fuse.
	in, out := make([]byte, 132*1024), make([]byte, 4096)
	var ii *fuse.InitIn
	for {
		n, err := unix.Read(ffd, in)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return fail(fmt.Errorf("read INIT: %w", err))
		}
		if ii = fusewire.View[fuse.InitIn](in[:n]); ii == nil || ii.Opcode != fusewire.OpInit {
			return fail(fmt.Errorf("first request op %d (%d bytes), not INIT", fusewire.Opcode(in[:n]), n))
		}
		break
	}
	// Protocol 7.42 brought FUSE_OVER_IO_URING.
	body := relayInitReply(fusewire.OutBody[fuse.InitOut](out), ii, 42, fuseuring.InitExt, fuseuring.OverIOURingFlag2)
	if _, err := unix.Write(ffd, out[:fusewire.Reply(out, ii.Unique, 0, body)]); err != nil {
		return fail(fmt.Errorf("INIT reply: %w", err))
	}
	// One queue per possible CPU, each its own thread pinned to its CPU.
	errs, ended := make(chan error, nq), make(chan struct{}, nq)
	for qid := range nq {
		go func() {
			_ = fuseuring.PinThread(qid) // for ever: the ring is this thread's
			q, err := newUringQueue(qid, ffd, tfd)
			if err == nil {
				err = q.register()
			}
			errs <- err
			if err != nil {
				return
			}
			if err := q.run(); err != nil && !errors.Is(err, unix.ENOTCONN) { // ENOTCONN: unmounted
				fmt.Fprintln(os.Stderr, "min-uring:", err)
				os.Exit(1)
			}
			ended <- struct{}{}
		}()
	}
	for range nq {
		if err := <-errs; err != nil {
			return fail(err)
		}
	}
	// FORGET and INTERRUPT still come over /dev/fuse; anything else there
	// would mean the kernel fell back to the classic transport.
	go func() {
		in := make([]byte, 132*1024)
		for {
			n, err := unix.Read(ffd, in)
			if err == unix.EINTR || err == unix.EAGAIN || err == unix.ENOENT {
				continue
			}
			if err != nil {
				return
			}
			switch op := fusewire.Opcode(in[:n]); op {
			case fusewire.OpForget, fusewire.OpBatchForget, fusewire.OpInterrupt:
			default:
				fmt.Fprintf(os.Stderr, "min-uring: op %d arrived over /dev/fuse, not the ring (%d bytes)\n", op, n)
				os.Exit(1)
			}
		}
	}()
	return readyThenServe(args[0], nq, ended)
}
