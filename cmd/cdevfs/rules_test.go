package main

// End-to-end tests of devfs rules and of chmod, chown and touch: the
// real daemon, a real mount, clients run as other users with setpriv.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sampleRules is the rules file shipped in testdata.
var sampleRules, _ = filepath.Abs("../../testdata/devfs.rules")

const nobody = 65534

// as runs a shell script as uid/gid with exactly the supplementary
// groups given (none if groups is empty).
func as(uid, gid uint32, groups []uint32, script string) (string, error) {
	args := []string{fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", gid)}
	if len(groups) == 0 {
		args = append(args, "--clear-groups")
	} else {
		var gs []string
		for _, g := range groups {
			gs = append(gs, strconv.Itoa(int(g)))
		}
		args = append(args, "--groups="+strings.Join(gs, ","))
	}
	out, err := exec.Command("setpriv", append(args, "sh", "-c", script)...).CombinedOutput()
	return string(out), err
}

// letOthersIn opens the mount's parent directory to other users (the
// mount itself needs --allow-other).
func letOthersIn(t *testing.T, d *daemon) {
	t.Helper()
	if err := os.Chmod(filepath.Dir(d.dir), 0o755); err != nil {
		t.Fatal(err)
	}
}

func groupID(t *testing.T, name string) uint32 {
	t.Helper()
	g, err := user.LookupGroup(name)
	if err != nil {
		t.Fatalf("group %s: %v", name, err)
	}
	id, _ := strconv.Atoi(g.Gid)
	return uint32(id)
}

// statOf stats path as root (a lookup of a free unit creates it).
func statOf(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return &st
}

// wantAttr checks a node's permission bits and owner.
func wantAttr(t *testing.T, path string, mode, uid, gid uint32) {
	t.Helper()
	st := statOf(t, path)
	if st.Mode&0o7777 != mode || st.Uid != uid || st.Gid != gid {
		t.Errorf("%s: mode %04o uid %d gid %d, want %04o %d %d", filepath.Base(path), st.Mode&0o7777, st.Uid, st.Gid, mode, uid, gid)
	}
}

func wantENOENT(t *testing.T, path string) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != syscall.ENOENT {
		t.Errorf("stat %s = %v, want ENOENT", filepath.Base(path), err)
	}
}

