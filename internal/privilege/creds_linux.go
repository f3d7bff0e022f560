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
// effective capabilities and the user namespace they belong to, read at
// once (capget(2) and a stat of /proc/TID/ns/user, a few microseconds);
// and its effective uid and supplementary groups, read from
// /proc/TID/status only if a check asks for them (the file costs tens of
// microseconds to generate).
type Creds struct {
	Effective Set // CapEff: good in userNS and the namespaces below it only
	userNS    nsID
	tid       uint32

	status *taskStatus // read by loadStatus; nil until then
}

// taskStatus is what /proc/TID/status adds to Creds.
type taskStatus struct {
	euid   uint32   // as the daemon sees it
	groups []uint32 // supplementary groups (FUSE passes only the primary one)
	err    error
}

// ReadCreds reads the credentials of the task with id tid (a thread id:
// FUSE puts the calling thread's in a request).
//
// Why this is free of races with the caller: FUSE sends a request from
// the calling thread, and once the daemon has read the request that
// thread waits for the answer uninterruptibly, fatal signals included
// (request_wait_answer's last wait_event). Until the daemon answers, the
// thread cannot exit, so its tid cannot be reused, and its credentials
// cannot change, since only a thread itself changes its own (commit_creds
// acts on current). A tid of 0 means the caller is outside the daemon's
// pid namespace: it gets nothing.
func ReadCreds(tid uint32) (*Creds, error) {
	if tid == 0 {
		return nil, errors.New("privilege: the caller is not in the daemon's pid namespace")
	}
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/user", tid), &st); err != nil {
		return nil, fmt.Errorf("privilege: task %d user namespace: %w", tid, err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3, Pid: int32(tid)}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil, fmt.Errorf("privilege: task %d capabilities: %w", tid, err)
	}
	return &Creds{
		Effective: Set(data[0].Effective) | Set(data[1].Effective)<<32,
		userNS:    nsID{st.Dev, st.Ino},
		tid:       tid,
	}, nil
}

// EUID returns the task's effective uid, as the daemon sees it.
func (c *Creds) EUID() (uint32, error) {
	s := c.loadStatus()
	return s.euid, s.err
}

// Groups returns the task's supplementary groups.
func (c *Creds) Groups() ([]uint32, error) {
	s := c.loadStatus()
	return s.groups, s.err
}

func (c *Creds) loadStatus() *taskStatus {
	if c.status == nil {
		c.status = &taskStatus{}
		f, err := os.Open(fmt.Sprintf("/proc/%d/status", c.tid))
		if err == nil {
			err = c.status.parse(f)
			f.Close()
		}
		if err != nil {
			c.status.err = fmt.Errorf("privilege: task %d status: %w", c.tid, err)
		}
	}
	return c.status
}

// parse takes Uid and Groups from a /proc/PID/status.
func (s *taskStatus) parse(f *os.File) error {
	sawUid := false
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
			s.euid, sawUid = uint32(n), true
		case "Groups":
			for _, g := range strings.Fields(val) {
				n, err := strconv.ParseUint(g, 10, 32)
				if err != nil {
					return err
				}
				s.groups = append(s.groups, uint32(n))
			}
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if !sawUid {
		return errors.New("no Uid line")
	}
	return nil
}
