// Command cdevbench measures the price of the cdevfs relay: the same
// packet workloads on a native tun fd (opened through /dev/net/tun with
// TUNSETIFF) and through a cdevfs mount, in one run, and prints one table
// with both and their ratio.
//
//	go run ./cmd/cdevbench [flags]
//
// It must run as root. It re-executes itself under `unshare --net
// --mount`, so every interface and mount it makes lives in a private
// network and mount namespace that dies with it. The cdevfs side is the
// real product: the cdevfs binary (built from this module unless -cdevfs
// names one) serving a mount in a temporary directory, as a separate
// process, whose RSS is what the scale rows report.
//
// The packet rows have two more columns, floors for the relay: min-relay,
// a minimal hand-written FUSE relay over the classic /dev/fuse transport
// (relay.go), and min-uring, the same over FUSE-over-io_uring (uring.go),
// which is "n/a" unless the fuse module's enable_uring parameter is Y
// (the benchmark reads it and never changes it). -relay=false and
// -uring=false leave them out.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cdevfs/cdevfs/internal/tunfd"
	"golang.org/x/sys/unix"
)

type config struct {
	cdevfs    string
	rounds    int
	duration  time.Duration
	clones    int
	openClose int
	scale     []int
	relay     bool
	uring     bool
	// cdevfsURing serves the cdevfs column over io_uring where the kernel
	// allows it (the daemon's --io-uring on), else over /dev/fuse.
	cdevfsURing bool
}

const nsEnv = "CDEVBENCH_NETNS"

