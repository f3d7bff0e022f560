// Package tunfd binds /dev/net/tun fds to Linux tun/tap interfaces: the
// one ioctl, TUNSETIFF, that the daemon's backend, the benchmark's
// native reference and the tests' independent programs all make.
package tunfd

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// SetIff binds fd, an open /dev/net/tun, to the interface name with
// flags (IFF_TUN or IFF_TAP, IFF_NO_PI, IFF_TUN_EXCL): tun_set_iff makes
// the interface in the namespace the fd was opened in, or attaches fd to
// the existing one: EBUSY if another fd is attached, or if flags has
// IFF_TUN_EXCL.
func SetIff(fd int, name string, flags uint16) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("TUNSETIFF %q: %w", name, err)
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return nil
}

// Open opens /dev/net/tun, blocking and close-on-exec, in the calling
// thread's network namespace, and binds it to name (SetIff).
func Open(name string, flags uint16) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	if err := SetIff(fd, name, flags); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
