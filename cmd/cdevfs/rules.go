package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cdevfs/cdevfs/rules"
)

// ruleSource is where the devfs rules come from: --rules FILE and
// --ruleset NAME|NUMBER (FreeBSD's devfs_system_ruleset).
type ruleSource struct {
	file, set string
}

// load reads the file and picks the ruleset; no --rules means no rules
// (nil). Errors read "FILE:LINE: reason".
func (s ruleSource) load() (*rules.Ruleset, error) {
	switch {
	case s.file == "" && s.set == "":
		return nil, nil
	case s.file == "":
		return nil, errors.New("--ruleset needs --rules FILE")
	case s.set == "":
		return nil, errors.New("--rules needs --ruleset NAME|NUMBER")
	}
	f, err := rules.ParseFile(s.file, rules.SystemResolver{})
	if err != nil {
		return nil, err
	}
	return f.Ruleset(s.set)
}

// reloadOnHUP re-reads the rules on every SIGHUP until the returned stop
// is called, and hands good ones to apply (which applies them to every
// node, as `service devfs restart` does on FreeBSD). Bad ones are logged,
// one line with FILE:LINE, and the rules in force stay.
func reloadOnHUP(src ruleSource, apply func(*rules.Ruleset), log *slog.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			if src.file == "" {
				log.Info("SIGHUP: no --rules file, nothing to reload")
				continue
			}
			rs, err := src.load()
			if err != nil {
				log.Error("rules reload failed, keeping the rules in force", "error", err.Error())
				continue
			}
			apply(rs)
			log.Info("rules reloaded", "file", src.file, "ruleset", rs.Name)
		}
	}()
	return func() {
		signal.Stop(hup)
		cancel()
		<-done
	}
}
