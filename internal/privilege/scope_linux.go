package privilege

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// nsID names a namespace: the device and inode of its nsfs file, which
// /proc/PID/ns/* and the NS_GET_* ioctls lead to.
type nsID struct{ dev, ino uint64 }

// overflowUID is what the kernel shows for a uid that has no mapping in
// the reader's user namespace (kernel.overflowuid).
const overflowUID = 65534

// userNS is one user namespace of a scope's chain.
type userNS struct {
	id    nsID
	owner uint32 // the euid that made it, as the daemon sees it
}

// Scope is a user namespace capabilities are checked in, with its
// ancestors as far as the daemon can see them: chain[0] is the namespace
// itself, chain[i+1] the parent of chain[i]. It never changes once made.
type Scope struct {
	chain []userNS
}

// NewScope returns the scope of the namespace file path (a /proc/PID/ns
// entry, or a bind mount of one such as /run/netns/NAME): the user
// namespace that owns it, or the namespace itself if it is a user
// namespace (which NS_GET_USERNS would answer with its parent).
func NewScope(path string) (*Scope, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("privilege: open %s: %w", path, err)
	}
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("privilege: %s is not a namespace: %w", path, err)
	}
	if typ != unix.CLONE_NEWUSER {
		owner, err := unix.IoctlRetInt(fd, unix.NS_GET_USERNS)
		unix.Close(fd)
		if err != nil {
			return nil, fmt.Errorf("privilege: the user namespace owning %s: %w", path, err)
		}
		fd = owner
	}
	s := &Scope{}
	for {
		ns, err := readUserNS(fd)
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("privilege: %s: %w", path, err)
		}
		s.chain = append(s.chain, ns)
		parent, err := unix.IoctlRetInt(fd, unix.NS_GET_PARENT)
		unix.Close(fd)
		// EPERM: the initial namespace, or a parent beyond the daemon's
		// own user namespace, which it may not see.
		if errors.Is(err, unix.EPERM) {
			return s, nil
		}
		if err != nil {
			return nil, fmt.Errorf("privilege: parent of a user namespace of %s: %w", path, err)
		}
		fd = parent
	}
}

func readUserNS(fd int) (userNS, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return userNS{}, err
	}
	owner, err := unix.IoctlGetUint32(fd, unix.NS_GET_OWNER_UID)
	if err != nil {
		return userNS{}, err
	}
	return userNS{id: nsID{st.Dev, st.Ino}, owner: owner}, nil
}

// Capable reports whether c holds capability cp in s, by the kernel's
// cap_capable: a task holds cp in its own user namespace if cp is in its
// effective set, and every capability in the namespaces its euid made
// below it (the owner rule), and nothing anywhere else: not in an
// ancestor, not in an unrelated namespace.
func (s *Scope) Capable(c *Creds, cp Cap) bool {
	if c == nil {
		return false
	}
	for i, ns := range s.chain {
		if ns.id != c.userNS {
			continue
		}
		// The walk of cap_capable reaches chain[i-1] before chain[i]:
		// its owner, if it is the caller, holds all of it. An unmapped
		// euid shows as the overflow uid, which proves nothing.
		if i > 0 && s.chain[i-1].owner != overflowUID {
			if euid, err := c.EUID(); err == nil && euid == s.chain[i-1].owner {
				return true
			}
		}
		return c.Effective.Has(cp)
	}
	return false
}

// Policy is cdevfs's privilege model: each capability is checked in the
// scope where the kernel would check it for the same action.
type Policy struct {
	net   *Scope // the user namespace owning the network namespace interfaces are made in
	mount *Scope // the user namespace owning the mount (the daemon's own)
}

// NewPolicy returns the policy of a daemon creating interfaces in the
// network namespace at netnsPath ("" for its own) and mounting in its
// own user namespace.
func NewPolicy(netnsPath string) (*Policy, error) {
	if netnsPath == "" {
		netnsPath = "/proc/self/ns/net"
	}
	net, err := NewScope(netnsPath)
	if err != nil {
		return nil, err
	}
	mount, err := NewScope("/proc/self/ns/user")
	if err != nil {
		return nil, err
	}
	return &Policy{net: net, mount: mount}, nil
}

// Capable reports whether c holds cp where cdevfs asks for it:
// CAP_NET_ADMIN in the network namespace's owner, as tun's TUNSETIFF
// checks it (ns_capable(net->user_ns, CAP_NET_ADMIN)); every other in the
// mount's owner, as the VFS checks capabilities against the
// filesystem's user namespace (capable_wrt_inode_uidgid).
func (p *Policy) Capable(c *Creds, cp Cap) bool {
	if cp == NetAdmin {
		return p.net.Capable(c, cp)
	}
	return p.mount.Capable(c, cp)
}

// Held returns the capabilities of caps that c holds where they count.
func (p *Policy) Held(c *Creds, caps Set) Set {
	var held Set
	for cp := Cap(0); cp <= maxCap; cp++ {
		if caps.Has(cp) && p.Capable(c, cp) {
			held |= 1 << cp
		}
	}
	return held
}
