package metrics

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func fixedStates(open, closed, dying int) States {
	return func() (int, int, int) { return open, closed, dying }
}

// TestCountersMove: every method moves its own metric and only that one.
func TestCountersMove(t *testing.T) {
	m := New(fixedStates(1, 2, 3))
	m.Opened()
	m.Created()
	m.Created()
	m.Revoked()
	m.Destroyed()
	m.Read(84)
	m.Read(16)
	m.Wrote(84)
	m.Error(syscall.ENXIO)
	m.Error(syscall.ENXIO)
	m.Error(syscall.EAGAIN)
	m.Error(0) // not an error: not counted
	m.Request(15, time.Now().Add(-time.Millisecond))
	m.Request(1, time.Now())
	m.Request(999, time.Now()) // unknown opcode: "other"
	m.RingRequest()
	m.RingRequest()
	m.RingParked()
	m.Refused("clone")
	m.Refused("clone")
	m.Refused("chmod")
	m.WatchResynced()

	for _, c := range []struct {
		got  float64
		want float64
		what string
	}{
		{testutil.ToFloat64(m.opens), 1, "opens"},
		{testutil.ToFloat64(m.clones), 2, "clones"},
		{testutil.ToFloat64(m.revokes), 1, "revokes"},
		{testutil.ToFloat64(m.destroys), 1, "destroys"},
		{testutil.ToFloat64(m.packetsRead), 2, "packets read"},
		{testutil.ToFloat64(m.bytesRead), 100, "bytes read"},
		{testutil.ToFloat64(m.packetsWritten), 1, "packets written"},
		{testutil.ToFloat64(m.bytesWritten), 84, "bytes written"},
		{testutil.ToFloat64(m.errors.WithLabelValues("ENXIO")), 2, "ENXIO errors"},
		{testutil.ToFloat64(m.errors.WithLabelValues("EAGAIN")), 1, "EAGAIN errors"},
		{float64(testutil.CollectAndCount(m.errors)), 2, "errno series"},
		{float64(testutil.CollectAndCount(m.requests)), 3, "opcode series"},
		{testutil.ToFloat64(m.refusals.WithLabelValues("clone")), 2, "refused clones"},
		{testutil.ToFloat64(m.refusals.WithLabelValues("chmod")), 1, "refused chmods"},
		{float64(testutil.CollectAndCount(m.refusals)), 2, "refusal series"},
		{testutil.ToFloat64(m.watchResyncs), 1, "watch resyncs"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
	body := scrape(t, m.Handler())
	for _, want := range []string{
		`cdevfs_interfaces{state="open"} 1`,
		`cdevfs_interfaces{state="closed"} 2`,
		`cdevfs_interfaces{state="dying"} 3`,
		`cdevfs_fuse_request_duration_seconds_count{opcode="read"} 1`,
		`cdevfs_fuse_request_duration_seconds_count{opcode="lookup"} 1`,
		`cdevfs_fuse_request_duration_seconds_count{opcode="other"} 1`,
		`cdevfs_device_errors_total{errno="ENXIO"} 2`,
		`cdevfs_read_bytes_total 100`,
		`cdevfs_fuse_ring_requests_total 2`,
		`cdevfs_fuse_ring_parked_reads_total 1`,
		`cdevfs_refusals_total{action="clone"} 2`,
		`cdevfs_watch_resyncs_total 1`,
		`go_goroutines `,
		`process_resident_memory_bytes `,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %q:\n%s", want, body)
		}
	}
}

// TestNilCountsNothing: a nil *Metrics (no --metrics) is usable.
func TestNilCountsNothing(t *testing.T) {
	var m *Metrics
	m.Opened()
	m.Created()
	m.Revoked()
	m.Destroyed()
	m.Read(1)
	m.Wrote(1)
	m.Error(syscall.EIO)
	m.Request(15, time.Now())
	m.RingRequest()
	m.Refused("open")
	m.WatchResynced()
}

// TestPacketPathDoesNotAllocate: the per-packet and per-request methods
// allocate nothing once their labelled children are resolved.
func TestPacketPathDoesNotAllocate(t *testing.T) {
	m := New(fixedStates(0, 0, 0))
	m.Error(syscall.EAGAIN)
	m.Request(15, time.Now())
	start := time.Now()
	if n := testing.AllocsPerRun(1000, func() {
		m.Read(84)
		m.Wrote(84)
		m.Error(syscall.EAGAIN)
		m.Request(15, start)
	}); n != 0 {
		t.Errorf("%v allocations per packet, want 0", n)
	}
}

// TestListenUnix: "unix:/path" serves /metrics on a unix socket, and
// Close removes the socket.
func TestListenUnix(t *testing.T) {
	m := New(fixedStates(0, 1, 0))
	m.Created()
	path := filepath.Join(t.TempDir(), "metrics.sock")
	s, err := Listen("unix:"+path, m.Handler())
	if err != nil {
		t.Fatal(err)
	}
	if s.Addr() != "unix:"+path {
		t.Errorf("Addr = %q, want unix:%s", s.Addr(), path)
	}
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	resp, err := c.Get("http://cdevfs/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), "cdevfs_clones_total 1") {
		t.Errorf("scrape over the unix socket lacks cdevfs_clones_total 1:\n%s", b)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Errorf("socket %s still answers after Close", path)
	}
}

// TestListenRefusesBadAddress: an address that cannot be listened on is
// an error at start, naming the metrics.
func TestListenRefusesBadAddress(t *testing.T) {
	for _, addr := range []string{"unix:/nonexistent/dir/metrics.sock", "no-such-host.invalid:99999"} {
		if s, err := Listen(addr, http.NotFoundHandler()); err == nil {
			s.Close()
			t.Errorf("Listen(%q) succeeded, want an error", addr)
		} else if !strings.HasPrefix(err.Error(), "metrics: ") {
			t.Errorf("Listen(%q) = %v, want an error starting \"metrics: \"", addr, err)
		}
	}
}

func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	s, err := Listen("unix:"+filepath.Join(t.TempDir(), "s"), h)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", strings.TrimPrefix(s.Addr(), "unix:"))
	}}}
	resp, err := c.Get("http://cdevfs/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
