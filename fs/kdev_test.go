package fs

import (
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/kdev"
	"golang.org/x/sys/unix"
)

// TestKernelDevices: the kernel's devices are character device nodes with
// the kernel's numbers and devtmpfs's modes, one added by configuration
// too; opening one reaches the kernel's driver (full's ENOSPC, an mmap
// of zero shared), not the daemon.
func TestKernelDevices(t *testing.T) {
	requireFuse(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	root := NewRoot(reg, []string{"tun"}, func(name string) bool { return name == "tun0" }, ownPolicy(t), quiet)
	kmsg, err := kdev.Sys("/sys").Lookup("kmsg")
	if err != nil {
		t.Fatal(err)
	}
	if err := root.AddDevice(kmsg); err != nil {
		t.Fatal(err)
	}
	// Names the tree has, or a cloner owns, are refused.
	for _, name := range []string{"null", "tun", "tun0", "stdin", "ptmx", "kmsg"} {
		if err := root.AddDevice(kdev.Device{Name: name, Major: 1, Minor: 3, Mode: 0o666}); err == nil {
			t.Errorf("AddDevice(%s) succeeded, want an error: the name is taken", name)
		}
	}
	dir, _, err := mountTree(t, reg, root, MountOptions{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}

	for _, name := range append(append([]string{}, kdev.Defaults...), "kmsg") {
		want, err := kdev.Sys("/sys").Lookup(name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(dir, name), &st); err != nil {
			t.Errorf("stat %s: %v", name, err)
			continue
		}
		if st.Mode != unix.S_IFCHR|want.Mode || st.Rdev != unix.Mkdev(want.Major, want.Minor) || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: mode %o rdev %d:%d owner %d:%d, want %o %d:%d 0:0", name, st.Mode,
				unix.Major(st.Rdev), unix.Minor(st.Rdev), st.Uid, st.Gid, unix.S_IFCHR|want.Mode, want.Major, want.Minor)
		}
	}
	if st, err := statMode(filepath.Join(dir, "kmsg")); err != nil || st != unix.S_IFCHR|0o644 {
		t.Errorf("kmsg mode %o %v, want a character device 0644 (its DEVMODE)", st, err)
	}

	full, err := unix.Open(filepath.Join(dir, "full"), unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(full)
	if _, err := unix.Write(full, []byte("x")); err != unix.ENOSPC {
		t.Errorf("write to full: %v, want ENOSPC", err)
	}
	zero, err := unix.Open(filepath.Join(dir, "zero"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(zero)
	b, err := unix.Mmap(zero, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap(MAP_SHARED) of zero: %v", err)
	}
	b[12345] = 1
	if b[0] != 0 || b[1<<20-1] != 0 {
		t.Errorf("mmap of zero is not zeroed")
	}
	unix.Munmap(b)
}

func statMode(path string) (uint32, error) {
	var st unix.Stat_t
	err := unix.Stat(path, &st)
	return st.Mode, err
}
