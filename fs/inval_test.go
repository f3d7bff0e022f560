package fs

import (
	"context"
	"io"
	"log/slog"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cdevfs/cdevfs/cloner"
	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/fusewire"
	"github.com/cdevfs/cdevfs/internal/kdev"
	"github.com/cdevfs/cdevfs/rules"
	"github.com/cdevfs/cdevfs/transport"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// notification is a FUSE notification the daemon wrote: its code and body.
type notification struct {
	code int32
	body []byte
}

// entry decodes an INVAL_ENTRY notification: the parent and the name.
func (n notification) entry() (parent uint64, name string, ok bool) {
	h := fusewire.View[fuse.NotifyInvalEntryOut](n.body)
	if n.code != fusewire.NotifyInvalEntry || h == nil {
		return 0, "", false
	}
	size := int(unsafe.Sizeof(*h))
	if len(n.body) < size+int(h.NameLen) {
		return 0, "", false
	}
	return h.Parent, string(n.body[size : size+int(h.NameLen)]), true
}

// inode decodes an INVAL_INODE notification.
func (n notification) inode() (*fuse.NotifyInvalInodeOut, bool) {
	h := fusewire.View[fuse.NotifyInvalInodeOut](n.body)
	return h, n.code == fusewire.NotifyInvalInode && h != nil
}

// cacheTree is a tree on the fake kernel, served by a transport whose
// /dev/fuse is a pipe: requests are handled in-process, and what the
// daemon writes (replies and notifications) is read back.
type cacheTree struct {
	reg   *devnode.Registry
	fake  *cloner.Fake
	root  *Root
	conn  *transport.Conn
	inval *invalidator
	r     reqs
	out   []byte
	notes chan notification
}

func newCacheTree(t *testing.T) *cacheTree {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	c := &cacheTree{reg: devnode.NewRegistry(), fake: cloner.NewFake(), notes: make(chan notification, 16)}
	cloner.New(cloner.Tun, c.fake, c.reg, 0, quiet)
	c.root = NewRoot(c.reg, []string{"tun"}, func(string) bool { return true }, ownPolicy(t), quiet)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	c.conn = serveConn(pw, c.root, true)
	c.inval = newInvalidator(&c.root.Inode, quiet)
	c.root.inval.Store(c.inval)
	done := make(chan struct{})
	go func() { // split the stream into messages; keep the notifications
		defer close(done)
		for {
			var h [fusewire.OutHeaderSize]byte
			if _, err := io.ReadFull(pr, h[:]); err != nil {
				return
			}
			out := fusewire.Out(h[:])
			body := make([]byte, int(out.Length)-len(h))
			if _, err := io.ReadFull(pr, body); err != nil {
				return
			}
			if out.Unique == 0 { // a notification
				c.notes <- notification{out.Status, body}
			}
		}
	}()
	t.Cleanup(func() {
		c.inval.stop()
		c.reg.Shutdown(context.Background(), nil)
		pw.Close()
		<-done
		pr.Close()
	})
	c.out = make([]byte, c.conn.BufSize())
	serveOne(c.conn, c.r.init(), c.out)
	return c
}

// lookup sends LOOKUP name (from this process, as root) and returns the
// nodeid.
func (c *cacheTree) lookup(t *testing.T, name string) uint64 {
	t.Helper()
	serveOne(c.conn, c.r.lookup(name), c.out)
	if e := fusewire.Status(c.out); e != 0 {
		t.Fatalf("LOOKUP %s: %v", name, e)
	}
	return fusewire.OutBody[fuse.EntryOut](c.out).NodeId
}

func (c *cacheTree) next(t *testing.T, what string) notification {
	t.Helper()
	select {
	case n := <-c.notes:
		return n
	case <-time.After(2 * time.Second):
		t.Fatalf("no notification within 2s, want %s", what)
		return notification{}
	}
}

// wantEntry checks for FUSE_NOTIFY_INVAL_ENTRY of name in the root.
func (c *cacheTree) wantEntry(t *testing.T, name string) {
	t.Helper()
	n := c.next(t, "INVAL_ENTRY "+name)
	if parent, got, ok := n.entry(); !ok || parent != 1 || got != name {
		t.Fatalf("notification code %d body %q, want INVAL_ENTRY (%d) of %s in nodeid 1", n.code, n.body, fusewire.NotifyInvalEntry, name)
	}
}

// wantInode checks for FUSE_NOTIFY_INVAL_INODE of nodeid, attributes only.
func (c *cacheTree) wantInode(t *testing.T, nodeid uint64, name string) {
	t.Helper()
	n := c.next(t, "INVAL_INODE of "+name)
	if in, ok := n.inode(); !ok || in.Ino != nodeid || in.Off >= 0 {
		t.Fatalf("notification code %d body %x, want INVAL_INODE (%d) of nodeid %d (%s) with offset < 0", n.code, n.body, fusewire.NotifyInvalInode, nodeid, name)
	}
}

func (c *cacheTree) wantNone(t *testing.T, after string) {
	t.Helper()
	select {
	case n := <-c.notes:
		t.Fatalf("notification code %d body %q after %s, want none", n.code, n.body, after)
	case <-time.After(50 * time.Millisecond):
	}
}

func ruleset(t *testing.T, src string) *rules.Ruleset {
	t.Helper()
	f, err := rules.Parse("test.rules", "[test=10]\n"+src, rules.SystemResolver{})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := f.Ruleset("test")
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// TestInvalidationsFollowChanges: what the kernel may cache is invalidated
// when cdevfs changes it behind the kernel's back, and only then: a
// destroyed name, a name the rules now hide, attributes the rules changed.
func TestInvalidationsFollowChanges(t *testing.T) {
	c := newCacheTree(t)
	c.lookup(t, "tun0")
	n, err := c.reg.Get("tun0")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Destroy(context.Background()); err != nil {
		t.Fatal(err)
	}
	n.Rel()
	c.wantEntry(t, "tun0")

	tun1 := c.lookup(t, "tun1")
	null := c.lookup(t, "null")
	c.root.SetRules(ruleset(t, "add path tun1 mode 0640\nadd path null mode 0600\n"))
	// Each changed entry: its inode's attributes, and its name (a LOOKUP
	// in flight could cache the old attributes after INVAL_INODE).
	inodes, names := map[uint64]bool{}, map[string]bool{}
	for range 4 {
		n := c.next(t, "INVAL_INODE and INVAL_ENTRY of tun1 and null")
		in, isInode := n.inode()
		parent, name, isEntry := n.entry()
		switch {
		case isInode && in.Off < 0:
			inodes[in.Ino] = true
		case isEntry && parent == 1:
			names[name] = true
		default:
			t.Fatalf("notification code %d body %x, want INVAL_INODE (attributes only) or INVAL_ENTRY in the root", n.code, n.body)
		}
	}
	if !inodes[tun1] || !inodes[null] || !names["tun1"] || !names["null"] {
		t.Fatalf("invalidated nodeids %v and names %v, want tun1 (%d) and null (%d) in both", inodes, names, tun1, null)
	}
	c.root.SetRules(ruleset(t, "add path tun1 mode 0640\nadd path null mode 0600\n"))
	c.wantNone(t, "applying the same rules again")
	c.root.SetRules(ruleset(t, "add path tun1 hide\n"))
	c.wantEntry(t, "tun1")

	c.inval.stop() // unmounted: nothing is cached, nothing is said
	n, err = c.reg.Lookup(context.Background(), "tun2")
	if err != nil {
		t.Fatal(err)
	}
	n.Destroy(context.Background())
	n.Rel()
	c.wantNone(t, "a destroy once stopped")
}

// TestListingNeverClones: READDIRPLUS's lookup of a listed name that was
// destroyed since the listing answers ENOENT and creates nothing, where a
// privileged path lookup would clone the free unit.
func TestListingNeverClones(t *testing.T) {
	c := newCacheTree(t)
	c.lookup(t, "tun4")
	d := newRootDir(c.root)
	ctx := &fuse.Context{Caller: fuse.Caller{Pid: uint32(os.Getpid())}}
	var names []string
	for {
		de, e := d.Readdirent(ctx)
		if e != 0 {
			t.Fatalf("Readdirent: errno %d", e)
		}
		if de == nil {
			break
		}
		names = append(names, de.Name)
	}
	n, err := c.reg.Get("tun4")
	if err != nil {
		t.Fatalf("tun4 is not in the registry after its lookup (listing %q)", names)
	}
	n.Destroy(context.Background())
	n.Rel()
	var out fuse.EntryOut
	if _, e := d.Lookup(ctx, "tun4", &out); e != syscall.ENOENT {
		t.Errorf("READDIRPLUS lookup of destroyed tun4 = errno %d, want ENOENT", e)
	}
	if c.fake.Exists("tun4") {
		t.Errorf("READDIRPLUS lookup of destroyed tun4 created the interface again")
	}
	null, err := kdev.Sys("/sys").Lookup("null")
	if err != nil {
		t.Fatal(err)
	}
	if _, e := d.Lookup(ctx, "null", &out); e != 0 || out.Mode&syscall.S_IFMT != syscall.S_IFCHR || out.Rdev != null.Rdev() {
		t.Errorf("READDIRPLUS lookup of null = errno %d mode %o rdev %#x, want the character device %s", e, out.Mode, out.Rdev, null)
	}
}

// TestUnlinkedDeviceIsStale: a path operation that reaches a destroyed
// or hidden node through an entry the kernel still caches gets ESTALE
// (the kernel then walks the path again); a Getattr that names an open
// handle still answers. Each operation comes from a thread of its own, so
// none is taken for the kernel's retry of another (TestStaleRetry).
func TestUnlinkedDeviceIsStale(t *testing.T) {
	c := newCacheTree(t)
	n, err := c.reg.Lookup(context.Background(), "tun5")
	if err != nil {
		t.Fatal(err)
	}
	d := &devNode{entry: entry{root: c.root, name: "tun5", typ: syscall.S_IFREG, store: n}, node: n}
	tid := uint32(100)
	ctx := func() *fuse.Context {
		tid++
		return &fuse.Context{Caller: fuse.Caller{Pid: tid}}
	}
	var out fuse.AttrOut
	if e := d.Getattr(ctx(), nil, &out); e != 0 {
		t.Fatalf("Getattr of live tun5 = errno %d, want 0", e)
	}
	n.UpdateAttr(func(a *devnode.Attr) { a.Hidden = true })
	if _, _, e := d.Open(ctx(), uint32(os.O_RDWR)); e != syscall.ESTALE {
		t.Errorf("Open of hidden tun5 = errno %d, want ESTALE", e)
	}
	n.UpdateAttr(func(a *devnode.Attr) { a.Hidden = false })
	n.Destroy(context.Background())
	defer n.Rel()
	if _, _, e := d.Open(ctx(), uint32(os.O_RDWR)); e != syscall.ESTALE {
		t.Errorf("Open of destroyed tun5 = errno %d, want ESTALE", e)
	}
	if e := d.Getattr(ctx(), nil, &out); e != syscall.ESTALE {
		t.Errorf("Getattr by path of destroyed tun5 = errno %d, want ESTALE", e)
	}
	chmod := &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE, Mode: syscall.S_IFREG | 0644}}
	if e := d.Setattr(ctx(), nil, chmod, &out); e != syscall.ESTALE {
		t.Errorf("chmod by path of destroyed tun5 = errno %d, want ESTALE", e)
	}
	if e := d.Getattr(ctx(), struct{}{}, &out); e != 0 {
		t.Errorf("Getattr naming a handle of destroyed tun5 = errno %d, want 0", e)
	}
	// The kernel's retry of an open (the same thread, the same name) that
	// meets a destroyed node again gets ENXIO, as on FreeBSD's devfs.
	retry := ctx()
	if _, _, e := d.Open(retry, uint32(os.O_RDWR)); e != syscall.ESTALE {
		t.Errorf("first Open of destroyed tun5 = errno %d, want ESTALE", e)
	}
	if _, _, e := d.Open(retry, uint32(os.O_RDWR)); e != syscall.ENXIO {
		t.Errorf("retried Open of destroyed tun5 = errno %d, want ENXIO", e)
	}
	// An open that gets past the check ends its call: the thread's next
	// stale open is a call of its own, answered ESTALE.
	n6, err := c.reg.Lookup(context.Background(), "tun6")
	if err != nil {
		t.Fatal(err)
	}
	defer n6.Rel()
	live := &devNode{entry: entry{root: c.root, name: "tun6", typ: syscall.S_IFREG, store: n6}, node: n6}
	next := ctx()
	if _, _, e := d.Open(next, uint32(os.O_RDWR)); e != syscall.ESTALE {
		t.Errorf("first Open of destroyed tun5 = errno %d, want ESTALE", e)
	}
	h, _, e := live.Open(next, uint32(os.O_RDWR))
	if e != 0 {
		t.Fatalf("Open of live tun6 = errno %d, want 0", e)
	}
	h.(*handle).Release(context.Background())
	if _, _, e := d.Open(next, uint32(os.O_RDWR)); e != syscall.ESTALE {
		t.Errorf("Open of destroyed tun5 after the same thread opened tun6 = errno %d, want ESTALE (a new call)", e)
	}
}

