// Package rules parses FreeBSD devfs.rules(5) files and applies their
// rulesets to device entries, as devfs(8) and the kernel's devfs_rule.c
// do. It is pure Go and knows nothing of FUSE or of the device layer: a
// caller hands Apply an entry's name and attributes and gets them back
// changed.
//
// The file format is /etc/devfs.rules':
//
//	# comment
//	[localrules=10]
//	add path 'tun*' mode 0660 group network
//	add path 'tap*' hide
//	add 500 path null user root     # an explicit rule number
//	[jail=11]
//	add include $localrules         # the rules of an earlier ruleset
//	add path 'tun[0-3]' unhide
//
// A rule is "add [number] condition... action...". Conditions: `path
// GLOB` (fnmatch(3) with FNM_PATHNAME, see Match) and `type
// disk|mem|tape|tty`. Actions: `hide`, `unhide`, `user U` (FreeBSD's
// spelling; `owner U` is accepted as an alias), `group G`, `mode M`
// (octal) and `include RULESET`.
package rules

import (
	"fmt"
)

// Attr is what rules change on an entry: FreeBSD's de_uid, de_gid,
// de_mode and the DE_WHITEOUT flag (hidden).
type Attr struct {
	Mode     uint32
	Uid, Gid uint32
	Hidden   bool
}

// IncludeDepth is how deep `include` is followed: FreeBSD's default
// vfs.devfs.rule_depth, 1. A ruleset's includes are run, but the
// includes of an included ruleset are not (so /etc/defaults/devfs.rules
// repeats the includes of devfsrules_jail in devfsrules_jail_vnet).
const IncludeDepth = 1

// Type flags of the `type` condition (cdevsw d_flags).
const (
	TypeDisk uint32 = 1 << iota
	TypeMem
	TypeTape
	TypeTTY
)

// Rule is one `add` line.
type Rule struct {
	Num  uint16 // rule number: rules run in this order
	Line int    // line in the file, for messages

	// Conditions: a rule with none matches every entry.
	Path    string // fnmatch pattern; "" means no path condition
	HasPath bool
	Types   uint32 // Type* flags; 0 means no type condition

	// Actions, in the order devfs_rule_run runs them.
	Hide, Unhide   bool
	SetUid, SetGid bool
	Uid, Gid       uint32
	SetMode        bool
	Mode           uint32
	Include        *Ruleset // nil: no include
}

// Ruleset is one [name=number] section: rules sorted by number.
type Ruleset struct {
	Name  string
	Num   uint16
	Line  int // line of the section header
	Rules []*Rule
}

// Entry is what a rule's conditions look at.
type Entry struct {
	// Path is the entry's name relative to the mount: "tun0".
	Path string
	// Type is the entry's cdevsw flags (Type*). cdevfs gives no entry
	// one (not even the kernel's tty) and passes 0, so a `type`
	// condition never matches, as on FreeBSD for a cdevsw without those
	// flags (and for symlinks, which have no cdevsw).
	Type uint32
}

// Apply runs the ruleset's rules on an entry's attributes, in rule
// number order (devfs_ruleset_applyde). Attributes a rule does not set
// are left as they are: applying rules never undoes an earlier rule or a
// chmod, exactly as `devfs rule applyset` on FreeBSD.
func (rs *Ruleset) Apply(e Entry, a *Attr) {
	if rs == nil {
		return
	}
	rs.apply(e, a, IncludeDepth)
}

func (rs *Ruleset) apply(e Entry, a *Attr, depth int) {
	for _, r := range rs.Rules {
		r.run(e, a, depth)
	}
}

// Matches reports whether the rule's conditions hold for e
// (devfs_rule_match).
func (r *Rule) Matches(e Entry) bool {
	if r.Types != 0 && e.Type&r.Types == 0 {
		return false
	}
	if r.HasPath && !Match(r.Path, e.Path) {
		return false
	}
	return true
}

// run is devfs_rule_run: if the rule matches, hide/unhide, then user,
// group, mode, then the included ruleset while depth allows.
func (r *Rule) run(e Entry, a *Attr, depth int) {
	if !r.Matches(e) {
		return
	}
	if r.Hide {
		a.Hidden = true
	}
	if r.Unhide {
		a.Hidden = false
	}
	if r.SetUid {
		a.Uid = r.Uid
	}
	if r.SetGid {
		a.Gid = r.Gid
	}
	if r.SetMode {
		a.Mode = r.Mode
	}
	if r.Include != nil && depth > 0 {
		r.Include.apply(e, a, depth-1)
	}
}

// Error is a problem in a rules file, at a line (0: the file as a whole).
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	if e.Line == 0 {
		return fmt.Sprintf("%s: %s", e.File, e.Msg)
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}
