package privilege

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Creds are what the kernel checks a task's privilege with: its
// effective uid, supplementary groups, effective capabilities and the
// user namespace those capabilities belong to.
type Creds struct {
	EUID      uint32   // as the daemon sees it
	Groups    []uint32 // supplementary groups (FUSE passes only the primary one)
	Effective Set      // CapEff: good in userNS and the namespaces below it only
	userNS    nsID
}

// ReadCreds reads the credentials of the task with id tid (a thread id:
// FUSE puts the calling thread's in a request) from /proc.
//
// Why this is free of races with the caller: FUSE sends a request from
// the calling thread, and once the daemon has read the request that
// thread waits for the answer uninterruptibly, fatal signals included
// (request_wait_answer's last wait_event). Until the daemon answers, the
// thread cannot exit, so its tid cannot be reused, and its credentials
// cannot change, since only a thread itself changes its own (commit_creds
// acts on current). Both files are read through one directory fd, so they
// are of one task even if that reasoning were broken. A tid of 0 means
// the caller is outside the daemon's pid namespace: it gets nothing.
func ReadCreds(tid uint32) (*Creds, error) {
	if tid == 0 {
		return nil, errors.New("privilege: the caller is not in the daemon's pid namespace")
	}
	dir, err := unix.Open(fmt.Sprintf("/proc/%d", tid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("privilege: task %d: %w", tid, err)
	}
	defer unix.Close(dir)
	var st unix.Stat_t
	if err := unix.Fstatat(dir, "ns/user", &st, 0); err != nil {
		return nil, fmt.Errorf("privilege: task %d user namespace: %w", tid, err)
	}
	fd, err := unix.Openat(dir, "status", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("privilege: task %d status: %w", tid, err)
	}
	f := os.NewFile(uintptr(fd), "status")
	defer f.Close()
	c := &Creds{userNS: nsID{st.Dev, st.Ino}}
	if err := c.parseStatus(f); err != nil {
		return nil, fmt.Errorf("privilege: task %d status: %w", tid, err)
	}
	return c, nil
}

// parseStatus takes Uid, Groups and CapEff from a /proc/PID/status.
func (c *Creds) parseStatus(f *os.File) error {
	seen := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := bytes.Cut(sc.Bytes(), []byte{':'})
		if !ok {
			continue
		}
		val := strings.TrimSpace(string(v))
		switch string(k) {
		case "Uid": // real, effective, saved, filesystem
			fields := strings.Fields(val)
			if len(fields) < 2 {
				return fmt.Errorf("bad Uid line %q", val)
			}
			n, err := strconv.ParseUint(fields[1], 10, 32)
			if err != nil {
				return err
			}
			c.EUID = uint32(n)
			seen++
		case "Groups":
			for _, g := range strings.Fields(val) {
				n, err := strconv.ParseUint(g, 10, 32)
				if err != nil {
					return err
				}
				c.Groups = append(c.Groups, uint32(n))
			}
		case "CapEff":
			n, err := strconv.ParseUint(val, 16, 64)
			if err != nil {
				return err
			}
			c.Effective = Set(n)
			seen++
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if seen != 2 {
		return errors.New("no Uid or CapEff line")
	}
	return nil
}
