package fs

import (
	"context"
	"testing"

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/cdevfs/cdevfs/internal/privilege"
	"github.com/cdevfs/cdevfs/internal/testenv"
	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (a
// transport reader, an invalidator, a registry worker).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// ownPolicy is the privilege policy of a daemon in the test's own
// namespaces: the test, root in them, is privileged.
func ownPolicy(tb testing.TB) *privilege.Policy {
	tb.Helper()
	p, err := privilege.NewPolicy("")
	if err != nil {
		testenv.Unavailable(tb, "privilege", err)
	}
	return p
}

// mountTree mounts root, serving reg, at a new temporary directory and,
// when the test ends, shuts reg down, unmounts and closes, in the
// daemon's order. It returns the mountpoint and the mount.
func mountTree(t *testing.T, reg *devnode.Registry, root *Root, o MountOptions) (string, *Mount, error) {
	t.Helper()
	dir := t.TempDir()
	m, err := New(dir, root, o)
	if err != nil {
		reg.Shutdown(context.Background(), nil)
		return dir, nil, err
	}
	t.Cleanup(func() {
		reg.Shutdown(context.Background(), nil)
		if err := m.Unmount(); err != nil {
			t.Error(err)
		}
		m.Close()
	})
	return dir, m, nil
}
