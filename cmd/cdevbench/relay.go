package main

// The minimal relay: the least a FUSE daemon can do to carry tun packets
// over the classic /dev/fuse transport, as the floor cdevfs is measured
// against. One mount with one regular file "t"; READ reads the tun fd
// straight into the reply buffer, WRITE writes the request's payload; no
// go-fuse, no allocation, no locks, a fixed set of reader threads blocked
// in read(2) on /dev/fuse. It implements only what the benchmark's client
// does (no poll, no interrupt, no ioctl): a measuring instrument, not a
// product.

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func unsafePointer(b *byte) unsafe.Pointer { return unsafe.Pointer(b) }

const (
	relayIf      = "relay0"
	relayThreads = 4
	fuseOpLookup = 1
	fuseOpForget = 2
	fuseOpGetatt = 3
	fuseOpOpen   = 14
	fuseOpRead   = 15
	fuseOpWrite  = 16
	fuseOpRel    = 18
	fuseOpFlush  = 25
	fuseOpInit   = 26
	fuseOpIntr   = 36
	fuseOpDestr  = 38
	fuseOpBForg  = 42
)

type relayProc struct {
	cmd         *exec.Cmd
	dir         string
	name        string // the column: min-relay, min-uring
	ifname      string
	local, peer netip.Addr
}

// startRelay runs `cdevbench relay-serve DIR` (the classic /dev/fuse
// relay) or, with uring, `cdevbench uring-serve DIR`, and waits for it to
// serve.
func startRelay(uring bool) (*relayProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "cdevbench-relay-")
	if err != nil {
		return nil, err
	}
	r := &relayProc{dir: dir, name: "min-relay", ifname: relayIf,
		local: netip.MustParseAddr("198.18.3.1"), peer: netip.MustParseAddr("198.18.3.2")}
	sub := "relay-serve"
	if uring {
		r.name, r.ifname, sub = "min-uring", uringIf, "uring-serve"
		r.local, r.peer = netip.MustParseAddr("198.18.4.1"), netip.MustParseAddr("198.18.4.2")
	}
	r.cmd = exec.Command(self, sub, dir)
	r.cmd.Stderr = os.Stderr
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		os.Remove(dir)
		return nil, err
	}
	if err := r.cmd.Start(); err != nil {
		os.Remove(dir)
		return nil, err
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		r.stop()
		return nil, fmt.Errorf("%s did not start: %q", r.name, line)
	}
	return r, nil
}

