// Package bsdtun holds FreeBSD's tun(4)/tap(4) ioctl numbers as cdevfs
// serves them: re-encoded with Linux's _IOW/_IOR (docs/design.md, "ioctls"), the
// same numbers as include/net/if_tun.h.
package bsdtun

// Linux ioctl number encoding (asm-generic/ioctl.h).
const (
	iocWrite = 1
	iocRead  = 2
)

// TuninfoSize is sizeof(struct tuninfo); IfreqSize is sizeof(struct ifreq).
const (
	TuninfoSize = 8
	IfreqSize   = 40
	intSize     = 4
)

// The commands: _IOW/_IOR('t', nr, size) is dir<<30 | size<<16 | 't'<<8 | nr.
const (
	TUNSDEBUG     = iocWrite<<30 | intSize<<16 | 't'<<8 | 90
	TUNGDEBUG     = iocRead<<30 | intSize<<16 | 't'<<8 | 89
	TUNSIFINFO    = iocWrite<<30 | TuninfoSize<<16 | 't'<<8 | 91
	TUNGIFINFO    = iocRead<<30 | TuninfoSize<<16 | 't'<<8 | 92
	TUNSLMODE     = iocWrite<<30 | intSize<<16 | 't'<<8 | 93
	TUNGIFNAME    = iocRead<<30 | IfreqSize<<16 | 't'<<8 | 93
	TUNSIFMODE    = iocWrite<<30 | intSize<<16 | 't'<<8 | 94
	TUNSIFPID     = 't'<<8 | 95
	TUNSIFHEAD    = iocWrite<<30 | intSize<<16 | 't'<<8 | 96
	TUNGIFHEAD    = iocRead<<30 | intSize<<16 | 't'<<8 | 97
	TUNSTRANSIENT = iocWrite<<30 | intSize<<16 | 't'<<8 | 98
	TUNGTRANSIENT = iocRead<<30 | intSize<<16 | 't'<<8 | 99

	// TAP aliases (net/if_tap.h).
	TAPSDEBUG     = TUNSDEBUG
	TAPGDEBUG     = TUNGDEBUG
	TAPSIFINFO    = TUNSIFINFO
	TAPGIFINFO    = TUNGIFINFO
	TAPGIFNAME    = TUNGIFNAME
	TAPSTRANSIENT = TUNSTRANSIENT
	TAPGTRANSIENT = TUNGTRANSIENT
)

// Interface types reported by TUNGIFINFO (FreeBSD's if_types.h).
const (
	IFT_ETHER = 0x6
	IFT_PPP   = 0x17
)

// MRU is the largest packet a write may carry.
const MRU = 65535

// Names maps each command to its name, for logs and tests.
var Names = map[uint32]string{
	TUNSDEBUG: "TUNSDEBUG", TUNGDEBUG: "TUNGDEBUG", TUNSIFINFO: "TUNSIFINFO", TUNGIFINFO: "TUNGIFINFO",
	TUNSLMODE: "TUNSLMODE", TUNGIFNAME: "TUNGIFNAME", TUNSIFMODE: "TUNSIFMODE", TUNSIFPID: "TUNSIFPID",
	TUNSIFHEAD: "TUNSIFHEAD", TUNGIFHEAD: "TUNGIFHEAD", TUNSTRANSIENT: "TUNSTRANSIENT", TUNGTRANSIENT: "TUNGTRANSIENT",
}
