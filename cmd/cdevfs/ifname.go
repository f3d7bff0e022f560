package main

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
	"unsafe"

	"github.com/cdevfs/cdevfs/bsdtun"
	"golang.org/x/sys/unix"
)

const ifnameUsage = `usage: cdevfs ifname [FD]

Prints the interface name of the tun or tap handle open on FD (default 0,
standard input), as TUNGIFNAME tells it: a shell learns which unit its
open of a clone node made.

	exec 3<>/dev/tun; unit=$(cdevfs ifname <&3)
`

// ifnameCmd is `cdevfs ifname [FD]`.
func ifnameCmd(args []string, stdout, stderr io.Writer) int {
	fd := 0
	switch {
	case len(args) == 1 && (args[0] == "-h" || args[0] == "--help"):
		fmt.Fprint(stdout, ifnameUsage)
		return 0
	case len(args) == 1:
		n, err := strconv.Atoi(args[0])
		if err != nil || n < 0 {
			fmt.Fprintf(stderr, "cdevfs ifname: %q is not a file descriptor\n%s", args[0], ifnameUsage)
			return 2
		}
		fd = n
	case len(args) > 1:
		fmt.Fprint(stderr, ifnameUsage)
		return 2
	}
	name, err := ifname(fd)
	if err != nil {
		fmt.Fprintf(stderr, "cdevfs ifname: fd %d: %v\n", fd, err)
		return 1
	}
	fmt.Fprintln(stdout, name)
	return 0
}

// ifname asks the handle on fd for its interface's name (TUNGIFNAME
// fills a struct ifreq, whose first IFNAMSIZ bytes are the name).
func ifname(fd int) (string, error) {
	var ifr [bsdtun.IfreqSize]byte
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), bsdtun.TUNGIFNAME, uintptr(unsafe.Pointer(&ifr[0]))); e != 0 {
		if e == unix.ENOTTY || e == unix.EINVAL {
			return "", fmt.Errorf("not a cdevfs tun or tap handle (%w)", e)
		}
		return "", e
	}
	name, _, _ := bytes.Cut(ifr[:unix.IFNAMSIZ], []byte{0})
	return string(name), nil
}