func main() {
	var c config
	var scale string
	flag.StringVar(&c.cdevfs, "cdevfs", "", "cdevfs binary to benchmark (default: build ./cmd/cdevfs of this module)")
	flag.IntVar(&c.rounds, "rounds", 20000, "ping-pong round trips per side")
	flag.DurationVar(&c.duration, "duration", 5*time.Second, "time per pipelined throughput measurement per side")
	flag.IntVar(&c.clones, "clones", 1000, "clone operations per side (median reported)")
	flag.IntVar(&c.openClose, "openclose", 2000, "open/close cycles of an existing node per side")
	flag.StringVar(&scale, "scale", "1000,10000", "comma-separated interface counts for the scale rows")
	flag.BoolVar(&c.relay, "relay", true, "also measure a minimal hand-written FUSE relay (the /dev/fuse floor)")
	flag.BoolVar(&c.uring, "uring", true, "also measure a minimal FUSE-over-io_uring relay (needs the fuse module's enable_uring=Y; n/a otherwise)")
	flag.BoolVar(&c.cdevfsURing, "cdevfs-uring", true, "serve the cdevfs column over FUSE-over-io_uring where the kernel allows it (enable_uring=Y); false: over /dev/fuse")
	flag.Parse()
	for _, f := range strings.Split(scale, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			fatalf("bad -scale %q", scale)
		}
		c.scale = append(c.scale, n)
	}
	slices.Sort(c.scale)
	if len(os.Args) > 1 && os.Args[1] == "relay-serve" {
		os.Exit(relayServe(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "uring-serve" {
		os.Exit(uringServe(os.Args[2:]))
	}
	if os.Geteuid() != 0 {
		fatalf("must run as root (creating interfaces and mounting need it)")
	}
	if os.Getenv(nsEnv) == "" {
		os.Exit(reexec(&c))
	}
	if err := run(&c); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cdevbench: "+format+"\n", args...)
	os.Exit(1)
}

// reexec builds cdevfs if needed and runs this program again in a private
// network and mount namespace.
func reexec(c *config) int {
	self, err := os.Executable()
	if err != nil {
		fatalf("%v", err)
	}
	args := os.Args[1:]
	if c.cdevfs == "" {
		dir, err := os.MkdirTemp("", "cdevbench-")
		if err != nil {
			fatalf("%v", err)
		}
		defer os.RemoveAll(dir)
		bin := filepath.Join(dir, "cdevfs")
		out, err := exec.Command("go", "build", "-o", bin, "github.com/cdevfs/cdevfs/cmd/cdevfs").CombinedOutput()
		if err != nil {
			fatalf("go build cdevfs (run from inside the module, or pass -cdevfs): %v\n%s", err, out)
		}
		args = append([]string{"-cdevfs", bin}, args...)
	}
	cmd := exec.Command("unshare", append([]string{"--net", "--mount", "--", self}, args...)...)
	cmd.Env = append(os.Environ(), nsEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		fatalf("unshare: %v", err)
	}
	return 0
}

// openRetry opens path, retrying while the node is busy (EBUSY) or the
// open was interrupted (EINTR: an open waiting for a closing holder ends
// on a signal, and the bench's own children send SIGCHLD; os.OpenFile
// retries it too), and returns the time of the successful open.
func openRetry(path string) (int, time.Duration, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		t0 := time.Now()
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		d := time.Since(t0)
		if err == nil {
			return fd, d, nil
		}
		if (err != unix.EBUSY && err != unix.EINTR) || time.Now().After(deadline) {
			return -1, 0, fmt.Errorf("open %s: %w", path, err)
		}
		runtime.Gosched()
	}
}

func run(c *config) (err error) {
	// No IPv6 on the bench interfaces: router solicitations would only
	// add packets to skip.
	sysctl("net/ipv6/conf/all/disable_ipv6", "1")
	sysctl("net/ipv6/conf/default/disable_ipv6", "1")
	if err := ip("link", "set", "lo", "up"); err != nil {
		return err
	}
	mnt, err := os.MkdirTemp("", "cdevbench-mnt-")
	if err != nil {
		return err
	}
	defer os.Remove(mnt)
	// The cdevfs column's transport, said in the header.
	var notes []string
	iouring, transport := "off", "/dev/fuse (-cdevfs-uring=false)"
	if c.cdevfsURing {
		if ok, why := uringAvailable(); ok {
			iouring, transport = "on", "FUSE over io_uring"
		} else {
			transport = "/dev/fuse, " + why
		}
	}
	notes = append(notes, "cdevfs column: served over "+transport)
	d, err := startDaemon(c.cdevfs, mnt, iouring)
	if err != nil {
		return err
	}
	defer d.stop()
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\ncdevfs log:\n%s", err, d.log())
		}
	}()
	// The extra columns: the minimal relays, over /dev/fuse and over
	// io_uring. min-uring is "n/a" (a column of its own, with the reason
	// in the header) where the kernel would not carry FUSE over io_uring:
	// the benchmark does not change the fuse module's setting itself.
	var relays []*relayProc
	var cols []string
	uringOK := false
	if c.relay {
		rp, err := startRelay(false)
		if err != nil {
			return err
		}
		defer rp.stop()
		relays, cols = append(relays, rp), append(cols, rp.name)
	}
	if c.uring {
		cols = append(cols, "min-uring")
		var why string
		if uringOK, why = uringAvailable(); uringOK {
			rp, err := startRelay(true)
			if err != nil {
				return err
			}
			defer rp.stop()
			relays = append(relays, rp)
		} else {
			notes = append(notes, "min-uring: n/a, "+why)
		}
	}
	r := &results{}
	rss0, err := rssKiB(d.cmd.Process.Pid)
	if err != nil {
		return err
	}
	pkt := newPacketsFor(netip.MustParseAddr("198.18.9.2"), netip.MustParseAddr("198.18.9.1"), 84)

	// Clone cost: open of the clone node to the first packet written,
	// against TUNSETIFF creating an interface and the first packet written
	// on it. Both sides in blocks of 100, alternating, so that drift on a
	// noisy machine hits both. Neither side closes during the row: closing
	// a tun fd waits out an RCU grace period under the lock the next
	// TUNSETIFF needs, which would bill one side's closes to the other's
	// creates (about 50 µs a clone when only cdevfs closed).
	var nativeFds, cloneFds []int
	var cl, nat []time.Duration
	for done := 0; done < c.clones; done += 100 {
		n := min(100, c.clones-done)
		for i := range n {
			t0 := time.Now()
			fd, err := unix.Open(filepath.Join(mnt, "tun"), unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("clone %d: %w", done+i, err)
			}
			if err := firstWrite(fd, pkt.pkts[0]); err != nil {
				return fmt.Errorf("clone %d: %w", done+i, err)
			}
			cl = append(cl, time.Since(t0))
			cloneFds = append(cloneFds, fd)
		}
		for i := range n {
			t0 := time.Now()
			fd, err := tunfd.Open(fmt.Sprintf("nclone%d", done+i), unix.IFF_TUN|unix.IFF_NO_PI)
			if err != nil {
				return err
			}
			if err := firstWrite(fd, pkt.pkts[0]); err != nil {
				return fmt.Errorf("native clone: %w", err)
			}
			nat = append(nat, time.Since(t0))
			// Kept open: closing deletes the interface, slowly; the
			// namespace takes them at exit.
			nativeFds = append(nativeFds, fd)
		}
	}
	r.add(row{name: fmt.Sprintf("clone to first packet, median of %d (µs)", c.clones), unit: "µs",
		native: us(median(nat)), cdevfs: us(median(cl)), lower: true,
		target: "≤ 2×", ok: func(n, f float64) bool { return f <= 2*n }})
	units := c.clones // tun0 .. tun(clones-1) exist now, and stay (persistent)
	for _, fd := range cloneFds {
		unix.Close(fd)
	}
	// The closes' RELEASEs reach the daemon after close(2) returns: wait
	// for the last one before the next rows, which it would disturb.
	if units > 0 {
		fd, _, err := openRetry(filepath.Join(mnt, fmt.Sprintf("tun%d", units-1)))
		if err != nil {
			return err
		}
		unix.Close(fd)
	}

	firstPoint := true
	scalePoint := func(want int) error {
		rssBefore, err := rssKiB(d.cmd.Process.Pid)
		if err != nil {
			return err
		}
		before := units
		if firstPoint {
			rssBefore, before, firstPoint = rss0, 0, false
		}
		if err := createUnits(mnt, units, want); err != nil {
			return err
		}
		units = max(units, want)
		rss, err := rssKiB(d.cmd.Process.Pid)
		if err != nil {
			return err
		}
		perIf := float64(rss-rssBefore) / float64(units-before)
		lsN, err := timeLs(mnt)
		if err != nil {
			return err
		}
		lsS, err := timeLs("/sys/class/net")
		if err != nil {
			return err
		}
		last := fmt.Sprintf("tun%d", units-1)
		fuseOpen, natOpen, err := timeLastOpen(mnt, last)
		if err != nil {
			return err
		}
		r.add(row{name: fmt.Sprintf("ls -l, %d nodes (ms) [native: ls -l /sys/class/net]", units), unit: "ms",
			native: lsS, cdevfs: lsN, lower: true, target: units >= 10000 && c.scale[len(c.scale)-1] >= 10000,
			ok: func(n, f float64) bool { return f < 300 }, targetText: "< 300 ms"})
		r.add(row{name: fmt.Sprintf("daemon RSS per interface, %d (KiB) [%d→%d]", units, before, units), unit: "KiB",
			native: -1, cdevfs: perIf, lower: true})
		r.add(row{name: fmt.Sprintf("lookup+open of %s, %d (µs) [native: TUNSETIFF attach]", last, units), unit: "µs",
			native: natOpen, cdevfs: fuseOpen, lower: true})
		return nil
	}
	var scaleRest []int
	if len(c.scale) > 0 {
		if err := scalePoint(c.scale[0]); err != nil {
			return err
		}
		scaleRest = c.scale[1:]
	}

	// The packet links: a native tun and a cdevfs unit (tun0, made by the
	// first clone above), each on its own /24.
	nfd, err := tunfd.Open("nbench", unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		return err
	}
	defer unix.Close(nfd)
	native := &link{name: "native", fd: nfd, local: netip.MustParseAddr("198.18.1.1"), peer: netip.MustParseAddr("198.18.1.2")}
	if err := configure("nbench", native.local); err != nil {
		return err
	}
	cfd, _, err := openRetry(filepath.Join(mnt, "tun0"))
	if err != nil {
		return err
	}
	cdev := &link{name: "cdevfs", fd: cfd, local: netip.MustParseAddr("198.18.2.1"), peer: netip.MustParseAddr("198.18.2.2")}
	if name, err := gifname(cfd); err != nil || name != "tun0" {
		return fmt.Errorf("TUNGIFNAME on tun0: %q, %v", name, err)
	}
	if err := configure("tun0", cdev.local); err != nil {
		return err
	}
	links := []*link{native, cdev}
	for _, rp := range relays {
		rl, err := rp.link()
		if err != nil {
			return err
		}
		links = append(links, rl)
		defer unix.Close(rl.fd)
	}
	for _, l := range links {
		if err := warmup(l); err != nil {
			return err
		}
	}

	// Ping-pong: two halves per side, alternating.
	rtts := make([][]time.Duration, len(links))
	for range 2 {
		for i, l := range links {
			rt, err := pingPong(l, c.rounds/2)
			if err != nil {
				return err
			}
			rtts[i] = append(rtts[i], rt...)
		}
	}
	for i := range rtts {
		slices.Sort(rtts[i])
	}
	// extra gives the extra columns' values of a packet row: f of the
	// relay links in column order, naN for a column not measured here.
	extra := func(f func(int) float64) []float64 {
		var v []float64
		i := 2
		for _, name := range cols {
			if name == "min-uring" && !uringOK {
				v = append(v, naN)
				continue
			}
			v = append(v, f(i))
			i++
		}
		return v
	}
	p50 := func(i int) float64 { return percentileUS(rtts[i], 0.50) }
	p99 := func(i int) float64 { return percentileUS(rtts[i], 0.99) }
	r.add(row{name: fmt.Sprintf("ping-pong p50, %d round trips (µs)", len(rtts[0])), native: p50(0), cdevfs: p50(1), extra: extra(p50), lower: true,
		target: "≤ native+15", ok: func(n, f float64) bool { return f <= n+15 }})
	r.add(row{name: fmt.Sprintf("ping-pong p99, %d round trips (µs)", len(rtts[0])), native: p99(0), cdevfs: p99(1), extra: extra(p99), lower: true})

	// Pipelined throughput: each size and depth, two halves per side.
	for _, size := range []int{64, 1400} {
		for _, depth := range []int{1, 8, 64} {
			pps := make([]float64, len(links))
			for range 2 {
				for i, l := range links {
					p, err := pipelined(l, size, depth, c.duration/2)
					if err != nil {
						return err
					}
					pps[i] += p / 2
				}
			}
			rw := row{name: fmt.Sprintf("pipelined %dB, %d outstanding (pps)", size, depth), native: pps[0], cdevfs: pps[1], extra: extra(func(i int) float64 { return pps[i] })}
			if size == 64 && depth == 64 {
				rw.target, rw.ok = "≥ 0.25×", func(n, f float64) bool { return f >= 0.25*n }
			}
			r.add(rw)
		}
	}

	// Open/close of an existing node: cdevfs tun0 against TUNSETIFF
	// attaching to a persistent native interface.
	unix.Close(cfd)
	pfd, err := tunfd.Open("npersist", unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		return err
	}
	if err := unix.IoctlSetInt(pfd, unix.TUNSETPERSIST, 1); err != nil {
		return err
	}
	unix.Close(pfd)
	var ocN, ocF float64
	for range 2 {
		t0 := time.Now()
		for range c.openClose / 2 {
			fd, err := tunfd.Open("npersist", unix.IFF_TUN|unix.IFF_NO_PI)
			if err != nil {
				return err
			}
			unix.Close(fd)
		}
		ocN += float64(c.openClose/2) / time.Since(t0).Seconds() / 2
		t0 = time.Now()
		for range c.openClose / 2 {
			fd, _, err := openRetry(filepath.Join(mnt, "tun0"))
			if err != nil {
				return err
			}
			unix.Close(fd)
		}
		ocF += float64(c.openClose/2) / time.Since(t0).Seconds() / 2
	}
	r.add(row{name: "open/close of an existing node (ops/s)", native: ocN, cdevfs: ocF})

	for _, n := range scaleRest {
		if err := scalePoint(n); err != nil {
			return err
		}
	}
	floor, err := floorLine(c.rounds)
	if err != nil {
		return err
	}
	printHeader(os.Stdout, c, notes)
	r.print(os.Stdout, cols)
	fmt.Println(floor)
	_ = nativeFds
	return nil
}

