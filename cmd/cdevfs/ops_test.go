package main

// End-to-end tests of the operational side: --help, JSON logs, systemd
// readiness, Prometheus metrics and the container recipe.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/internal/testenv"
)

// TestHelpListsEveryFlag: `cdevfs mount --help` lists every flag the
// FlagSet defines, on stdout with status 0; the README documents each;
// `cdevfs --help` and `cdevfs version` answer.
func TestHelpListsEveryFlag(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"mount", "--help"}, &out, &errb); code != 0 || errb.Len() != 0 {
		t.Fatalf("mount --help: status %d, stderr %q; want 0 and nothing on stderr", code, errb.String())
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	mountFlagSet(&mountFlags{}).VisitAll(func(f *flag.Flag) {
		n++
		if !regexp.MustCompile(`(?m)^  --` + regexp.QuoteMeta(f.Name) + `\b`).Match(out.Bytes()) {
			t.Errorf("mount --help does not list --%s:\n%s", f.Name, out.String())
		}
		if !bytes.Contains(readme, []byte("| `--"+f.Name)) {
			t.Errorf("README's flag table does not document --%s", f.Name)
		}
	})
	if n < 6 {
		t.Errorf("the mount FlagSet defines %d flags, want at least 6", n)
	}
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		out.Reset()
		if code := run(args, &out, io.Discard); code != 0 || !strings.Contains(out.String(), "mount [flags] MOUNTPOINT") {
			t.Errorf("cdevfs %s: status %d, output %q; want 0 and the usage", args[0], code, out.String())
		}
	}
	out.Reset()
	if code := run([]string{"version"}, &out, io.Discard); code != 0 || !regexp.MustCompile(`^cdevfs \S+\n$`).Match(out.Bytes()) {
		t.Errorf("cdevfs version: status %d, output %q; want 0 and \"cdevfs VERSION\"", code, out.String())
	}
	errb.Reset()
	if code := run([]string{"mount", "--log-format", "xml", "/tmp"}, io.Discard, &errb); code != 2 || !strings.Contains(errb.String(), "unknown log format") {
		t.Errorf("--log-format xml: status %d, stderr %q; want 2 and the reason", code, errb.String())
	}
}

