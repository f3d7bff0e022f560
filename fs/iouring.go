package fs

import "fmt"

// IOURing says whether a mount carries its requests over FUSE-over-io_uring
// (transport/uring) instead of read(2) and write(2) on /dev/fuse
// (transport/devfuse).
type IOURing int

const (
	// IOURingOff never asks for it: the default (docs/transport.md says
	// why).
	IOURingOff IOURing = iota
	// IOURingAuto uses io_uring when the kernel offers it in INIT, which
	// it does while the fuse module's enable_uring is Y.
	IOURingAuto
	// IOURingOn requires it: the mount fails where it cannot be had.
	IOURingOn
)

var iouringNames = [...]string{IOURingOff: "off", IOURingAuto: "auto", IOURingOn: "on"}

// MarshalText gives auto, off or on.
func (u IOURing) MarshalText() ([]byte, error) {
	if int(u) < 0 || int(u) >= len(iouringNames) {
		return nil, fmt.Errorf("io-uring: bad mode %d", int(u))
	}
	return []byte(iouringNames[u]), nil
}

// UnmarshalText parses auto, off or on.
func (u *IOURing) UnmarshalText(b []byte) error {
	for i, n := range iouringNames {
		if string(b) == n {
			*u = IOURing(i)
			return nil
		}
	}
	return fmt.Errorf("%q is not auto, on or off", b)
}
