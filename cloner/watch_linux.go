//go:build linux

package cloner

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Watch follows the kernel's link changes with one netlink subscription
// (RTMGRP_LINK, no polling) until done is closed, and calls deleted with
// the ifindex of every interface the kernel removes (`ip link del`, a
// namespace going away). It returns once the subscription is in place, so
// nothing deleted after Watch returns is missed.
// onError hears of a failing subscription (for example lost messages).
func (b *Linux) Watch(done <-chan struct{}, deleted func(index int), onError func(error)) error {
	ch := make(chan netlink.LinkUpdate, 256)
	opts := netlink.LinkSubscribeOptions{ErrorCallback: func(err error) {
		select {
		case <-done: // closing the socket on done fails its last receive: not news
		default:
			onError(err)
		}
	}}
	if err := netlink.LinkSubscribeWithOptions(ch, done, opts); err != nil {
		return fmt.Errorf("cloner: subscribe to link changes: %w", err)
	}
	go func() { // ends when done closes: netlink then closes ch
		for u := range ch {
			if u.Header.Type == unix.RTM_DELLINK {
				deleted(int(u.Index))
			}
		}
	}()
	return nil
}
