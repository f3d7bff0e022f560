package main

// The operational pieces of the command: the log format, the flag
// listing of --help, and the systemd readiness notification.

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	sd "github.com/coreos/go-systemd/v22/daemon"
)

// logFormat is --log-format: text or json.
type logFormat string

const (
	logText logFormat = "text"
	logJSON logFormat = "json"
)

func (l logFormat) MarshalText() ([]byte, error) { return []byte(l), nil }

func (l *logFormat) UnmarshalText(b []byte) error {
	switch f := logFormat(b); f {
	case logText, logJSON:
		*l = f
		return nil
	}
	return fmt.Errorf("unknown log format %q (want text or json)", b)
}

// logger returns a logger writing lines of this format to w.
func (l logFormat) logger(w io.Writer, level slog.Level) *slog.Logger {
	o := &slog.HandlerOptions{Level: level}
	if l == logJSON {
		return slog.New(slog.NewJSONHandler(w, o))
	}
	return slog.New(slog.NewTextHandler(w, o))
}

// printFlags lists fl's flags the way the README writes them (--name),
// which flag.PrintDefaults does not (it prints -name).
func printFlags(fl *flag.FlagSet) {
	w := fl.Output()
	fl.VisitAll(func(f *flag.Flag) {
		arg, usage := flag.UnquoteUsage(f)
		head := "  --" + f.Name
		if arg != "" {
			head += " " + arg
		}
		if def := f.DefValue; def != "" && def != "false" {
			usage += fmt.Sprintf(" (default %s)", def)
		}
		fmt.Fprintf(w, "%-24s %s\n", head, strings.ReplaceAll(usage, "\n", "\n"+strings.Repeat(" ", 25)))
	})
}

// sdNotifier tells systemd of the service's state through $NOTIFY_SOCKET
// (Type=notify); without that variable (not run by systemd) it does
// nothing.
func sdNotifier(log *slog.Logger) func(state string) {
	return func(state string) {
		if _, err := sd.SdNotify(false, state); err != nil {
			log.Warn("sd_notify", "state", state, "error", err)
		}
	}
}
