package cloner

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/cdevfs/cdevfs/devnode"
)

// logRecorder collects a cloner's log lines as JSON objects.
type logRecorder struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *logRecorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.Write(p)
}

// lines returns the logged lines whose msg is msg.
func (r *logRecorder) lines(t *testing.T, msg string) []map[string]any {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(r.buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// counts counts Events.
type counts struct {
	mu                          sync.Mutex
	created, revoked, destroyed int
}

func (c *counts) Created()   { c.mu.Lock(); c.created++; c.mu.Unlock() }
func (c *counts) Revoked()   { c.mu.Lock(); c.revoked++; c.mu.Unlock() }
func (c *counts) Destroyed() { c.mu.Lock(); c.destroyed++; c.mu.Unlock() }

// TestLogsSayWhoAndWhy: the create line names the creator (the context's
// actor); the revoke and destroy lines of each destroy say what started
// it: a transient last close with the closer's pid and uid, a deletion
// outside cdevfs, the shutdown. Events sees each.
func TestLogsSayWhoAndWhy(t *testing.T) {
	var rec logRecorder
	reg := devnode.NewRegistry()
	fake := NewFake()
	c := New(Tun, fake, reg, 0, slog.New(slog.NewJSONHandler(&rec, nil)))
	var ev counts
	c.SetEvents(&ev)

	opener := devnode.WithActor(context.Background(), devnode.Actor{Pid: 4242, Uid: 7})
	closer := devnode.WithActor(context.Background(), devnode.Actor{Pid: 4343, Uid: 8})
	tun0, err := reg.Clone(opener, "tun") // made open, transient below
	if err != nil {
		t.Fatal(err)
	}
	tun1, err := reg.Lookup(context.Background(), "tun1") // no actor: none logged
	if err != nil {
		t.Fatal(err)
	}
	tun2, err := reg.Lookup(opener, "tun2")
	if err != nil {
		t.Fatal(err)
	}
	tun0.SetTransient(true)
	if err := tun0.Close(closer); err != nil {
		t.Fatal(err)
	}
	tun0.Rel()
	fake.DeleteExternal("tun1")
	if _, err := tun1.Device().(devnode.IO).Read(context.Background(), make([]byte, 16), true); err == nil {
		t.Fatalf("read of a deleted interface succeeded")
	}
	tun1.Rel()
	reg.DrainSched()
	tun2.Rel()
	reg.Shutdown(context.Background(), nil)

	creates := rec.lines(t, "create")
	if len(creates) != 3 {
		t.Fatalf("%d create lines, want 3: %v", len(creates), creates)
	}
	for _, l := range creates {
		_, hasPid := l["pid"]
		switch l["unit"] {
		case "tun0", "tun2":
			if l["pid"] != 4242.0 || l["uid"] != 7.0 {
				t.Errorf("create line %v, want pid 4242 uid 7", l)
			}
		case "tun1":
			if hasPid {
				t.Errorf("create line %v names a pid, but no caller was known", l)
			}
		default:
			t.Errorf("create line for unexpected unit: %v", l)
		}
	}
	want := map[string]map[string]any{
		"tun0": {"reason": devnode.ReasonTransientClose, "pid": 4343.0, "uid": 8.0},
		"tun1": {"reason": devnode.ReasonDeleted},
		"tun2": {"reason": devnode.ReasonShutdown},
	}
	for _, msg := range []string{"revoke", "destroy"} {
		got := rec.lines(t, msg)
		if len(got) != 3 {
			t.Errorf("%d %s lines, want 3 (one per node): %v", len(got), msg, got)
		}
		for _, l := range got {
			w := want[l["unit"].(string)]
			for k, v := range w {
				if l[k] != v {
					t.Errorf("%s line %v: %s = %v, want %v", msg, l, k, l[k], v)
				}
			}
			if _, ok := w["pid"]; !ok && l["pid"] != nil {
				t.Errorf("%s line %v names a pid, but no process started it", msg, l)
			}
		}
	}
	if ev.created != 3 || ev.revoked != 3 || ev.destroyed != 3 {
		t.Errorf("events created %d, revoked %d, destroyed %d; want 3 each", ev.created, ev.revoked, ev.destroyed)
	}
}

// TestStates: the registry counts nodes open, closed and dying.
func TestStates(t *testing.T) {
	e := newFakeEnv(t, 0)
	open, err := e.reg.Clone(context.Background(), "tun")
	if err != nil {
		t.Fatal(err)
	}
	closed, err := e.reg.Lookup(context.Background(), "tun5")
	if err != nil {
		t.Fatal(err)
	}
	if o, c, d := e.reg.States(); o != 1 || c != 1 || d != 0 {
		t.Errorf("States = %d open, %d closed, %d dying; want 1, 1, 0", o, c, d)
	}
	e.destroy(t, open)
	if o, c, d := e.reg.States(); o != 0 || c != 1 || d != 0 {
		t.Errorf("after a destroy States = %d, %d, %d; want 0, 1, 0", o, c, d)
	}
	// An operation in flight holds the destroy back: the node is dying.
	if err := closed.Enter(); err != nil {
		t.Fatal(err)
	}
	e.reg.DestroySched(closed, devnode.ReasonDeleted)
	if o, c, d := e.reg.States(); o != 0 || c != 0 || d != 1 {
		t.Errorf("while a destroy drains States = %d, %d, %d; want 0, 0, 1", o, c, d)
	}
	closed.Exit()
	e.reg.DrainSched()
	if o, c, d := e.reg.States(); o != 0 || c != 0 || d != 0 {
		t.Errorf("after the destroy States = %d, %d, %d; want 0, 0, 0", o, c, d)
	}
	closed.Rel()
}
