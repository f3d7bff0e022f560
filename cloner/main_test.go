package cloner

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any test leaves a goroutine behind (a
// registry worker not shut down, a blocked reader, a scheduled destroy).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
