package fs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cdevfs/cdevfs/metrics"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// refusalRoot is a Root with just what refuse needs: metrics, and a
// refusal log in buf (JSON lines) on a clock the test moves.
func refusalRoot(buf *bytes.Buffer) (*Root, *time.Time) {
	now := time.Unix(1e9, 0)
	log := slog.New(slog.NewJSONHandler(buf, nil))
	return &Root{
		log:      log,
		metrics:  metrics.New(func() (int, int, int) { return 0, 0, 0 }),
		refusals: newRefusalLog(log, func() time.Time { return now }),
	}, &now
}

// scrapeMetrics returns what m serves to a scrape.
func scrapeMetrics(t *testing.T, m *metrics.Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Result().Body)
	return string(b)
}

func callerCtx(uid, pid uint32) context.Context {
	return fuse.NewContext(context.Background(), &fuse.Caller{Owner: fuse.Owner{Uid: uid, Gid: uid}, Pid: pid})
}

// refusalLines parses the JSON log lines in buf.
func refusalLines(t *testing.T, buf *bytes.Buffer) []map[string]any {
	t.Helper()
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", l, err)
		}
		lines = append(lines, m)
	}
	return lines
}

// refusalRun is a run of refusals of one caller with no time between them.
type refusalRun struct {
	wait     time.Duration // before the run
	uid      uint32
	pids     bool // a new pid for each refusal, as a caller forking would
	n        int
	action   string
	lines    int            // lines the run must log
	lastLine map[string]any // fields of the run's last line (nil: none checked)
}

func TestRefuse(t *testing.T) {
	per := refusalsPerCaller.Burst
	for _, c := range []struct {
		name string
		runs []refusalRun
	}{
		{
			name: "a caller's refusals are logged up to its burst",
			runs: []refusalRun{{uid: 1000, n: 3 * per, action: "clone", lines: per}},
		},
		{
			name: "new pids are the same caller",
			runs: []refusalRun{{uid: 1000, pids: true, n: 3 * per, action: "open", lines: per}},
		},
		{
			name: "after a second the next line tells what was suppressed",
			runs: []refusalRun{
				{uid: 1000, n: per + 7, action: "clone", lines: per},
				{wait: time.Second, uid: 1000, n: 2, action: "chmod", lines: 1,
					lastLine: map[string]any{"msg": "refused chmod", "uid": 1000.0, "suppressed": 7.0}},
			},
		},
		{
			name: "another caller has its own share",
			runs: []refusalRun{
				{uid: 1000, n: 2 * per, action: "clone", lines: per},
				{uid: 1001, n: per, action: "clone", lines: per,
					lastLine: map[string]any{"msg": "refused clone", "uid": 1001.0, "suppressed": nil}},
			},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			r, now := refusalRoot(&buf)
			want := map[string]int{}
			for i, run := range c.runs {
				*now = now.Add(run.wait)
				before := len(refusalLines(t, &buf))
				for k := range run.n {
					pid := uint32(100)
					if run.pids {
						pid += uint32(k)
					}
					r.refuse(callerCtx(run.uid, pid), run.action, "tun7", "reason", "caller not privileged")
				}
				want[run.action] += run.n
				lines := refusalLines(t, &buf)
				if got := len(lines) - before; got != run.lines {
					t.Fatalf("run %d: %d refusals logged %d lines, want %d:\n%s", i, run.n, got, run.lines, buf.String())
				}
				for k, v := range run.lastLine {
					if got := lines[len(lines)-1][k]; got != v {
						t.Errorf("run %d: last line's %s = %v, want %v: %v", i, k, got, v, lines[len(lines)-1])
					}
				}
			}
			for action, n := range want {
				sample := fmt.Sprintf("cdevfs_refusals_total{action=%q} %d\n", action, n)
				if body := scrapeMetrics(t, r.metrics); !strings.Contains(body, sample) {
					t.Errorf("metrics lack %q (every refusal counted):\n%s", sample, body)
				}
			}
		})
	}
}

// TestRefuseLine: a logged refusal has the unit, why, and the caller's
// pid and uid.
func TestRefuseLine(t *testing.T) {
	var buf bytes.Buffer
	r, _ := refusalRoot(&buf)
	r.refuse(callerCtx(65534, 4242), "clone", "tun", "error", errors.New("no free unit"))
	lines := refusalLines(t, &buf)
	if len(lines) != 1 {
		t.Fatalf("%d lines, want 1:\n%s", len(lines), buf.String())
	}
	for k, v := range map[string]any{"msg": "refused clone", "level": "WARN", "unit": "tun",
		"error": "no free unit", "pid": 4242.0, "uid": 65534.0} {
		if got := lines[0][k]; got != v {
			t.Errorf("%s = %v, want %v: %v", k, got, v, lines[0])
		}
	}
}
