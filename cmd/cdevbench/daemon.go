package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// daemon is a running `cdevfs mount`.
type daemon struct {
	cmd  *exec.Cmd
	dir  string
	mu   sync.Mutex
	logb bytes.Buffer
}

func startDaemon(bin, dir, iouring string) (*daemon, error) {
	d := &daemon{dir: dir}
	d.cmd = exec.Command(bin, "mount", "--log-level", "warn", "--io-uring", iouring, dir)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			d.mu.Lock()
			if d.logb.Len() < 1<<20 {
				d.logb.WriteString(sc.Text() + "\n")
			}
			d.mu.Unlock()
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(b, []byte(" "+dir+" ")) {
			if _, err := os.Stat(filepath.Join(dir, "tun")); err == nil {
				return d, nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.cmd.Process.Kill()
	return nil, fmt.Errorf("cdevfs did not serve %s within 20s:\n%s", dir, d.log())
}

func (d *daemon) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logb.String()
}

// rssKiB is the daemon's resident set size.
func rssKiB(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.Atoi(f[1])
		}
	}
	return 0, errors.New("no VmRSS")
}

// stop kills the daemon and detaches its mount. A SIGTERM would make
// cdevfs delete every interface it created, one netlink request each
// (~16 ms apiece: minutes for 10,000); the private network namespace
// takes them all with it instead.
func (d *daemon) stop() {
	d.cmd.Process.Kill()
	d.cmd.Wait()
	_ = unix.Unmount(d.dir, unix.MNT_DETACH)
}
