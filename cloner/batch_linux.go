//go:build linux

package cloner

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DeleteMany implements BatchDeleter. Each RTM_DELLINK of one interface
// waits for its own RCU grace periods (about 16 ms here), so deleting
// 1,000 interfaces one by one takes 16 s. The kernel deletes a whole
// interface group in one request and one unregister batch
// (rtnl_group_dellink, `ip link del group N`): the interfaces are moved
// into a group no interface uses, the group is checked to hold exactly
// them, and deleted at once. If the check fails (an administrator chose
// the same group in the meantime) they are deleted one by one.
func (b *Linux) DeleteMany(indexes []int) error {
	if len(indexes) == 0 {
		return nil
	}
	links, err := b.linkList()
	if err != nil {
		return err
	}
	used := make(map[uint32]bool)
	present := make(map[int]netlink.Link)
	for _, l := range links {
		used[l.Attrs().Group] = true
		present[l.Attrs().Index] = l
	}
	group := uint32(0x63646576) // "cdev"
	for used[group] {
		group++
	}
	mine := make(map[int]bool)
	err = b.handle(func(h *netlink.Handle) error {
		for _, i := range indexes {
			if l := present[i]; l != nil {
				if err := h.LinkSetGroup(l, int(group)); err == nil {
					mine[i] = true
				}
			}
		}
		return nil
	})
	if err != nil || len(mine) == 0 {
		return err
	}
	if b.groupIsExactly(group, mine) {
		if err := b.delGroup(group); err == nil {
			return nil
		}
	}
	var first error
	for i := range mine {
		l := present[i]
		if err := b.handle(func(h *netlink.Handle) error { return h.LinkDel(l) }); err != nil && first == nil && !errors.Is(err, unix.ENODEV) {
			first = fmt.Errorf("cloner: delete %s: %w", l.Attrs().Name, err)
		}
	}
	return first
}

// groupIsExactly reports whether the interfaces in group are those of want.
func (b *Linux) groupIsExactly(group uint32, want map[int]bool) bool {
	links, err := b.linkList()
	if err != nil {
		return false
	}
	n := 0
	for _, l := range links {
		if l.Attrs().Group != group {
			continue
		}
		if !want[l.Attrs().Index] {
			return false
		}
		n++
	}
	return n == len(want)
}

// delGroup sends RTM_DELLINK for a whole group. netlink.Handle has no
// group delete, so the request is built here, on a socket of its own in
// the backend's namespace.
func (b *Linux) delGroup(group uint32) error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.closed {
		return errClosed
	}
	s, err := nl.GetNetlinkSocketAt(b.ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer s.Close()
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(group)))
	if err := s.Send(req); err != nil {
		return err
	}
	for {
		msgs, _, err := s.Receive()
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != req.Seq || m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			if e := int32(binary.NativeEndian.Uint32(m.Data[:4])); e != 0 {
				return fmt.Errorf("cloner: delete link group %d: %w", group, syscall.Errno(-e))
			}
			return nil
		}
	}
}

// linkList lists the interfaces of the backend's namespace.
func (b *Linux) linkList() (links []netlink.Link, err error) {
	if herr := b.handle(func(h *netlink.Handle) error {
		links, err = h.LinkList()
		return nil
	}); herr != nil {
		return nil, herr
	}
	if err != nil {
		return nil, fmt.Errorf("cloner: list links: %w", err)
	}
	return links, nil
}
