package devfuse

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Mount opens /dev/fuse and mounts it at dir, as go-fuse's DirectMount
// does (mount(2) with fd=N, no fusermount), keeping the fd for the Loop
// (and the io_uring queues) to serve. maxRead bounds READs. The fd is
// blocking: the Loop's readers wait in read(2), not in Go's poller.
//
// The mount allows device nodes (no MS_NODEV): the kernel's devices are
// character device inodes that the kernel opens itself. Such an open
// never reaches the daemon, and without default_permissions the kernel
// would not check the node's mode either (fuse_permission asks the
// daemon only for access(2) and chdir): a 0600 null would open for
// anyone. With it the kernel checks every mode (generic_permission) and
// every chmod, chown and utimes (setattr_prepare) itself.
func Mount(dir string, allowOther bool, maxRead int) (*os.File, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,max_read=%d,default_permissions",
		fd, os.Getuid(), os.Getgid(), maxRead)
	if allowOther {
		data += ",allow_other"
	}
	if err := unix.Mount("cdevfs", dir, "fuse.cdevfs", unix.MS_NOSUID, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}

// fusectl is where the fuse control filesystem is usually mounted.
const fusectl = "/sys/fs/fuse/connections"

// Abort aborts the FUSE connection whose superblock has the device
// major:minor, through the fuse control filesystem (fuse_conn_abort_write),
// as `echo 1 > /sys/fs/fuse/connections/N/abort` does: every request
// waiting ends with ECONNABORTED, and readers blocked in read(2) of its
// /dev/fuse return ENODEV. The abort file belongs to the mount's owner;
// where fusectl is not mounted it is mounted on a directory of its own
// for the write, which needs CAP_SYS_ADMIN in the initial user
// namespace.
func Abort(major, minor uint32) error {
	// The directory's name is the kernel's dev_t, MKDEV(major, minor).
	name := strconv.FormatUint(uint64(major)<<20|uint64(minor), 10)
	if err := os.WriteFile(filepath.Join(fusectl, name, "abort"), []byte("1"), 0); err == nil {
		return nil
	}
	dir, err := os.MkdirTemp("", "cdevfs-fusectl-")
	if err != nil {
		return fmt.Errorf("abort FUSE connection %s: %w", name, err)
	}
	defer os.Remove(dir)
	if err := unix.Mount("fusectl", dir, "fusectl", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("abort FUSE connection %s: mount fusectl: %w", name, err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	if err := os.WriteFile(filepath.Join(dir, name, "abort"), []byte("1"), 0); err != nil {
		return fmt.Errorf("abort FUSE connection %s: %w", name, err)
	}
	return nil
}
