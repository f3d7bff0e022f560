package kdev

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeSys builds a sysfs tree as the kernel lays one out: the device in
// /sys/devices, its class link, and its /sys/dev/{char,block} link.
func fakeSys(t *testing.T) Sys {
	t.Helper()
	root := t.TempDir()
	dev := func(class, name, kind, num, uevent string) {
		dir := filepath.Join(root, "devices", "virtual", class, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "dev"), []byte(num+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "uevent"), []byte(uevent), 0o644)
		for _, l := range []struct{ dir, name string }{{filepath.Join("class", class), name}, {filepath.Join("dev", kind), num}} {
			os.MkdirAll(filepath.Join(root, l.dir), 0o755)
			if err := os.Symlink(dir, filepath.Join(root, l.dir, l.name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	dev("mem", "null", "char", "1:3", "MAJOR=1\nMINOR=3\nDEVNAME=null\nDEVMODE=0666\n")
	dev("mem", "kmsg", "char", "1:11", "MAJOR=1\nMINOR=11\nDEVNAME=kmsg\nDEVMODE=0644\n")
	dev("misc", "fuse", "char", "10:229", "MAJOR=10\nMINOR=229\nDEVNAME=fuse\n")
	dev("block", "loop0", "block", "7:0", "MAJOR=7\nMINOR=0\nDEVNAME=loop0\n")
	return Sys(root)
}

// TestLookup: a name is found in /sys/class/*/NAME/dev, with the mode of
// its uevent's DEVMODE, or devtmpfs's 0600 without one; a block device
// or an unknown name is missing; numbers are checked in /sys/dev/char.
func TestLookup(t *testing.T) {
	s := fakeSys(t)
	for _, c := range []struct {
		spec string
		want Device
	}{
		{"null", Device{"null", 1, 3, 0o666}},
		{"kmsg", Device{"kmsg", 1, 11, 0o644}},
		{"fuse", Device{"fuse", 10, 229, 0o600}},
		{"bitbucket=1:3", Device{"bitbucket", 1, 3, 0o666}},
	} {
		sp, err := ParseSpec(c.spec)
		if err != nil {
			t.Fatalf("ParseSpec(%q): %v", c.spec, err)
		}
		if d, err := s.Resolve(sp); err != nil || d != c.want {
			t.Errorf("Resolve(%q) = %+v, %v; want %+v", c.spec, d, err, c.want)
		}
	}
	for _, spec := range []string{"loop0", "nosuch", "null=1:4", "loop=7:0"} {
		sp, err := ParseSpec(spec)
		if err != nil {
			t.Fatalf("ParseSpec(%q): %v", spec, err)
		}
		if d, err := s.Resolve(sp); !errors.Is(err, ErrMissing) {
			t.Errorf("Resolve(%q) = %+v, %v; want ErrMissing", spec, d, err)
		}
	}
}

// TestParseSpec: what a --device argument may not be.
func TestParseSpec(t *testing.T) {
	for _, s := range []string{"", "=1:3", ".", "..", "net/tun", "n*", "a b", "null=1", "null=1:x", "null=4096:0", "null=1:1048576", "null=-1:3"} {
		if sp, err := ParseSpec(s); err == nil {
			t.Errorf("ParseSpec(%q) = %+v, want an error", s, sp)
		}
	}
	if sp, err := ParseSpec("kvm=10:232"); err != nil || sp != (Spec{"kvm", 10, 232, true}) {
		t.Errorf("ParseSpec(kvm=10:232) = %+v, %v", sp, err)
	}
}

// TestRealSysfs: this kernel's null and tty are what the host's /dev has.
func TestRealSysfs(t *testing.T) {
	for _, name := range []string{"null", "tty"} {
		var st unix.Stat_t
		if err := unix.Stat("/dev/"+name, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
			t.Skipf("no character device /dev/%s here: %v", name, err)
		}
		d, err := Sys("/sys").Lookup(name)
		if err != nil {
			t.Fatalf("Lookup(%s): %v", name, err)
		}
		if uint64(d.Rdev()) != st.Rdev || d.Mode != 0o666 {
			t.Errorf("Lookup(%s) = %+v (rdev %#x), want rdev %#x (/dev/%s) and mode 0666", name, d, d.Rdev(), st.Rdev, name)
		}
	}
}
