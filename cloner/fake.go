package cloner

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
)

// Fake is an in-memory Backend for unit tests of the cloner and devnode
// logic. It also checks the fd discipline the real backend relies on: an
// operation on a closed link or a second Close is recorded in Violations.
type Fake struct {
	mu         sync.Mutex // guards every field and every fakeLink's state
	links      map[string]*fakeLink
	Taken      map[string]bool // names some foreign device has
	FailCreate func(name string) error
	violations []string
	nextIndex  int
}

// NewFake returns an empty fake kernel.
func NewFake() *Fake {
	return &Fake{links: make(map[string]*fakeLink), Taken: make(map[string]bool)}
}

// Exists reports whether the fake kernel has an interface named name.
func (f *Fake) Exists(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.links[name] != nil
}

// Len is the number of interfaces in the fake kernel.
func (f *Fake) Len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.links)
}

// Violations lists fd-discipline errors seen so far.
func (f *Fake) Violations() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.violations...)
}

// Inject queues a packet for reading on the interface name.
func (f *Fake) Inject(name string, pkt []byte) error {
	f.mu.Lock()
	l := f.links[name]
	f.mu.Unlock()
	if l == nil {
		return fmt.Errorf("fake: no interface %s", name)
	}
	select {
	case l.rx <- append([]byte(nil), pkt...):
		l.callWake()
		return nil
	default:
		return errors.New("fake: queue full")
	}
}

// DeleteExternal deletes name as `ip link del` would: attached readers fail.
func (f *Fake) DeleteExternal(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l := f.links[name]; l != nil {
		delete(f.links, name)
		l.deleted = true
		close(l.gone)
	}
}

// Create implements Backend.
func (f *Fake) Create(name string, kind Kind, attach bool) (Link, error) {
	if f.FailCreate != nil {
		if err := f.FailCreate(name); err != nil {
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.links[name] != nil || f.Taken[name] {
		return nil, fmt.Errorf("fake: %s exists: %w", name, syscall.EEXIST)
	}
	l := f.newLinkLocked(name, kind, OwnerSelf)
	l.attached = attach
	return l, nil
}

func (f *Fake) newLinkLocked(name string, kind Kind, owner Owner) *fakeLink {
	f.nextIndex++
	l := &fakeLink{f: f, name: name, kind: kind, owner: owner, index: f.nextIndex,
		rx: make(chan []byte, 64), gone: make(chan struct{}), woken: make(chan struct{})}
	f.links[name] = l
	return l
}

// AddExternal makes an interface as `ip tuntap add` would, with the
// owner's mark, and returns what the watch would report of it.
func (f *Fake) AddExternal(name string, kind Kind, owner Owner) LinkInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.newLinkLocked(name, kind, owner)
	return LinkInfo{Name: name, Index: l.index, TunTap: true, Kind: kind, Persist: true, Owner: owner}
}

// Find implements Backend.
func (f *Fake) Find(name string) (LinkInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l := f.links[name]; l != nil {
		return LinkInfo{Name: name, Index: l.index, TunTap: true, Kind: l.kind, Persist: true, Owner: l.owner}, nil
	}
	return LinkInfo{}, fmt.Errorf("fake: %s: %w", name, ErrGone)
}

// Adopt implements Backend.
func (f *Fake) Adopt(index int) (Link, LinkInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range f.links {
		if l.index == index {
			return l, LinkInfo{Name: l.name, Index: index, TunTap: true, Kind: l.kind, Persist: true, Owner: l.owner}, nil
		}
	}
	return nil, LinkInfo{}, fmt.Errorf("fake: ifindex %d: %w", index, ErrGone)
}

type fakeLink struct {
	f        *Fake
	name     string
	kind     Kind
	owner    Owner
	index    int
	rx       chan []byte
	gone     chan struct{} // closed by DeleteExternal
	woken    chan struct{} // closed by Wake
	attached bool
	up       bool
	mtu      int
	deleted  bool
	closed   bool
	wakeOnce sync.Once
	pollWake func() // guarded by f.mu
}

func (l *fakeLink) Readable() (bool, error) {
	if err := l.use("readable"); err != nil {
		return false, err
	}
	return len(l.rx) > 0, nil
}

func (l *fakeLink) Watch(wake func()) {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	l.pollWake = wake
}

func (l *fakeLink) callWake() {
	l.f.mu.Lock()
	w := l.pollWake
	l.f.mu.Unlock()
	if w != nil {
		w()
	}
}

func (l *fakeLink) Name() string { return l.name }

func (l *fakeLink) Index() int { return l.index }

func (l *fakeLink) MTU() (int, bool, error) {
	if err := l.use("mtu"); err != nil {
		return 0, false, err
	}
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	if l.mtu == 0 {
		return 1500, l.up, nil
	}
	return l.mtu, l.up, nil
}

func (l *fakeLink) SetMTU(mtu int) error {
	if err := l.use("setmtu"); err != nil {
		return err
	}
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	l.mtu = mtu
	return nil
}

// SetUp marks the fake interface up or down (ip link set up).
func (f *Fake) SetUp(name string, up bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l := f.links[name]; l != nil {
		l.up = up
	}
}

func (l *fakeLink) use(op string) error {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	if l.closed {
		l.f.violations = append(l.f.violations, op+" on closed link "+l.name)
		return syscall.EBADF
	}
	if l.deleted {
		return ErrGone
	}
	return nil
}

func (l *fakeLink) Attach(ctx context.Context) error {
	if err := l.use("attach"); err != nil {
		return err
	}
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	l.attached = true
	return nil
}

func (l *fakeLink) Detach() error {
	if err := l.use("detach"); err != nil {
		return err
	}
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	l.attached = false
	return nil
}

func (l *fakeLink) Read(ctx context.Context, p []byte, nonblock bool) (int, error) {
	if err := l.use("read"); err != nil {
		return 0, err
	}
	select {
	case <-l.woken:
		return 0, ErrRevoked
	default:
	}
	if nonblock {
		select {
		case pkt := <-l.rx:
			return copy(p, pkt), nil
		default:
			return 0, syscall.EAGAIN
		}
	}
	select {
	case pkt := <-l.rx:
		return copy(p, pkt), nil
	case <-l.woken:
		return 0, ErrRevoked
	case <-l.gone:
		return 0, ErrGone
	case <-ctx.Done():
		return 0, syscall.EINTR
	}
}

func (l *fakeLink) Write(ctx context.Context, p []byte) (int, error) {
	if err := l.use("write"); err != nil {
		return 0, err
	}
	select {
	case <-l.woken:
		return 0, ErrRevoked
	default:
	}
	return len(p), nil
}

func (l *fakeLink) Wake() {
	l.wakeOnce.Do(func() { close(l.woken) })
	l.callWake()
}

func (l *fakeLink) Delete() error {
	if err := l.use("delete"); err != nil && !errors.Is(err, ErrGone) {
		return err
	}
	if l.owner != OwnerSelf {
		return nil // like the Linux backend: never delete what we did not make
	}
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	if l.f.links[l.name] == l {
		delete(l.f.links, l.name)
	}
	l.deleted = true
	return nil
}

func (l *fakeLink) Close() error {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	if l.closed {
		l.f.violations = append(l.f.violations, "double close of "+l.name)
		return syscall.EBADF
	}
	l.closed = true
	return nil
}
