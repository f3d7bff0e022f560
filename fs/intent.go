package fs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// namingCall says how a system call treats the last name of a path it
// looks up: flagsArg < 0, it makes or removes the name; otherwise the
// argument at flagsArg holds open flags, and only an exclusive create
// (O_CREAT|O_EXCL) makes it.
type namingCall struct{ flagsArg int }

// namingCalls are the system calls every Linux architecture has; the
// architectures with the older calls (mkdir, open, ...) add theirs in
// legacyNamingCalls.
var namingCalls = map[uint64]namingCall{
	unix.SYS_MKDIRAT:   {-1},
	unix.SYS_MKNODAT:   {-1},
	unix.SYS_SYMLINKAT: {-1},
	unix.SYS_LINKAT:    {-1},
	unix.SYS_RENAMEAT2: {-1},
	unix.SYS_UNLINKAT:  {-1},
	unix.SYS_OPENAT:    {2},
}

// makesName reports whether the thread tid is looking a name up in
// order to make or remove it (mkdir, mknod, symlink, link, rename,
// unlink, rmdir, an exclusive create) rather than to use it. FreeBSD's
// devfs_lookup knows this from the lookup's nameiop and clones only for
// a use; FUSE does not pass the kernel's intent (LOOKUP_CREATE,
// LOOKUP_EXCL), but the thread is blocked in its system call until the
// LOOKUP is answered (privilege.ReadCreds says why), and
// /proc/TID/syscall names the call and its arguments. A thread whose
// call cannot be read (another pid namespace, an io_uring worker) is
// taken to use the name.
func makesName(tid uint32) bool {
	if tid == 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", tid))
	if err != nil {
		return false
	}
	return parseMakesName(b)
}

// parseMakesName reads a /proc/TID/syscall line: the call's number in
// decimal, its six arguments in hex, then the stack and instruction
// pointers; or "running", or -1 and the pointers outside a call.
func parseMakesName(line []byte) bool {
	f := bytes.Fields(line)
	if len(f) < 7 {
		return false
	}
	nr, err := strconv.ParseUint(string(f[0]), 10, 64)
	if err != nil {
		return false
	}
	c, ok := namingCalls[nr]
	if !ok {
		c, ok = legacyNamingCalls[nr]
	}
	if !ok {
		return false
	}
	if c.flagsArg < 0 {
		return true
	}
	flags, err := strconv.ParseUint(string(bytes.TrimPrefix(f[1+c.flagsArg], []byte("0x"))), 16, 64)
	if err != nil {
		return false
	}
	const excl = syscall.O_CREAT | syscall.O_EXCL
	return flags&excl == excl
}
