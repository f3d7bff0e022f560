package rules

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Resolver turns user and group names into ids.
type Resolver interface {
	LookupUser(name string) (uint32, error)
	LookupGroup(name string) (uint32, error)
}

// SystemResolver looks names up in the system's user and group
// databases (os/user).
type SystemResolver struct{}

// LookupUser implements Resolver.
func (SystemResolver) LookupUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(id), err
}

// LookupGroup implements Resolver.
func (SystemResolver) LookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(g.Gid, 10, 32)
	return uint32(id), err
}

// File is a parsed rules file: its rulesets in file order.
type File struct {
	Name string
	Sets []*Ruleset
}

// Ruleset returns the ruleset named sel, or numbered sel.
func (f *File) Ruleset(sel string) (*Ruleset, error) {
	for _, rs := range f.Sets {
		if rs.Name == sel || strconv.Itoa(int(rs.Num)) == sel {
			return rs, nil
		}
	}
	return nil, &Error{File: f.Name, Msg: fmt.Sprintf("no ruleset %q (the file has %s)", sel, f.names())}
}

func (f *File) names() string {
	if len(f.Sets) == 0 {
		return "none"
	}
	var s []string
	for _, rs := range f.Sets {
		s = append(s, fmt.Sprintf("[%s=%d]", rs.Name, rs.Num))
	}
	return strings.Join(s, ", ")
}

// maxPattern is DEVFS_MAXPTRNLEN: the kernel keeps at most 199 bytes of a
// pattern (devfs(8) truncates with a warning; a longer one is an error
// here, since a truncated pattern matches what its author did not mean).
const maxPattern = 200

// ParseFile reads and parses the rules file at path.
func ParseFile(path string, res Resolver) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, &Error{File: path, Msg: errText(err)}
	}
	return Parse(path, string(b), res)
}

func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// Parse parses src, the text of the rules file called name (for
// messages). The first problem is returned as an *Error with its line.
func Parse(name, src string, res Resolver) (*File, error) {
	p := &parser{f: &File{Name: name}, res: res}
	for i, line := range strings.Split(src, "\n") {
		p.line = i + 1
		if err := p.parseLine(strings.TrimSuffix(line, "\r")); err != nil {
			return nil, &Error{File: name, Line: p.line, Msg: err.Error()}
		}
	}
	return p.f, nil
}

type parser struct {
	f    *File
	res  Resolver
	line int
	cur  *Ruleset
}

// header is a section line: [name=number], as rc.subr's
// devfs_rulesets_from_file reads it (the name becomes a shell variable,
// so it is an identifier).
var header = regexp.MustCompile(`^\[([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)\]$`)

func (p *parser) parseLine(line string) error {
	words, err := p.words(line)
	if err != nil {
		return err
	}
	if len(words) == 0 {
		return nil
	}
	if strings.HasPrefix(words[0], "[") {
		if len(words) != 1 {
			return fmt.Errorf("bad section header %q: want [name=number]", strings.TrimSpace(line))
		}
		return p.section(words[0])
	}
	if words[0] != "add" {
		return fmt.Errorf("unknown command %q: a rules file has [name=number] sections and add lines", words[0])
	}
	if p.cur == nil {
		return errors.New("rule before the first [name=number] section")
	}
	r, err := p.rule(words[1:])
	if err != nil {
		return err
	}
	return p.insert(r)
}

func (p *parser) section(w string) error {
	m := header.FindStringSubmatch(w)
	if m == nil {
		return fmt.Errorf("bad section header %q: want [name=number]", w)
	}
	num, err := strconv.ParseUint(m[2], 10, 16)
	if err != nil || num == 0 {
		return fmt.Errorf("ruleset number %s out of range 1-65535 (0 is the empty ruleset, which cannot be changed)", m[2])
	}
	for _, rs := range p.f.Sets {
		if rs.Name == m[1] {
			return fmt.Errorf("ruleset %s already defined at line %d", m[1], rs.Line)
		}
		if rs.Num == uint16(num) {
			return fmt.Errorf("ruleset number %d already used by [%s=%d] at line %d", num, rs.Name, rs.Num, rs.Line)
		}
	}
	p.cur = &Ruleset{Name: m[1], Num: uint16(num), Line: p.line}
	p.f.Sets = append(p.f.Sets, p.cur)
	return nil
}

