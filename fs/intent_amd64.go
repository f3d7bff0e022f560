package fs

import "golang.org/x/sys/unix"

// legacyNamingCalls are namingCalls' older forms that amd64 still has.
var legacyNamingCalls = map[uint64]namingCall{
	unix.SYS_MKDIR:    {-1},
	unix.SYS_MKNOD:    {-1},
	unix.SYS_SYMLINK:  {-1},
	unix.SYS_LINK:     {-1},
	unix.SYS_RENAME:   {-1},
	unix.SYS_RENAMEAT: {-1},
	unix.SYS_UNLINK:   {-1},
	unix.SYS_RMDIR:    {-1},
	unix.SYS_OPEN:     {1},
	// creat(2) is O_CREAT|O_WRONLY|O_TRUNC, never exclusive: a use.
}