// logLines parses every line of a --log-format json log; any line that is
// not a JSON object fails the test.
func logLines(t *testing.T, log string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// findLine returns the first line with msg and unit.
func findLine(lines []map[string]any, msg, unit string) map[string]any {
	for _, l := range lines {
		if l["msg"] == msg && l["unit"] == unit {
			return l
		}
	}
	return nil
}

// TestJSONLogs: with --log-format json every line is a JSON object; the
// create line has the unit and the opener's pid and uid; a transient last
// close logs the closer; `ip link del` and the shutdown log their reason;
// a refused clone logs the refused caller.
func TestJSONLogs(t *testing.T) {
	d := startDaemon(t, "--log-format", "json", "--allow-other")
	os.Chmod(d.dir, 0755)
	os.Chmod(filepath.Dir(d.dir), 0755)

	opener := exec.Command("sh", "-c", "exec 3<>"+d.path("tun"))
	if out, err := opener.CombinedOutput(); err != nil {
		t.Fatalf("sh opening tun: %v %s", err, out)
	}
	transient := client("transient_tuntap", d.path("tun5"))
	if out, err := transient.CombinedOutput(); err != nil {
		t.Fatalf("transient_tuntap: %v %s", err, out)
	}
	testenv.WaitFor(t, "tun5's transient destroy", func() bool { return !contains(d.links(), "tun5") })
	d.mustIP("link", "del", "tun0")
	testenv.WaitFor(t, "tun0's node to go", func() bool { return !contains(d.ls(), "tun0") })
	if _, err := os.Stat(d.path("tun3")); err != nil {
		t.Fatal(err)
	}
	// The clone node open to all, so that the kernel lets nobody's open
	// through (default_permissions) and the daemon refuses the clone.
	if err := os.Chmod(d.path("tap"), 0o666); err != nil {
		t.Fatal(err)
	}
	refused := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", "exec 3<>"+d.path("tap"))
	if err := refused.Run(); err == nil {
		t.Fatalf("nobody cloned a tap")
	}
	d.stop()

	lines := logLines(t, d.log())
	pid := func(c *exec.Cmd) float64 { return float64(c.Process.Pid) }
	for _, c := range []struct {
		msg, unit string
		want      map[string]any
	}{
		{"create", "tun0", map[string]any{"pid": pid(opener), "uid": 0.0}},
		{"create", "tun5", map[string]any{"pid": pid(transient), "uid": 0.0}},
		{"revoke", "tun5", map[string]any{"reason": "transient last close", "pid": pid(transient), "uid": 0.0}},
		{"destroy", "tun5", map[string]any{"reason": "transient last close", "pid": pid(transient), "uid": 0.0}},
		{"revoke", "tun0", map[string]any{"reason": "interface deleted outside cdevfs"}},
		{"destroy", "tun0", map[string]any{"reason": "interface deleted outside cdevfs"}},
		{"destroy", "tun3", map[string]any{"reason": "shutdown"}},
		{"refused clone", "tap", map[string]any{"pid": pid(refused), "uid": 65534.0}},
	} {
		l := findLine(lines, c.msg, c.unit)
		if l == nil {
			t.Errorf("no %q line for %s in the log:\n%s", c.msg, c.unit, d.log())
			continue
		}
		for k, v := range c.want {
			if l[k] != v {
				t.Errorf("%q line for %s: %s = %v, want %v (line %v)", c.msg, c.unit, k, l[k], v, l)
			}
		}
		if l["level"] == nil || l["time"] == nil {
			t.Errorf("%q line for %s lacks level or time: %v", c.msg, c.unit, l)
		}
	}
}

// TestSystemdNotify: the real binary, run as systemd would with
// NOTIFY_SOCKET, sends READY=1 only once the mount serves (the tree is
// there when it arrives) and STOPPING=1 on SIGTERM, then exits 0 with
// the mount gone.
func TestSystemdNotify(t *testing.T) {
	requireKernel(t)
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dir := t.TempDir()
	cmd := exec.Command("unshare", "--net", "--", cdevfs, "mount", dir)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	var logb bytes.Buffer
	cmd.Stderr = &logb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	recv := func(want string) {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 4096)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s on NOTIFY_SOCKET: %v", want, err)
		}
		if got := string(buf[:n]); got != want {
			t.Fatalf("notification %q, want %q", got, want)
		}
	}
	recv("READY=1")
	// The tree must be served the moment READY=1 is in.
	ents, err := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if err != nil || !contains(names, "tun") || !contains(names, "null") {
		t.Fatalf("at READY=1, readdir %s = %v, %v; want the cdevfs tree", dir, names, err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	recv("STOPPING=1")
	select {
	case err := <-exited:
		exited <- err // for the deferred wait
		if err != nil {
			t.Fatalf("cdevfs exited with %v after SIGTERM, want 0:\n%s", err, logb.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("cdevfs did not exit within 30s of SIGTERM")
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), " "+dir+" ") {
		t.Errorf("mount %s still there after cdevfs exited", dir)
	}
}

// TestUnitFile: dist/cdevfs.service is a notify service that restarts on
// failure and stops with SIGTERM; systemd-analyze verify accepts it where
// systemd-analyze is installed (systemd is not a test dependency: CI
// machines need not have it).
func TestUnitFile(t *testing.T) {
	b, err := os.ReadFile("../../dist/cdevfs.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"Type=notify", "Restart=on-failure", "KillSignal=SIGTERM", "ExecStart=/usr/local/bin/cdevfs mount "} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(want)).MatchString(unit) {
			t.Errorf("cdevfs.service lacks a line %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("no systemd-analyze here, unit not verified: %v", err)
		return
	}
	requireKernel(t) // for the built binary
	// verify checks that ExecStart's binary exists: point it at ours.
	dir := t.TempDir()
	local := strings.ReplaceAll(unit, "/usr/local/bin/cdevfs", cdevfs)
	if err := os.WriteFile(filepath.Join(dir, "cdevfs.service"), []byte(local), 0644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", filepath.Join(dir, "cdevfs.service")).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// scrape fetches the daemon's metrics over its unix socket and returns
// the value of each sample by its name and labels.
func scrape(t *testing.T, sock string) map[string]float64 {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	resp, err := c.Get("http://cdevfs/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("scrape: %v %s", err, resp.Status)
	}
	m := make(map[string]float64)
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("scrape: bad sample %q", l)
		}
		m[l[:i]] = v
	}
	return m
}

// TestMetrics: a scrape of the real daemon after a clone, pings through
// the node, an oversize write and an `ip link del` shows each counter
// moved by what was done.
func TestMetrics(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "metrics.sock")
	d := startDaemon(t, "--metrics", "unix:"+sock)
	before := scrape(t, sock)
	if before["cdevfs_clones_total"] != 0 || before[`cdevfs_interfaces{state="closed"}`] != 0 {
		t.Fatalf("fresh daemon's metrics: clones %v, closed %v; want 0", before["cdevfs_clones_total"], before[`cdevfs_interfaces{state="closed"}`])
	}
	if _, err := os.Stat(d.path("tun7")); err != nil { // clones tun7
		t.Fatal(err)
	}
	d.configure("tun7")
	const pings = 3
	if out, err := client("icmpecho", d.path("tun7"), "198.18.0.2", "198.18.0.1", strconv.Itoa(pings)).CombinedOutput(); err != nil {
		t.Fatalf("icmpecho: %v\n%s", err, out)
	}
	fd := reopen(t, d.path("tun7"))
	if _, err := syscall.Write(fd, make([]byte, 65536)); err != syscall.EIO {
		t.Fatalf("oversize write = %v, want EIO", err)
	}
	if err := syscall.Close(fd); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, "tun7 closed in the metrics", func() bool { return scrape(t, sock)[`cdevfs_interfaces{state="closed"}`] == 1 })
	m := scrape(t, sock)
	for name, want := range map[string]float64{
		"cdevfs_clones_total":                     1,
		"cdevfs_opens_total":                      2, // icmpecho's, then ours
		`cdevfs_device_errors_total{errno="EIO"}`: 1,
		`cdevfs_interfaces{state="open"}`:         0,
		`cdevfs_interfaces{state="dying"}`:        0,
		"cdevfs_destroys_total":                   0,
		"cdevfs_revokes_total":                    0,
	} {
		if got, ok := m[name]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, want)
		}
	}
	// icmpecho resends when a reply is slow, and the kernel sends IPv6
	// router solicitations: at least one packet each way per ping.
	for name, least := range map[string]float64{
		"cdevfs_packets_written_total":                                pings,
		"cdevfs_packets_read_total":                                   pings,
		"cdevfs_written_bytes_total":                                  pings * 84,
		"cdevfs_read_bytes_total":                                     pings * 84,
		`cdevfs_fuse_request_duration_seconds_count{opcode="read"}`:   pings,
		`cdevfs_fuse_request_duration_seconds_count{opcode="write"}`:  pings + 1,
		`cdevfs_fuse_request_duration_seconds_count{opcode="lookup"}`: 1,
	} {
		if got := m[name]; got < least {
			t.Errorf("%s = %v, want at least %v", name, got, least)
		}
	}
	d.mustIP("link", "del", "tun7")
	testenv.WaitFor(t, "the destroy in the metrics", func() bool { return scrape(t, sock)["cdevfs_destroys_total"] == 1 })
	m = scrape(t, sock)
	if m["cdevfs_revokes_total"] != 1 || m[`cdevfs_interfaces{state="closed"}`] != 0 {
		t.Errorf("after ip link del: revokes %v, closed %v; want 1 and 0", m["cdevfs_revokes_total"], m[`cdevfs_interfaces{state="closed"}`])
	}
	d.stop()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("metrics socket %s left after exit: %v", sock, err)
	}
}

