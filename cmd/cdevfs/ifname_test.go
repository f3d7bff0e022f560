package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestIfname: a shell learns the unit its clone open made, with no
// ioctl of its own; a handle that is no tun says so.
func TestIfname(t *testing.T) {
	d := startDaemon(t)
	script := "exec 3<>" + d.path("tun") + "; exec 4<>" + d.path("tap") + "; " +
		cdevfs + " ifname <&3; " + cdevfs + " ifname 4; exec 3<&- 4<&-; " +
		cdevfs + " ifname </dev/null || echo refused"
	out, err := exec.Command("sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 4 || lines[0] != "tun0" || lines[1] != "tap0" ||
		!strings.Contains(lines[2], "not a cdevfs tun or tap handle") || lines[3] != "refused" {
		t.Errorf("output:\n%s\nwant tun0, tap0, then a refusal of /dev/null", out)
	}
}
