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
// listing may report one interface twice, and w must not mind.
func (b *Linux) Watch(done <-chan struct{}, w Watcher) error {
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
		return fmt.Errorf("cloner: subscribe to link changes: %w", err)
	}
	go func() { // ends when done closes: netlink then closes ch
		for u := range ch {
			switch u.Header.Type {
			case unix.RTM_DELLINK:
				w.Deleted(int(u.Index))
			case unix.RTM_NEWLINK:
				w.Appeared(b.linkInfo(u.Link))
			}
		}
	}()
	links, err := b.linkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		w.Appeared(b.linkInfo(l))
	}
	return nil
}