// link opens the relay's file and configures its interface.
func (r *relayProc) link() (*link, error) {
	l := &link{name: r.name, local: r.local, peer: r.peer}
	if err := configure(r.ifname, l.local); err != nil {
		return nil, err
	}
	fd, err := unix.Open(filepath.Join(r.dir, "t"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", r.name, err)
	}
	l.fd = fd
	return l, nil
}

func (r *relayProc) stop() {
	r.cmd.Process.Kill()
	r.cmd.Wait()
	_ = unix.Unmount(r.dir, unix.MNT_DETACH)
	os.Remove(r.dir)
}

// relayMount creates the tun interface ifname (its fd nonblocking), opens
// /dev/fuse and mounts it on dir.
func relayMount(ifname, dir string) (tfd, ffd int, err error) {
	tfd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	ifr, _ := unix.NewIfreq(ifname)
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(tfd, unix.TUNSETIFF, ifr); err != nil {
		return -1, -1, fmt.Errorf("TUNSETIFF: %w", err)
	}
	ffd, err = unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=131072", ffd)
	if err := unix.Mount("relay", dir, "fuse.relay", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		return -1, -1, fmt.Errorf("mount: %w", err)
	}
	return tfd, ffd, nil
}

// relayInitReply fills out with the reply to the INIT request in in:
// protocol minor at most maxMinor, the given flags and flags2. It returns
// the body's length.
func relayInitReply(out, in []byte, maxMinor, flags, flags2 uint32) int {
	ne := binary.NativeEndian
	clear(out[16:80])
	ne.PutUint32(out[16:], 7)                                 // major
	ne.PutUint32(out[20:], min(ne.Uint32(in[44:]), maxMinor)) // minor
	ne.PutUint32(out[24:], 0)                                 // max_readahead
	ne.PutUint32(out[28:], flags)                             // flags
	ne.PutUint16(out[32:], 16)                                // max_background
	ne.PutUint16(out[34:], 12)                                // congestion_threshold
	ne.PutUint32(out[36:], 128*1024)                          // max_write
	ne.PutUint32(out[40:], 1)                                 // time_gran
	ne.PutUint16(out[44:], 32)                                // max_pages
	ne.PutUint32(out[48:], flags2)                            // flags2
	return 64
}

// relayServe is the relay process: it creates relay0, mounts dir, says
// "ready" and serves until killed.
func relayServe(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: cdevbench relay-serve DIR")
		return 2
	}
	tfd, ffd, err := relayMount(relayIf, args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	ended := make(chan struct{}, relayThreads)
	for range relayThreads {
		go func() {
			relayLoop(ffd, tfd)
			ended <- struct{}{}
		}()
	}
	// INIT is answered by the loops; the first stat waits for it.
	return readyThenServe(args[0], relayThreads, ended)
}

// readyThenServe tells the parent that the minimal relay mounted at mnt
// serves (its file t answers), then waits until killed, or until each of
// its n loops has ended (the connection went: unmount, abort).
func readyThenServe(mnt string, n int, ended <-chan struct{}) int {
	for {
		if _, err := os.Stat(filepath.Join(mnt, "t")); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	fmt.Println("ready")
	for range n {
		<-ended
	}
	return 0
}

func relayLoop(ffd, tfd int) {
	runtime.LockOSThread()
	in := make([]byte, 132*1024)
	out := make([]byte, 132*1024)
	ne := binary.NativeEndian
	for {
		n, err := unix.Read(ffd, in)
		if err != nil {
			if err == unix.EINTR || err == unix.ENOENT || err == unix.EAGAIN {
				continue
			}
			return
		}
		in := in[:n]
		op := ne.Uint32(in[4:])
		nodeid := ne.Uint64(in[16:])
		reply := func(errno unix.Errno, body int) {
			ne.PutUint32(out[0:], uint32(16+body))
			ne.PutUint32(out[4:], uint32(-int32(errno)))
			copy(out[8:16], in[8:16])
			_, _ = unix.Write(ffd, out[:16+body])
		}
		switch op {
		case fuseOpInit:
			reply(0, relayInitReply(out, in, 31, 0, 0))
		case fuseOpLookup:
			if nodeid != 1 || string(in[40:n-1]) != "t" {
				reply(unix.ENOENT, 0)
				continue
			}
			clear(out[16 : 16+128])
			ne.PutUint64(out[16:], 2) // nodeid
			relayAttr(out[16+40:], 2)
			reply(0, 128)
		case fuseOpGetatt:
			clear(out[16 : 16+104])
			relayAttr(out[16+16:], nodeid)
			reply(0, 104)
		case fuseOpOpen:
			clear(out[16:32])
			ne.PutUint64(out[16:], 1)
			ne.PutUint32(out[24:], 1|4|16) // DIRECT_IO | NONSEEKABLE | STREAM
			reply(0, 16)
		case fuseOpRead:
			size := int(ne.Uint32(in[56:]))
			nonblock := ne.Uint32(in[72:])&unix.O_NONBLOCK != 0
			for {
				m, err := unix.Read(tfd, out[16:16+size])
				if err == unix.EAGAIN && !nonblock {
					pfd := []unix.PollFd{{Fd: int32(tfd), Events: unix.POLLIN}}
					_, _ = unix.Poll(pfd, -1)
					continue
				}
				if err != nil {
					reply(err.(unix.Errno), 0)
				} else {
					reply(0, m)
				}
				break
			}
		case fuseOpWrite:
			size := int(ne.Uint32(in[56:]))
			m, err := unix.Write(tfd, in[80:80+size])
			if err != nil {
				reply(err.(unix.Errno), 0)
				continue
			}
			ne.PutUint64(out[16:], uint64(m))
			reply(0, 8)
		case fuseOpFlush, fuseOpRel, fuseOpDestr:
			reply(0, 0)
		case fuseOpForget, fuseOpBForg, fuseOpIntr:
		default:
			reply(unix.ENOSYS, 0)
		}
	}
}

// relayAttr fills a struct fuse_attr for the root (1) or the file (2).
func relayAttr(a []byte, nodeid uint64) {
	ne := binary.NativeEndian
	ne.PutUint64(a[0:], nodeid)
	mode := uint32(unix.S_IFDIR | 0o755)
	nlink := uint32(2)
	if nodeid != 1 {
		mode, nlink = unix.S_IFREG|0o600, 1
	}
	ne.PutUint32(a[60:], mode)
	ne.PutUint32(a[64:], nlink)
}
