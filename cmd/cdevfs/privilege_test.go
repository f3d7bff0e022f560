package main

// The privilege model and the tree's names, through the kernel: callers
// made with setpriv and unshare, a real daemon, real interfaces.

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// runAs runs a shell script under a wrapper (setpriv, unshare) and
// returns its combined output.
func runAs(wrapper []string, script string) (string, error) {
	args := append(append([]string{}, wrapper[1:]...), "sh", "-c", script)
	out, err := exec.Command(wrapper[0], args...).CombinedOutput()
	return string(out), err
}

// TestPrivilege: only a capability held in the user namespace that owns
// the daemon's network namespace (clone) or mount (chmod, chown) counts.
// Refused callers change nothing: no interface, no attribute.
func TestPrivilege(t *testing.T) {
	rules := filepath.Join(t.TempDir(), "devfs.rules")
	// The clone node and tun5 open to everyone, so that only privilege
	// stands between a caller and a clone; tun5 owned by uid 4242, so
	// that a chmod by anyone else needs CAP_FOWNER.
	if err := os.WriteFile(rules, []byte("[open=10]\nadd path 'tun' mode 0666\nadd path 'tun5' mode 0666\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "--allow-other", "--rules", rules, "--ruleset", "open")
	letOthersIn(t, d)
	if err := os.Chown(d.path("tun5"), 4242, 0); err != nil { // cloned by root's lookup
		t.Fatal(err)
	}

	nobodyID := []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}
	refused := []struct {
		name    string
		wrapper []string
	}{
		{"nobody in a user namespace of its own", append(append([]string{}, nobodyID...), "unshare", "-Ur")},
		{"root in a user namespace of its own", []string{"unshare", "-Ur"}},
		{"root without CAP_NET_ADMIN, CAP_CHOWN, CAP_FOWNER", []string{"setpriv", "--inh-caps=-net_admin,-chown,-fowner", "--bounding-set=-net_admin,-chown,-fowner"}},
		{"root without capabilities", []string{"setpriv", "--inh-caps=-all", "--bounding-set=-all"}},
		{"nobody", nobodyID},
	}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			before := d.links()
			for _, op := range []struct{ what, script string }{
				{"clone through tun", "exec 3<>" + d.path("tun")},
				{"clone on lookup of tun7", "exec 3<>" + d.path("tun7")},
				{"chmod of tun5", "chmod 0600 " + d.path("tun5")},
				{"chown of null", "chown 65534 " + d.path("null")},
				{"chgrp of tun5", "chgrp 4242 " + d.path("tun5")},
			} {
				// In a user namespace the kernel itself refuses a chown
				// to an unmapped id (EINVAL); the rest is the daemon's
				// EPERM, or ENOENT for the lookup.
				if out, err := runAs(c.wrapper, op.script); err == nil {
					t.Errorf("%s: succeeded, want a refusal\n%s", op.what, out)
				} else if op.what == "clone through tun" && !strings.Contains(out, "ermitted") {
					t.Errorf("%s: want EPERM (Operation not permitted), got: %v\n%s", op.what, err, out)
				}
			}
			if after := d.links(); !slices.Equal(before, after) {
				t.Errorf("interfaces went from %v to %v: a refused caller created one", before, after)
			}
			wantAttr(t, d.path("tun5"), 0o666, 4242, 0)
			wantAttr(t, d.path("null"), 0o666, 0, 0)
		})
	}

	t.Run("nobody with ambient CAP_NET_ADMIN", func(t *testing.T) {
		w := append(append([]string{}, nobodyID...), "--inh-caps=+net_admin", "--ambient-caps=+net_admin")
		before := len(d.links())
		if out, err := runAs(w, "exec 3<>"+d.path("tun")); err != nil {
			t.Fatalf("clone: %v\n%s", err, out)
		}
		if after := len(d.links()); after != before+1 {
			t.Errorf("%d interfaces after the clone, want %d", after, before+1)
		}
		// CAP_NET_ADMIN is no CAP_FOWNER.
		if out, err := runAs(w, "chmod 0600 "+d.path("null")); err == nil {
			t.Errorf("chmod of null with CAP_NET_ADMIN alone succeeded\n%s", out)
		}
	})
}

