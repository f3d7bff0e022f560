package fs

import (
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/cdevfs/cdevfs/transport/devfuse"
	"github.com/cdevfs/cdevfs/transport/uring"
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

// Mount is a served cdevfs mount: the tree, the connection serving it,
// and what carries the connection's requests.
//
// Close order (Unmount, then Close): the kernel stops sending requests
// (the unmount), the invalidations stop, the io_uring queues are told to
// stop, /dev/fuse is closed (which aborts what is left of the connection
// once the queues have closed their rings), and the queues and the
// /dev/fuse loop are waited for. The daemon revokes
// and drains its devices before (devnode.Registry.Shutdown), and destroys
// them after.
type Mount struct {
	dir   string
	root  *Root
	conn  *transport.Conn
	loop  *devfuse.Loop
	rings atomic.Pointer[uring.Server] // nil: requests come over /dev/fuse
	inval *invalidator
	devno string // the mount's device, major:minor, as mountinfo gives it

	// unmounted is how Unmount left the mount: unmountNone, or
	// unmountEnded (a plain or forced unmount destroyed the superblock,
	// which ended the connection, and its device number may be another
	// mount's by now), or unmountDetached (lazily: open files keep the
	// superblock, its number and the connection).
	unmounted atomic.Int32
}

// How Unmount left the mount (Mount.unmounted).
const (
	unmountNone = iota
	unmountEnded
	unmountDetached
)

// Dir is the mountpoint.
func (m *Mount) Dir() string { return m.dir }

// Done is closed when the mount stops being served: the kernel ended the
// connection (an unmount, including one the daemon did not ask for, an
// abort through fusectl, or Close), or an io_uring queue failed, which
// leaves the requests of its CPU unanswered. A daemon shuts down on it,
// as libfuse's loop ends when its mount is unmounted; its Unmount and
// Close then abort what is left of the connection.
func (m *Mount) Done() <-chan struct{} { return m.conn.Ended() }

// Err says why Done is closed: nil if the kernel ended the connection,
// the failure otherwise (and nil while Done is open).
func (m *Mount) Err() error { return m.conn.Err() }

// New mounts root at dir and starts serving it. It returns once the
// kernel's INIT has been answered, so the mount is usable at once.
func New(dir string, root *Root, o MountOptions) (*Mount, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if o.IOURing != IOURingOff {
		if err := uring.Probe(); err != nil {
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

func mount(dir string, root *Root, o MountOptions) (*Mount, error) {
	if err := checkMountpoint(dir, o.Log); err != nil {
		return nil, err
	}
	dev, err := devfuse.Mount(dir, o.AllowOther, maxWrite)
	if err != nil {
		return nil, err
	}
	m := &Mount{dir: dir, root: root}
	if ms := mountsAt(dir); len(ms) > 0 {
		m.devno = ms[len(ms)-1].devno
	}
	m.conn = newConn(dev, root, o)
	root.metrics = o.Metrics
	m.inval = newInvalidator(&root.Inode, o.Log)
	root.inval.Store(m.inval)
	if m.loop, err = devfuse.Start(m.conn); err != nil {
		m.Unmount()
		dev.Close()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	root.mount.Store(m) // after loop is set: revoked reads it
	select {
	case <-m.conn.Inited():
	case <-time.After(10 * time.Second):
		m.Unmount()
		m.Close()
		return nil, fmt.Errorf("mount %s: the kernel sent no INIT", dir)
	}
	if err := m.startRings(o); err != nil {
		m.Unmount()
		m.Close()
		return nil, err
	}
	return m, nil
}

// startRings starts the io_uring queues if INIT asked for them.
func (m *Mount) startRings(o MountOptions) error {
	switch {
	case o.IOURing == IOURingOff:
		return nil
	case !m.conn.RingsAsked() && o.IOURing == IOURingOn:
		return fmt.Errorf("mount %s: --io-uring=on: %w", m.dir, uring.NotOffered())
	case !m.conn.RingsAsked():
		return nil
	}
	s, err := uring.Start(m.conn, m.dir, maxWrite)
	m.rings.Store(s)
	if err != nil {
		return fmt.Errorf("mount %s: %w: %w", m.dir, errURingStart, err)
	}
	o.Log.Info("FUSE over io_uring", "queues", s.Queues(), "entries_per_queue", uring.Entries)
	return nil
}

// newConn builds the connection serving root's tree on dev: go-fuse's
// node tree and protocol server behind the transport.
func newConn(dev *os.File, root *Root, o MountOptions) *transport.Conn {
	ps, notifier := newProtocolServer(dev, root, o)
	return transport.NewConn(dev, ps, root, notifier,
		transport.Options{Log: o.Log, Metrics: o.Metrics, Debug: o.Debug, MaxWrite: maxWrite})
}

// newProtocolServer builds go-fuse's node tree of root and its protocol
// server, and the notifier through which the tree invalidates what the
// kernel caches.
func newProtocolServer(dev *os.File, root *Root, o MountOptions) (*fuse.ProtocolServer, *transport.Notifier) {
	notifier := transport.NewNotifier(dev)
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
		PanicHandler:      transport.PanicHandler(o.Log, o.Metrics),
	}
	raw := fs.NewNodeFS(root, &fs.Options{
		// Entries and attributes are cached, and invalidated when they
		// change (see cacheTimeout); misses never are.
		EntryTimeout:    &cached,
		AttrTimeout:     &cached,
		NegativeTimeout: &zero,
		MountOptions:    mo,
		ServerCallbacks: notifier,
		Logger:          mo.Logger,
	})
	return fuse.NewProtocolServer(raw, &mo), notifier
}

// revoked tells the transports that n's device was revoked: READs they
// hold waiting for n's packets must end (devfuse.Loop.Revoked,
// uring.Server.Revoked).
func (m *Mount) revoked(n *devnode.Node) {
	m.loop.Revoked(n.Ino())
	if s := m.rings.Load(); s != nil {
		s.Revoked(n.Ino())
	}
}

// Unmount detaches the mount: a plain unmount, or a lazy one if files on
// it are still open (their owners then see ENOTCONN once Close runs).
// An unmount acts on the topmost mount at the mountpoint, so only while
// that is this one: a mount made over it is reported, and one already
// gone (unmounted by someone else) is not looked for further.
func (m *Mount) Unmount() error {
	ms := mountsAt(m.dir)
	top := len(ms) > 0 && ms[len(ms)-1].devno == m.devno
	if !top {
		if m.Err() != nil {
			m.inval.abandon() // a stranded request may hold the root's lock
		}
		defer m.inval.stop()
		for _, e := range ms {
			if e.devno == m.devno {
				return fmt.Errorf("unmount %s: a %s mount covers it; unmount that first", m.dir, ms[len(ms)-1].fstype)
			}
		}
		return nil // gone already
	}
	if m.Err() != nil {
		// An io_uring queue failed: the kernel still puts its CPU's
		// requests on it, and nothing answers them. A LOOKUP among them
		// holds its directory's lock, so the invalidator's notification
		// for that directory would never end, and neither would the
		// unmount. MNT_FORCE aborts the connection first
		// (fuse_umount_begin), which ends every request, and then
		// unmounts unless files are open.
		switch err := unix.Unmount(m.dir, unix.MNT_FORCE); {
		case err == nil:
			// Gone: another unmount would act on what is under it.
			m.unmounted.Store(unmountEnded)
			m.inval.stop()
			return nil
		case errors.Is(err, unix.EBUSY):
			// Aborted, but files are open: detached below.
		default:
			// EPERM: MNT_FORCE needs CAP_SYS_ADMIN in the initial
			// user namespace. The connection ends when the daemon
			// closes /dev/fuse (Close), unless a notification
			// waits for a stranded request: then at its exit.
			m.conn.Log().Warn("cannot abort the FUSE connection of a failed io_uring queue; requests stranded on it end when the daemon exits",
				"mountpoint", m.dir, "err", err)
			m.inval.abandon()
		}
	}
	err := unix.Unmount(m.dir, 0)
	how := unmountEnded
	if errors.Is(err, unix.EBUSY) {
		err, how = unix.Unmount(m.dir, unix.MNT_DETACH), unmountDetached
	}
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: not mounted any more
		return fmt.Errorf("unmount %s: %w", m.dir, err)
	}
	if err == nil {
		m.unmounted.Store(int32(how))
	}
	// A plain unmount leaves nothing cached, so the destroys that follow
	// need not say. After a lazy one, files still open keep the kernel's
	// inodes: a path operation reaching a destroyed node through them
	// gets ESTALE, then ENXIO from the closed registry. stop waits for a
	// notification in flight, which waits for the LOOKUPs in the
	// directory: they are answered at once by now (the registry no
	// longer clones).
	m.inval.stop()
	return nil
}

// Close ends the connection and waits for the transports to stop. Call
// it after Unmount, last.
//
// After a plain unmount the kernel has ended the connection already.
// Otherwise (a lazy unmount with files still open, a failed io_uring
// queue) closing /dev/fuse would not end it: each reader blocked in
// read(2) holds the file open, and so does each ring, as a fixed file.
// So the queues are stopped, which closes their rings, and the
// connection is aborted through fusectl (devfuse.Abort). Where that is
// refused (a daemon without CAP_SYS_ADMIN in the initial user
// namespace), readers still blocked are left to end with the mount's
// last file or the process.
func (m *Mount) Close() {
	m.inval.stop() // before the fd goes: the invalidator writes to it
	s := m.rings.Load()
	if s != nil {
		s.Stop()
	}
	abortErr := m.abortIfServed()
	m.conn.Dev().Close()
	if s != nil {
		s.Wait()
	}
	if abortErr == nil {
		m.loop.Wait()
		return
	}
	select {
	case <-m.loop.Stopped():
	case <-time.After(closeWait):
		m.conn.Log().Warn("FUSE readers still waiting on a connection that could not be aborted; they end with the mount's last open file",
			"mountpoint", m.dir, "err", abortErr)
	}
}

// closeWait bounds Close's wait for readers of a connection it could not
// abort, which may have ended all the same.
const closeWait = 2 * time.Second

// abortIfServed aborts the connection unless the kernel ended it. The
// connection is named by the superblock's device number, so only while
// that number is surely the mount's: it is mounted here still, or was
// detached lazily by Unmount (open files keep the superblock). After a
// plain unmount the kernel ended the connection itself, and the number
// may be another FUSE mount's by now; after an unmount of someone
// else's, it may be too.
func (m *Mount) abortIfServed() error {
	select {
	case <-m.conn.Ended():
		if m.conn.Err() == nil {
			return nil // the kernel ended it: the readers have ENODEV
		}
	default:
	}
	switch m.unmounted.Load() {
	case unmountEnded:
		return nil
	case unmountNone:
		if ms := mountsAt(m.dir); !slices.ContainsFunc(ms, func(e mountEntry) bool { return e.devno == m.devno }) {
			return fmt.Errorf("the mount at %s is gone, unmounted by someone else", m.dir)
		}
	}
	var major, minor uint32
	if _, err := fmt.Sscanf(m.devno, "%d:%d", &major, &minor); err != nil {
		return fmt.Errorf("the mount's device %q: %w", m.devno, err)
	}
	return devfuse.Abort(major, minor)
}

func extraCaps(u IOURing) uint64 {
	if u == IOURingOff {
		return 0
	}
	return fuse.CAP_OVER_IO_URING
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
// mount namespace.
func mountAt(dir string) (fstype string, ok bool) {
	ms := mountsAt(dir)
	if len(ms) == 0 {
		return "", false
	}
	return ms[len(ms)-1].fstype, true
}

// mountEntry is a line of /proc/self/mountinfo: the mount's device
// (field 3, major:minor) and filesystem type (after the " - " separator).
type mountEntry struct{ devno, fstype string }

// mountsAt lists the mounts at dir (field 5 is the mount point), bottom
// first: mountinfo lists a mount after the one it covers.
func mountsAt(dir string) []mountEntry {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var ms []mountEntry
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) <= 4 || unescapeMount(f[4]) != dir {
			continue
		}
		e := mountEntry{devno: f[2]}
		for i, x := range f {
			if x == "-" && i+1 < len(f) {
				e.fstype = f[i+1]
			}
		}
		ms = append(ms, e)
	}
	return ms
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