// firstWrite writes the first packet on a new interface. The interface is
// down, so the tun driver refuses it with EIO: the packet made the whole
// trip to the driver and back, on both sides alike, which is what the
// clone row times (open to the first packet handled).
func firstWrite(fd int, p []byte) error {
	if _, err := unix.Write(fd, p); err != nil && err != unix.EIO {
		return fmt.Errorf("first write: %w", err)
	}
	return nil
}

// createUnits makes tun<from> .. tun<to-1> by looking the names up (a
// lookup of a free unit creates it), with a few parallel callers.
func createUnits(mnt string, from, to int) error {
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	const workers = 4
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := from + w; u < to; u += workers {
				var st unix.Stat_t
				if err := unix.Stat(filepath.Join(mnt, fmt.Sprintf("tun%d", u)), &st); err != nil {
					errs <- fmt.Errorf("create tun%d: %w", u, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// timeLs runs `ls -l dir` three times and returns the median in ms.
func timeLs(dir string) (float64, error) {
	var ds []time.Duration
	for range 3 {
		cmd := exec.Command("ls", "-l", dir)
		var errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = io.Discard, &errb
		t0 := time.Now()
		if err := cmd.Run(); err != nil {
			return 0, fmt.Errorf("ls -l %s: %v: %s", dir, err, errb.Bytes())
		}
		ds = append(ds, time.Since(t0))
	}
	return float64(median(ds).Microseconds()) / 1e3, nil
}

// timeLastOpen times open(2) of mnt/name (a path lookup and an open)
// against a native TUNSETIFF attach to the same interface; medians of 21.
func timeLastOpen(mnt, name string) (fuse, native float64, err error) {
	var fs, ns []time.Duration
	for range 21 {
		time.Sleep(2 * time.Millisecond) // let the last RELEASE land
		fd, d, err := openRetry(filepath.Join(mnt, name))
		if err != nil {
			return 0, 0, err
		}
		fs = append(fs, d)
		unix.Close(fd)
		time.Sleep(2 * time.Millisecond)
		for {
			t0 := time.Now()
			fd, err = tunfd.Open(name, unix.IFF_TUN|unix.IFF_NO_PI)
			d = time.Since(t0)
			if err == nil {
				break
			}
			if !errors.Is(err, unix.EBUSY) {
				return 0, 0, err
			}
			time.Sleep(time.Millisecond)
		}
		ns = append(ns, d)
		unix.Close(fd)
	}
	return us(median(fs)), us(median(ns)), nil
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func newPacketsFor(peer, local netip.Addr, size int) *packets {
	return newPackets(&link{peer: peer, local: local}, size)
}
