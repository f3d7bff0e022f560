package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

func printHeader(w io.Writer, c *config, notes []string) {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	var u unix.Utsname
	_ = unix.Uname(&u)
	fmt.Fprintf(w, "cdevbench: nproc %d, %s, kernel %s, %s; rounds %d, duration %v per pipelined row, clones %d, open/close %d\n",
		runtime.NumCPU(), model, unix.ByteSliceToString(u.Release[:]), runtime.Version(), c.rounds, c.duration, c.clones, c.openClose)
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
}

// row is one line of the table. native < 0, or an extra column's value
// missing or < 0, means "no such measurement"; naN means the measurement
// cannot be made here ("n/a"). extra holds the extra columns (the minimal
// relays) in order. lower says smaller is better (the ratio is still
// cdevfs/native).
type row struct {
	name           string
	unit           string
	native, cdevfs float64
	extra          []float64
	lower          bool
	target         any // a string, or a bool saying whether the target applies
	targetText     string
	ok             func(native, cdevfs float64) bool
}

type results struct{ rows []row }

func (r *results) add(rw row) { r.rows = append(r.rows, rw) }

// naN marks a value that cannot be measured here.
const naN = -2

func num(v float64) string {
	switch {
	case v == naN:
		return "n/a"
	case v < 0:
		return "-"
	case v >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func (r *results) print(w io.Writer, cols []string) {
	width := 0
	for _, rw := range r.rows {
		width = max(width, len([]rune(rw.name)))
	}
	pad := func(s string) string { return s + strings.Repeat(" ", width-len([]rune(s))) }
	head := fmt.Sprintf("%s  %12s  %12s  %7s", pad("metric"), "native", "cdevfs", "ratio")
	for _, c := range cols {
		head += fmt.Sprintf("  %12s", c)
	}
	fmt.Fprintln(w, head+"  target")
	for _, rw := range r.rows {
		ratio := "-"
		if rw.native > 0 && rw.cdevfs >= 0 {
			ratio = strconv.FormatFloat(rw.cdevfs/rw.native, 'f', 2, 64)
		}
		line := fmt.Sprintf("%s  %12s  %12s  %7s", pad(rw.name), num(rw.native), num(rw.cdevfs), ratio)
		for i := range cols {
			v := -1.0
			if i < len(rw.extra) {
				v = rw.extra[i]
			}
			line += fmt.Sprintf("  %12s", num(v))
		}
		tt := rw.targetText
		applies := false
		switch t := rw.target.(type) {
		case string:
			tt, applies = t, true
		case bool:
			applies = t
		}
		if applies && rw.ok != nil {
			verdict := "MISSED"
			if rw.ok(rw.native, rw.cdevfs) {
				verdict = "met"
			}
			line += fmt.Sprintf("  %s %s", tt, verdict)
		}
		fmt.Fprintln(w, strings.TrimRight(line, " "))
	}
}

var _ = syscall.EINTR
