//go:build linux

package cloner

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Watch follows the kernel's link changes in the backend's namespace with
// one netlink subscription (RTMGRP_LINK, no polling) until done is closed.
// Once subscribed it lists the existing interfaces through w.Appeared, so
// nothing made before or after Watch returns is missed; events and the
// listing may report one interface twice, and w must not mind. The
// returned channel is closed once no callback runs or will run any more
// (after done is closed): a shutdown waits for it before the deletions
// it makes itself, so none of them reaches a registry being torn down.
func (b *Linux) Watch(done <-chan struct{}, w Watcher) (<-chan struct{}, error) {
	ch := make(chan netlink.LinkUpdate, 256)
	opts := netlink.LinkSubscribeOptions{ErrorCallback: func(err error) {
		select {
		case <-done: // closing the socket on done fails its last receive: not news
		default:
			w.Error(err)
		}
	}}
	if b.ns.IsOpen() {
		opts.Namespace = &b.ns
	}
	if err := b.handle(func(*netlink.Handle) error {
		return netlink.LinkSubscribeWithOptions(ch, done, opts)
	}); err != nil {
		return nil, fmt.Errorf("cloner: subscribe to link changes: %w", err)
	}
	stopped := make(chan struct{})
	go func() {
		defer func() {
			close(stopped)
			// netlink closes ch once its socket, closed on done, fails;
			// until then it may still be sending: drain, unheard.
			for range ch {
			}
		}()
		for {
			select {
			case <-done:
				return
			case u, ok := <-ch:
				if !ok {
					return
				}
				select {
				case <-done: // done while this event waited: not delivered
					return
				default:
				}
				switch u.Header.Type {
				case unix.RTM_DELLINK:
					w.Deleted(int(u.Index))
				case unix.RTM_NEWLINK:
					w.Appeared(b.linkInfo(u.Link))
				}
			}
		}
	}()
	links, err := b.linkList()
	if err != nil {
		return stopped, err
	}
	for _, l := range links {
		w.Appeared(b.linkInfo(l))
	}
	return stopped, nil
}
