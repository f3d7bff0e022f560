package devfuse

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Mount opens /dev/fuse nonblocking and mounts it at dir, as go-fuse's
// DirectMount does (mount(2) with fd=N, no fusermount), keeping the fd
// for the Loop (and the io_uring queues) to serve. maxRead bounds READs.
//
// The mount allows device nodes (no MS_NODEV): the kernel's devices are
// character device inodes that the kernel opens itself. Such an open
// never reaches the daemon, and without default_permissions the kernel
// would not check the node's mode either (fuse_permission asks the
// daemon only for access(2) and chdir): a 0600 null would open for
// anyone. With it the kernel checks every mode (generic_permission) and
// every chmod, chown and utimes (setattr_prepare) itself.
func Mount(dir string, allowOther bool, maxRead int) (*os.File, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
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
