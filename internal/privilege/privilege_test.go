package privilege

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// sleeper starts `args... sleep 60` and returns its pid once it runs
// sleep (after unshare or setpriv has made its credentials).
func sleeper(t *testing.T, args ...string) int {
	t.Helper()
	cmd := exec.Command(args[0], append(args[1:], "sleep", "60")...)
	if err := cmd.Start(); err != nil {
		testenv.Unavailable(t, "privilege", fmt.Errorf("start %v: %w", args, err))
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		if err == nil && strings.TrimSpace(string(comm)) == "sleep" {
			return cmd.Process.Pid
		}
	}
	t.Fatalf("%v did not reach sleep", args)
	return 0
}

// TestCapable checks real processes against the daemon's own namespaces,
// as cdevfs checks its FUSE callers.
func TestCapable(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "privilege", "not root")
	}
	for _, tool := range []string{"unshare", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, "privilege", err)
		}
	}
	p, err := NewPolicy("")
	if err != nil {
		t.Fatal(err)
	}
	nobody := []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}
	cases := []struct {
		name string
		cmd  []string
		held Set // of {Chown, Fowner, NetAdmin, Mknod}
	}{
		{"root", []string{"env"}, Of(Chown, Fowner, NetAdmin, Mknod)},
		{"nobody", nobody, 0},
		{"root in a user namespace of its own", []string{"unshare", "-Ur"}, 0},
		{"nobody in a user namespace of its own", append(nobody, "unshare", "-Ur"), 0},
		{"root without CAP_NET_ADMIN", []string{"setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"}, Of(Chown, Fowner, Mknod)},
		{"root without capabilities", []string{"setpriv", "--inh-caps=-all", "--bounding-set=-all"}, 0},
		{"nobody with ambient CAP_NET_ADMIN", append(nobody, "--inh-caps=+net_admin", "--ambient-caps=+net_admin"), Of(NetAdmin)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pid := sleeper(t, c.cmd...)
			cr, err := ReadCreds(uint32(pid))
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Held(cr, Of(Chown, Fowner, NetAdmin, Mknod)); got != c.held {
				t.Errorf("holds %#x where cdevfs checks, want %#x (CapEff %#x)", got, c.held, cr.Effective)
			}
		})
	}
}

// TestOwnerRule: a daemon inside a user namespace that root made sees
// root (outside it) as holding every capability there, as cap_capable's
// owner rule says; the namespace's own root holds its effective set; a
// sibling namespace's root holds nothing.
func TestOwnerRule(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "privilege", "not root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		testenv.Unavailable(t, "privilege", err)
	}
	inner := sleeper(t, "unshare", "-Ur")
	sibling := sleeper(t, "unshare", "-Ur")
	s, err := NewScope(fmt.Sprintf("/proc/%d/ns/user", inner))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.chain) != 2 {
		t.Fatalf("scope chain has %d namespaces, want 2 (the child and the initial one)", len(s.chain))
	}
	for _, c := range []struct {
		name string
		pid  int
		want bool
	}{{"its maker", os.Getpid(), true}, {"its root", inner, true}, {"a sibling's root", sibling, false}} {
		cr, err := ReadCreds(uint32(c.pid))
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Capable(cr, NetAdmin); got != c.want {
			t.Errorf("%s: CAP_NET_ADMIN in the child namespace: %v, want %v", c.name, got, c.want)
		}
	}
}

// TestReadCredsGone: a pid that is gone or outside the daemon's pid
// namespace gives no credentials, and no credentials hold nothing.
func TestReadCredsGone(t *testing.T) {
	if _, err := ReadCreds(0); err == nil {
		t.Error("ReadCreds(0) succeeded, want an error")
	}
	if _, err := ReadCreds(1 << 30); err == nil {
		t.Error("ReadCreds of a pid beyond pid_max succeeded, want an error")
	}
	p, err := NewPolicy("")
	if err != nil {
		testenv.Unavailable(t, "privilege", err)
	}
	if p.Capable(nil, NetAdmin) {
		t.Error("nil credentials hold CAP_NET_ADMIN")
	}
}
