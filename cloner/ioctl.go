package cloner

import (
	"context"
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/cdevfs/cdevfs/bsdtun"
	"github.com/cdevfs/cdevfs/devnode"
	"golang.org/x/sys/unix"
)

// bsdState is a device's FreeBSD tun/tap state that has no Linux
// counterpart (or whose counterpart, like the MTU, lives in the kernel and
// is not cached here). It is guarded by device.mu.
type bsdState struct {
	debug    int32
	baudrate int32
	head     bool   // TUNSIFHEAD: a 4-byte address family before each packet
	lmode    bool   // TUNSLMODE: link-layer mode, header off
	mode     uint32 // TUNSIFMODE: IFF_POINTOPOINT or IFF_BROADCAST, maybe IFF_MULTICAST
	pid      int32  // TUNSIFPID: owning pid
}

// Linux address families carried in the TUNSIFHEAD header.
const (
	afInet  = unix.AF_INET
	afInet6 = unix.AF_INET6
	minMTU  = 68 // IPv4's minimum, the Linux tun's lower bound
)

var _ devnode.Ioctler = (*device)(nil)

// Ioctl implements devnode.Ioctler: FreeBSD's tunioctl(), with the
// commands re-encoded for Linux (package bsdtun). Commands only a layer-3
// tun has (TUNSLMODE, TUNSIFMODE, TUNSIFPID, TUNSIFHEAD, TUNGIFHEAD) are
// ENOTTY on a tap, as in FreeBSD, where if_tap.h has no such names.
func (d *device) Ioctl(ctx context.Context, cmd uint32, pid uint32, in, out []byte) error {
	clear(out) // every output buffer is written whole
	tun := d.c.kind == Tun
	switch cmd {
	case bsdtun.TUNSDEBUG:
		v, err := intArg(in)
		if err != nil {
			return err
		}
		d.mu.Lock()
		d.st.debug = v
		d.mu.Unlock()
	case bsdtun.TUNGDEBUG:
		d.mu.Lock()
		v := d.st.debug
		d.mu.Unlock()
		return putInt(out, v)
	case bsdtun.TUNSIFINFO:
		return d.setInfo(in)
	case bsdtun.TUNGIFINFO:
		return d.getInfo(out)
	case bsdtun.TUNGIFNAME:
		if len(out) < unix.IFNAMSIZ {
			return syscall.EINVAL
		}
		copy(out[:unix.IFNAMSIZ-1], d.link.Name())
	case bsdtun.TUNSTRANSIENT:
		v, err := intArg(in)
		if err != nil {
			return err
		}
		if d.foreign && v != 0 {
			// A transient device is deleted on last close, and cdevfs
			// never deletes an interface it did not make.
			d.c.log.Warn("refused", "action", "TUNSTRANSIENT", "unit", d.link.Name(), "pid", pid, "reason", "interface not made by cdevfs")
			return syscall.EPERM
		}
		if n := d.node.Load(); n != nil {
			n.SetTransient(v != 0)
		}
	case bsdtun.TUNGTRANSIENT:
		var v int32
		if n := d.node.Load(); n != nil && n.Flags()&devnode.FlagTransient != 0 {
			v = 1
		}
		return putInt(out, v)
	case bsdtun.TUNSLMODE:
		v, err := tunIntArg(tun, in)
		if err != nil {
			return err
		}
		d.mu.Lock()
		d.st.lmode = v != 0
		if d.st.lmode {
			d.st.head = false
		}
		d.mu.Unlock()
	case bsdtun.TUNSIFHEAD:
		v, err := tunIntArg(tun, in)
		if err != nil {
			return err
		}
		d.mu.Lock()
		d.st.head = v != 0
		if d.st.head {
			d.st.lmode = false
		}
		d.mu.Unlock()
	case bsdtun.TUNGIFHEAD:
		if !tun {
			return syscall.ENOTTY
		}
		var v int32
		d.mu.Lock()
		if d.st.head {
			v = 1
		}
		d.mu.Unlock()
		return putInt(out, v)
	case bsdtun.TUNSIFMODE:
		v, err := tunIntArg(tun, in)
		if err != nil {
			return err
		}
		return d.setMode(uint32(v))
	case bsdtun.TUNSIFPID:
		if !tun {
			return syscall.ENOTTY
		}
		d.mu.Lock()
		d.st.pid = int32(pid)
		d.mu.Unlock()
	default:
		return syscall.ENOTTY
	}
	return nil
}

