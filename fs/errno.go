package fs

import (
	"errors"
	"syscall"
)

// errno maps an error from the layers below to the errno a FUSE caller
// sees. Every error below wraps the errno with BSD meaning (docs/design.md,
// "Errors"); anything else is an internal failure and reads as EIO.
func errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if e, ok := err.(syscall.Errno); ok { // the packet path's errors: no allocation
		return mapErrno(e)
	}
	return errnoWrapped(err)
}

func errnoWrapped(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return mapErrno(e)
	}
	return syscall.EIO
}

func mapErrno(e syscall.Errno) syscall.Errno {
	switch e {
	case syscall.EEXIST:
		// A device of that name exists that is not ours to give out.
		return syscall.EBUSY
	case syscall.EBADFD:
		return syscall.ENXIO
	}
	return e
}
