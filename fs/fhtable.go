package fs

import (
	"sync"
	"sync/atomic"
)

// fhTable maps the kernel's file handle numbers (go-fuse's fh, a small
// index it recycles after RELEASE) to device handles: the tree's side of
// transport.Files, for the transport's packet path. A lookup is two
// atomic loads: no lock shared by all devices on the packet path. Growth
// takes mu.
type fhTable struct {
	mu     sync.Mutex // serializes growth
	chunks atomic.Pointer[[]*fhChunk]
}

const fhChunkSize = 1024

type fhChunk [fhChunkSize]atomic.Pointer[handle]

// get returns the handle registered for fh, or nil.
func (t *fhTable) get(fh uint64) *handle {
	cs := t.chunks.Load()
	if cs == nil || fh/fhChunkSize >= uint64(len(*cs)) {
		return nil
	}
	return (*cs)[fh/fhChunkSize][fh%fhChunkSize].Load()
}

// clear forgets fh if h is still registered for it.
func (t *fhTable) clear(fh uint64, h *handle) {
	if cs := t.chunks.Load(); cs != nil && fh/fhChunkSize < uint64(len(*cs)) {
		(*cs)[fh/fhChunkSize][fh%fhChunkSize].CompareAndSwap(h, nil)
	}
}

// set registers h for fh.
func (t *fhTable) set(fh uint64, h *handle) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var cs []*fhChunk
	if p := t.chunks.Load(); p != nil {
		cs = *p
	}
	if need := int(fh/fhChunkSize) + 1; need > len(cs) {
		grown := make([]*fhChunk, need)
		copy(grown, cs)
		for i := len(cs); i < need; i++ {
			grown[i] = new(fhChunk)
		}
		cs = grown
		t.chunks.Store(&cs)
	}
	cs[fh/fhChunkSize][fh%fhChunkSize].Store(h)
}
