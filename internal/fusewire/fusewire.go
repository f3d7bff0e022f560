// Package fusewire is the FUSE wire format as cdevfs's transports and
// cdevbench's relays read and write it: the opcodes, defined here once
// with their names, and typed views of requests and replies in the byte
// buffers that read(2) on /dev/fuse and the io_uring entries give.
//
// The layouts are <linux/fuse.h>'s. Where go-fuse exports the struct
// (fuse.InHeader, fuse.ReadIn, fuse.WriteOut, ...) that type is used, as
// go-fuse's own request decoding does: a request struct embeds
// fuse.InHeader, so a view of the whole request is one pointer
// conversion. The few go-fuse keeps unexported (the POLL ones) are
// declared here. A view allocates nothing, so the packet path may use it.
package fusewire

import (
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// FUSE opcodes (enum fuse_opcode).
const (
	OpLookup        = 1
	OpForget        = 2
	OpGetattr       = 3
	OpSetattr       = 4
	OpReadlink      = 5
	OpSymlink       = 6
	OpMknod         = 8
	OpMkdir         = 9
	OpUnlink        = 10
	OpRmdir         = 11
	OpRename        = 12
	OpLink          = 13
	OpOpen          = 14
	OpRead          = 15
	OpWrite         = 16
	OpStatfs        = 17
	OpRelease       = 18
	OpFsync         = 20
	OpSetxattr      = 21
	OpGetxattr      = 22
	OpListxattr     = 23
	OpRemovexattr   = 24
	OpFlush         = 25
	OpInit          = 26
	OpOpendir       = 27
	OpReaddir       = 28
	OpReleasedir    = 29
	OpFsyncdir      = 30
	OpGetlk         = 31
	OpSetlk         = 32
	OpSetlkw        = 33
	OpAccess        = 34
	OpCreate        = 35
	OpInterrupt     = 36
	OpBmap          = 37
	OpDestroy       = 38
	OpIoctl         = 39
	OpPoll          = 40
	OpNotifyReply   = 41
	OpBatchForget   = 42
	OpFallocate     = 43
	OpReaddirplus   = 44
	OpRename2       = 45
	OpLseek         = 46
	OpCopyFileRange = 47
	OpSetupmapping  = 48
	OpRemovemapping = 49
	OpSyncfs        = 50
	OpTmpfile       = 51
	OpStatx         = 52
)

// names are the opcodes' names, as metrics label them.
var names = [...]string{
	OpLookup: "lookup", OpForget: "forget", OpGetattr: "getattr",
	OpSetattr: "setattr", OpReadlink: "readlink", OpSymlink: "symlink",
	OpMknod: "mknod", OpMkdir: "mkdir", OpUnlink: "unlink", OpRmdir: "rmdir",
	OpRename: "rename", OpLink: "link", OpOpen: "open", OpRead: "read",
	OpWrite: "write", OpStatfs: "statfs", OpRelease: "release",
	OpFsync: "fsync", OpSetxattr: "setxattr", OpGetxattr: "getxattr",
	OpListxattr: "listxattr", OpRemovexattr: "removexattr", OpFlush: "flush",
	OpInit: "init", OpOpendir: "opendir", OpReaddir: "readdir",
	OpReleasedir: "releasedir", OpFsyncdir: "fsyncdir", OpGetlk: "getlk",
	OpSetlk: "setlk", OpSetlkw: "setlkw", OpAccess: "access",
	OpCreate: "create", OpInterrupt: "interrupt", OpBmap: "bmap",
	OpDestroy: "destroy", OpIoctl: "ioctl", OpPoll: "poll",
	OpNotifyReply: "notify_reply", OpBatchForget: "batch_forget",
	OpFallocate: "fallocate", OpReaddirplus: "readdirplus",
	OpRename2: "rename2", OpLseek: "lseek", OpCopyFileRange: "copy_file_range",
	OpSetupmapping: "setupmapping", OpRemovemapping: "removemapping",
	OpSyncfs: "syncfs", OpTmpfile: "tmpfile", OpStatx: "statx",
}

// MaxOpcode bounds the opcodes Name knows.
const MaxOpcode = len(names) - 1

// Name is op's name, "" for an opcode this package does not know.
func Name(op uint32) string {
	if op >= uint32(len(names)) {
		return ""
	}
	return names[op]
}

// Notification codes (enum fuse_notify_code), carried in the error field
// of an out header whose unique is 0.
const (
	NotifyPoll       = 1
	NotifyInvalInode = 2
	NotifyInvalEntry = 3
	NotifyDelete     = 6
)

// Sizes of the headers.
const (
	InHeaderSize  = int(unsafe.Sizeof(fuse.InHeader{}))
	OutHeaderSize = int(unsafe.Sizeof(fuse.OutHeader{}))
)

// PollIn is struct fuse_poll_in (go-fuse's is unexported).
type PollIn struct {
	fuse.InHeader
	Fh     uint64
	Kh     uint64
	Flags  uint32
	Events uint32
}

// PollOut is struct fuse_poll_out.
type PollOut struct {
	Revents uint32
	Padding uint32
}

// NotifyPollWakeupOut is struct fuse_notify_poll_wakeup_out.
type NotifyPollWakeupOut struct {
	Kh uint64
}

// PollScheduleNotify is FUSE_POLL_SCHEDULE_NOTIFY in PollIn.Flags: the
// kernel will wait, so a change of readiness must be notified.
const PollScheduleNotify = 1

// View returns b's start as a *T, or nil if b is shorter than a T. T is
// a request (fuse.ReadIn, which starts with the in header) or a body.
// The buffers views are taken of (read(2)'s, an io_uring entry's) are
// 8-byte aligned, and so is every offset views are taken at.
func View[T any](b []byte) *T {
	var t T
	if len(b) < int(unsafe.Sizeof(t)) {
		return nil
	}
	return (*T)(unsafe.Pointer(unsafe.SliceData(b)))
}

// Header is the in header of request b, which must hold one.
func Header(b []byte) *fuse.InHeader { return View[fuse.InHeader](b) }

// Opcode is request b's opcode, 0 if b is too short for a header.
func Opcode(b []byte) uint32 {
	if h := Header(b); h != nil {
		return h.Opcode
	}
	return 0
}

// Out is the out header of reply b.
func Out(b []byte) *fuse.OutHeader { return View[fuse.OutHeader](b) }

// OutBody is the body of reply b, after its out header, as a *T, or nil
// if b is too short to hold one.
func OutBody[T any](b []byte) *T {
	if len(b) < OutHeaderSize {
		return nil
	}
	return View[T](b[OutHeaderSize:])
}

// Reply writes into out the header of a reply to the request with
// unique: errno (0 for success) and a body of bodyLen bytes, which the
// caller writes after it. It returns the reply's length.
func Reply(out []byte, unique uint64, errno syscall.Errno, bodyLen int) int {
	n := OutHeaderSize + bodyLen
	*Out(out) = fuse.OutHeader{Length: uint32(n), Status: -int32(errno), Unique: unique}
	return n
}

// ErrorReply writes a bare error reply to request in into out.
func ErrorReply(in, out []byte, errno syscall.Errno) int {
	return Reply(out, Header(in).Unique, errno, 0)
}

// Status is the errno of reply out, 0 for success (or a reply too short
// to say).
func Status(out []byte) syscall.Errno {
	if h := Out(out); h != nil && h.Status < 0 {
		return syscall.Errno(-h.Status)
	}
	return 0
}

// Notify writes into msg the header of a notification with code and a
// body of bodyLen bytes, and returns the message's length.
func Notify(msg []byte, code int32, bodyLen int) int {
	n := OutHeaderSize + bodyLen
	*Out(msg) = fuse.OutHeader{Length: uint32(n), Status: code}
	return n
}