// waitLog waits until the daemon's log has n lines containing s.
func (d *daemon) waitLog(s string, n int) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(d.log(), s) < n {
		if time.Now().After(deadline) {
			d.t.Fatalf("log has %d lines with %q, want %d:\n%s", strings.Count(d.log(), s), s, n, d.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRulesGroupMemberOpens: with a rule giving tun* mode 0660 group
// dialout, a member of dialout (by a supplementary or its primary group)
// opens a unit; anyone else gets EACCES from the kernel (the mount's
// default_permissions), which the daemon never sees; a member still cannot
// clone (EPERM, logged) although the clone node is 0660 dialout too; units made
// later, through the clone node, get the rule when made; tap* is hidden.
func TestRulesGroupMemberOpens(t *testing.T) {
	dialout := groupID(t, "dialout")
	d := startDaemon(t, "--allow-other", "--rules", sampleRules, "--ruleset", "cdevfs_net")
	letOthersIn(t, d)
	wantAttr(t, d.path("tun0"), 0o660, 0, dialout)
	wantAttr(t, d.path("tun1"), 0o660, 0, dialout)
	wantAttr(t, d.path("tun"), 0o660, 0, dialout)
	wantAttr(t, d.path("null"), 0o666, 0, 0) // no rule: the default

	if out, err := as(nobody, nobody, []uint32{dialout}, "exec 3<>"+d.path("tun0")); err != nil {
		t.Errorf("a member by supplementary group cannot open tun0: %v %s", err, out)
	}
	if out, err := as(nobody, dialout, nil, "exec 3<>"+d.path("tun1")); err != nil {
		t.Errorf("a member by primary group cannot open tun1: %v %s", err, out)
	}
	out, err := as(nobody, nobody, nil, "exec 3<>"+d.path("tun0"))
	if err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("a non-member opening tun0: %v %q, want EACCES", err, out)
	}
	out, err = as(nobody, nobody, []uint32{dialout}, "exec 3<>"+d.path("tun"))
	if err == nil || !strings.Contains(out, "not permitted") {
		t.Errorf("a member opening the clone node: %v %q, want EPERM (cloning needs privilege)", err, out)
	}
	if n := strings.Count(d.log(), "refused open"); n != 0 {
		t.Errorf("log has %d \"refused open\" lines, want none (the kernel refuses):\n%s", n, d.log())
	}
	if n := strings.Count(d.log(), "refused clone"); n != 1 {
		t.Errorf("log has %d \"refused clone\" lines, want 1:\n%s", n, d.log())
	}

	// A unit made through the clone node gets the rules when it is made.
	fd := openDev(t, d.path("tun"))
	defer syscall.Close(fd)
	wantAttr(t, d.path("tun2"), 0o660, 0, dialout)

	// tap* is hidden: not listed, not looked up, not cloned by name.
	for _, name := range d.ls() {
		if strings.HasPrefix(name, "tap") {
			t.Errorf("ls shows %s, hidden by rule", name)
		}
	}
	wantENOENT(t, d.path("tap"))
	wantENOENT(t, d.path("tap5"))
	if links := d.links(); contains(links, "tap5") {
		t.Errorf("links %v: a lookup of hidden tap5 created it", links)
	}
}

// TestRulesHideUnhideInclude: the jail-like ruleset includes "hide
// everything" and "unhide the basics" and unhides tun units; selected by
// number.
func TestRulesHideUnhideInclude(t *testing.T) {
	dialout := groupID(t, "dialout")
	d := startDaemon(t, "--rules", sampleRules, "--ruleset", "11")
	want := []string{"fd", "null", "random", "stderr", "stdin", "stdout", "tun", "urandom", "zero"}
	if got := d.ls(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("ls = %v, want %v", got, want)
	}
	wantENOENT(t, d.path("full"))
	wantENOENT(t, d.path("tap"))
	if _, err := os.ReadFile(d.path("full")); !os.IsNotExist(err) {
		t.Errorf("read of hidden full: %v, want ENOENT", err)
	}
	wantAttr(t, d.path("tun3"), 0o660, 0, dialout)
	if got := d.ls(); !contains(got, "tun3") {
		t.Errorf("ls = %v, want tun3 listed (unhidden by rule)", got)
	}
	if target, err := os.Readlink(d.path("stdin")); err != nil || target != "/proc/self/fd/0" {
		t.Errorf("readlink stdin = %q %v", target, err)
	}
}

// TestRulesErrorsRefuseToStart: a syntax error, an unknown user or group,
// an unknown ruleset or a missing file is one line "cdevfs: FILE:LINE:
// reason" and exit status 1, with nothing mounted.
func TestRulesErrorsRefuseToStart(t *testing.T) {
	requireKernel(t)
	dir := t.TempDir()
	write := func(name, src string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	syntax := write("syntax.rules", "[a=1]\n# tun for the dialout group\nadd path 'tun*' mode 0660 grp dialout\n")
	quote := write("quote.rules", "[a=1]\nadd path 'tun* mode 0660\n")
	nouser := write("user.rules", "[a=1]\nadd path 'tun*' mode 0660\n\nadd path tun0 user cdevfs-no-such-user\n")
	nogroup := write("group.rules", "[a=1]\nadd path tun0 group cdevfs-no-such-group\n")
	cases := []struct {
		name, file, set, want string
	}{
		{"syntax error", syntax, "a", syntax + `:3: unknown argument "grp"`},
		{"unterminated quote", quote, "a", quote + ":2: unterminated ' quote"},
		{"unknown user", nouser, "a", nouser + `:4: unknown user "cdevfs-no-such-user"`},
		{"unknown group", nogroup, "a", nogroup + `:2: unknown group "cdevfs-no-such-group"`},
		{"unknown ruleset", sampleRules, "nosuch", sampleRules + `: no ruleset "nosuch"`},
		{"missing file", filepath.Join(dir, "missing"), "a", filepath.Join(dir, "missing") + ": no such file or directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mnt := t.TempDir()
			cmd := exec.Command("unshare", "--mount", "--net", cdevfs, "mount", "--rules", c.file, "--ruleset", c.set, mnt)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 1 {
				t.Fatalf("exit = %v, want status 1; stderr:\n%s", err, stderr.String())
			}
			lines := strings.Split(strings.TrimRight(stderr.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "cdevfs: "+c.want) {
				t.Errorf("stderr = %q, want one line starting %q", stderr.String(), "cdevfs: "+c.want)
			}
		})
	}
}

// TestRulesReloadOnSIGHUP: SIGHUP re-reads the file and applies it to
// every node (changing what the new rules set, keeping the rest, as
// FreeBSD's applyset); bad rules on SIGHUP are one log line with
// FILE:LINE and the old rules stay in force, for existing nodes and for
// new ones.
func TestRulesReloadOnSIGHUP(t *testing.T) {
	dialout := groupID(t, "dialout")
	file := filepath.Join(t.TempDir(), "devfs.rules")
	write := func(src string) {
		if err := os.WriteFile(file, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("[net=10]\nadd path 'tun*' mode 0660 group dialout\n")
	d := startDaemon(t, "--rules", file, "--ruleset", "net")
	wantAttr(t, d.path("tun0"), 0o660, 0, dialout)

	write("[net=10]\nadd path 'tun*' mode 0640\nadd path full hide\n")
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog("rules reloaded", 1)
	wantAttr(t, d.path("tun0"), 0o640, 0, dialout) // the group was not reset
	wantAttr(t, d.path("tun1"), 0o640, 0, 0)       // made under the new rules
	wantENOENT(t, d.path("full"))

	write("[net=10]\nadd path 'tun*' mode 0600\nadd path tun frob\n")
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog("rules reload failed", 1)
	var line string
	for _, l := range strings.Split(d.log(), "\n") {
		if strings.Contains(l, "rules reload failed") {
			line = l
		}
	}
	if !strings.Contains(line, file+`:3: unknown argument \"frob\"`) {
		t.Errorf("reload failure line %q, want %s:3 and the reason", line, file)
	}
	wantAttr(t, d.path("tun0"), 0o640, 0, dialout)
	wantAttr(t, d.path("tun2"), 0o640, 0, 0) // the old rules still apply to new nodes
	wantENOENT(t, d.path("full"))
	if n := strings.Count(d.log(), "rules reloaded"); n != 1 {
		t.Errorf("log has %d \"rules reloaded\" lines, want 1", n)
	}
}

// TestChmodChownTouch: root's chmod, chown and touch on a node work,
// show in stat and last for the node's life (across an open and close);
// another user's are refused as Linux refuses them (EPERM, or EACCES
// for touch to the current time on a node it may not write), by the
// kernel (default_permissions): the daemon sees and logs none of them;
// an owner may chmod its own node but not give it away.
func TestChmodChownTouch(t *testing.T) {
	d := startDaemon(t, "--allow-other")
	letOthersIn(t, d)
	tun0, tun1 := d.path("tun0"), d.path("tun1")
	statOf(t, tun0)
	statOf(t, tun1)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v %s", strings.Join(args, " "), err, out)
		}
	}
	run("chmod", "0604", tun0)
	run("chown", "65534:20", tun0)
	run("touch", "-c", "-d", "@1000000000", tun0)
	check := func() {
		t.Helper()
		wantAttr(t, tun0, 0o604, nobody, 20)
		if st := statOf(t, tun0); st.Mtim.Sec != 1000000000 || st.Atim.Sec != 1000000000 {
			t.Errorf("tun0 atime %d mtime %d, want 1000000000", st.Atim.Sec, st.Mtim.Sec)
		}
	}
	check()
	fd := openDev(t, tun0)
	syscall.Close(fd)
	check()
	run("chmod", "0600", d.path("null"))
	wantAttr(t, d.path("null"), 0o600, 0, 0)

	before := statOf(t, tun1)
	for _, c := range []struct{ script, want string }{
		{"chmod 0666 " + tun1, "not permitted"},
		{"chown 65534 " + tun1, "not permitted"},
		{"chgrp 65534 " + tun1, "not permitted"},
		{"touch -c -d @5 " + tun1, "not permitted"},
		{"touch -c " + tun1, "Permission denied"},
		{"cat " + d.path("null"), "Permission denied"},
	} {
		if out, err := as(nobody, nobody, nil, c.script); err == nil || !strings.Contains(out, c.want) {
			t.Errorf("nobody: %s: %v %q, want %q", c.script, err, out, c.want)
		}
	}
	after := statOf(t, tun1)
	if after.Mode != before.Mode || after.Uid != 0 || after.Gid != 0 || after.Mtim != before.Mtim || after.Ctim != before.Ctim {
		t.Errorf("tun1 changed by refused calls: %+v -> %+v", before, after)
	}
	if got := strings.Count(d.log(), "refused "); got != 0 {
		t.Errorf("log has %d \"refused\" lines, want none (the kernel refuses):\n%s", got, d.log())
	}

	// nobody owns tun0 now: it may chmod it, not give it away.
	if out, err := as(nobody, nobody, nil, "chmod 0600 "+tun0); err != nil {
		t.Errorf("owner's chmod: %v %s", err, out)
	}
	if out, err := as(nobody, nobody, nil, "chown 0 "+tun0); err == nil || !strings.Contains(out, "not permitted") {
		t.Errorf("owner's chown to root: %v %q, want EPERM", err, out)
	}
	wantAttr(t, tun0, 0o600, nobody, 20)

	// For the node's life only: a recreated tun0 is a new node, 0600 root.
	d.mustIP("link", "del", "tun0")
	deadline := time.Now().Add(5 * time.Second)
	for contains(d.ls(), "tun0") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	wantAttr(t, tun0, 0o600, 0, 0)
}