// insert adds r to the current ruleset in rule number order; number 0
// means the last rule's number plus 100 (devfs_rule_autonumber).
func (p *parser) insert(r *Rule) error {
	rs := p.cur
	if r.Num == 0 {
		last := 0
		if n := len(rs.Rules); n > 0 {
			last = int(rs.Rules[n-1].Num)
		}
		if last+100 > 0xffff {
			return fmt.Errorf("no automatic rule number left after %d (give one explicitly)", last)
		}
		r.Num = uint16(last + 100)
	}
	for _, o := range rs.Rules {
		if o.Num == r.Num {
			return fmt.Errorf("rule number %d already used at line %d", r.Num, o.Line)
		}
	}
	rs.Rules = append(rs.Rules, r)
	sort.SliceStable(rs.Rules, func(i, j int) bool { return rs.Rules[i].Num < rs.Rules[j].Num })
	return nil
}

// rule parses a rulespec as devfs(8)'s rulespec_intok: an optional rule
// number, conditions, then actions.
func (p *parser) rule(w []string) (*Rule, error) {
	r := &Rule{Line: p.line}
	if len(w) > 0 && isNumber(w[0]) {
		n, err := strconv.ParseUint(w[0], 10, 16)
		if err != nil {
			return nil, fmt.Errorf("rule number %s out of range 1-65535", w[0])
		}
		r.Num = uint16(n) // 0: automatic, as in devfs(8)
		w = w[1:]
	}
	arg := func(kw string) (string, error) {
		if len(w) < 2 {
			return "", fmt.Errorf("expecting argument for %s", kw)
		}
		a := w[1]
		w = w[2:]
		return a, nil
	}
	// Conditions.
	for len(w) > 0 {
		kw := w[0]
		if kw != "path" && kw != "type" {
			break
		}
		a, err := arg(kw)
		if err != nil {
			return nil, err
		}
		if kw == "path" {
			if len(a) >= maxPattern {
				return nil, fmt.Errorf("path pattern longer than %d bytes", maxPattern-1)
			}
			r.Path, r.HasPath = a, true
			continue
		}
		t, ok := map[string]uint32{"disk": TypeDisk, "mem": TypeMem, "tape": TypeTape, "tty": TypeTTY}[a]
		if !ok {
			return nil, fmt.Errorf("unknown type %q (disk, mem, tape or tty)", a)
		}
		r.Types |= t
	}
	// Actions.
	for len(w) > 0 {
		kw := w[0]
		switch kw {
		case "hide":
			r.Hide = true
			w = w[1:]
			continue
		case "unhide":
			r.Unhide = true
			w = w[1:]
			continue
		case "path", "type":
			return nil, fmt.Errorf("condition %q after an action: conditions come first", kw)
		case "user", "owner", "group", "mode", "include":
		default:
			return nil, fmt.Errorf("unknown argument %q", kw)
		}
		a, err := arg(kw)
		if err != nil {
			return nil, err
		}
		switch kw {
		case "user", "owner":
			if r.Uid, err = p.id(a, "user", p.res.LookupUser); err != nil {
				return nil, err
			}
			r.SetUid = true
		case "group":
			if r.Gid, err = p.id(a, "group", p.res.LookupGroup); err != nil {
				return nil, err
			}
			r.SetGid = true
		case "mode":
			// setmode(3) also takes symbolic modes, whose result depends
			// on the umask for "+r"; only octal is accepted here.
			m, err := strconv.ParseUint(a, 8, 32)
			if err != nil || m > 0o7777 {
				return nil, fmt.Errorf("invalid mode %q: want an octal mode, at most 07777", a)
			}
			r.Mode, r.SetMode = uint32(m), true
		case "include":
			if r.Include, err = p.include(a); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// id resolves a user or group: a name first, then a number, as
// devfs(8) does (getpwnam, then a number).
func (p *parser) id(a, what string, lookup func(string) (uint32, error)) (uint32, error) {
	if id, err := lookup(a); err == nil {
		return id, nil
	}
	if isNumber(a) {
		n, err := strconv.ParseUint(a, 10, 32)
		if err == nil && n != 0xffffffff { // (uid_t)-1 means "no change" to chown(2)
			return uint32(n), nil
		}
		return 0, fmt.Errorf("%s id %s out of range", what, a)
	}
	return 0, fmt.Errorf("unknown %s %q", what, a)
}

// include resolves an include's argument, a ruleset number (a $name
// has been expanded to one by words). The kernel refuses an include of
// a ruleset that does not exist yet (ESRCH from devfs_rule_insert).
func (p *parser) include(a string) (*Ruleset, error) {
	n, err := strconv.ParseUint(a, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("include wants a ruleset number or $name, not %q", a)
	}
	for _, rs := range p.f.Sets {
		if rs.Num == uint16(n) {
			return rs, nil
		}
	}
	return nil, fmt.Errorf("include of ruleset %d, which is not defined above", n)
}

func isNumber(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// words splits a line as the shell does when rc.subr evaluates it:
// blanks separate words, '...' quotes literally, "..." quotes with $
// expansion, a backslash quotes one character, a word starting with #
// begins a comment, and $name or ${name} is the number of the ruleset of
// that name (rc.subr sets one shell variable per [name=number] line).
func (p *parser) words(line string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(line); {
		c := line[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
			i++
		case c == '#' && !inWord:
			return out, nil
		case c == '\'':
			end := strings.IndexByte(line[i+1:], '\'')
			if end < 0 {
				return nil, errors.New("unterminated ' quote")
			}
			cur.WriteString(line[i+1 : i+1+end])
			inWord = true
			i += end + 2
		case c == '"':
			i++
			for {
				if i >= len(line) {
					return nil, errors.New(`unterminated " quote`)
				}
				c := line[i]
				if c == '"' {
					i++
					break
				}
				if c == '\\' && i+1 < len(line) && strings.IndexByte(`"\$`+"`", line[i+1]) >= 0 {
					cur.WriteByte(line[i+1])
					i += 2
					continue
				}
				if c == '$' {
					n, err := p.expand(line[i:], &cur)
					if err != nil {
						return nil, err
					}
					i += n
					continue
				}
				cur.WriteByte(c)
				i++
			}
			inWord = true
		case c == '\\':
			if i+1 >= len(line) {
				return nil, errors.New("backslash at end of line")
			}
			cur.WriteByte(line[i+1])
			inWord = true
			i += 2
		case c == '$':
			n, err := p.expand(line[i:], &cur)
			if err != nil {
				return nil, err
			}
			inWord = true
			i += n
		default:
			cur.WriteByte(c)
			inWord = true
			i++
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out, nil
}

// expand writes the expansion of the $name or ${name} at the start of s
// and returns how many bytes it took; a '$' not followed by a name is
// itself.
func (p *parser) expand(s string, out *strings.Builder) (int, error) {
	name, n := "", 1
	if strings.HasPrefix(s, "${") {
		end := strings.IndexByte(s, '}')
		if end < 0 {
			return 0, errors.New("unterminated ${")
		}
		name, n = s[2:end], end+1
	} else {
		j := 1
		for j < len(s) && (s[j] == '_' || isAlpha(s[j]) || (j > 1 && isDigit(s[j]))) {
			j++
		}
		name, n = s[1:j], j
	}
	if name == "" {
		out.WriteByte('$')
		return 1, nil
	}
	for _, rs := range p.f.Sets {
		if rs.Name == name {
			out.WriteString(strconv.Itoa(int(rs.Num)))
			return n, nil
		}
	}
	return 0, fmt.Errorf("unknown ruleset $%s (a ruleset is known from its [name=number] line on)", name)
}
