package fs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"github.com/cdevfs/cdevfs/devnode"
	"golang.org/x/sys/unix"
)

// rootMount mounts a Root with no cloner at a temporary directory, over
// mode's transport; devices are made with reg.Make.
func rootMount(t *testing.T, mode IOURing) (dir string, reg *devnode.Registry, root *Root) {
	t.Helper()
	requireFuse(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg = devnode.NewRegistry()
	root = NewRoot(reg, nil, func(string) bool { return false }, ownPolicy(t), quiet)
	dir, _, err := mountTree(t, reg, root, MountOptions{Log: quiet, IOURing: mode})
	if err != nil {
		t.Fatal(err)
	}
	return dir, reg, root
}

// makeDev makes a device node called name; the registry holds it until
// it is destroyed.
func makeDev(t *testing.T, reg *devnode.Registry, name string) {
	t.Helper()
	n, err := reg.Make(name, &loopDev{}, false)
	if err != nil {
		t.Fatalf("make %s: %v", name, err)
	}
	n.Rel()
}

// openDir opens dir, closed when the test ends.
func openDir(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// readOne reads the next entry of the directory fd: a getdents buffer
// of 40 bytes holds one entry of a name of up to 20 bytes, never two.
// The name is "" at the end.
func readOne(t *testing.T, fd int) string {
	t.Helper()
	var buf [40]byte
	n, err := unix.Getdents(fd, buf[:])
	if err != nil {
		t.Fatalf("getdents: %v", err)
	}
	_, _, names := unix.ParseDirent(buf[:n], -1, nil)
	if len(names) > 1 {
		t.Fatalf("getdents of 40 bytes gave %q, want one entry", names)
	}
	if len(names) == 0 {
		return ""
	}
	return names[0]
}

// readAll reads fd from where it is to the end.
func readAll(t *testing.T, fd int) []string {
	t.Helper()
	var names []string
	for {
		name := readOne(t, fd)
		if name == "" {
			return names
		}
		names = append(names, name)
	}
}

// TestRootListingResumes: the root's listing is resumed from the offset
// alone (the daemon keeps no handle for an open directory), so two
// listings read an entry at a time, interleaved, while devices come and
// go, each list every entry that stayed exactly once, a hidden entry
// never, and a device destroyed before the listing reached it not at all;
// a rewind lists what exists then. Over both transports.
func TestRootListingResumes(t *testing.T) {
	for _, mode := range []IOURing{IOURingOff, IOURingOn} {
		name, _ := mode.MarshalText()
		t.Run("io-uring="+string(name), func(t *testing.T) {
			if mode == IOURingOn {
				setURing(t, "Y")
			}
			testRootListingResumes(t, mode)
		})
	}
}

func testRootListingResumes(t *testing.T, mode IOURing) {
	dir, reg, root := rootMount(t, mode)
	mk := func(name string) { makeDev(t, reg, name) }
	destroy := func(name string) {
		n, err := reg.Get(name)
		if err != nil {
			t.Fatalf("get %s: %v", name, err)
		}
		defer n.Rel()
		if err := n.Destroy(context.Background()); err != nil {
			t.Fatalf("destroy %s: %v", name, err)
		}
	}
	stayed := readAll(t, openDir(t, dir)) // the static nodes
	for i := range 6 {
		mk(fmt.Sprintf("dev%d", i))
	}
	root.SetRules(ruleset(t, "add path dev5 hide\n"))
	stayed = append(stayed, "dev0", "dev2", "dev3", "dev4")

	a, b := openDir(t, dir), openDir(t, dir)
	var listed [2][]string
	for step := 0; ; step++ {
		na, nb := readOne(t, a), readOne(t, b)
		if step == 2 { // the listings are in the static nodes yet
			destroy("dev1")
			mk("dev6")
		}
		if na == "" && nb == "" {
			break
		}
		for i, name := range []string{na, nb} {
			if name != "" {
				listed[i] = append(listed[i], name)
			}
		}
	}
	for i, names := range listed {
		for _, name := range stayed {
			if c := count(names, name); c != 1 {
				t.Errorf("listing %d: %s listed %d times, want once (listing %q)", i, name, c, names)
			}
		}
		for _, name := range []string{"dev1", "dev5"} {
			if slices.Contains(names, name) {
				t.Errorf("listing %d shows %s, destroyed before the listing reached it or hidden (listing %q)", i, name, names)
			}
		}
	}

	mk("dev7")
	if _, err := unix.Seek(a, 0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	names := readAll(t, a)
	want := append(slices.Clone(stayed), "dev6", "dev7")
	slices.Sort(want)
	slices.Sort(names)
	if !slices.Equal(names, want) {
		t.Errorf("listing after rewinddir = %q, want %q", names, want)
	}
}

// TestListingSeesWhatWasMade: the listing's shared index of devices
// (inoIndex) never hides a change from a listing read after it: a device
// made is listed by the next listing, one destroyed is not, while other
// devices come and go all along.
func TestListingSeesWhatWasMade(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := devnode.NewRegistry()
	defer reg.Shutdown(context.Background(), nil)
	root := NewRoot(reg, nil, func(string) bool { return false }, ownPolicy(t), quiet)
	list := func() []string {
		d := newRootDir(root)
		var names []string
		for {
			de, _ := d.Readdirent(context.Background())
			if de == nil {
				return names
			}
			names = append(names, de.Name)
		}
	}
	stop := make(chan struct{})
	churned := make(chan struct{})
	go func() { // other names come and go, remaking the index
		defer close(churned)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			n, err := reg.Make(fmt.Sprintf("churn%d", i), &loopDev{}, false)
			if err != nil {
				t.Errorf("make churn%d: %v", i, err)
				return
			}
			list()
			n.Destroy(context.Background())
			n.Rel()
		}
	}()
	defer func() { close(stop); <-churned }()
	for i := range 200 {
		name := fmt.Sprintf("dev%d", i)
		n, err := reg.Make(name, &loopDev{}, false)
		if err != nil {
			t.Fatal(err)
		}
		if names := list(); count(names, name) != 1 {
			t.Fatalf("listing after making %s = %q, want it once", name, names)
		}
		if i%2 == 0 {
			n.Rel()
			continue
		}
		err = n.Destroy(context.Background())
		n.Rel()
		if err != nil {
			t.Fatal(err)
		}
		if names := list(); slices.Contains(names, name) {
			t.Fatalf("listing after destroying %s = %q, want it gone", name, names)
		}
	}
}

// TestMadeDirectoryListingResumes: a directory a caller made is listed
// by position as the root is: an entry removed before the listing reached
// it is not listed, the others once, and a rewind shows what was made.
func TestMadeDirectoryListingResumes(t *testing.T) {
	dir, _, _ := rootMount(t, IOURingOff)
	made := filepath.Join(dir, "shm")
	for _, p := range []string{made, made + "/a", made + "/b", made + "/c"} {
		if err := os.Mkdir(p, 0755); err != nil {
			t.Fatal(err)
		}
	}
	fd := openDir(t, made)
	names := []string{readOne(t, fd)}
	if err := os.Remove(made + "/b"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(made+"/d", 0755); err != nil {
		t.Fatal(err)
	}
	names = append(names, readAll(t, fd)...)
	if !slices.Equal(names, []string{"a", "c", "d"}) {
		t.Errorf("listing of %s read across rmdir b, mkdir d = %q, want [a c d]", made, names)
	}
	if _, err := unix.Seek(fd, 0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(made+"/e", 0755); err != nil {
		t.Fatal(err)
	}
	if names := readAll(t, fd); !slices.Equal(names, []string{"a", "c", "d", "e"}) {
		t.Errorf("listing of %s after rewinddir = %q, want [a c d e]", made, names)
	}
}

func count(names []string, name string) int {
	c := 0
	for _, n := range names {
		if n == name {
			c++
		}
	}
	return c
}

// TestOpenDirectoryCost: an open directory costs the daemon no memory, so
// a user of the mount holding directory fds cannot grow it. 15,000 fds,
// on the root and on a directory a caller made (the mount point of a
// runtime's shm, say: the entries beside it take a fd each for its
// listing), each read one entry in, may grow the heap by 128 bytes a
// fd at most: a go-fuse handle kept per open would be 4,300 (its table
// entry alone about 180), while the daemon's own comings and goings (a
// request reader and its 384 KiB of buffers) stay below 128 × 15,000 =
// 1.9 MB.
func TestOpenDirectoryCost(t *testing.T) {
	const want, bound = 15000, 128
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	n := min(want, int(rl.Cur)-500)
	if n < want/2 {
		t.Skipf("RLIMIT_NOFILE %d leaves room for %d fds, want %d", rl.Cur, n, want)
	}
	dir, reg, _ := rootMount(t, IOURingOff)
	for i := range 3 {
		makeDev(t, reg, fmt.Sprintf("dev%d", i))
	}
	made := filepath.Join(dir, "shm")
	for _, p := range []string{made, filepath.Join(made, "a"), filepath.Join(made, "b")} {
		if err := os.Mkdir(p, 0755); err != nil {
			t.Fatal(err)
		}
	}
	dirs := []string{dir, made}
	fds := make([]int, 0, n)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for _, d := range dirs { // the first OPENDIRs and READDIRs, and the readers they start
		readAll(t, openDir(t, d))
	}
	before := heapAlloc()
	for i := range n {
		d := dirs[i%len(dirs)]
		fd, err := unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open %s with %d fds open: %v", d, len(fds), err)
		}
		fds = append(fds, fd)
		readOne(t, fd)
	}
	after := heapAlloc()
	per := (int64(after) - int64(before)) / int64(n)
	t.Logf("%d open directories: heap %d -> %d bytes, %d bytes each", n, before, after, per)
	if per > bound {
		t.Errorf("an open directory costs the daemon %d bytes of heap, want at most %d", per, bound)
	}
}

// heapAlloc is the heap's live bytes after two full collections (the
// second frees what the first left in sync.Pools' victim caches).
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
