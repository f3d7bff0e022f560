package fs

import (
	"syscall"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// TestSetattrRules: who may chmod, chown, chgrp, touch and truncate, as
// Linux decides (the e2e tests check the same through the kernel).
func TestSetattrRules(t *testing.T) {
	t0 := time.Unix(1000, 0)
	now := time.Unix(2000, 0)
	node := devnode.Attr{Mode: 0660, Uid: 1000, Gid: 20, Atime: t0, Mtime: t0, Ctime: t0}
	root := &creds{uid: 0, loaded: true, held: askedCaps}
	capless := &creds{uid: 0, loaded: true} // a container's root: uid 0, no capability
	owner := &creds{uid: 1000, gid: 1000, loaded: true, groups: []uint32{30}}
	member := &creds{uid: 2000, gid: 2000, loaded: true, groups: []uint32{20}}
	other := &creds{uid: 3000, gid: 3000, loaded: true}
	fowner := &creds{uid: 3000, gid: 3000, loaded: true, held: privilege.Of(privilege.Fowner)}
	chowner := &creds{uid: 3000, gid: 3000, loaded: true, held: privilege.Of(privilege.Chown)}

	mode := func(m uint32) fuse.SetAttrInCommon {
		return fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE, Mode: syscall.S_IFREG | m}
	}
	own := func(uid, gid uint32, valid uint32) fuse.SetAttrInCommon {
		in := fuse.SetAttrInCommon{Valid: valid}
		in.Uid, in.Gid = uid, gid
		return in
	}
	touchNow := fuse.SetAttrInCommon{Valid: fuse.FATTR_ATIME | fuse.FATTR_MTIME | fuse.FATTR_ATIME_NOW | fuse.FATTR_MTIME_NOW}
	touchAt := fuse.SetAttrInCommon{Valid: fuse.FATTR_ATIME | fuse.FATTR_MTIME, Atime: 5, Mtime: 6}
	truncPath := fuse.SetAttrInCommon{Valid: fuse.FATTR_SIZE}

	cases := []struct {
		name  string
		c     *creds
		in    fuse.SetAttrInCommon
		errno syscall.Errno
		check func(devnode.Attr) bool
	}{
		{"root chmod", root, mode(0604), 0, func(a devnode.Attr) bool { return a.Mode == 0604 && a.Ctime.Equal(now) }},
		{"owner chmod", owner, mode(0600), 0, func(a devnode.Attr) bool { return a.Mode == 0600 }},
		{"owner chmod setgid outside group", owner, mode(02660), 0, func(a devnode.Attr) bool { return a.Mode == 0660 }},
		{"root chmod setgid", root, mode(02660), 0, func(a devnode.Attr) bool { return a.Mode == 02660 }},
		{"member chmod", member, mode(0666), syscall.EPERM, nil},
		{"other chmod", other, mode(0666), syscall.EPERM, nil},
		{"CAP_FOWNER chmod", fowner, mode(0666), 0, func(a devnode.Attr) bool { return a.Mode == 0666 }},
		{"capless root chmod", capless, mode(0666), syscall.EPERM, nil},
		{"capless root chown", capless, own(0, 0, fuse.FATTR_UID), syscall.EPERM, nil},
		{"root chown", root, own(65534, 0, fuse.FATTR_UID|fuse.FATTR_GID), 0, func(a devnode.Attr) bool { return a.Uid == 65534 && a.Gid == 0 }},
		{"owner chown away", owner, own(2000, 0, fuse.FATTR_UID), syscall.EPERM, nil},
		{"owner chown to self", owner, own(1000, 0, fuse.FATTR_UID), 0, func(a devnode.Attr) bool { return a.Uid == 1000 }},
		{"owner chgrp to own group", owner, own(0, 30, fuse.FATTR_GID), 0, func(a devnode.Attr) bool { return a.Gid == 30 }},
		{"owner chgrp to other group", owner, own(0, 40, fuse.FATTR_GID), syscall.EPERM, nil},
		{"member chgrp", member, own(0, 2000, fuse.FATTR_GID), syscall.EPERM, nil},
		{"CAP_CHOWN chown", chowner, own(1, 1, fuse.FATTR_UID|fuse.FATTR_GID), 0, func(a devnode.Attr) bool { return a.Uid == 1 && a.Gid == 1 }},
		{"CAP_FOWNER chown", fowner, own(1, 0, fuse.FATTR_UID), syscall.EPERM, nil},
		{"root touch -d", root, touchAt, 0, func(a devnode.Attr) bool { return a.Atime.Unix() == 5 && a.Mtime.Unix() == 6 }},
		{"owner touch -d", owner, touchAt, 0, func(a devnode.Attr) bool { return a.Mtime.Unix() == 6 }},
		{"member touch -d", member, touchAt, syscall.EPERM, nil},
		{"member touch (a writer)", member, touchNow, 0, func(a devnode.Attr) bool { return a.Mtime.After(t0) }},
		{"other touch", other, touchNow, syscall.EACCES, nil},
		{"other touch -d", other, touchAt, syscall.EPERM, nil},
		{"other truncate", other, truncPath, syscall.EACCES, nil},
		{"member truncate", member, truncPath, 0, func(a devnode.Attr) bool { return a.Mode == 0660 }},
		{"root chown and chmod at once", root, fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE | fuse.FATTR_UID, Mode: 0640, Owner: fuse.Owner{Uid: 7}}, 0,
			func(a devnode.Attr) bool { return a.Mode == 0640 && a.Uid == 7 }},
		// A refused part refuses the whole request: nothing changes.
		{"owner chmod with chown away", owner, fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE | fuse.FATTR_UID, Mode: 0600, Owner: fuse.Owner{Uid: 7}}, syscall.EPERM, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := node
			in := c.in
			ref := setattr(c.c, &a, &in, now)
			switch {
			case c.errno != 0 && ref == nil:
				t.Fatalf("allowed, want %v", c.errno)
			case c.errno != 0 && ref.errno != c.errno:
				t.Fatalf("refused with %v (%s), want %v", ref.errno, ref.action, c.errno)
			case c.errno == 0 && ref != nil:
				t.Fatalf("refused: %s %s %v", ref.action, ref.reason, ref.errno)
			case c.errno == 0 && !c.check(a):
				t.Fatalf("attributes after: %+v", a)
			}
		})
	}
}

