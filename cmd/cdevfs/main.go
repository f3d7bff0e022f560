// Command cdevfs mounts a devfs-like FUSE tree whose tun and tap nodes
// clone real Linux tun/tap interfaces on open.
//
//	cdevfs mount [flags] MOUNTPOINT
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

	"syscall"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	cfs "github.com/cdevfs/cdevfs/fs"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "devel"

const usage = `usage: cdevfs <command> [arguments]

cdevfs serves a devfs-like tree over FUSE: null, zero, full, random,
urandom, fd, stdin, stdout, stderr, and the clone nodes tun and tap, whose
opening creates a real Linux tun/tap interface (the BSD dev_clone model).

commands:
  mount [flags] MOUNTPOINT   mount the tree and serve it in the foreground
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
}

func mountCmd(args []string, stdout, stderr io.Writer) int {
	var f mountFlags
	fl := flag.NewFlagSet("cdevfs mount", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.BoolVar(&f.allowOther, "allow-other", false, "let every user use the mount (mount option allow_other); cloning still needs CAP_NET_ADMIN")
	fl.IntVar(&f.maxUnit, "max-unit", cloner.DefaultMaxUnit, "highest tun/tap unit number")
	fl.BoolVar(&f.debug, "debug", false, "log every FUSE request (implies --log-level debug)")
	fl.TextVar(&f.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	fl.Usage = func() {
		fmt.Fprint(fl.Output(), "usage: cdevfs mount [flags] MOUNTPOINT\n\nflags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fl.NArg() != 1 {
		fl.Usage()
		return 2
	}
	if f.debug {
		f.logLevel = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: f.logLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, fl.Arg(0), f, log, nil); err != nil {
		fmt.Fprintf(stderr, "cdevfs: %v\n", err)
		return 1
	}
	return 0
}

// serve mounts the tree at dir and serves it until ctx ends, then shuts
// down in the fixed order: stop accepting (no clone), revoke every node,
// drain in-flight operations, unmount, destroy the interfaces cdevfs
// created, close the fds. ready, if not nil, is called once the mount
// serves.
func serve(ctx context.Context, dir string, f mountFlags, log *slog.Logger, ready func()) error {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("no /dev/fuse: %w (is the fuse module loaded?)", errors.Unwrap(err))
	}
	be, err := cloner.NewLinux()
	if err != nil {
		return err
	}
	defer be.Close()
	reg := devnode.NewRegistry()
	kinds := []cloner.Kind{cloner.Tun, cloner.Tap}
	var prefixes []string
	var cloners []*cloner.Cloner
	for _, k := range kinds {
		cloners = append(cloners, cloner.New(k, be, reg, f.maxUnit, log))
		prefixes = append(prefixes, k.Prefix())
	}
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	err = be.Watch(stopWatch, func(index int) {
		for _, c := range cloners {
			c.LinkDeleted(index)
		}
	}, func(err error) { log.Error("netlink watch", "error", err) })
	if err != nil {
		return err
	}
	cloneable := func(name string) bool {
		for _, k := range kinds {
			if _, wild, ok := cloner.ParseName(k.Prefix(), name, f.maxUnit); ok && !wild {
				return true
			}
		}
		return false
	}
	root := cfs.NewRoot(reg, prefixes, cloneable, log)
	m, err := cfs.New(dir, root, cfs.MountOptions{AllowOther: f.allowOther, Debug: f.debug, Log: log})
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		return err
	}
	log.Info("serving", "mountpoint", m.Dir(), "pid", os.Getpid())
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	log.Info("shutting down", "mountpoint", m.Dir())
	reg.Shutdown(context.Background(), func() {
		if err := m.Unmount(); err != nil {
			log.Error("unmount", "error", err)
		}
	})
	m.Close()
	log.Info("stopped")
	return nil
}
