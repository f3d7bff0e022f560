// Package kdev finds the kernel's character devices in sysfs: their
// device numbers and the mode devtmpfs gives their nodes, as the kernel
// reports them, never guessed.
package kdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Defaults are the devices of every tree: those an OCI runtime makes in a
// container's /dev (the runtime spec's default devices, less its links).
var Defaults = []string{"null", "zero", "full", "random", "urandom", "tty"}

// Device is one of the kernel's character devices, to be served as a
// node called Name.
type Device struct {
	Name         string
	Major, Minor uint32
	// Mode is the permission bits devtmpfs gives the device's node: the
	// uevent's DEVMODE, which the driver's devnode callback sets (0666
	// for null, zero, full, random, urandom, tty), or devtmpfs's 0600.
	Mode uint32
}

// Rdev is the device number as FUSE carries it in fuse_attr.rdev, which
// the kernel reads with new_decode_dev (a 12-bit major, a 20-bit minor).
func (d Device) Rdev() uint32 { return uint32(unix.Mkdev(d.Major, d.Minor)) }

func (d Device) String() string { return fmt.Sprintf("%s=%d:%d", d.Name, d.Major, d.Minor) }

// ErrMissing marks a device sysfs does not have.
var ErrMissing = errors.New("no such character device in sysfs")

// Spec is a device asked for by configuration: a name, and the numbers if
// given (NAME=MAJ:MIN).
type Spec struct {
	Name         string
	Major, Minor uint32
	Numbered     bool
}

// ParseSpec parses NAME or NAME=MAJ:MIN. NAME is one path component
// of printable characters, no glob characters (it is looked up in
// /sys/class/*/NAME).
func ParseSpec(s string) (Spec, error) {
	name, num, numbered := strings.Cut(s, "=")
	if err := checkName(name); err != nil {
		return Spec{}, fmt.Errorf("device %q: %w", s, err)
	}
	sp := Spec{Name: name, Numbered: numbered}
	if numbered {
		maj, min, err := parseNumbers(num)
		if err != nil {
			return Spec{}, fmt.Errorf("device %q: %w", s, err)
		}
		sp.Major, sp.Minor = maj, min
	}
	return sp, nil
}

func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return errors.New("want a name")
	case strings.ContainsAny(name, "/*?[\\"):
		return errors.New("a name is one path component without * ? [ \\")
	}
	for _, c := range name {
		if c <= ' ' || c == 0x7f {
			return errors.New("a name has no spaces or control characters")
		}
	}
	return nil
}

// parseNumbers parses "MAJ:MIN" as the kernel writes a device's dev file.
func parseNumbers(s string) (maj, min uint32, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return 0, 0, fmt.Errorf("%q: want MAJOR:MINOR", s)
	}
	// The kernel's limits: MINORBITS 20, and majors below 4096 (what
	// fuse_attr.rdev can carry).
	ma, err1 := strconv.ParseUint(a, 10, 12)
	mi, err2 := strconv.ParseUint(b, 10, 20)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("%q: want MAJOR:MINOR, a major below 4096 and a minor below 1048576", s)
	}
	return uint32(ma), uint32(mi), nil
}

// Sys is the root of a sysfs mount: "/sys" (a test's fake tree elsewhere).
type Sys string

// Resolve finds sp's device: by name in /sys/class/*/NAME/dev, or, with
// numbers, at /sys/dev/char/MAJ:MIN. An error wraps ErrMissing if sysfs
// has no such character device.
func (s Sys) Resolve(sp Spec) (Device, error) {
	if sp.Numbered {
		return s.at(sp.Name, sp.Major, sp.Minor)
	}
	return s.Lookup(sp.Name)
}

// Lookup finds the character device called name: a class device whose
// dev file (/sys/class/*/NAME/dev) gives numbers under which
// /sys/dev/char lists that same device (a block device's are under
// /sys/dev/block).
func (s Sys) Lookup(name string) (Device, error) {
	if err := checkName(name); err != nil {
		return Device{}, fmt.Errorf("device %q: %w", name, err)
	}
	devs, _ := filepath.Glob(filepath.Join(string(s), "class", "*", name, "dev"))
	var found []Device
	for _, dev := range devs {
		b, err := os.ReadFile(dev)
		if err != nil {
			continue
		}
		maj, min, err := parseNumbers(string(b))
		if err != nil {
			continue
		}
		if !s.same(filepath.Dir(dev), maj, min) {
			continue // not a character device
		}
		d, err := s.at(name, maj, min)
		if err != nil {
			return Device{}, err
		}
		found = append(found, d)
	}
	switch {
	case len(found) == 0:
		return Device{}, fmt.Errorf("device %q: %w (/sys/class/*/%s/dev)", name, ErrMissing, name)
	case len(found) > 1 && (found[0].Major != found[1].Major || found[0].Minor != found[1].Minor):
		return Device{}, fmt.Errorf("device %q: two character devices of that name: %d:%d and %d:%d; name one NAME=MAJ:MIN",
			name, found[0].Major, found[0].Minor, found[1].Major, found[1].Minor)
	}
	return found[0], nil
}

// same reports whether class device dir is the character device maj:min.
func (s Sys) same(dir string, maj, min uint32) bool {
	a, err1 := filepath.EvalSymlinks(dir)
	b, err2 := filepath.EvalSymlinks(s.charDir(maj, min))
	return err1 == nil && err2 == nil && a == b
}

func (s Sys) charDir(maj, min uint32) string {
	return filepath.Join(string(s), "dev", "char", fmt.Sprintf("%d:%d", maj, min))
}

// at checks that maj:min is a character device of the kernel's and
// returns it, called name, with the mode devtmpfs gives it.
func (s Sys) at(name string, maj, min uint32) (Device, error) {
	d := Device{Name: name, Major: maj, Minor: min, Mode: 0600}
	b, err := os.ReadFile(filepath.Join(s.charDir(maj, min), "uevent"))
	if errors.Is(err, fs.ErrNotExist) {
		return Device{}, fmt.Errorf("device %s: %w (%s)", d, ErrMissing, s.charDir(maj, min))
	}
	if err != nil {
		return Device{}, fmt.Errorf("device %s: %w", d, err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "DEVMODE="); ok {
			m, err := strconv.ParseUint(v, 8, 32)
			if err != nil || m&^07777 != 0 {
				return Device{}, fmt.Errorf("device %s: uevent DEVMODE=%q", d, v)
			}
			d.Mode = uint32(m)
		}
	}
	return d, nil
}
