package main

// The packet workloads: one client, the same code for a native tun fd and
// a cdevfs file. The client plays the far end of a point-to-point link: it
// writes ICMP echo requests from the peer address to the interface's own
// address, and the kernel answers each with an echo reply written back to
// the same fd.

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cdevfs/cdevfs/internal/icmptest"
	"golang.org/x/sys/unix"
)

// link is one end under test: an fd (blocking, O_RDWR) and the addresses
// of the interface (local, answered by the kernel) and of the peer we
// pretend to be.
type link struct {
	name  string
	fd    int
	local netip.Addr
	peer  netip.Addr
}

// packets is a ring of echo requests of one size with distinct sequence
// numbers, built once so the measured loops do not allocate.
type packets struct {
	pkts [][]byte
}

const ringSize = 256

func newPackets(l *link, size int) *packets {
	p := &packets{}
	for i := range ringSize {
		p.pkts = append(p.pkts, icmptest.EchoRequest(l.peer, l.local, 0xcdef, uint16(i), size-28))
	}
	return p
}

// echoReplySeq reports whether b is an IPv4 ICMP echo reply, and its
// sequence number.
func echoReplySeq(b []byte) (uint16, bool) {
	if len(b) < 28 || b[0]>>4 != 4 || b[9] != 1 {
		return 0, false
	}
	ihl := int(b[0]&0xf) * 4
	if len(b) < ihl+8 || b[ihl] != 0 {
		return 0, false
	}
	return binary.BigEndian.Uint16(b[ihl+6:]), true
}

// watchdog writes pkt() again when progress has not moved for a second:
// a lost packet (the kernel drops a few right after an interface comes
// up) must not stall a blocking read forever. It stops when stop is
// closed.
func watchdog(fd int, progress *atomic.Int64, pkt func() []byte, stop chan struct{}) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	last, stalled := progress.Load(), 0
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if now := progress.Load(); now != last {
			last, stalled = now, 0
			continue
		}
		if stalled++; stalled >= 2 {
			_, _ = unix.Write(fd, pkt())
			stalled = 0
		}
	}
}

// setNonblock switches the fd's O_NONBLOCK (fcntl; cdevfs sees it on the
// next read, as it does for any client).
func setNonblock(fd int, on bool) error {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		fl |= unix.O_NONBLOCK
	} else {
		fl &^= unix.O_NONBLOCK
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl)
	return err
}

// readWithin reads one packet, waiting at most d (nonblocking reads and
// short sleeps: no FUSE_POLL needed, so the minimal relay need not
// implement it). It returns 0 bytes on timeout.
func readWithin(l *link, buf []byte, d time.Duration) (int, error) {
	if err := setNonblock(l.fd, true); err != nil {
		return 0, err
	}
	defer setNonblock(l.fd, false)
	end := time.Now().Add(d)
	for {
		n, err := unix.Read(l.fd, buf)
		switch {
		case err == nil:
			return n, nil
		case err == unix.EAGAIN || err == unix.EINTR:
			if time.Now().After(end) {
				return 0, nil
			}
			time.Sleep(200 * time.Microsecond)
		default:
			return 0, fmt.Errorf("%s: read: %w", l.name, err)
		}
	}
}

// drain reads whatever is queued until nothing arrives for 50 ms.
func drain(l *link) error {
	buf := make([]byte, 65536)
	for {
		n, err := readWithin(l, buf, 50*time.Millisecond)
		if err != nil || n == 0 {
			return err
		}
	}
}

// warmup pings until an echo comes back, resending every 100 ms: right
// after an interface comes up the kernel drops the first packets.
func warmup(l *link) error {
	pk := newPackets(l, 84)
	buf := make([]byte, 65536)
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		if _, err := unix.Write(l.fd, pk.pkts[i%ringSize]); err != nil {
			return fmt.Errorf("%s: write: %w", l.name, err)
		}
		for {
			n, err := readWithin(l, buf, 100*time.Millisecond)
			if err != nil {
				return err
			}
			if n == 0 {
				break // resend
			}
			if _, ok := echoReplySeq(buf[:n]); ok {
				return drain(l)
			}
		}
	}
	return fmt.Errorf("%s: no echo reply within 10s", l.name)
}

// pingPong writes one echo request and reads until its reply, rounds
// times, and returns the round-trip times.
func pingPong(l *link, rounds int) ([]time.Duration, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	pk := newPackets(l, 84)
	buf := make([]byte, 65536)
	rtt := make([]time.Duration, 0, rounds)
	var progress atomic.Int64
	var cur atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go watchdog(l.fd, &progress, func() []byte { return pk.pkts[cur.Load()%ringSize] }, stop)
	for i := range rounds {
		cur.Store(int64(i))
		want := uint16(i % ringSize)
		t0 := time.Now()
		if _, err := unix.Write(l.fd, pk.pkts[want]); err != nil {
			return nil, fmt.Errorf("%s: write: %w", l.name, err)
		}
		for {
			n, err := unix.Read(l.fd, buf)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("%s: read: %w", l.name, err)
			}
			if seq, ok := echoReplySeq(buf[:n]); ok && seq == want {
				break
			}
		}
		rtt = append(rtt, time.Since(t0))
		progress.Add(1)
	}
	return rtt, drain(l)
}

// pipelined keeps depth echo requests outstanding for d, as a VPN's two
// loops would: a writer thread writes a request whenever fewer than depth
// are outstanding, a reader thread reads the replies. It returns the echo
// replies read per second.
func pipelined(l *link, size, depth int, d time.Duration) (float64, error) {
	pk := newPackets(l, size)
	var progress atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go watchdog(l.fd, &progress, func() []byte { return pk.pkts[0] }, stop)
	credits := make(chan struct{}, depth)
	done := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for i := 0; ; i++ {
			select {
			case credits <- struct{}{}:
			case <-done:
				werr <- nil
				return
			}
			if _, err := unix.Write(l.fd, pk.pkts[i%ringSize]); err != nil {
				werr <- fmt.Errorf("%s: write: %w", l.name, err)
				return
			}
		}
	}()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf := make([]byte, 65536)
	start := time.Now()
	end := start.Add(d)
	var got int64
	var now time.Time
	var rerr error
	for {
		n, err := unix.Read(l.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			rerr = fmt.Errorf("%s: read: %w", l.name, err)
			break
		}
		if _, ok := echoReplySeq(buf[:n]); !ok {
			continue
		}
		got++
		progress.Add(1)
		select {
		case <-credits:
		default: // a watchdog resend's reply
		}
		if got&15 == 0 {
			if now = time.Now(); now.After(end) {
				break
			}
		}
	}
	close(done)
	if err := <-werr; err != nil && rerr == nil {
		rerr = err
	}
	if rerr != nil {
		return 0, rerr
	}
	return float64(got) / now.Sub(start).Seconds(), drain(l)
}

// percentile of sorted durations, in microseconds.
func percentileUS(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i].Nanoseconds()) / 1e3
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}
