package cloner

import (
	"sync"
	"sync/atomic"
)

// holdSet is what the cloners of one backend hold and are making, kept
// so that it can be read without their locks: the netlink watch reads it
// to drop, without waiting on a cloner's lock (which Clone holds across
// the create whose own events the watch is hearing), the link events that
// concern nothing new. A nil *holdSet holds nothing and drops nothing.
type holdSet struct {
	names    sync.Map // ifindex (int) → its node's name (string): the union of the cloners' byIndex
	creating sync.Map // interface name (string) → *making, while a cloner creates it
}

// making is one create under way.
type making struct{ state atomic.Int32 }

const (
	makingOpen    = iota // the create is under way; no event dropped
	makingSkipped        // the watch dropped an event of the name
	makingDone           // the create is over: events of the name go through
)

// holder is a Backend that keeps a holdSet for its watch (the Linux one).
type holder interface{ holds() *holdSet }

// add records that a cloner has a node named name on ifindex index.
func (h *holdSet) add(index int, name string) {
	if h != nil {
		h.names.Store(index, name)
	}
}

// remove records that no cloner has a node on ifindex index any more.
func (h *holdSet) remove(index int) {
	if h != nil {
		h.names.Delete(index)
	}
}

// begin records that a cloner is creating name, until end.
func (h *holdSet) begin(name string) *making {
	if h == nil {
		return nil
	}
	m := new(making)
	h.creating.Store(name, m)
	return m
}

// end records that the create m of name is over, and reports whether
// the watch dropped an event of the name meanwhile.
func (h *holdSet) end(name string, m *making) (skipped bool) {
	if h == nil || m == nil {
		return false
	}
	h.creating.CompareAndDelete(name, m)
	return m.state.Swap(makingDone) == makingSkipped
}

// quiet reports whether a link event (RTM_NEWLINK) of the interface with
// ifindex index, now named name, concerns nothing new to the cloners, so
// that the watch may drop it: either some cloner has a node on index
// under that same name (a change of state, alias or flags, which
// LinkAppeared ignores for an interface it holds), or nobody has a node
// on index and name is being created right now. In the second case the
// create learns that an event was dropped (end), and if it fails (the
// name was taken, perhaps by the interface of that event) it looks the
// name up again itself (Cloner.endCreate). A rename (a held index under
// another name) and anything unknown are not quiet.
func (h *holdSet) quiet(index int, name []byte) bool {
	if h == nil {
		return false
	}
	if v, ok := h.names.Load(index); ok {
		return v.(string) == string(name)
	}
	v, ok := h.creating.Load(string(name))
	if !ok {
		return false
	}
	m := v.(*making)
	for {
		switch s := m.state.Load(); s {
		case makingSkipped:
			return true
		case makingDone:
			return false
		default:
			if m.state.CompareAndSwap(s, makingSkipped) {
				return true
			}
		}
	}
}
