//go:build !amd64 && !arm64

package fs

// legacyNamingCalls: the other architectures have the generic system
// call table, whose naming calls namingCalls lists.
var legacyNamingCalls = map[uint64]namingCall{}
