package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The machine's floor under any relay: a FUSE request is one thread
// (the client, inside the kernel) handing work to another (the daemon)
// and sleeping until it answers, so no FUSE transport can make a round
// trip cheaper than two threads passing one byte back and forth. A
// ping-pong needs two such round trips (a WRITE and a READ); native tun
// needs none (the kernel answers the echo inside the write). Measured
// with both threads on one CPU (what FUSE over io_uring does: the queue
// of the sender's CPU, served by a thread pinned there) and on two (what
// /dev/fuse may do: it wakes whichever reader waits longest, wherever it
// runs), since on a virtual machine waking an idle CPU is an exit to the
// host that costs far more than a switch on a busy one.

// threadRoundTrip passes one byte n times from a client thread pinned to
// CPU 0 to a server thread pinned to cpu and back, through two pipes,
// and returns the round trips' p50.
func threadRoundTrip(cpu, n int) (time.Duration, error) {
	var req, rep [2]int
	if err := unix.Pipe2(req[:], unix.O_CLOEXEC); err != nil {
		return 0, err
	}
	defer unix.Close(req[0]) // the write ends: by their writers
	if err := unix.Pipe2(rep[:], unix.O_CLOEXEC); err != nil {
		return 0, err
	}
	defer unix.Close(rep[0])

	// Each side on a thread of its own; a side that fails closes its
	// write end, so the other's read ends too.
	served, timed := make(chan error, 1), make(chan error, 1)
	go func() {
		defer unix.Close(rep[1])
		served <- pinned(cpu, func() error {
			var b [1]byte
			for range n {
				if err := readFull(req[0], b[:]); err != nil {
					return err
				}
				if _, err := unix.Write(rep[1], b[:]); err != nil {
					return err
				}
			}
			return nil
		})
	}()
	rtt := make([]time.Duration, 0, n)
	go func() {
		defer unix.Close(req[1])
		timed <- pinned(0, func() error {
			var b [1]byte
			for range n {
				t0 := time.Now()
				if _, err := unix.Write(req[1], b[:]); err != nil {
					return err
				}
				if err := readFull(rep[0], b[:]); err != nil {
					return err
				}
				rtt = append(rtt, time.Since(t0))
			}
			return nil
		})
	}()
	err, serr := <-timed, <-served
	if err == nil {
		err = serr
	}
	if err != nil {
		return 0, fmt.Errorf("thread round trip: %w", err)
	}
	return median(rtt), nil
}

// pinned locks the calling goroutine, which must be one of its own, to
// its thread, pins the thread to cpu and runs f; the thread ends with the
// goroutine (it never goes back to the runtime with its affinity).
func pinned(cpu int, f func() error) error {
	runtime.LockOSThread() // never unlocked: the thread is discarded
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	return f()
}

func readFull(fd int, b []byte) error {
	for {
		n, err := unix.Read(fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case n == 0:
			return io.ErrUnexpectedEOF
		}
		return nil
	}
}

// idleState says how this machine's CPUs idle, which decides what a wake
// across CPUs costs: the cpuidle driver, and for haltpoll (a guest that
// may poll before it halts) how long it polls.
func idleState() string {
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	drv := read("/sys/devices/system/cpu/cpuidle/current_driver")
	if drv == "" {
		return "cpuidle: none"
	}
	s := "cpuidle driver " + drv
	if ns := read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"); ns != "" {
		s += ", haltpoll.guest_halt_poll_ns " + ns
	}
	return s
}

// floorLine measures the thread round trips (see above) and says them.
func floorLine(rounds int) (string, error) {
	one, err := threadRoundTrip(0, rounds)
	if err != nil {
		return "", err
	}
	line := fmt.Sprintf("machine floor: a thread round trip (one byte each way through two pipes), p50 of %d: %.2f µs on one CPU", rounds, us(one))
	if runtime.NumCPU() > 1 {
		two, err := threadRoundTrip(1, rounds)
		if err != nil {
			return "", err
		}
		line += fmt.Sprintf(", %.2f µs across two", us(two))
	}
	return fmt.Sprintf("%s (%s)", line, idleState()), nil
}
