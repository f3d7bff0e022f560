package fs

import (
	"testing"

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
