package tunfd

import (
	"errors"
	"net"
	"os"
	"runtime"
	"testing"

	"github.com/cdevfs/cdevfs/internal/testenv"
	"golang.org/x/sys/unix"
)

// inOwnNetns runs f on a thread moved into a network namespace of its
// own, so that no interface reaches the host's. The thread is never
// unlocked: the runtime ends it with the goroutine, and the namespace
// with it once f's fds are closed.
func inOwnNetns(t *testing.T, f func()) {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		testenv.Unavailable(t, "tun", err)
	}
	done := make(chan error)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		f()
		done <- nil
	}()
	if err := <-done; err != nil {
		testenv.Unavailable(t, "network namespace", err)
	}
}

// TestOpen: Open makes the interface, which lasts while its fd is open;
// a second fd cannot attach to it, with or without IFF_TUN_EXCL; a name
// that is no interface name is refused before any ioctl.
func TestOpen(t *testing.T) {
	inOwnNetns(t, func() {
		const name = "tunfd0"
		fd, err := Open(name, unix.IFF_TUN|unix.IFF_NO_PI)
		if err != nil {
			t.Errorf("Open(%s) = %v, want a new interface", name, err)
			return
		}
		if _, err := net.InterfaceByName(name); err != nil {
			t.Errorf("after Open(%s): %v, want the interface to exist", name, err)
		}
		for _, tc := range []struct {
			what  string
			name  string
			flags uint16
			want  error
		}{
			{"attach while attached", name, unix.IFF_TUN | unix.IFF_NO_PI, unix.EBUSY},
			{"exclusive create of an existing name", name, unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_TUN_EXCL, unix.EBUSY},
			{"a name longer than IFNAMSIZ", "tunfd-name-far-too-long", unix.IFF_TUN, unix.EINVAL},
		} {
			fd2, err := Open(tc.name, tc.flags)
			if err == nil {
				unix.Close(fd2)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("%s: Open(%s, %#x) = %v, want %v", tc.what, tc.name, tc.flags, err, tc.want)
			}
		}
		unix.Close(fd)
		if _, err := net.InterfaceByName(name); err == nil {
			t.Errorf("%s still exists after its only fd closed, want it gone (not persistent)", name)
		}
	})
}
