package fs

import (
	"fmt"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestParseMakesName reads /proc/TID/syscall lines of the calls that
// look a name up.
func TestParseMakesName(t *testing.T) {
	line := func(nr uintptr, args ...uint64) string {
		s := fmt.Sprint(nr)
		for i := 0; i < 6; i++ {
			var a uint64
			if i < len(args) {
				a = args[i]
			}
			s += fmt.Sprintf(" 0x%x", a)
		}
		return s + " 0x7ffd0000 0x7f000000\n"
	}
	const dirfd = 0xffffff9c // AT_FDCWD
	cases := []struct {
		name, line string
		want       bool
	}{
		{"mkdirat", line(unix.SYS_MKDIRAT, dirfd, 0x1000, 0o777), true},
		{"mknodat", line(unix.SYS_MKNODAT, dirfd, 0x1000, 0o20644, 0x103), true},
		{"symlinkat", line(unix.SYS_SYMLINKAT, 0x1000, dirfd, 0x2000), true},
		{"linkat", line(unix.SYS_LINKAT, dirfd, 0x1000, dirfd, 0x2000), true},
		{"unlinkat", line(unix.SYS_UNLINKAT, dirfd, 0x1000), true},
		{"renameat2", line(unix.SYS_RENAMEAT2, dirfd, 0x1000, dirfd, 0x2000), true},
		{"openat O_CREAT|O_EXCL", line(unix.SYS_OPENAT, dirfd, 0x1000, syscall.O_RDWR|syscall.O_CREAT|syscall.O_EXCL), true},
		{"openat O_CREAT", line(unix.SYS_OPENAT, dirfd, 0x1000, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_TRUNC), false},
		{"openat", line(unix.SYS_OPENAT, dirfd, 0x1000, syscall.O_RDWR), false},
		{"newfstatat", line(unix.SYS_NEWFSTATAT, dirfd, 0x1000, 0x2000), false},
		{"statx", line(unix.SYS_STATX, dirfd, 0x1000), false},
		{"running", "running\n", false},
		{"outside a call", "-1 0x7ffd0000 0x7f000000\n", false},
		{"empty", "", false},
	}
	for _, c := range cases {
		if got := parseMakesName([]byte(c.line)); got != c.want {
			t.Errorf("%s (%q): makes a name %v, want %v", c.name, c.line, got, c.want)
		}
	}
}