// TestTreeNames: nobody removes, renames or links nothing; root's rm
// hides an entry, as FreeBSD's devfs whites one out, and leaves its
// device; the listing stays whole through all of it. Operations that
// make or remove a name never clone the free unit they name.
func TestTreeNames(t *testing.T) {
	d := startDaemon(t, "--allow-other")
	letOthersIn(t, d)
	fd := openDev(t, d.path("tun0")) // tun0 exists and is held
	defer syscall.Close(fd)
	all := d.ls()

	// Nobody is refused by the kernel (the root directory's mode, with
	// default_permissions); root without capabilities, which the mode
	// lets through, by cdevfs.
	capless := []string{"setpriv", "--inh-caps=-all", "--bounding-set=-all"}
	for _, name := range []string{"null", "zero", "tun", "tap", "tun0", "stdin", "fd"} {
		if out, err := as(nobody, nobody, nil, "rm -f "+d.path(name)); err == nil || !strings.Contains(out, "denied") {
			t.Errorf("nobody's rm %s: %v, want EACCES\n%s", name, err, out)
		}
		if out, err := runAs(capless, "rm -f "+d.path(name)); err == nil || !strings.Contains(out, "ermitted") {
			t.Errorf("capless root's rm %s: %v, want EPERM\n%s", name, err, out)
		}
	}
	for _, script := range []string{
		"mv " + d.path("tun0") + " " + d.path("eth0"),
		"ln " + d.path("null") + " " + d.path("null2"),
	} {
		if out, err := runAs([]string{"env"}, script); err == nil {
			t.Errorf("root's %q succeeded, want EPERM\n%s", script, out)
		}
	}
	if got := d.ls(); !slices.Equal(got, all) {
		t.Fatalf("listing after refused changes: %v, want %v", got, all)
	}

	// Root hides what it removes; the interface stays, and so does the
	// open handle.
	for _, name := range []string{"null", "tun0", "tun"} {
		if err := os.Remove(d.path(name)); err != nil {
			t.Fatalf("root's rm %s: %v", name, err)
		}
	}
	got := d.ls()
	for _, name := range []string{"null", "tun0", "tun"} {
		if slices.Contains(got, name) {
			t.Errorf("%s still listed after root's rm: %v", name, got)
		}
		wantENOENT(t, d.path(name))
	}
	if !slices.Contains(d.links(), "tun0") {
		t.Errorf("root's rm of tun0 destroyed its interface: %v", d.links())
	}
	syscall.SetNonblock(fd, true)
	if _, err := syscall.Read(fd, make([]byte, 2048)); err != syscall.EAGAIN {
		t.Errorf("read on a handle of a removed tun0: %v, want EAGAIN (still the device's)", err)
	}
	if !slices.Contains(got, "zero") || !slices.Contains(got, "tap") {
		t.Errorf("listing lost entries nobody removed: %v", got)
	}

	// Make or remove a free unit's name: no interface. (mv(1) is not
	// among them: it looks its target up with stat(2) first, a use.)
	before := d.links()
	for _, script := range []string{
		"mkdir " + d.path("tun40"),
		"ln -s null " + d.path("tun41"),
		"mknod " + d.path("tun42") + " c 1 3",
		"ln " + d.path("zero") + " " + d.path("tun43"),
	} {
		if out, err := runAs([]string{"env"}, script); err == nil {
			t.Errorf("%q succeeded\n%s", script, out)
		}
	}
	// The system calls alone: a shell's noclobber and rm(1) stat the
	// name first, which is a use.
	if f, err := os.OpenFile(d.path("tun44"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); err == nil {
		f.Close()
		t.Errorf("open(tun44, O_CREAT|O_EXCL) succeeded")
	}
	if err := syscall.Unlink(d.path("tun45")); err != syscall.ENOENT {
		t.Errorf("unlink(tun45): %v, want ENOENT", err)
	}
	if after := d.links(); !slices.Equal(before, after) {
		t.Errorf("interfaces went from %v to %v: an operation that names a unit cloned it", before, after)
	}
	// A plain use of a free unit's name still clones it (devfs clone on
	// lookup), with or without O_CREAT.
	if out, err := runAs([]string{"env"}, "stat "+d.path("tun47")+" >/dev/null && : >> "+d.path("tun48")); err != nil {
		t.Errorf("stat tun47, append to tun48: %v\n%s", err, out)
	}
	for _, name := range []string{"tun47", "tun48"} {
		if !slices.Contains(d.links(), name) {
			t.Errorf("%s not cloned by its use: %v", name, d.links())
		}
	}
}
