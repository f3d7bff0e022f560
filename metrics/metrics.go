// Package metrics is cdevfs's Prometheus instrumentation: one Metrics
// struct that the layers tell what happened (an open, a clone, a packet,
// a FUSE request) and that serves the counts on /metrics.
//
// A nil *Metrics is valid and counts nothing, so the daemon without
// --metrics pays one nil check per event. The per-packet and per-request
// methods do not allocate: their counters are resolved once (labelled
// children are cached by errno and opcode on first use), so a packet
// costs an atomic add, never a label lookup.
package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
)

// States counts the device nodes by state: open, closed (neither open nor
// being destroyed), dying (destroy under way). It is called on every
// scrape.
type States func() (open, closed, dying int)

// Metrics holds cdevfs's metrics and the registry that serves them.
type Metrics struct {
	reg *prometheus.Registry

	opens, clones, destroys, revokes prometheus.Counter
	packetsRead, packetsWritten      prometheus.Counter
	bytesRead, bytesWritten          prometheus.Counter
	ringRequests                     prometheus.Counter
	ringParked                       prometheus.Counter
	ringHeld                         prometheus.Gauge
	watchResyncs                     prometheus.Counter
	panics                           prometheus.Counter

	refusals  *prometheus.CounterVec
	ringKicks *prometheus.CounterVec
	errors    *prometheus.CounterVec
	errorBy   [maxErrno]atomic.Pointer[prometheus.Counter]
	requests  *prometheus.HistogramVec
	reqBy     [fusewire.MaxOpcode + 1]atomic.Pointer[prometheus.Observer]
}

// maxErrno bounds the errno numbers cached; Linux's are below 134.
const maxErrno = 256

