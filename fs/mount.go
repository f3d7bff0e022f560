package fs

import (
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/internal/fuseuring"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// MountOptions configure a mount.
type MountOptions struct {
	// AllowOther lets users other than the mounter use the mount (the
	// mount option allow_other; as root no /etc/fuse.conf is involved).
	AllowOther bool
	// Debug logs every FUSE request and reply.
	Debug bool
	// Log receives the daemon's log lines.
	Log *slog.Logger
	// Metrics counts opens, packets, errors and FUSE requests; nil
	// counts nothing.
	Metrics *metrics.Metrics
	// IOURing says whether requests go over FUSE-over-io_uring.
	IOURing IOURing
}

// maxWrite is the largest WRITE the kernel sends us: above the MRU, so
// an oversize packet arrives whole and is refused with EIO.
const maxWrite = 128 * 1024

// cacheTimeout is how long the kernel may keep an entry or attributes
// without asking. Every change cdevfs makes is pushed to the kernel at
// once (invalidator); the timeout only bounds the damage of one that
// somehow was not. Names that do not exist are never cached: a lookup of
// a free unit clones, and an interface made outside must appear at once.
const cacheTimeout = time.Minute

// Mount is a served cdevfs mount.
type Mount struct {
	dir   string
	t     *transport
	inval *invalidator // nil if the tree is not a *Root
}

// Dir is the mountpoint.
func (m *Mount) Dir() string { return m.dir }

// Done is closed when the mount stops being served: the kernel ended the
// connection (an unmount, including one the daemon did not ask for, an
// abort through fusectl, or Close), or an io_uring queue failed, which
// leaves the requests of its CPU unanswered. A daemon shuts down on it,
// as libfuse's loop ends when its mount is unmounted; its Unmount and
// Close then abort what is left of the connection.
func (m *Mount) Done() <-chan struct{} { return m.t.ended }

// Err says why Done is closed: nil if the kernel ended the connection,
// the failure otherwise (and nil while Done is open).
func (m *Mount) Err() error {
	select {
	case <-m.t.ended:
		return m.t.endErr
	default:
		return nil
	}
}

// New mounts root at dir and starts serving it. It returns once the
// kernel's INIT has been answered, so the mount is usable at once.
func New(dir string, root fs.InodeEmbedder, o MountOptions) (*Mount, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if o.IOURing != IOURingOff {
		if err := probeURing(); err != nil {
			if o.IOURing == IOURingOn {
				return nil, fmt.Errorf("mount %s: --io-uring=on: %w", dir, err)
			}
			o.Log.Info("FUSE over io_uring not available; serving over /dev/fuse", "why", err)
			o.IOURing = IOURingOff
		}
	}
	m, err := mount(dir, root, o)
	if errors.Is(err, errURingStart) && o.IOURing == IOURingAuto {
		// Once INIT asked for io_uring the kernel holds every request
		// until the queues are ready, so a mount whose queues failed is
		// of no use: mount again without.
		o.Log.Warn("FUSE over io_uring offered but not usable; mounting again over /dev/fuse", "err", err)
		o.IOURing = IOURingOff
		m, err = mount(dir, root, o)
	}
	return m, err
}

// errURingStart marks a mount whose io_uring queues did not start.
var errURingStart = errors.New("io_uring queues")

func mount(dir string, root fs.InodeEmbedder, o MountOptions) (*Mount, error) {
	if err := checkMountpoint(dir, o.Log); err != nil {
		return nil, err
	}
	dev, err := openFuse(dir, o.AllowOther, maxWrite)
	if err != nil {
		return nil, err
	}
	t := newServer(dev, root, o)
	t.dir = dir
	m := &Mount{dir: dir, t: t}
	if r, ok := root.(*Root); ok {
		m.inval = newInvalidator(&r.Inode, o.Log)
		r.inval.Store(m.inval)
	}
	t.start()
	select {
	case <-t.inited:
	case <-time.After(10 * time.Second):
		m.Unmount()
		m.Close()
		return nil, fmt.Errorf("mount %s: the kernel sent no INIT", dir)
	}
	var uerr error
	switch s := t.uring.Load(); {
	case t.uringErr == nil && s != nil:
		o.Log.Info("FUSE over io_uring", "queues", len(s.queues), "entries_per_queue", ringEntries)
	case errors.Is(t.uringErr, errNoURing) && o.IOURing == IOURingOn:
		why := t.uringErr.Error()
		if ok, w := fuseuring.Available(); !ok {
			why = w
		}
		uerr = fmt.Errorf("mount %s: --io-uring=on: %s", dir, why)
	case t.uringErr != nil && !errors.Is(t.uringErr, errNoURing):
		uerr = fmt.Errorf("mount %s: %w: %w", dir, errURingStart, t.uringErr)
	}
	if uerr != nil {
		m.Unmount()
		m.Close()
		return nil, uerr
	}
	return m, nil
}

// newServer builds the transport serving root's tree on dev: go-fuse's
// node tree and protocol server behind this package's request loop.
func newServer(dev *os.File, root fs.InodeEmbedder, o MountOptions) *transport {
	t := newTransport(dev, o.Log, maxWrite)
	t.metrics = o.Metrics
	t.wantURing = o.IOURing != IOURingOff
	if r, ok := root.(*Root); ok {
		r.notifyPoll = func(kh uint64) { t.PollNotify(kh) }
		r.fhs = &t.fhs
		r.metrics = o.Metrics
		r.tr.Store(t)
	}
	t.fast = !o.Debug
	zero, cached := time.Duration(0), cacheTimeout
	mo := fuse.MountOptions{
		AllowOther:    o.AllowOther,
		MaxWrite:      maxWrite,
		MaxBackground: 64,
		Name:          "cdevfs",
		FsName:        "cdevfs",
		DisableSplice: true,
		// Taken only if the kernel offers it in INIT (go-fuse masks
		// extra capabilities with the kernel's).
		ExtraCapabilities: extraCaps(o.IOURing),
		Debug:             o.Debug,
		Logger:            log.New(slogWriter{o.Log}, "", 0),
		PanicHandler:      panicHandler(o.Log, o.Metrics),
	}
	raw := fs.NewNodeFS(root, &fs.Options{
		// Entries and attributes are cached, and invalidated when they
		// change (see cacheTimeout); misses never are.
		EntryTimeout:    &cached,
		AttrTimeout:     &cached,
		NegativeTimeout: &zero,
		MountOptions:    mo,
		ServerCallbacks: t,
		Logger:          mo.Logger,
	})
	t.ps = fuse.NewProtocolServer(raw, &mo)
	return t
}

// Unmount detaches the mount: a plain unmount, or a lazy one if files on
// it are still open (their owners then see ENOTCONN once Close runs).
func (m *Mount) Unmount() error {
	if m.Err() != nil {
		// An io_uring queue failed: the kernel still puts its CPU's
		// requests on it, and nothing answers them. A LOOKUP among them
		// holds its directory's lock, so the invalidator's notification
		// for that directory (stopInval waits for it) would never end,
		// and neither would the unmount. MNT_FORCE aborts the connection
		// first (fuse_umount_begin), which ends every request.
		_ = unix.Unmount(m.dir, unix.MNT_FORCE)
	}
	err := unix.Unmount(m.dir, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(m.dir, unix.MNT_DETACH)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: not mounted any more
		return fmt.Errorf("unmount %s: %w", m.dir, err)
	}
	// A plain unmount leaves nothing cached, so the destroys that follow
	// need not say. After a lazy one, files still open keep the kernel's
	// inodes: a path operation reaching a destroyed node through them
	// gets ESTALE, then ENXIO from the closed registry. stop waits for a
	// notification in flight, which waits for the LOOKUPs in the
	// directory: they are answered at once by now (the registry no
	// longer clones).
	m.stopInval()
	return nil
}

// Close closes /dev/fuse, which aborts the connection, and waits for the
// request loop to stop. Call it after Unmount, last.
//
// The io_uring queues stop first: each ring holds /dev/fuse as a fixed
// file, so closing the fd ends the connection only once the rings are
// closed too. After a plain unmount they have stopped already (the
// kernel gave their entries back).
func (m *Mount) Close() {
	m.stopInval() // before the fd goes: the invalidator writes to it
	if s := m.t.uring.Load(); s != nil {
		s.stop()
	}
	m.t.dev.Close()
	m.t.wait()
}

func extraCaps(u IOURing) uint64 {
	if u == IOURingOff {
		return 0
	}
	return fuse.CAP_OVER_IO_URING
}

func (m *Mount) stopInval() {
	if m.inval != nil {
		m.inval.stop()
	}
}

// checkMountpoint refuses a missing directory or one that is already a
// mount point, with a message a user can act on.
func checkMountpoint(dir string, log *slog.Logger) error {
	isDir, err := statSync(dir)
	if errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED) {
		// A daemon that died (kill -9) leaves its mount behind, and every
		// access fails with ENOTCONN (ECONNABORTED for a moment after the
		// death where the connection was over io_uring, while the kernel
		// tears the queues down). One of ours is cleaned up so that a
		// restart just works; anyone else's is reported.
		if fstype, _ := mountAt(dir); fstype != "fuse.cdevfs" {
			return fmt.Errorf("mountpoint %s: a dead FUSE mount (%s) is there (transport endpoint is not connected); unmount it with umount -l %s", dir, fstype, dir)
		}
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("mountpoint %s: unmount the stale cdevfs mount: %w", dir, err)
		}
		log.Warn("unmounted a stale cdevfs mount left by a daemon that died", "mountpoint", dir)
		isDir, err = statSync(dir)
	}
	if err != nil {
		return fmt.Errorf("mountpoint %s: %w", dir, errors.Unwrap(err))
	}
	if !isDir {
		return fmt.Errorf("mountpoint %s: not a directory", dir)
	}
	if fstype, ok := mountAt(dir); ok {
		return fmt.Errorf("mountpoint %s: already in use (%s is mounted there)", dir, fstype)
	}
	return nil
}

