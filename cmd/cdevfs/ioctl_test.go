package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cdevfs/cdevfs/bsdtun"
	"github.com/cdevfs/cdevfs/internal/testenv"
)

func ioctlPtr(fd int, cmd uint32, p unsafe.Pointer) syscall.Errno {
	_, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), uintptr(cmd), uintptr(p))
	return e
}

func ioctlSetInt(fd int, cmd uint32, v int32) syscall.Errno {
	return ioctlPtr(fd, cmd, unsafe.Pointer(&v))
}

func ioctlGetInt(fd int, cmd uint32) (int32, syscall.Errno) {
	v := int32(-12345) // not zero: the daemon must write the whole buffer
	e := ioctlPtr(fd, cmd, unsafe.Pointer(&v))
	return v, e
}

type tuninfo struct {
	Baudrate int32
	MTU      uint16
	Type     uint8
	Dummy    uint8
}

// TestHeaderMatchesGoConstants: the C header's values, printed by a C
// program compiled against it, equal package bsdtun's.
func TestHeaderMatchesGoConstants(t *testing.T) {
	requireKernel(t)
	out, err := client("if_tun_consts").Output()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"TUNSDEBUG": bsdtun.TUNSDEBUG, "TUNGDEBUG": bsdtun.TUNGDEBUG, "TUNSIFINFO": bsdtun.TUNSIFINFO,
		"TUNGIFINFO": bsdtun.TUNGIFINFO, "TUNSLMODE": bsdtun.TUNSLMODE, "TUNGIFNAME": bsdtun.TUNGIFNAME,
		"TUNSIFMODE": bsdtun.TUNSIFMODE, "TUNSIFPID": bsdtun.TUNSIFPID, "TUNSIFHEAD": bsdtun.TUNSIFHEAD,
		"TUNGIFHEAD": bsdtun.TUNGIFHEAD, "TUNSTRANSIENT": bsdtun.TUNSTRANSIENT, "TUNGTRANSIENT": bsdtun.TUNGTRANSIENT,
		"TAPSDEBUG": bsdtun.TAPSDEBUG, "TAPGDEBUG": bsdtun.TAPGDEBUG, "TAPSIFINFO": bsdtun.TAPSIFINFO,
		"TAPGIFINFO": bsdtun.TAPGIFINFO, "TAPGIFNAME": bsdtun.TAPGIFNAME, "TAPSTRANSIENT": bsdtun.TAPSTRANSIENT,
		"TAPGTRANSIENT": bsdtun.TAPGTRANSIENT, "IFT_ETHER": bsdtun.IFT_ETHER, "IFT_PPP": bsdtun.IFT_PPP,
		"TUNMRU": bsdtun.MRU, "sizeof_tuninfo": bsdtun.TuninfoSize, "sizeof_ifreq": bsdtun.IfreqSize,
	}
	seen := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		v, _ := strconv.ParseUint(f[1], 10, 64)
		w, ok := want[f[0]]
		if !ok {
			t.Errorf("header prints %s, which the test does not know", f[0])
			continue
		}
		seen++
		if v != w {
			t.Errorf("%s: C header %#x, Go %#x", f[0], v, w)
		}
	}
	if seen != len(want) {
		t.Errorf("compared %d values, want %d", seen, len(want))
	}
}

