package fs

import (
	"context"
	"log/slog"
	"time"

	"github.com/cdevfs/cdevfs/internal/ratelimit"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The bounds of the refusal log. A caller gets a burst of 10 lines, then
// one a second: a person at a shell who is refused sees every refusal in
// the log, a program that loops on one sees its rate and count. All
// callers together get a burst of 100, then 10 a second (1-2 kB/s of log),
// since a user with subordinate uids can be many callers. 1024 callers
// are tracked at most (about 64 kB); more share one bucket.
var (
	refusalsPerCaller = ratelimit.Rate{Burst: 10, Every: time.Second}
	refusalsAll       = ratelimit.Rate{Burst: 100, Every: 100 * time.Millisecond}
)

const refusalCallers = 1024

// refusalLog logs refused actions, at a bounded rate per caller: an
// unprivileged caller can be refused as fast as it can make syscalls
// (some 10,000 a second), and a line for each would fill the disk.
type refusalLog struct {
	log   *slog.Logger
	limit *ratelimit.Limiter
}

// newRefusalLog returns a refusalLog writing to log, on the clock now.
func newRefusalLog(log *slog.Logger, now func() time.Time) *refusalLog {
	return &refusalLog{log: log, limit: ratelimit.New(refusalsPerCaller, refusalsAll, refusalCallers, now)}
}

// refused logs, unless its caller has had its share of lines, the line
// "refused <action>" with the unit, why (key-value pairs: "reason" or
// "error"), and the caller's pid and uid; and, on the first line after
// some were suppressed, how many: the caller's in suppressed, those of
// callers no longer tracked in suppressed_others.
func (l *refusalLog) refused(ctx context.Context, action, unit string, why ...any) {
	var c fuse.Caller
	if fc, ok := fuse.FromContext(ctx); ok {
		c = *fc
	}
	v := l.limit.Allow(c.Uid)
	if !v.OK {
		return
	}
	args := append([]any{"unit", unit}, why...)
	args = append(args, "pid", c.Pid, "uid", c.Uid)
	if v.Suppressed > 0 {
		args = append(args, "suppressed", v.Suppressed)
	}
	if v.Others > 0 {
		args = append(args, "suppressed_others", v.Others)
	}
	l.log.Warn("refused "+action, args...)
}

// refuse records an action refused to the caller of ctx: counted in the
// metrics every time, logged at a bounded rate (refusalLog). action names
// what was refused ("clone", "open", "chmod", ...), why is key-value
// pairs saying why ("reason", "caller not privileged" or "error", err).
func (r *Root) refuse(ctx context.Context, action, unit string, why ...any) {
	r.metrics.Refused(action)
	r.refusals.refused(ctx, action, unit, why...)
}
