//go:build linux

package cloner

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/tunfd"
	"golang.org/x/sys/unix"
)

// BenchmarkLinuxClone is issue 8's clone row without FUSE: an interface
// made and its first packet written, by the backend alone (Create), by a
// cloner with the netlink watch running (the daemon's clone node), and
// natively (TUNSETIFF, as the kernel's own clone). The sides alternate
// one operation at a time, so drift on a noisy machine hits all of them,
// and each side's median is reported; ratios are against native. Every
// interface is kept until the end (as cdevbench does), then removed
// untimed. Run it in a private namespace:
//
//	unshare --net --mount -- go test -run '^$' -bench LinuxClone -benchtime 1000x ./cloner
func BenchmarkLinuxClone(b *testing.B) {
	ltRequireNetns(b)
	mark, err := NewLinux(LinuxOptions{Mark: MarkPrefix + "bench"})
	if err != nil {
		b.Fatal(err)
	}
	defer mark.Close()
	reg := devnode.NewRegistry()
	c := New(Tun, mark, reg, 1<<20, slog.New(slog.NewTextHandler(io.Discard, nil)))
	done := make(chan struct{})
	stopped, err := mark.Watch(done, Watcher{Appeared: c.LinkAppeared, Deleted: c.LinkDeleted, Error: func(error) {}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	// An IPv4 header, enough for the tun driver to take it (it answers
	// EIO: the interface is down, as on cdevbench's first write).
	pkt := make([]byte, 84)
	pkt[0] = 0x45
	var links []Link
	var nodes []*devnode.Node
	var natFds []int
	defer func() {
		for _, n := range nodes {
			_ = n.Close(ctx)
			n.Rel()
		}
		close(done)
		<-stopped
		reg.Shutdown(ctx, func() { _ = DeleteCreated(mark, c) })
		for _, l := range links {
			_ = l.Delete()
			_ = l.Close()
		}
		for _, fd := range natFds {
			unix.Close(fd)
		}
	}()
	var nat, bk, cl []time.Duration
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		fd, err := tunfd.Open(fmt.Sprintf("nat%d", i), unix.IFF_TUN|unix.IFF_NO_PI)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := unix.Write(fd, pkt); err != nil && err != unix.EIO {
			b.Fatal(err)
		}
		nat = append(nat, time.Since(t0))
		natFds = append(natFds, fd)

		t0 = time.Now()
		l, err := mark.Create(fmt.Sprintf("bk%d", i), Tun, true)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := l.Write(ctx, pkt); err != nil && err != unix.EIO {
			b.Fatal(err)
		}
		bk = append(bk, time.Since(t0))
		links = append(links, l)

		t0 = time.Now()
		n, err := reg.Clone(ctx, "tun")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := n.Device().(devnode.IO).Write(ctx, pkt); err != nil && err != unix.EIO {
			b.Fatal(err)
		}
		cl = append(cl, time.Since(t0))
		nodes = append(nodes, n)
	}
	b.StopTimer()
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2]) / float64(time.Microsecond)
	}
	n, k, m := med(nat), med(bk), med(cl)
	b.ReportMetric(n, "native-µs")
	b.ReportMetric(k, "create-µs")
	b.ReportMetric(m, "clone-µs")
	b.ReportMetric(k/n, "create/native")
	b.ReportMetric(m/n, "clone/native")
	b.ReportMetric(0, "ns/op")
}
