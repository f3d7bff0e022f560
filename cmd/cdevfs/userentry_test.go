package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// TestUserEntries: a privileged caller finishes the tree as a container
// runtime does (directories for devpts, shm and mqueue mounted there, a
// mount target, links), removes what it made, and cannot take a
// cloner's name; anyone else is refused. A pseudo-terminal opens through
// the default ptmx link once devpts is mounted at pts.
func TestUserEntries(t *testing.T) {
	d := startDaemon(t, "--allow-other")
	letOthersIn(t, d)
	for _, dir := range []string{"pts", "shm", "mqueue"} {
		if err := os.Mkdir(d.path(dir), 0o755); err != nil {
			t.Fatalf("mkdir %s: %v", dir, err)
		}
	}
	if err := os.WriteFile(d.path("target"), nil, 0o600); err != nil {
		t.Fatalf("create target: %v", err)
	}
	if err := os.Symlink("/proc/self/fd/9", d.path("fd9")); err != nil {
		t.Fatalf("symlink: %v", err)
	}
	if err := os.Mkdir(d.path("shm/sub"), 0o700); err != nil {
		t.Fatalf("mkdir shm/sub: %v", err)
	}
	ls := d.ls()
	for _, want := range []string{"pts", "shm", "mqueue", "target", "fd9", "ptmx", "core"} {
		if !slices.Contains(ls, want) {
			t.Errorf("ls lacks %s: %v", want, ls)
		}
	}
	if fi, err := os.Stat(d.path("shm")); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o755 {
		t.Errorf("stat shm: %v %v, want a directory 0755", fi, err)
	}
	if target, err := os.Readlink(d.path("ptmx")); err != nil || target != "pts/ptmx" {
		t.Errorf("ptmx links to %q (%v), want pts/ptmx", target, err)
	}

	// The runtime's mounts, inside the test's private mount namespace.
	for _, m := range [][]string{
		{"-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", d.path("pts")},
		{"-t", "tmpfs", "shm", d.path("shm")},
		{"-t", "mqueue", "mqueue", d.path("mqueue")},
	} {
		if out, err := exec.Command("mount", m...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v\n%s", m, err, out)
		}
		defer exec.Command("umount", m[len(m)-1]).Run()
	}
	fd, err := syscall.Open(d.path("ptmx"), syscall.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open ptmx through the mount: %v", err)
	}
	syscall.Close(fd)
	if err := os.WriteFile(d.path("shm/x"), []byte("shm"), 0o600); err != nil {
		t.Errorf("write into shm: %v", err)
	}
	for _, m := range []string{"pts", "shm", "mqueue"} {
		exec.Command("umount", d.path(m)).Run()
	}

	// Names that are cdevfs's cannot be taken: EEXIST from the kernel
	// for what exists, EPERM for a free unit's name.
	for _, c := range []struct {
		name string
		want error
	}{{"tun", syscall.EEXIST}, {"null", syscall.EEXIST}, {"stdin", syscall.EEXIST}, {"tun5", syscall.EPERM}, {"tap0", syscall.EPERM}} {
		if err := syscall.Mkdir(d.path(c.name), 0o755); err != c.want {
			t.Errorf("mkdir %s: %v, want %v", c.name, err, c.want)
		}
	}
	if slices.Contains(d.links(), "tun5") {
		t.Errorf("mkdir tun5 made an interface: %v", d.links())
	}

	// Nobody makes or removes nothing: the kernel refuses it (the
	// directory's mode), and cdevfs refuses root without capabilities.
	capless := []string{"setpriv", "--inh-caps=-all", "--bounding-set=-all"}
	for _, script := range []string{
		"mkdir " + d.path("nob"), "ln -s x " + d.path("nob"), ": > " + d.path("nob"),
		"rmdir " + d.path("mqueue"), "rm " + d.path("target"), "rm " + d.path("fd9"),
	} {
		if out, err := as(nobody, nobody, nil, script); err == nil || !strings.Contains(out, "denied") {
			t.Errorf("nobody's %q: %v, want EACCES\n%s", script, err, out)
		}
		if out, err := runAs(capless, script); err == nil || !strings.Contains(out, "ermitted") {
			t.Errorf("capless root's %q: %v, want EPERM\n%s", script, err, out)
		}
	}

	// Made entries keep their names, as cdevfs's own do.
	if err := syscall.Rename(d.path("target"), d.path("target2")); err != syscall.EPERM {
		t.Errorf("rename of a made entry: %v, want EPERM", err)
	}

	// Root removes what was made, and only what is empty.
	if err := syscall.Rmdir(d.path("shm")); err != syscall.ENOTEMPTY {
		t.Errorf("rmdir shm with shm/sub in it: %v, want ENOTEMPTY", err)
	}
	for _, p := range []string{"shm/sub", "shm", "pts", "mqueue"} {
		if err := syscall.Rmdir(d.path(p)); err != nil {
			t.Errorf("rmdir %s: %v", p, err)
		}
	}
	for _, p := range []string{"target", "fd9"} {
		if err := os.Remove(d.path(p)); err != nil {
			t.Errorf("rm %s: %v", p, err)
		}
	}
	ls = d.ls()
	for _, gone := range []string{"pts", "shm", "mqueue", "target", "fd9"} {
		if slices.Contains(ls, gone) {
			t.Errorf("%s still listed after its removal: %v", gone, ls)
		}
	}
	// A name made anew after its removal is new.
	if err := os.Mkdir(d.path("pts"), 0o700); err != nil {
		t.Errorf("mkdir pts again: %v", err)
	}
	if _, err := os.Stat(filepath.Join(d.path("pts"), "x")); !os.IsNotExist(err) {
		t.Errorf("stat pts/x in a new pts: %v, want ENOENT", err)
	}
}
