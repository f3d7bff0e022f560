package devnode

import "context"

// Actor is the process on whose behalf an operation runs: the FUSE caller
// that opened, looked up or closed a node. The layer that knows the caller
// (fs) puts it in the context, so the layers below can say in their logs
// who created or destroyed an interface without knowing FUSE.
type Actor struct {
	Pid, Uid uint32
}

type (
	actorKey  struct{}
	reasonKey struct{}
)

// WithActor returns a context carrying a.
func WithActor(ctx context.Context, a Actor) context.Context {
	return context.WithValue(ctx, actorKey{}, a)
}

// ActorFrom returns the actor in ctx, if there is one.
func ActorFrom(ctx context.Context) (Actor, bool) {
	a, ok := ctx.Value(actorKey{}).(Actor)
	return a, ok
}

// WithReason returns a context whose Node.Destroy records reason as the
// cause (instead of ReasonDestroy).
func WithReason(ctx context.Context, reason string) context.Context {
	return context.WithValue(ctx, reasonKey{}, reason)
}

// Reasons a node is destroyed (Cause.Reason).
const (
	ReasonTransientClose = "transient last close"
	ReasonDeleted        = "interface deleted outside cdevfs"
	ReasonNetnsGone      = "network namespace deleted"
	ReasonShutdown       = "shutdown"
	ReasonDestroy        = "destroy"
)

// Cause is what started a node's destroy: recorded when the node turns
// dying, so that the device's revoke and destroy can log it.
type Cause struct {
	Reason   string
	Actor    Actor
	HasActor bool // Actor is known (a request started the destroy)
}

// causeFrom is the cause with ctx's reason (else reason) and ctx's
// actor, if any.
func causeFrom(ctx context.Context, reason string) Cause {
	if r, ok := ctx.Value(reasonKey{}).(string); ok {
		reason = r
	}
	a, ok := ActorFrom(ctx)
	return Cause{Reason: reason, Actor: a, HasActor: ok}
}

// Cause returns what started the node's destroy; the zero Cause while the
// node is not dying.
func (n *Node) Cause() Cause {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cause
}
