package fs

import "golang.org/x/sys/unix"

// legacyNamingCalls: arm64 keeps renameat beside renameat2 (its C
// libraries' rename(3) uses it).
var legacyNamingCalls = map[uint64]namingCall{
	unix.SYS_RENAMEAT: {-1},
}