// TestContainerRecipe runs testdata/container.sh, the README's recipe, as
// a user would: an unmodified client in a container whose /dev is cdevfs
// opens /dev/tun, configures the interface it got (its -u hook), and pings
// through it; a user other than root uses the tree too (--allow-other).
// The machine's /dev is untouched, and nothing is left behind.
func TestContainerRecipe(t *testing.T) {
	requireKernel(t)
	devBefore, _ := os.ReadDir("/dev")
	tmp := t.TempDir()
	container := func(args ...string) (string, error) {
		cmd := exec.Command("../../testdata/container.sh", args...)
		cmd.Env = append(os.Environ(), "CDEVFS="+cdevfs, "TMPDIR="+tmp)
		done := make(chan struct{})
		defer close(done)
		go func() {
			select {
			case <-done:
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
			}
		}()
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	up := `ip addr add 198.18.0.1/32 peer 198.18.0.2 dev "$1" && ip link set "$1" up`
	out, err := container(filepath.Join(binDir, "icmpecho"), "-u", up, "/dev/tun", "198.18.0.2", "198.18.0.1", "3")
	if err != nil {
		t.Fatalf("container.sh icmpecho /dev/tun: %v\n%s", err, out)
	}
	for _, want := range []string{"msg=create unit=tun0", "msg=destroy unit=tun0", "msg=stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("container.sh output lacks %q:\n%s", want, out)
		}
	}
	out, err = container("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
		"id -u && head -c 4 /dev/zero | od -An -tx1 && echo x > /dev/null && ls /dev")
	if err != nil {
		t.Fatalf("container.sh as nobody: %v\n%s", err, out)
	}
	for _, want := range []string{"65534\n", " 00 00 00 00\n", "tap\n", "tun\n", "urandom\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("container.sh as nobody: output lacks %q:\n%s", want, out)
		}
	}
	devAfter, _ := os.ReadDir("/dev")
	if fmt.Sprint(devBefore) != fmt.Sprint(devAfter) {
		t.Errorf("the machine's /dev changed: %v, then %v", devBefore, devAfter)
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), "cdevfs") {
		t.Errorf("a cdevfs mount is left in the test's namespace:\n%s", b)
	}
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("container.sh left %v in its TMPDIR", left)
	}
}