// TestIoctlTable: every ioctl of docs/design.md's table on a real tun or tap,
// with its effect on the real interface where there is one.
func TestIoctlTable(t *testing.T) {
	d := startDaemon(t)
	tun := openDev(t, d.path("tun"))
	defer syscall.Close(tun)
	tap := openDev(t, d.path("tap"))
	defer syscall.Close(tap)

	t.Run("TUNGIFNAME tells the clone opener its unit", func(t *testing.T) {
		for fd, want := range map[int]string{tun: "tun0", tap: "tap0"} {
			var ifr [bsdtun.IfreqSize]byte
			for i := range ifr {
				ifr[i] = 0xff // must be overwritten whole
			}
			if e := ioctlPtr(fd, bsdtun.TUNGIFNAME, unsafe.Pointer(&ifr)); e != 0 {
				t.Fatalf("TUNGIFNAME: %v", e)
			}
			name := string(bytes.TrimRight(ifr[:16], "\x00"))
			if name != want || bytes.IndexByte(ifr[16:], 0xff) >= 0 {
				t.Errorf("TUNGIFNAME = %q (% x), want %q and the rest zeroed", name, ifr, want)
			}
		}
	})
	t.Run("TUNSIFINFO sets the real MTU, TUNGIFINFO reads it back", func(t *testing.T) {
		info := tuninfo{Baudrate: 9600, MTU: 1280, Type: bsdtun.IFT_PPP}
		if e := ioctlPtr(tun, bsdtun.TUNSIFINFO, unsafe.Pointer(&info)); e != 0 {
			t.Fatalf("TUNSIFINFO: %v", e)
		}
		if out := d.mustIP("link", "show", "tun0"); !strings.Contains(out, "mtu 1280") {
			t.Errorf("ip link show tun0 = %q, want mtu 1280", out)
		}
		got := tuninfo{Baudrate: -1, MTU: 1, Type: 99, Dummy: 99}
		if e := ioctlPtr(tun, bsdtun.TUNGIFINFO, unsafe.Pointer(&got)); e != 0 {
			t.Fatalf("TUNGIFINFO: %v", e)
		}
		if got != (tuninfo{Baudrate: 9600, MTU: 1280, Type: bsdtun.IFT_PPP}) {
			t.Errorf("TUNGIFINFO = %+v, want baud 9600 mtu 1280 type IFT_PPP dummy 0", got)
		}
		tapInfo := tuninfo{MTU: 1400, Type: bsdtun.IFT_ETHER}
		if e := ioctlPtr(tap, bsdtun.TAPSIFINFO, unsafe.Pointer(&tapInfo)); e != 0 {
			t.Fatalf("TAPSIFINFO: %v", e)
		}
		if out := d.mustIP("link", "show", "tap0"); !strings.Contains(out, "mtu 1400") {
			t.Errorf("ip link show tap0 = %q, want mtu 1400", out)
		}
		for _, bad := range []tuninfo{{MTU: 10, Type: bsdtun.IFT_PPP}, {MTU: 1500, Type: bsdtun.IFT_ETHER}} {
			if e := ioctlPtr(tun, bsdtun.TUNSIFINFO, unsafe.Pointer(&bad)); e != syscall.EINVAL {
				t.Errorf("TUNSIFINFO %+v = %v, want EINVAL", bad, e)
			}
		}
	})
	t.Run("TUNSDEBUG/TUNGDEBUG", func(t *testing.T) {
		if e := ioctlSetInt(tun, bsdtun.TUNSDEBUG, 3); e != 0 {
			t.Fatal(e)
		}
		if v, e := ioctlGetInt(tun, bsdtun.TUNGDEBUG); e != 0 || v != 3 {
			t.Errorf("TUNGDEBUG = %d, %v; want 3", v, e)
		}
	})
	t.Run("TUNSIFMODE is EBUSY while up, EINVAL for other values", func(t *testing.T) {
		if e := ioctlSetInt(tun, bsdtun.TUNSIFMODE, syscall.IFF_BROADCAST|0x1000); e != 0 {
			t.Errorf("TUNSIFMODE IFF_BROADCAST|IFF_MULTICAST while down = %v, want success", e)
		}
		if e := ioctlSetInt(tun, bsdtun.TUNSIFMODE, syscall.IFF_UP); e != syscall.EINVAL {
			t.Errorf("TUNSIFMODE IFF_UP = %v, want EINVAL", e)
		}
		d.mustIP("link", "set", "tun0", "up")
		defer d.mustIP("link", "set", "tun0", "down")
		if e := ioctlSetInt(tun, bsdtun.TUNSIFMODE, syscall.IFF_POINTOPOINT); e != syscall.EBUSY {
			t.Errorf("TUNSIFMODE while up = %v, want EBUSY", e)
		}
	})
	t.Run("TUNSIFPID and TUNSLMODE", func(t *testing.T) {
		if e := ioctlPtr(tun, bsdtun.TUNSIFPID, nil); e != 0 {
			t.Errorf("TUNSIFPID = %v", e)
		}
		if e := ioctlSetInt(tun, bsdtun.TUNSLMODE, 0); e != 0 {
			t.Errorf("TUNSLMODE = %v", e)
		}
		if e := ioctlPtr(tap, bsdtun.TUNSIFPID, nil); e != syscall.ENOTTY {
			t.Errorf("TUNSIFPID on a tap = %v, want ENOTTY (tun only, as in FreeBSD)", e)
		}
	})
	t.Run("TUNSTRANSIENT/TUNGTRANSIENT", func(t *testing.T) {
		for _, v := range []int32{1, 0} {
			if e := ioctlSetInt(tap, bsdtun.TAPSTRANSIENT, v); e != 0 {
				t.Fatal(e)
			}
			if got, e := ioctlGetInt(tap, bsdtun.TAPGTRANSIENT); e != 0 || got != v {
				t.Errorf("TAPGTRANSIENT = %d, %v; want %d", got, e, v)
			}
		}
	})
	t.Run("unknown command and bad arguments", func(t *testing.T) {
		if e := ioctlSetInt(tun, 0x40047470 /* _IOW('t',112,int) */, 1); e != syscall.ENOTTY {
			t.Errorf("unknown ioctl = %v, want ENOTTY", e)
		}
		if e := ioctlSetInt(tun, 0x4004545a /* _IOW('T',90,int) */, 1); e != syscall.ENOTTY {
			t.Errorf("unknown 'T' ioctl = %v, want ENOTTY", e)
		}
	})
	t.Run("TUNSIFHEAD frames packets with a network-order AF header", func(t *testing.T) {
		if e := ioctlSetInt(tun, bsdtun.TUNSIFHEAD, 1); e != 0 {
			t.Fatal(e)
		}
		if v, e := ioctlGetInt(tun, bsdtun.TUNGIFHEAD); e != 0 || v != 1 {
			t.Fatalf("TUNGIFHEAD = %d, %v; want 1", v, e)
		}
		d.mustIP("link", "set", "tun0", "mtu", "1500")
		d.configure("tun0")
		req := echoRequest("198.18.0.2", "198.18.0.1", 7, 32)
		bad := append([]byte{0, 0, 0, 99}, req...)
		if _, err := syscall.Write(tun, bad); err != syscall.EAFNOSUPPORT {
			t.Errorf("write with family 99 = %v, want EAFNOSUPPORT", err)
		}
		framed := append([]byte{0, 0, 0, syscall.AF_INET}, req...)
		if n, err := syscall.Write(tun, framed); err != nil || n != len(framed) {
			t.Fatalf("write with AF_INET header = %d, %v", n, err)
		}
		buf := make([]byte, 2048)
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			n, err := readRetry(tun, buf)
			if err != nil {
				t.Fatal(err)
			}
			af := binary.BigEndian.Uint32(buf)
			if af != syscall.AF_INET && af != syscall.AF_INET6 {
				t.Fatalf("read header = %d, want AF_INET or AF_INET6", af)
			}
			if af == syscall.AF_INET && n >= 24+8 && buf[4+9] == 1 && buf[4+20] == 0 {
				return // the echo reply, after its AF_INET header
			}
		}
		t.Error("no echo reply read with TUNSIFHEAD on")
	})
}

