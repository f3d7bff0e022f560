package fusewire

import (
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// TestViews: a view of a buffer too short for its type is nil, never a
// panic; a reply built here reads back as built.
func TestViews(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		ok   bool
	}{
		{"empty", 0, false},
		{"header only", OutHeaderSize, false},
		{"header and a short body", OutHeaderSize + 8, false},
		{"header and a whole body", OutHeaderSize + 16, true},
	} {
		b := make([]byte, tc.n)
		if got := OutBody[fuse.OpenOut](b) != nil; got != tc.ok {
			t.Errorf("%s (%d bytes): OutBody[fuse.OpenOut] non-nil = %v, want %v", tc.name, tc.n, got, tc.ok)
		}
	}
	if View[fuse.ReadIn](make([]byte, 79)) != nil || View[fuse.ReadIn](make([]byte, 80)) == nil {
		t.Error("View[fuse.ReadIn] must need exactly the 80 bytes of struct fuse_read_in")
	}
	in := make([]byte, InHeaderSize)
	*Header(in) = fuse.InHeader{Length: uint32(len(in)), Opcode: OpLookup, Unique: 42}
	out := make([]byte, OutHeaderSize)
	if n := ErrorReply(in, out, syscall.ENOENT); n != OutHeaderSize || Status(out) != syscall.ENOENT || Out(out).Unique != 42 {
		t.Errorf("ErrorReply: %d bytes, status %v, unique %d; want 16, ENOENT, 42", n, Status(out), Out(out).Unique)
	}
	if Name(OpStatfs) != "statfs" || Name(0) != "" || Name(1000) != "" {
		t.Errorf("Name: statfs %q, 0 %q, 1000 %q; want statfs and two empty", Name(OpStatfs), Name(0), Name(1000))
	}
}
