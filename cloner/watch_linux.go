//go:build linux

package cloner

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// watchRcvBuf is the receive buffer asked for the subscription's socket;
// the kernel doubles it for its bookkeeping (socket(7)). A link event
// takes about 2.3 KB of it (the default 208 KiB overflows at 92 events,
// measured), so 8 MiB hold some 3,600 events: a burst of 1,000
// `ip tuntap add` while the daemon is stopped fits, and the watch need
// not resync. The memory is taken only while events wait.
const watchRcvBuf = 4 << 20

// Watch pauses, between failed attempts to subscribe again, grow from
// watchRetryMin to watchRetryMax.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 5 * time.Second
)

// dumpTries bounds the dumps tried in a row when the kernel interrupts
// them (NLM_F_DUMP_INTR: the link table changed during the dump).
const dumpTries = 10

// Watch follows the kernel's link changes in the backend's namespace with
// one netlink subscription (RTNLGRP_LINK, no polling) until done is closed.
// Once subscribed it lists the existing interfaces through w.Appeared, so
// nothing made before or after Watch returns is missed; events and the
// listing may report one interface twice, and w must not mind.
//
// The watch never goes deaf. When events arrive faster than w takes them
// (a daemon stopped with SIGSTOP during a burst of `ip tuntap add`), the
// kernel drops what the socket cannot hold and the next receive fails
// with ENOBUFS (netlink_overrun()); the events lost will never be sent
// again. On that or any receive error the watch reports it to w.Error,
// subscribes again and resyncs w from a full dump (see resync), then
// tells w.Resynced.
//
// The returned channel is closed once no callback runs or will run any
// more (after done is closed): a shutdown waits for it before the
// deletions it makes itself, so none of them reaches a registry being
// torn down. If Watch fails, no callback runs after it returns.
func (b *Linux) Watch(done <-chan struct{}, w Watcher) (<-chan struct{}, error) {
	s, err := b.subscribe()
	if err != nil {
		return nil, err
	}
	if err := b.resync(done, w); err != nil {
		s.Close()
		return nil, err
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		b.follow(done, w, s)
	}()
	return stopped, nil
}

// follow delivers the events of s to w and, each time s fails, subscribes
// again and resyncs, until done is closed.
func (b *Linux) follow(done <-chan struct{}, w Watcher, s *nl.NetlinkSocket) {
	for {
		err := b.receive(done, w, s)
		s.Close()
		if err == nil {
			return // done
		}
		w.Error(err)
		if s = b.resubscribe(done, w); s == nil {
			return
		}
		if stopping(done) {
			s.Close()
			return
		}
		if w.Resynced != nil {
			w.Resynced()
		}
	}
}

// resubscribe subscribes again and resyncs w. A failure (no memory or fd
// for the socket, the dump failing) is reported and tried again after a
// pause, until it works or done is closed (nil).
func (b *Linux) resubscribe(done <-chan struct{}, w Watcher) *nl.NetlinkSocket {
	pause := watchRetryMin
	for {
		s, err := b.subscribe()
		if err == nil {
			if err = b.resync(done, w); err == nil {
				return s
			}
			s.Close()
		}
		if stopping(done) {
			return nil
		}
		w.Error(fmt.Errorf("%w; trying again in %v", err, pause))
		t := time.NewTimer(pause)
		select {
		case <-done:
			t.Stop()
			return nil
		case <-t.C:
		}
		pause = min(2*pause, watchRetryMax)
	}
}

// subscribe opens a netlink socket in the backend's namespace that hears
// RTNLGRP_LINK, with a receive buffer of watchRcvBuf.
func (b *Linux) subscribe() (*nl.NetlinkSocket, error) {
	b.mu.RLock() // b.ns stays open
	defer b.mu.RUnlock()
	if b.closed {
		return nil, errClosed
	}
	s, err := nl.SubscribeAt(b.ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK)
	if err != nil {
		return nil, fmt.Errorf("cloner: subscribe to link changes: %w", err)
	}
	// SO_RCVBUFFORCE goes past net.core.rmem_max but needs CAP_NET_ADMIN
	// in the initial user namespace (sk_setsockopt); in a container,
	// SO_RCVBUF gets what rmem_max allows.
	if err := s.SetReceiveBufferSize(watchRcvBuf, true); err != nil {
		if err := s.SetReceiveBufferSize(watchRcvBuf, false); err != nil {
			s.Close()
			return nil, fmt.Errorf("cloner: receive buffer of the link subscription: %w", err)
		}
	}
	return s, nil
}

// receive delivers the events of s to w until done is closed (nil) or a
// receive fails (its error).
func (b *Linux) receive(done <-chan struct{}, w Watcher, s *nl.NetlinkSocket) error {
	// Closing the socket ends a receive blocked in it.
	quit, closer := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(closer)
		select {
		case <-done:
			s.Close()
		case <-quit:
		}
	}()
	defer func() {
		close(quit)
		<-closer
	}()
	for {
		msgs, from, err := s.Receive()
		if stopping(done) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("cloner: receive link changes: %w", err)
		}
		if from.Pid != nl.PidKernel {
			continue // only the kernel reports links
		}
		for _, m := range msgs {
			if stopping(done) {
				return nil // done while this event waited: not delivered
			}
			b.deliver(w, m)
		}
	}
}

// deliver hands one message of the subscription to w.
func (b *Linux) deliver(w Watcher, m syscall.NetlinkMessage) {
	switch m.Header.Type {
	case unix.RTM_NEWLINK:
		hdr := unix.NlMsghdr(m.Header)
		link, err := netlink.LinkDeserialize(&hdr, m.Data)
		if err != nil {
			w.Error(fmt.Errorf("cloner: link event: %w", err))
			return
		}
		w.Appeared(b.linkInfo(link))
	case unix.RTM_DELLINK:
		if len(m.Data) >= unix.SizeofIfInfomsg {
			w.Deleted(int(nl.DeserializeIfInfomsg(m.Data).Index))
		}
	}
}

// resync reconciles w with a full dump of the namespace's interfaces:
// each ifindex w knows that the dump lacks is reported Deleted, then each
// interface in it Appeared (new, renamed or unchanged: w must not mind).
// w.Known is read before the dump, so an interface made after it started
// is not taken for deleted; and a lacking ifindex cannot stand for
// another interface, as the kernel hands ifindexes out cyclically and
// reuses one only after its counter wraps at 2^31 (dev_index_reserve()).
func (b *Linux) resync(done <-chan struct{}, w Watcher) error {
	var known []int
	if w.Known != nil {
		known = w.Known()
	}
	links, err := b.dump(done)
	if err != nil {
		return err
	}
	present := make(map[int]bool, len(links))
	for _, l := range links {
		present[l.Attrs().Index] = true
	}
	for _, i := range known {
		if stopping(done) {
			return nil
		}
		if !present[i] {
			w.Deleted(i)
		}
	}
	for _, l := range links {
		if stopping(done) {
			return nil
		}
		w.Appeared(b.linkInfo(l))
	}
	return nil
}

// dump lists the namespace's interfaces in one complete dump. An
// interrupted one may lack interfaces that exist, and the node of an
// interface taken for deleted is destroyed (deleting the interface, if
// cdevfs made it), so it is tried again.
func (b *Linux) dump(done <-chan struct{}) ([]netlink.Link, error) {
	for try := 1; ; try++ {
		links, err := b.linkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || try == dumpTries || stopping(done) {
			return links, err
		}
	}
}

// stopping reports whether done is closed.
func stopping(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}
