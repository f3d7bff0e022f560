// Package privilege decides whether the process behind a FUSE request
// holds a capability where it counts: in the user namespace that owns
// the daemon's network namespace (to create interfaces) or the daemon's
// mount (to act on nodes it does not own, to change the tree), as the
// kernel's ns_capable decides. It is the one place cdevfs decides
// privilege; the tree asks it and knows nothing of namespaces.
//
// uid 0 alone is not privileged (a container's root with its
// capabilities dropped holds none), and a user namespace of the caller's
// own grants nothing here: its capabilities are good only inside it.
package privilege

import "fmt"

// Cap is a capability number (linux/capability.h).
type Cap uint

// The capabilities cdevfs asks about.
const (
	Chown         Cap = 0  // give a node away (chown, chgrp)
	DacOverride   Cap = 1  // open a node whatever its mode; change the tree
	DacReadSearch Cap = 2  // open a node for reading whatever its mode
	Fowner        Cap = 3  // chmod and set the times of a node one does not own
	Fsetid        Cap = 4  // keep S_ISGID on chmod outside the node's group
	NetAdmin      Cap = 12 // create interfaces (clone)
	Mknod         Cap = 27 // make device nodes
	maxCap        Cap = 63
)

var capNames = map[Cap]string{
	Chown: "CAP_CHOWN", DacOverride: "CAP_DAC_OVERRIDE", DacReadSearch: "CAP_DAC_READ_SEARCH",
	Fowner: "CAP_FOWNER", Fsetid: "CAP_FSETID", NetAdmin: "CAP_NET_ADMIN", Mknod: "CAP_MKNOD",
}

func (c Cap) String() string {
	if s, ok := capNames[c]; ok {
		return s
	}
	return fmt.Sprintf("capability %d", uint(c))
}

// Set is a set of capabilities, bit c for Cap c (the layout of CapEff in
// /proc/PID/status).
type Set uint64

// Has reports whether c is in s.
func (s Set) Has(c Cap) bool { return c <= maxCap && s&(1<<c) != 0 }

// Of returns the set of the given capabilities.
func Of(caps ...Cap) Set {
	var s Set
	for _, c := range caps {
		s |= 1 << c
	}
	return s
}