// TestTransientTuntapPort runs the ports of FreeBSD's transient_tuntap.c
// and of if_tun_test.sh's transient and 235704 cases.
func TestTransientTuntapPort(t *testing.T) {
	for _, c := range []string{"transient", "235704"} {
		t.Run(c, func(t *testing.T) {
			d := startDaemon(t)
			netns := "/proc/" + strconv.Itoa(d.cmd.Process.Pid) + "/ns/net"
			out, err := exec.Command("sh", "../../testdata/if_tun_test.sh", c, d.dir, netns, binDir).CombinedOutput()
			if err != nil {
				t.Fatalf("if_tun_test.sh %s: %v\n%s\ndaemon log:\n%s", c, err, out, d.log())
			}
		})
	}
	t.Run("non-transient survives close", func(t *testing.T) {
		d := startDaemon(t)
		fd := openDev(t, d.path("tap4"))
		syscall.Close(fd)
		time.Sleep(100 * time.Millisecond)
		if _, err := d.ip("link", "show", "tap4"); err != nil || !contains(d.ls(), "tap4") {
			t.Errorf("tap4 gone after the close of a non-transient device (ls %v)", d.ls())
		}
	})
}

// TestRenameKeepsNodeThenDeleteRevokes: FreeBSD PR 235704 with an open
// handle: after a rename the node keeps its name and proxies packets;
// deleting the renamed interface gives ENXIO on the handle.
func TestRenameKeepsNodeThenDeleteRevokes(t *testing.T) {
	d := startDaemon(t)
	fd := openDev(t, d.path("tun9"))
	defer syscall.Close(fd)
	d.mustIP("link", "set", "tun9", "name", "other")
	d.configure("other")
	if !contains(d.ls(), "tun9") {
		t.Fatalf("ls = %v, want tun9 kept after the rename", d.ls())
	}
	if _, err := syscall.Write(fd, echoRequest("198.18.0.2", "198.18.0.1", 1, 8)); err != nil {
		t.Fatalf("write after rename: %v", err)
	}
	buf := make([]byte, 2048)
	for {
		n, err := readRetry(fd, buf)
		if err != nil {
			t.Fatalf("read after rename: %v", err)
		}
		if n > 20 && buf[9] == 1 && buf[20] == 0 {
			break
		}
	}
	d.mustIP("link", "del", "other")
	testenv.WaitFor(t, "tun9 to leave ls", func() bool { return !contains(d.ls(), "tun9") })
	if _, err := readRetry(fd, buf); err != syscall.ENXIO {
		t.Errorf("read after ip link del other = %v, want ENXIO", err)
	}
}