// TestPermitted: owner, group (primary or supplementary) and other bits.
func TestPermitted(t *testing.T) {
	a := devnode.Attr{Mode: 0640, Uid: 1000, Gid: 20}
	cases := []struct {
		c    *creds
		want uint32
		ok   bool
	}{
		{&creds{uid: 0, loaded: true, held: askedCaps}, 6, true},
		// uid 0 without CAP_DAC_OVERRIDE is one more user.
		{&creds{uid: 0, loaded: true}, 4, false},
		{&creds{uid: 0, loaded: true, held: privilege.Of(privilege.DacReadSearch)}, 2, false},
		{&creds{uid: 3000, loaded: true, held: privilege.Of(privilege.DacReadSearch)}, 4, true},
		{&creds{uid: 3000, loaded: true, held: privilege.Of(privilege.DacOverride)}, 6, true},
		// Not even CAP_DAC_OVERRIDE executes a file with no x bit.
		{&creds{uid: 3000, loaded: true, held: askedCaps}, 1, false},
		{&creds{uid: 1000, gid: 1, loaded: true}, 6, true},
		{&creds{uid: 2000, gid: 20, loaded: true}, 4, true},
		{&creds{uid: 2000, gid: 20, loaded: true}, 2, false},
		{&creds{uid: 2000, gid: 1, loaded: true, groups: []uint32{5, 20}}, 4, true},
		{&creds{uid: 2000, gid: 1, loaded: true, groups: []uint32{5}}, 4, false},
		// The owner gets the owner's bits even when the group's would allow more.
		{&creds{uid: 1000, gid: 20, loaded: true}, 1, false},
	}
	for _, c := range cases {
		if got := c.c.permitted(a, c.want); got != c.ok {
			t.Errorf("%+v want %o: %v, want %v", c.c, c.want, got, c.ok)
		}
	}
}