// TestStaleRetry: staleAnswers answers ESTALE, and the final errno to
// the same thread's next stale answer for the same name within the
// window; never remembers more than staleThreads threads; and always
// answers ESTALE to a caller with no thread id.
func TestStaleRetry(t *testing.T) {
	now := time.Unix(1000, 0)
	type ask struct {
		tid    uint32
		name   string
		after  time.Duration // the clock moves this far before the question
		want   syscall.Errno
		forget bool // not a question: tid's open got past the stale check
	}
	for _, tc := range []struct {
		name string
		asks []ask
	}{
		{"retry gets final", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {7, "tun3", time.Millisecond, syscall.ENXIO, false}}},
		{"the retry is forgotten", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {7, "tun3", 0, syscall.ENXIO, false}, {7, "tun3", 0, syscall.ESTALE, false}}},
		{"another thread", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {8, "tun3", 0, syscall.ESTALE, false}, {7, "tun3", 0, syscall.ENXIO, false}}},
		{"another name", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {7, "tun4", 0, syscall.ESTALE, false}, {7, "tun4", 0, syscall.ENXIO, false}}},
		{"past the window", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {7, "tun3", staleRetryWindow, syscall.ESTALE, false}}},
		{"no thread id", []ask{{0, "tun3", 0, syscall.ESTALE, false}, {0, "tun3", 0, syscall.ESTALE, false}}},
		{"an open past the check ends the call", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {7, "", 0, 0, true}, {7, "tun3", 0, syscall.ESTALE, false}}},
		{"another thread's open", []ask{{7, "tun3", 0, syscall.ESTALE, false}, {8, "", 0, 0, true}, {7, "tun3", 0, syscall.ENXIO, false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := now
			s := newStaleAnswers(func() time.Time { return clock })
			for i, a := range tc.asks {
				clock = clock.Add(a.after)
				if a.forget {
					s.forget(a.tid)
					continue
				}
				if got := s.answer(a.tid, a.name, syscall.ENXIO); got != a.want {
					t.Errorf("question %d (thread %d, %s, %v later) answered %v, want %v", i, a.tid, a.name, a.after, got, a.want)
				}
			}
		})
	}

	clock := now
	s := newStaleAnswers(func() time.Time { return clock })
	for tid := uint32(1); tid <= staleThreads+10; tid++ {
		s.answer(tid, "tun3", syscall.ENXIO)
	}
	if len(s.byThread) != staleThreads {
		t.Errorf("%d threads remembered after %d asked, want the bound, %d", len(s.byThread), staleThreads+10, staleThreads)
	}
	if got := s.answer(staleThreads+5, "tun3", syscall.ENXIO); got != syscall.ESTALE {
		t.Errorf("a thread that found the table full was answered %v on its retry, want ESTALE (not remembered)", got)
	}
	clock = clock.Add(staleRetryWindow)
	s.answer(staleThreads+20, "tun3", syscall.ENXIO)
	if got := s.answer(staleThreads+20, "tun3", syscall.ENXIO); got != syscall.ENXIO || len(s.byThread) != 0 {
		t.Errorf("after the window: retry answered %v with %d threads remembered, want ENXIO and a table swept empty", got, len(s.byThread))
	}
}
