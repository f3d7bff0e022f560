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
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
	"unsafe"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/internal/tunfd"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

func unsafePointer(b *byte) unsafe.Pointer { return unsafe.Pointer(b) }

const (
	relayIf      = "relay0"
	relayThreads = 4
)

// Sizes of the requests and replies the relays read and write.
const (
	sizeofInitOut  = int(unsafe.Sizeof(fuse.InitOut{}))
	sizeofEntryOut = int(unsafe.Sizeof(fuse.EntryOut{}))
	sizeofAttrOut  = int(unsafe.Sizeof(fuse.AttrOut{}))
	sizeofOpenOut  = int(unsafe.Sizeof(fuse.OpenOut{}))
	sizeofWriteIn  = int(unsafe.Sizeof(fuse.WriteIn{}))
	sizeofWriteOut = int(unsafe.Sizeof(fuse.WriteOut{}))
)

// relayOpenFlags are the open flags of "t": a stream with no page cache.
const relayOpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NONSEEKABLE | fuse.FOPEN_STREAM

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
	tfd, err = tunfd.Open(ifname, unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		return -1, -1, err
	}
	if err := unix.SetNonblock(tfd, true); err != nil {
		unix.Close(tfd)
		return -1, -1, err
	}
	ffd, err = unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(tfd)
		return -1, -1, err
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=131072", ffd)
	if err := unix.Mount("relay", dir, "fuse.relay", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(ffd)
		unix.Close(tfd)
		return -1, -1, fmt.Errorf("mount: %w", err)
	}
	return tfd, ffd, nil
}

// relayInitReply writes into body the body of the reply to INIT request
// in: protocol minor at most maxMinor, the given flags and flags2. It
// returns the body's length.
func relayInitReply(body *fuse.InitOut, in *fuse.InitIn, maxMinor, flags, flags2 uint32) int {
	*body = fuse.InitOut{
		Major:               7,
		Minor:               min(in.Minor, maxMinor),
		Flags:               flags,
		MaxBackground:       16,
		CongestionThreshold: 12,
		MaxWrite:            128 * 1024,
		TimeGran:            1,
		MaxPages:            32,
		Flags2:              flags2,
	}
	return sizeofInitOut
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
	for {
		n, err := unix.Read(ffd, in)
		if err != nil {
			if err == unix.EINTR || err == unix.ENOENT || err == unix.EAGAIN {
				continue
			}
			return
		}
		in := in[:n]
		h := fusewire.Header(in)
		if h == nil {
			continue
		}
		var errno unix.Errno
		body := 0
		switch h.Opcode {
		case fusewire.OpInit:
			if ii := fusewire.View[fuse.InitIn](in); ii != nil {
				body = relayInitReply(fusewire.OutBody[fuse.InitOut](out), ii, 31, 0, 0)
			} else {
				errno = unix.EPROTO
			}
		case fusewire.OpLookup:
			if h.NodeId != 1 || string(in[fusewire.InHeaderSize:]) != "t\x00" {
				errno = unix.ENOENT
				break
			}
			o := fusewire.OutBody[fuse.EntryOut](out)
			*o = fuse.EntryOut{NodeId: 2}
			relayAttr(&o.Attr, 2)
			body = sizeofEntryOut
		case fusewire.OpGetattr:
			o := fusewire.OutBody[fuse.AttrOut](out)
			*o = fuse.AttrOut{}
			relayAttr(&o.Attr, h.NodeId)
			body = sizeofAttrOut
		case fusewire.OpOpen:
			*fusewire.OutBody[fuse.OpenOut](out) = fuse.OpenOut{Fh: 1, OpenFlags: relayOpenFlags}
			body = sizeofOpenOut
		case fusewire.OpRead:
			r := fusewire.View[fuse.ReadIn](in)
			if r == nil {
				errno = unix.EPROTO
				break
			}
			buf := out[fusewire.OutHeaderSize:][:min(int(r.Size), len(out)-fusewire.OutHeaderSize)]
			for {
				m, err := unix.Read(tfd, buf)
				if err == unix.EAGAIN && r.Flags&unix.O_NONBLOCK == 0 {
					pfd := []unix.PollFd{{Fd: int32(tfd), Events: unix.POLLIN}}
					_, _ = unix.Poll(pfd, -1)
					continue
				}
				if err != nil {
					errno = err.(unix.Errno)
				} else {
					body = m
				}
				break
			}
		case fusewire.OpWrite:
			w := fusewire.View[fuse.WriteIn](in)
			if w == nil || sizeofWriteIn+int(w.Size) > n {
				errno = unix.EPROTO
				break
			}
			m, err := unix.Write(tfd, in[sizeofWriteIn:sizeofWriteIn+int(w.Size)])
			if err != nil {
				errno = err.(unix.Errno)
				break
			}
			*fusewire.OutBody[fuse.WriteOut](out) = fuse.WriteOut{Size: uint32(m)}
			body = sizeofWriteOut
		case fusewire.OpFlush, fusewire.OpRelease, fusewire.OpDestroy:
		case fusewire.OpForget, fusewire.OpBatchForget, fusewire.OpInterrupt:
			continue // no reply
		default:
			errno = unix.ENOSYS
		}
		_, _ = unix.Write(ffd, out[:fusewire.Reply(out, h.Unique, errno, body)])
	}
}

// relayAttr fills the attributes of the root (1) or the file (2).
func relayAttr(a *fuse.Attr, nodeid uint64) {
	*a = fuse.Attr{Ino: nodeid, Mode: unix.S_IFDIR | 0o755, Nlink: 2}
	if nodeid != 1 {
		a.Mode, a.Nlink = unix.S_IFREG|0o600, 1
	}
}
