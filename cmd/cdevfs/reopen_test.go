package main

import (
	"fmt"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// TestCloseMeansClosed: as on BSD, where close(2) is synchronous, a node
// is free once its holder's close(2) has returned or the holder has
// exited, though FUSE sends the last close (RELEASE) after that, without
// waiting for it (fuse_release). A reopen at once is never EBUSY, over
// either transport: 2,000 close→reopen rounds and 300 exit→reopen rounds
// (the testdata client reopen), none EBUSY. A node still held through
// another copy of the file (a dup, a forked child's) stays exclusive: a
// close of one copy, or a child's exit, frees nothing.
func TestCloseMeansClosed(t *testing.T) {
	requireKernel(t)
	for _, tr := range []struct {
		name string
		flag string
		ring string // enable_uring for the run; "" leaves it
	}{
		{"DevFuse", "off", ""},
		{"IOURing", "on", "Y"},
	} {
		t.Run(tr.name, func(t *testing.T) {
			if tr.ring != "" {
				testenv.SetURing(t, tr.ring)
			}
			d := startDaemon(t, "--io-uring", tr.flag)
			t.Run("CloseThenReopen", func(t *testing.T) {
				runReopen(t, d.path("tun5"), "close", 2000)
			})
			t.Run("ExitThenReopen", func(t *testing.T) {
				runReopen(t, d.path("tun5"), "exit", 300)
			})
			t.Run("OtherCopyStillHolds", func(t *testing.T) {
				otherCopyStillHolds(t, d.path("tun6"))
			})
			t.Run("WaitingOpenStallsNothing", func(t *testing.T) {
				waitingOpenStallsNothing(t, d.path("tun7"), d.path("tun8"))
			})
			t.Run("SignalEndsWait", func(t *testing.T) {
				signalEndsWait(t, d.path("tun9"))
			})
		})
	}
}

// runReopen runs `reopen mode path n` and wants no open EBUSY.
func runReopen(t *testing.T, path, mode string, n int) {
	t.Helper()
	start := time.Now()
	out, err := client("reopen", mode, path, fmt.Sprint(n)).CombinedOutput()
	if err != nil {
		t.Fatalf("reopen %s %s %d: %v\n%s", mode, path, n, err, out)
	}
	t.Logf("reopen %s, %d rounds in %v: %s", mode, n, time.Since(start).Round(time.Millisecond), strings.ReplaceAll(strings.TrimSpace(string(out)), "\n", "; "))
	want := fmt.Sprintf("busy 0 of %d\n", n)
	if mode == "exit" {
		want += "child busy 0\n"
	}
	if string(out) != want {
		t.Errorf("reopen %s: got %q, want %q: an open right after a close(2) or an exit found the node busy", mode, out, want)
	}
}

// otherCopyStillHolds closes one copy of an open file (a dup: FUSE's
// FLUSH, and no RELEASE) and lets a forked child that inherited another
// copy exit: the node stays open through the first descriptor, so an
// open is EBUSY each time, and works once that descriptor is closed.
func otherCopyStillHolds(t *testing.T, path string) {
	fd := openDev(t, path)
	defer func() {
		if fd >= 0 {
			syscall.Close(fd)
		}
	}()
	wantBusy := func(after string) time.Duration {
		t.Helper()
		start := time.Now()
		fd2, err := openRetry(path)
		took := time.Since(start)
		if err == nil {
			syscall.Close(fd2)
		}
		if err != syscall.EBUSY {
			t.Fatalf("open after %s = %v, want EBUSY: the node is still open through the first descriptor", after, err)
		}
		return took
	}

	dup, err := syscall.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(dup)
	first := wantBusy("closing a dup")
	again := wantBusy("a refused open")
	t.Logf("EBUSY after closing a dup in %v, again in %v", first.Round(time.Millisecond), again.Round(time.Millisecond))

	pid, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2, uintptr(fd)}})
	if err != nil {
		t.Fatal(err)
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
		t.Fatalf("child holding a copy: %v, status %v", err, ws)
	}
	took := wantBusy("a child holding a copy exited")
	t.Logf("EBUSY after a child's exit in %v", took.Round(time.Millisecond))

	syscall.Close(fd)
	fd = -1
	fd2, err := openRetry(path)
	if err != nil {
		t.Fatalf("open right after the last descriptor was closed = %v, want it to succeed", err)
	}
	syscall.Close(fd2)
}

// waitingOpenStallsNothing: an open waiting for a closing holder (one
// that still holds the file through another descriptor, so the wait
// lasts its whole bound) holds up no other request, not even one from
// the same CPU, which over io_uring goes to the same queue.
func waitingOpenStallsNothing(t *testing.T, held, other string) {
	fd := openDev(t, held)
	defer syscall.Close(fd)
	ofd := openDev(t, other)
	defer syscall.Close(ofd)
	dup, err := syscall.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(dup) // the holder looks closing until an opener's wait ends

	cpu := onSomeCPU(t)
	waiting := make(chan error, 1)
	go func() {
		pinTo(cpu)
		fd2, err := openRetry(held)
		if err == nil {
			syscall.Close(fd2)
		}
		waiting <- err
	}()
	time.Sleep(200 * time.Millisecond) // the open is waiting by now (it waits 1 s)
	took := make(chan time.Duration, 1)
	go func() {
		pinTo(cpu)
		start := time.Now()
		// A write to the other node (down: EIO), a round trip on the
		// same CPU's queue.
		syscall.Write(ofd, echoRequest("198.18.0.2", "198.18.0.1", 1, 8))
		took <- time.Since(start)
	}()
	if d := <-took; d > 300*time.Millisecond {
		t.Errorf("a write from the same CPU took %v while an open waited for a closing holder, want it answered at once", d.Round(time.Millisecond))
	}
	if err := <-waiting; err != syscall.EBUSY {
		t.Errorf("open of a node still held = %v, want EBUSY", err)
	}
}

// signalEndsWait: a signal to an open waiting for a closing holder ends
// it with EINTR at once (the kernel's FUSE INTERRUPT), not at the end of
// the wait's bound.
func signalEndsWait(t *testing.T, held string) {
	fd := openDev(t, held)
	defer syscall.Close(fd)
	dup, err := syscall.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(dup)

	tid := make(chan int, 1)
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread the signal is for; it ends with the goroutine
		tid <- unix.Gettid()
		fd2, err := syscall.Open(held, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
		if err == nil {
			syscall.Close(fd2)
		}
		done <- err
	}()
	id := <-tid
	time.Sleep(200 * time.Millisecond) // the open is waiting by now (it waits 1 s)
	start := time.Now()
	// SIGURG: the Go runtime's own preemption signal, which it ignores here.
	if err := unix.Tgkill(unix.Getpid(), id, unix.SIGURG); err != nil {
		t.Fatal(err)
	}
	err = <-done
	if took := time.Since(start); err != syscall.EINTR || took > 500*time.Millisecond {
		t.Errorf("waiting open after a signal = %v in %v, want EINTR at once", err, took.Round(time.Millisecond))
	}
}

// onSomeCPU returns a CPU the test may run on.
func onSomeCPU(t *testing.T) int {
	t.Helper()
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	for cpu := 0; ; cpu++ {
		if set.IsSet(cpu) {
			return cpu
		}
	}
}

// pinTo keeps the calling goroutine on an OS thread of its own, bound to
// cpu; the thread ends with the goroutine (it is never unlocked).
func pinTo(cpu int) {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	unix.SchedSetaffinity(0, &set)
}