// TestTransientCloseRacingOpen: 1,000 times, the last close of a
// transient tun8 races an open of tun8 by name. Each open ends in a fresh
// device or ENXIO (never EBUSY once the old device is dying), and nothing
// is left behind.
func TestTransientCloseRacingOpen(t *testing.T) {
	d := startDaemon(t)
	path := d.path("tun8")
	fd := openDev(t, path)
	iterations, fresh, enxio, busy := 1000, 0, 0, 0
	if testing.Short() {
		iterations = 100
	}
	for i := 0; i < iterations; i++ {
		if e := ioctlSetInt(fd, bsdtun.TUNSTRANSIENT, 1); e != 0 {
			t.Fatalf("iteration %d: TUNSTRANSIENT: %v", i, e)
		}
		closed := make(chan struct{})
		go func(fd int) { syscall.Close(fd); close(closed) }(fd)
		var next int
		var err error
		for {
			next, err = openRetry(path)
			if err != syscall.EBUSY {
				break
			}
			// EBUSY is right only while the old device is still open: the
			// racing close(2) has not begun yet. Retry.
			busy++
		}
		<-closed
		switch err {
		case nil:
			fresh++
		case syscall.ENXIO:
			enxio++
			testenv.WaitFor(t, "tun8 to be openable again", func() bool {
				next, err = syscall.Open(path, syscall.O_RDWR, 0)
				return err == nil
			})
		default:
			t.Fatalf("iteration %d: open racing a transient close = %v, want a fresh device or ENXIO", i, err)
		}
		if v, e := ioctlGetInt(next, bsdtun.TUNGTRANSIENT); e != 0 || v != 0 {
			log := d.log()
			if len(log) > 3000 {
				log = log[len(log)-3000:]
			}
			t.Fatalf("iteration %d: the opened device has TUNGTRANSIENT %d, %v: not a fresh device\n%s", i, v, e, log)
		}
		fd = next
	}
	ioctlSetInt(fd, bsdtun.TUNSTRANSIENT, 1)
	syscall.Close(fd)
	testenv.WaitFor(t, "tun8 to go", func() bool { _, err := d.ip("link", "show", "tun8"); return err != nil })
	testenv.WaitFor(t, "tun8 to leave ls", func() bool { return !contains(d.ls(), "tun8") })
	t.Logf("%d iterations: %d fresh devices, %d ENXIO, %d EBUSY retries before the close began", iterations, fresh, enxio, busy)
	if got := d.links(); len(got) != 0 {
		t.Errorf("links left: %v", got)
	}
}