// New returns the metrics, with the interface gauge reading states.
func New(states States) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: "cdevfs", Name: name, Help: help})
		m.reg.MustRegister(c)
		return c
	}
	m.opens = counter("opens_total", "Successful opens of device nodes (tunN, tapN, and the clone nodes).")
	m.clones = counter("clones_total", "Interfaces created by cloning (open of tun/tap or lookup of a free unit).")
	m.destroys = counter("destroys_total", "Interfaces destroyed (transient last close, deletion outside cdevfs, shutdown).")
	m.revokes = counter("revokes_total", "Device nodes revoked (their handles fail with ENXIO from then on).")
	m.packetsRead = counter("packets_read_total", "Packets read from devices by clients.")
	m.packetsWritten = counter("packets_written_total", "Packets written to devices by clients.")
	m.bytesRead = counter("read_bytes_total", "Bytes of packets read from devices by clients.")
	m.bytesWritten = counter("written_bytes_total", "Bytes of packets written to devices by clients.")
	m.ringRequests = counter("fuse_ring_requests_total", "FUSE requests answered through io_uring queues (--io-uring) rather than /dev/fuse.")
	m.ringParked = counter("fuse_ring_parked_reads_total", "Blocking READs that waited for their packet parked in an io_uring queue (a poll of the device's fd) rather than on a thread.")
	m.ringHeld = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "cdevfs", Name: "fuse_ring_requests_held",
		Help: "FUSE requests io_uring queues hold while they wait: READs parked for a packet and requests served on a goroutine of their own."})
	m.ringKicks = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "cdevfs", Name: "fuse_ring_kicks_total",
		Help: "Kicks io_uring queues sent to fetch requests the kernel stranded while READs held their entries, by result: answered by the queue, or missed (it went elsewhere: the queue's CPU is not the daemon's, or the mountpoint leads elsewhere)."},
		[]string{"result"})
	m.reg.MustRegister(m.ringHeld, m.ringKicks)
	m.panics = counter("handler_panics_total", "FUSE request handlers that panicked (a bug: each is logged at ERROR with its stack, and its request answered EIO).")
	m.watchResyncs = counter("watch_resyncs_total", "Times the netlink watch lost link events (its socket overflowed: ENOBUFS) and resynced the tree from a full dump of the interfaces.")
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "cdevfs", Name: "device_errors_total",
		Help: "Errors returned by device reads, writes and ioctls, by errno."}, []string{"errno"})
	m.requests = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "cdevfs", Name: "fuse_request_duration_seconds",
		Help: "Time from reading a FUSE request to writing its reply, by opcode. A blocking read waits for a packet, so READ's tail is idle time.",
		// 10 µs to 42 s: a lookup takes microseconds, a blocking read as
		// long as the link is quiet.
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 12)}, []string{"opcode"})
	// Every refusal, whether or not its log line was suppressed (the log
	// of refusals is rate-limited per caller).
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "cdevfs", Name: "refusals_total",
		Help: "Actions refused to a caller, by action (clone, open, chmod, ...); each one, logged or not."}, []string{"action"})
	m.reg.MustRegister(m.refusals, m.errors, m.requests, stateCollector{states},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Opened counts a successful open of a device node.
func (m *Metrics) Opened() {
	if m != nil {
		m.opens.Inc()
	}
}

// Created counts a cloned interface (cloner.Events).
func (m *Metrics) Created() {
	if m != nil {
		m.clones.Inc()
	}
}

// Revoked counts a revoked node (cloner.Events).
func (m *Metrics) Revoked() {
	if m != nil {
		m.revokes.Inc()
	}
}

// Destroyed counts a destroyed interface (cloner.Events).
func (m *Metrics) Destroyed() {
	if m != nil {
		m.destroys.Inc()
	}
}

// Read counts one packet of n bytes read by a client.
func (m *Metrics) Read(n int) {
	if m != nil {
		m.packetsRead.Inc()
		m.bytesRead.Add(float64(n))
	}
}

// Wrote counts one packet of n bytes written by a client.
func (m *Metrics) Wrote(n int) {
	if m != nil {
		m.packetsWritten.Inc()
		m.bytesWritten.Add(float64(n))
	}
}

// Refused counts an action refused to a caller. action is one of a few
// names fixed in the code, never the caller's input, so the series stay
// few.
func (m *Metrics) Refused(action string) {
	if m != nil {
		m.refusals.WithLabelValues(action).Inc()
	}
}

// Panicked counts a FUSE request handler that panicked.
func (m *Metrics) Panicked() {
	if m != nil {
		m.panics.Inc()
	}
}

// Error counts an error returned to a client by a device operation.
func (m *Metrics) Error(e syscall.Errno) {
	if m == nil || e == 0 {
		return
	}
	if int(e) >= maxErrno {
		m.errors.WithLabelValues(errnoName(e)).Inc()
		return
	}
	c := m.errorBy[e].Load()
	if c == nil {
		// Racing first uses resolve the same child: either store is fine.
		child := m.errors.WithLabelValues(errnoName(e))
		c = &child
		m.errorBy[e].Store(c)
	}
	(*c).Inc()
}

// RingRequest counts one FUSE request answered through an io_uring queue.
func (m *Metrics) RingRequest() {
	if m == nil {
		return
	}
	m.ringRequests.Inc()
}

// RingParked counts one blocking READ parked in an io_uring queue.
func (m *Metrics) RingParked() {
	if m == nil {
		return
	}
	m.ringParked.Inc()
}

// RingHeld adds delta to the requests io_uring queues hold.
func (m *Metrics) RingHeld(delta int) {
	if m != nil {
		m.ringHeld.Add(float64(delta))
	}
}

// RingKick counts one kick of an io_uring queue, answered or missed.
func (m *Metrics) RingKick(answered bool) {
	if m == nil {
		return
	}
	result := "missed"
	if answered {
		result = "answered"
	}
	m.ringKicks.WithLabelValues(result).Inc()
}

// WatchResynced counts one resync of the netlink watch after lost events.
func (m *Metrics) WatchResynced() {
	if m != nil {
		m.watchResyncs.Inc()
	}
}

// Request observes one FUSE request with opcode op that started at start.
// Meant to be deferred by the transport: defer m.Request(op, time.Now()).
func (m *Metrics) Request(op uint32, start time.Time) {
	if m == nil {
		return
	}
	d := time.Since(start).Seconds()
	name := fusewire.Name(op)
	if name == "" {
		op, name = 0, "other"
	}
	o := m.reqBy[op].Load()
	if o == nil {
		child := m.requests.WithLabelValues(name)
		o = &child
		m.reqBy[op].Store(o)
	}
	(*o).Observe(d)
}

func errnoName(e syscall.Errno) string {
	if name := unix.ErrnoName(e); name != "" {
		return name
	}
	return fmt.Sprintf("errno%d", int(e))
}

// stateCollector reports cdevfs_interfaces by state at scrape time, so
// the gauge is always the registry's truth, never a count kept in step.
type stateCollector struct{ states States }

var interfacesDesc = prometheus.NewDesc("cdevfs_interfaces",
	"Device nodes (one per interface) by state: open, closed, or dying (being destroyed).", []string{"state"}, nil)

func (s stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- interfacesDesc }

func (s stateCollector) Collect(ch chan<- prometheus.Metric) {
	open, closed, dying := s.states()
	ch <- prometheus.MustNewConstMetric(interfacesDesc, prometheus.GaugeValue, float64(open), "open")
	ch <- prometheus.MustNewConstMetric(interfacesDesc, prometheus.GaugeValue, float64(closed), "closed")
	ch <- prometheus.MustNewConstMetric(interfacesDesc, prometheus.GaugeValue, float64(dying), "dying")
}

// Server serves a Handler on a TCP address or a unix socket.
type Server struct {
	srv  *http.Server
	done chan error
	addr string
	path string // the unix socket to remove on Close, if any
}

// Listen starts serving h on /metrics at addr: "host:port", or
// "unix:/path" for a unix socket (reachable whatever network namespace
// the daemon runs in).
func Listen(addr string, h http.Handler) (*Server, error) {
	network, a := "tcp", addr
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, a = "unix", p
		// A socket left by a daemon that died is in the way; anything
		// else is not ours to remove.
		if st, err := os.Lstat(p); err == nil && st.Mode()&os.ModeSocket != 0 {
			os.Remove(p)
		}
	}
	ln, err := net.Listen(network, a)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	s := &Server{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		done: make(chan error, 1), addr: ln.Addr().String()}
	if network == "unix" {
		s.path, s.addr = a, addr
	}
	go func() { s.done <- s.srv.Serve(ln) }()
	return s, nil
}

// Addr is where the server listens (for logs).
func (s *Server) Addr() string { return s.addr }

// Close stops the server and removes its unix socket.
func (s *Server) Close() error {
	err := s.srv.Close()
	if e := <-s.done; !errors.Is(e, http.ErrServerClosed) && err == nil {
		err = e
	}
	if s.path != "" {
		os.Remove(s.path)
	}
	return err
}
