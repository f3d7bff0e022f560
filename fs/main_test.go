package fs

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (a
// transport reader, an invalidator, a registry worker).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