// statSync stats dir asking its filesystem, not the kernel's cache: the
// root of a dead FUSE mount may have its attributes cached (the kernel
// fetches them for its permission checks, default_permissions), and only
// a request finds the daemon gone (ENOTCONN).
func statSync(dir string) (isDir bool, err error) {
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, dir, unix.AT_STATX_FORCE_SYNC, unix.STATX_TYPE, &st); err != nil {
		return false, &os.PathError{Op: "statx", Path: dir, Err: err}
	}
	return st.Mode&unix.S_IFMT == unix.S_IFDIR, nil
}

// mountAt returns the filesystem type of the topmost mount at dir in this
// mount namespace, from /proc/self/mountinfo (field 5 is the mount point,
// the type follows the " - " separator).
func mountAt(dir string) (fstype string, ok bool) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) <= 4 || unescapeMount(f[4]) != dir {
			continue
		}
		ok = true
		for i, x := range f {
			if x == "-" && i+1 < len(f) {
				fstype = f[i+1]
			}
		}
	}
	return fstype, ok
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// slogWriter sends go-fuse's log.Logger output to slog.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Debug(strings.TrimRight(string(p), "\n"), "component", "go-fuse")
	return len(p), nil
}

// panicHandler answers a request whose handler panicked: EIO, a line at
// ERROR with the stack, and the panic counted. A panic is a bug, never a
// client's doing (docs/design.md, "Errors"); go-fuse's own handler would log
// it where only --debug shows it.
func panicHandler(log *slog.Logger, m *metrics.Metrics) func(any) fuse.Status {
	return func(r any) fuse.Status {
		m.Panicked()
		log.Error("panic in a FUSE request handler", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		return fuse.EIO
	}
}
