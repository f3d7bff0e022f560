// Command cdevfs mounts a devfs-like FUSE tree whose tun and tap nodes
// clone real Linux tun/tap interfaces on open.
//
//	cdevfs mount [flags] MOUNTPOINT
//	cdevfs ifname [FD]
//	cdevfs version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	cfs "github.com/cdevfs/cdevfs/fs"
	"github.com/cdevfs/cdevfs/internal/kdev"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/metrics"
	"github.com/cdevfs/cdevfs/transport/devfuse"
	sd "github.com/coreos/go-systemd/v22/daemon"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "devel"

const usage = `usage: cdevfs <command> [arguments]

cdevfs serves a devfs-like tree over FUSE: the kernel's null, zero, full,
random, urandom and tty, fd, stdin, stdout, stderr, and the clone nodes
tun and tap, whose opening creates a real Linux tun/tap interface (the BSD
dev_clone model).

commands:
  mount [flags] MOUNTPOINT   mount the tree and serve it in the foreground
  ifname [FD]                print the interface of the tun/tap handle on FD (default 0)
  version                    print the version

Run 'cdevfs mount --help' for the mount flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "mount":
		return mountCmd(args[1:], stdout, stderr)
	case "ifname":
		return ifnameCmd(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "cdevfs %s\n", version)
		return 0
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "cdevfs: unknown command %q\n%s", args[0], usage)
	return 2
}

type mountFlags struct {
	allowOther bool
	maxUnit    int
	debug      bool
	logLevel   slog.Level
	netns      string
	orphans    string
	rules      ruleSource
	logFormat  logFormat
	metrics    string
	iouring    cfs.IOURing
	devices    []kdev.Spec // --device: kernel devices beside kdev.Defaults
}

// mountFlagSet defines the mount flags on f.
func mountFlagSet(f *mountFlags) *flag.FlagSet {
	fl := flag.NewFlagSet("cdevfs mount", flag.ContinueOnError)
	fl.BoolVar(&f.allowOther, "allow-other", false, "let every user use the mount (mount option allow_other); cloning still needs CAP_NET_ADMIN")
	fl.TextVar(&f.iouring, "io-uring", cfs.IOURingOff, "`MODE` of carrying FUSE requests over io_uring: off, auto (when the kernel offers it: fuse's enable_uring is Y) or on (required); over io_uring a request can be stranded in the kernel behind blocked reads")
	fl.IntVar(&f.maxUnit, "max-unit", cloner.DefaultMaxUnit, "highest tun/tap unit number `N`")
	fl.BoolVar(&f.debug, "debug", false, "log every FUSE request (implies --log-level debug)")
	fl.TextVar(&f.logLevel, "log-level", slog.LevelInfo, "lowest `LEVEL` logged: debug, info, warn or error")
	fl.TextVar(&f.logFormat, "log-format", logText, "`FORMAT` of the log lines: text (key=value) or json (one object a line)")
	fl.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics at http://`ADDR`/metrics: host:port, or unix:/path for a unix socket")
	fl.StringVar(&f.netns, "netns", "", "create and watch interfaces in the network namespace `NETNS`: a name of ip netns, or a path (default: the daemon's own)")
	fl.StringVar(&f.orphans, "orphans", "adopt", "`WHAT` to do at start with interfaces a killed cdevfs left at this mountpoint: adopt or destroy")
	fl.StringVar(&f.rules.file, "rules", "", "devfs rules `FILE` (FreeBSD devfs.rules syntax); re-read on SIGHUP")
	fl.StringVar(&f.rules.set, "ruleset", "", "the ruleset of --rules to apply: `NAME|NUMBER`")
	fl.Func("device", "serve the kernel's character device `NAME[=MAJ:MIN]` too, as found in /sys/class/*/NAME (or /sys/dev/char/MAJ:MIN); repeatable", func(s string) error {
		sp, err := kdev.ParseSpec(s)
		f.devices = append(f.devices, sp)
		return err
	})
	fl.Usage = func() {
		fmt.Fprint(fl.Output(), "usage: cdevfs mount [flags] MOUNTPOINT\n\nflags:\n")
		printFlags(fl)
	}
	return fl
}

func mountCmd(args []string, stdout, stderr io.Writer) int {
	var f mountFlags
	fl := mountFlagSet(&f)
	var msg strings.Builder // usage goes to stdout when asked for, else to stderr
	fl.SetOutput(&msg)
	if err := fl.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, msg.String())
			return 0
		}
		fmt.Fprint(stderr, msg.String())
		return 2
	}
	if fl.NArg() != 1 {
		fl.SetOutput(stderr)
		fl.Usage()
		return 2
	}
	if f.debug {
		f.logLevel = slog.LevelDebug
	}
	schedulerProcs()
	if f.orphans != "adopt" && f.orphans != "destroy" {
		fmt.Fprintf(stderr, "cdevfs: --orphans %q: want adopt or destroy\n", f.orphans)
		return 2
	}
	log := f.logFormat.logger(stderr, f.logLevel)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, fl.Arg(0), f, log, sdNotifier(log)); err != nil {
		fmt.Fprintf(stderr, "cdevfs: %v\n", err)
		return 1
	}
	return 0
}

// schedulerProcs gives Go's scheduler a P for each thread the /dev/fuse
// loop keeps blocked in a syscall, on top of one per CPU. A thread
// blocked in read(2) or poll(2) keeps its P until sysmon takes it back,
// 20 µs later at best; with one P per CPU, a reader woken by a request
// would find every P held by readers that wait, and wait that long
// before it runs. A GOMAXPROCS in the environment is left as it is.
// Setting it stops the runtime from following later changes of the
// container's CPU limit: the daemon keeps the count it started with.
func schedulerProcs() {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + devfuse.BlockedThreads)
}

// serve mounts the tree at dir and serves it until ctx ends or the mount
// does (Mount.Done: unmounted, aborted, its transport failed), then shuts
// down in the fixed order: stop accepting (no clone), revoke every node,
// drain in-flight operations, unmount, destroy the interfaces cdevfs
// created, close the fds. notify, if not nil, is told READY=1 once the
// mount serves and STOPPING=1 when the shutdown begins (sd_notify states).
func serve(ctx context.Context, dir string, f mountFlags, log *slog.Logger, notify func(state string)) error {
	rs, err := f.rules.load()
	if err != nil {
		return err
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("no /dev/fuse: %w (is the fuse module loaded?)", errors.Unwrap(err))
	}
	mnt, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	// The mark ties interfaces to this mountpoint, so a daemon restarted
	// on it after a crash knows them, and another instance leaves them be.
	be, err := cloner.NewLinux(cloner.LinuxOptions{Netns: f.netns, Mark: cloner.MarkPrefix + mnt})
	if err != nil {
		return err
	}
	defer be.Close()
	reg := devnode.NewRegistry()
	kinds := []cloner.Kind{cloner.Tun, cloner.Tap}
	var prefixes []string
	var cloners []*cloner.Cloner
	var mx *metrics.Metrics // nil without --metrics: counts nothing
	if f.metrics != "" {
		mx = metrics.New(reg.States)
		srv, err := metrics.Listen(f.metrics, mx.Handler())
		if err != nil {
			reg.Shutdown(context.Background(), nil)
			return err
		}
		defer srv.Close()
		log.Info("metrics", "addr", srv.Addr())
	}
	for _, k := range kinds {
		c := cloner.New(k, be, reg, f.maxUnit, log)
		c.DestroyOrphans(f.orphans == "destroy")
		if mx != nil {
			c.SetEvents(mx)
		}
		cloners = append(cloners, c)
		prefixes = append(prefixes, k.Prefix())
	}
	cloneable := func(name string) bool {
		for _, k := range kinds {
			if _, wild, ok := cloner.ParseName(k.Prefix(), name, f.maxUnit); ok && !wild {
				return true
			}
		}
		return false
	}
	netnsPath := "" // the daemon's own
	if f.netns != "" {
		netnsPath = cloner.NetnsPath(f.netns)
	}
	policy, err := privilege.NewPolicy(netnsPath)
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		return err
	}
	root := cfs.NewRoot(reg, prefixes, cloneable, policy, log)
	for _, sp := range f.devices {
		d, err := kdev.Sys("/sys").Resolve(sp)
		if errors.Is(err, kdev.ErrMissing) {
			log.Warn("kernel device left out", "device", sp.Name, "error", err)
			continue
		}
		if err == nil {
			err = root.AddDevice(d)
		}
		if err != nil {
			reg.Shutdown(context.Background(), nil)
			return err
		}
	}
	root.SetRules(rs)
	// Mount before following the kernel: the mountpoint check refuses a
	// second daemon on a live mount before it could adopt (and at its
	// exit delete) the interfaces of the first, which carry the same mark.
	m, err := cfs.New(dir, root, cfs.MountOptions{AllowOther: f.allowOther, Debug: f.debug, Log: log, Metrics: mx, IOURing: f.iouring})
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		return err
	}
	stopWatch := make(chan struct{})
	var stopOnce sync.Once
	stop := func() { stopOnce.Do(func() { close(stopWatch) }) }
	idle := make(chan struct{})
	close(idle)
	var watching <-chan struct{} = idle // closed once no watch callback runs
	// shutdown is the fixed close order: stop accepting (no clone, no
	// watch), revoke every node, drain in-flight operations, unmount,
	// delete the interfaces cdevfs created (in one batch), then destroy
	// the nodes and close their fds; the backend's fds close last.
	shutdown := func() {
		stop()
		<-watching // the deletions below are ours, not news
		reg.Shutdown(context.Background(), func() {
			if err := m.Unmount(); err != nil {
				log.Error("unmount", "error", err)
			}
			if err := cloner.DeleteCreated(be, cloners...); err != nil {
				log.Error("delete interfaces", "error", err)
			}
		})
		m.Close()
	}
	w, err := follow(be, reg, cloners, f.netns, stopWatch, stop, mx, log)
	if w != nil {
		watching = w
	}
	if err != nil {
		shutdown()
		return err
	}
	defer reloadOnHUP(f.rules, root.SetRules, log)()
	log.Info("serving", "mountpoint", m.Dir(), "pid", os.Getpid())
	if notify != nil {
		notify(sd.SdNotifyReady)
	}
	// A signal, or the mount ending under the daemon: unmounted by an
	// administrator (umount, as fusermount -u ends a libfuse daemon), its
	// connection aborted, or its transport failed. Either way the daemon
	// shuts down in its close order, so the interfaces it made go too.
	var failed error
	select {
	case <-ctx.Done():
		log.Info("shutting down", "mountpoint", m.Dir())
	case <-m.Done():
		if failed = m.Err(); failed != nil {
			log.Error("the mount failed; shutting down", "mountpoint", m.Dir(), "error", failed)
		} else {
			log.Warn("the mount was unmounted or its connection aborted; shutting down", "mountpoint", m.Dir())
		}
	}
	if notify != nil {
		notify(sd.SdNotifyStopping)
	}
	shutdown()
	log.Info("stopped")
	return failed
}

// follow makes the tree follow the kernel until stopWatch closes: one
// netlink subscription adopts interfaces that appear (and lists those
// there now) and revokes the nodes of deleted ones; with --netns, the
// deletion of the namespace retires every tun and tap device. Lost
// events (ENOBUFS) make the watch resync, counted in mx.
// The returned channel is closed once no watch callback runs any more.
func follow(be *cloner.Linux, reg *devnode.Registry, cloners []*cloner.Cloner, ns string, stopWatch chan struct{}, stop func(), mx *metrics.Metrics, log *slog.Logger) (<-chan struct{}, error) {
	onError := func(err error) { log.Error("watch", "error", err) }
	watching, err := be.Watch(stopWatch, cloner.Watcher{
		Appeared: func(info cloner.LinkInfo) {
			for _, c := range cloners {
				c.LinkAppeared(info)
			}
		},
		Deleted: func(index int) {
			for _, c := range cloners {
				c.LinkDeleted(index)
			}
		},
		Error: onError,
		Known: func() []int {
			var idx []int
			for _, c := range cloners {
				idx = append(idx, c.LinkIndexes()...)
			}
			return idx
		},
		Resynced: func() {
			mx.WatchResynced()
			log.Warn("watch resynced: link events were lost, the tree was reconciled with a full dump")
		},
	})
	if err != nil || ns == "" {
		return watching, err
	}
	return watching, cloner.WatchNetnsGone(cloner.NetnsPath(ns), stopWatch, func() {
		// Like a VNET jail's teardown: every device of the
		// namespace is destroyed; the static nodes stay.
		log.Warn("network namespace deleted: revoking its devices", "netns", ns)
		stop()
		<-watching
		for _, c := range cloners {
			c.Retire(context.Background())
		}
		reg.DrainSched()
		be.Close() // let go of the namespace, so the kernel can free it
		log.Info("network namespace released; tun and tap now fail with ENXIO", "netns", ns)
	}, onError)
}
