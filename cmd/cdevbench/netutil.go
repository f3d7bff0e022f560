package main

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"

	"github.com/cdevfs/cdevfs/bsdtun"
	"golang.org/x/sys/unix"
)

// gifname asks a cdevfs device for its interface name (TUNGIFNAME).
func gifname(fd int) (string, error) {
	var ifr [bsdtun.IfreqSize]byte
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(bsdtun.TUNGIFNAME), uintptr(unsafePointer(&ifr[0]))); e != 0 {
		return "", e
	}
	return unix.ByteSliceToString(ifr[:16]), nil
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// configure gives interface name the address local/24 and brings it up.
func configure(name string, local netip.Addr) error {
	if err := ip("addr", "add", local.String()+"/24", "dev", name); err != nil {
		return err
	}
	return ip("link", "set", name, "up")
}

func sysctl(path, v string) { _ = os.WriteFile("/proc/sys/"+path, []byte(v), 0o644) }