// setInfo is TUNSIFINFO: the MTU goes to the real interface; the type
// must be the interface's own; the baudrate is recorded.
func (d *device) setInfo(in []byte) error {
	if len(in) < bsdtun.TuninfoSize {
		return syscall.EINVAL
	}
	baud := int32(binary.NativeEndian.Uint32(in[0:]))
	mtu := int(binary.NativeEndian.Uint16(in[4:]))
	if typ := in[6]; typ != d.ifType() || mtu < minMTU || mtu > bsdtun.MRU {
		return fmt.Errorf("cloner: TUNSIFINFO mtu %d type %#x: %w", mtu, typ, syscall.EINVAL)
	}
	if err := d.link.SetMTU(mtu); err != nil {
		return d.check(err)
	}
	d.mu.Lock()
	d.st.baudrate = baud
	d.mu.Unlock()
	return nil
}

// getInfo is TUNGIFINFO: the MTU as the kernel has it now.
func (d *device) getInfo(out []byte) error {
	if len(out) < bsdtun.TuninfoSize {
		return syscall.EINVAL
	}
	mtu, _, err := d.link.MTU()
	if err != nil {
		return d.check(err)
	}
	d.mu.Lock()
	baud := d.st.baudrate
	d.mu.Unlock()
	binary.NativeEndian.PutUint32(out[0:], uint32(baud))
	binary.NativeEndian.PutUint16(out[4:], uint16(mtu))
	out[6] = d.ifType()
	return nil
}

func (d *device) ifType() byte {
	if d.c.kind == Tap {
		return bsdtun.IFT_ETHER
	}
	return bsdtun.IFT_PPP
}

// setMode is TUNSIFMODE: IFF_POINTOPOINT or IFF_BROADCAST, optionally
// with IFF_MULTICAST; EBUSY while the interface is up (FreeBSD refuses
// to change the mode of a running interface).
func (d *device) setMode(v uint32) error {
	switch v &^ unix.IFF_MULTICAST {
	case unix.IFF_POINTOPOINT, unix.IFF_BROADCAST:
	default:
		return fmt.Errorf("cloner: TUNSIFMODE %#x: %w", v, syscall.EINVAL)
	}
	_, up, err := d.link.MTU()
	if err != nil {
		return d.check(err)
	}
	if up {
		return fmt.Errorf("cloner: TUNSIFMODE while %s is up: %w", d.link.Name(), syscall.EBUSY)
	}
	d.mu.Lock()
	d.st.mode = v
	d.mu.Unlock()
	return nil
}

func intArg(in []byte) (int32, error) {
	if len(in) < 4 {
		return 0, syscall.EINVAL
	}
	return int32(binary.NativeEndian.Uint32(in)), nil
}

func tunIntArg(tun bool, in []byte) (int32, error) {
	if !tun {
		return 0, syscall.ENOTTY
	}
	return intArg(in)
}

func putInt(out []byte, v int32) error {
	if len(out) < 4 {
		return syscall.EINVAL
	}
	binary.NativeEndian.PutUint32(out, uint32(v))
	return nil
}

// headMode reports whether packets carry the TUNSIFHEAD header.
func (d *device) headMode() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.head
}

// readHead reads one packet after a 4-byte address family in network
// byte order (FreeBSD's TUN_IFHEAD), taken from the IP version.
func (d *device) readHead(ctx context.Context, p []byte, nonblock bool) (int, error) {
	var one [1]byte
	body := one[:]
	if len(p) > 4 {
		body = p[4:]
	}
	n, err := d.link.Read(ctx, body, nonblock)
	if err != nil {
		return 0, d.check(err)
	}
	af := uint32(afInet)
	if n > 0 && body[0]>>4 == 6 {
		af = afInet6
	}
	var h [4]byte
	binary.BigEndian.PutUint32(h[:], af)
	if len(p) <= 4 {
		return copy(p, h[:]), nil
	}
	copy(p, h[:])
	return 4 + n, nil
}

// writeHead writes one packet that starts with a TUNSIFHEAD header; a
// family other than AF_INET or AF_INET6 is EAFNOSUPPORT.
func (d *device) writeHead(ctx context.Context, p []byte) (int, error) {
	if len(p) < 4 {
		return 0, syscall.EINVAL
	}
	switch binary.BigEndian.Uint32(p) {
	case afInet, afInet6:
	default:
		return 0, fmt.Errorf("cloner: address family %d: %w", binary.BigEndian.Uint32(p), syscall.EAFNOSUPPORT)
	}
	n, err := d.link.Write(ctx, p[4:])
	if err != nil {
		return 0, d.check(err)
	}
	return n + 4, nil
}
