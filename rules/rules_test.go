package rules

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResolver knows users root and nobody, groups wheel, network and dialout.
type fakeResolver struct{}

func (fakeResolver) LookupUser(name string) (uint32, error) {
	switch name {
	case "root":
		return 0, nil
	case "nobody":
		return 65534, nil
	case "1234": // a user whose name is a number: the name wins, as in devfs(8)
		return 42, nil
	}
	return 0, errors.New("no such user")
}

func (fakeResolver) LookupGroup(name string) (uint32, error) {
	switch name {
	case "wheel":
		return 0, nil
	case "network":
		return 69, nil
	case "dialout":
		return 20, nil
	}
	return 0, errors.New("no such group")
}

func mustParse(t *testing.T, src string) *File {
	t.Helper()
	f, err := Parse("test.rules", src, fakeResolver{})
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return f
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, src string
		line      int
		want      string
	}{
		{"rule before section", "add path tun hide", 1, "before the first"},
		{"bad header", "[a b=1]", 1, "bad section header"},
		{"header without number", "[abc]", 1, "bad section header"},
		{"ruleset zero", "[a=0]", 1, "out of range"},
		{"ruleset too big", "[a=65536]", 1, "out of range"},
		{"duplicate name", "[a=1]\n[a=2]", 2, "already defined at line 1"},
		{"duplicate number", "[a=1]\n\n[b=1]", 3, "already used"},
		{"unknown command", "[a=1]\ndel 100", 2, `unknown command "del"`},
		{"unknown argument", "[a=1]\nadd path tun frobnicate", 2, `unknown argument "frobnicate"`},
		{"missing path arg", "[a=1]\nadd path", 2, "expecting argument for path"},
		{"missing mode arg", "[a=1]\nadd path tun mode", 2, "expecting argument for mode"},
		{"bad mode", "[a=1]\nadd path tun mode 0689", 2, "invalid mode"},
		{"mode too big", "[a=1]\nadd path tun mode 17777", 2, "invalid mode"},
		{"symbolic mode", "[a=1]\nadd path tun mode u+rw", 2, "invalid mode"},
		{"unknown user", "[a=1]\n# comment\nadd path tun user nosuchuser", 3, `unknown user "nosuchuser"`},
		{"unknown owner", "[a=1]\nadd path tun owner nosuchuser", 2, `unknown user "nosuchuser"`},
		{"unknown group", "[a=1]\nadd path tun group nosuchgroup", 2, `unknown group "nosuchgroup"`},
		{"uid -1", "[a=1]\nadd path tun user 4294967295", 2, "out of range"},
		{"unknown type", "[a=1]\nadd type block hide", 2, "unknown type"},
		{"condition after action", "[a=1]\nadd hide path tun", 2, "conditions come first"},
		{"unterminated quote", "[a=1]\nadd path 'tun hide", 2, "unterminated '"},
		{"unterminated dquote", "[a=1]\nadd path \"tun hide", 2, "unterminated \""},
		{"trailing backslash", "[a=1]\nadd path tun hide \\", 2, "backslash at end"},
		{"unknown variable", "[a=1]\nadd include $b", 2, "unknown ruleset $b"},
		{"forward include", "[a=1]\nadd include $b\n[b=2]", 2, "unknown ruleset $b"},
		{"include by bare name", "[b=2]\n[a=1]\nadd include b", 3, "include wants a ruleset number"},
		{"include unknown number", "[a=1]\nadd include 7", 2, "not defined above"},
		{"duplicate rule number", "[a=1]\nadd 100 hide\nadd 100 unhide", 3, "rule number 100 already used at line 2"},
		{"rule number too big", "[a=1]\nadd 65536 hide", 2, "out of range"},
		{"autonumber overflow", "[a=1]\nadd 65500 hide\nadd unhide", 3, "no automatic rule number"},
		{"long pattern", "[a=1]\nadd path " + strings.Repeat("x", 200) + " hide", 2, "longer than 199"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("test.rules", c.src, fakeResolver{})
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("Parse = %v, want an *Error", err)
			}
			if pe.Line != c.line || !strings.Contains(pe.Msg, c.want) {
				t.Errorf("error %q, want line %d containing %q", err, c.line, c.want)
			}
			if prefix := fmt.Sprintf("test.rules:%d: ", c.line); !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("error %q, want it to start with %q", err, prefix)
			}
		})
	}
}

// A realistic file: every construct, applied to entries.
const sample = `# cdevfs rules
[devfsrules_hide_all=1]
add hide

[devfsrules_unhide_basic=2]
add path null unhide
add path zero unhide
add path 'u*random' unhide    # urandom only

[net=10]
add include $devfsrules_hide_all
add include ${devfsrules_unhide_basic}
add path 'tun*' unhide mode 0660 group network
add path "tap[0-3]" unhide mode 640 user nobody group 0
add 50 path 'tun*' mode 0600      # rule 50 runs first, so 0660 wins
add path tun user 1234

[nested=11]
add include $net
add path zero mode 0444
`

func TestApply(t *testing.T) {
	f := mustParse(t, sample)
	net, err := f.Ruleset("net")
	if err != nil {
		t.Fatal(err)
	}
	if byNum, _ := f.Ruleset("10"); byNum != net {
		t.Errorf("Ruleset(\"10\") = %v, want the net ruleset", byNum)
	}
	if _, err := f.Ruleset("nosuch"); err == nil || !strings.Contains(err.Error(), "test.rules: no ruleset \"nosuch\"") {
		t.Errorf("Ruleset(nosuch) = %v", err)
	}
	var nums []uint16
	for _, r := range net.Rules {
		nums = append(nums, r.Num)
	}
	if fmt.Sprint(nums) != "[50 100 200 300 400 500]" {
		t.Errorf("rule numbers %v, want [50 100 200 300 400 500] (autonumber: last + 100)", nums)
	}
	def := Attr{Mode: 0600}
	cases := []struct {
		set, name string
		want      Attr
	}{
		{"net", "tun0", Attr{Mode: 0660, Gid: 69}},
		{"net", "tun", Attr{Mode: 0660, Gid: 69, Uid: 42}},
		{"net", "tap2", Attr{Mode: 0640, Uid: 65534, Gid: 0}},
		{"net", "tap4", Attr{Mode: 0600, Hidden: true}},
		{"net", "null", Attr{Mode: 0600}},
		{"net", "urandom", Attr{Mode: 0600}},
		{"net", "random", Attr{Mode: 0600, Hidden: true}},
		{"net", "stdin", Attr{Mode: 0600, Hidden: true}},
		// Depth 1 (vfs.devfs.rule_depth): nested runs net's own rules but
		// not the rulesets net includes, so nothing is hidden.
		{"nested", "random", Attr{Mode: 0600}},
		{"nested", "tun3", Attr{Mode: 0660, Gid: 69}},
		{"nested", "zero", Attr{Mode: 0444}},
		{"devfsrules_unhide_basic", "tun0", Attr{Mode: 0600}},
	}
	for _, c := range cases {
		rs, err := f.Ruleset(c.set)
		if err != nil {
			t.Fatal(err)
		}
		a := def
		rs.Apply(Entry{Path: c.name}, &a)
		if a != c.want {
			t.Errorf("%s on %s: %+v, want %+v", c.set, c.name, a, c.want)
		}
	}
}

// TestApplyKeepsWhatNoRuleSets: rules change only what they name; an
// earlier chmod or hide stays (FreeBSD applyset does not reset).
func TestApplyKeepsWhatNoRuleSets(t *testing.T) {
	rs, _ := mustParse(t, "[a=1]\nadd path tun0 group wheel\nadd path tun1 unhide\n").Ruleset("a")
	a := Attr{Mode: 0604, Uid: 7, Gid: 9, Hidden: true}
	rs.Apply(Entry{Path: "tun0"}, &a)
	if a != (Attr{Mode: 0604, Uid: 7, Gid: 0, Hidden: true}) {
		t.Errorf("tun0: %+v", a)
	}
	rs.Apply(Entry{Path: "tun1"}, &a)
	if a.Hidden {
		t.Errorf("tun1 still hidden after unhide")
	}
}

func TestTypeConditions(t *testing.T) {
	rs, _ := mustParse(t, "[a=1]\nadd type disk type tty hide\n").Ruleset("a")
	for _, c := range []struct {
		typ  uint32
		want bool
	}{{0, false}, {TypeTTY, true}, {TypeMem, false}, {TypeDisk | TypeMem, true}} {
		a := Attr{}
		rs.Apply(Entry{Path: "x", Type: c.typ}, &a)
		if a.Hidden != c.want {
			t.Errorf("type %#x: hidden = %v, want %v", c.typ, a.Hidden, c.want)
		}
	}
}

func TestSelfIncludeIsBounded(t *testing.T) {
	rs, _ := mustParse(t, "[a=1]\nadd path x mode 0644\nadd include $a\n").Ruleset("a")
	a := Attr{}
	rs.Apply(Entry{Path: "x"}, &a)
	if a.Mode != 0644 {
		t.Errorf("mode %o", a.Mode)
	}
}

func TestWords(t *testing.T) {
	p := &parser{f: &File{Sets: []*Ruleset{{Name: "r1", Num: 3}}}}
	cases := []struct{ line, want string }{
		{`add path 'a b' hide`, `[add path a b hide]`},
		{`add path "x$r1" hide`, `[add path x3 hide]`},
		{`add path 'x$r1' hide`, `[add path x$r1 hide]`},
		{`add path a\ b`, `[add path a b]`},
		{`add path a#b # comment`, `[add path a#b]`},
		{`  # only a comment`, `[]`},
		{`add include ${r1}x`, `[add include 3x]`},
		{`add path $ hide`, `[add path $ hide]`},
	}
	for _, c := range cases {
		w, err := p.words(c.line)
		if err != nil {
			t.Errorf("words(%q): %v", c.line, err)
			continue
		}
		if got := fmt.Sprint(w); got != c.want {
			t.Errorf("words(%q) = %s, want %s", c.line, got, c.want)
		}
	}
}

func TestSystemResolver(t *testing.T) {
	src := "[a=1]\nadd path tun user root group root mode 0660\n"
	rs, err := Parse("sys.rules", src, SystemResolver{})
	if err != nil {
		t.Fatalf("root user and group: %v", err)
	}
	if r := rs.Sets[0].Rules[0]; r.Uid != 0 || r.Gid != 0 || !r.SetUid || !r.SetGid {
		t.Errorf("rule %+v", r)
	}
	_, err = Parse("sys.rules", "[a=1]\nadd path tun user cdevfs-no-such-user\n", SystemResolver{})
	if err == nil || err.Error() != `sys.rules:2: unknown user "cdevfs-no-such-user"` {
		t.Errorf("unknown user: %v", err)
	}
}

func TestParseFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "devfs.rules")
	if err := os.WriteFile(path, []byte(sample), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := ParseFile(path, fakeResolver{})
	if err != nil || len(f.Sets) != 4 {
		t.Fatalf("ParseFile: %v, %v", f, err)
	}
	_, err = ParseFile(filepath.Join(dir, "missing"), fakeResolver{})
	if err == nil || !strings.HasSuffix(err.Error(), "missing: no such file or directory") {
		t.Errorf("missing file: %v", err)
	}
}

// The sample file shipped in testdata parses with the fake resolver's
// names (the e2e tests use it with real ones).
func TestTestdataSample(t *testing.T) {
	if _, err := ParseFile("../testdata/devfs.rules", fakeResolver{}); err != nil {
		t.Errorf("testdata/devfs.rules: %v", err)
	}
}

// FuzzParse: Parse never panics; what it accepts applies without
// panicking, and an error always carries the file name and a line in
// the input.
func FuzzParse(f *testing.F) {
	f.Add(sample)
	f.Add("[a=1]\nadd 100 path 'x*' hide unhide user root group 0 mode 0777 include $a\n")
	f.Add("[a=1]\nadd path \"${a}\\\"\" type tty\n")
	f.Fuzz(func(t *testing.T, src string) {
		file, err := Parse("fuzz.rules", src, fakeResolver{})
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.File != "fuzz.rules" || pe.Line < 1 || pe.Line > strings.Count(src, "\n")+1 {
				t.Fatalf("error %v (%#v) for %q", err, err, src)
			}
			return
		}
		for _, rs := range file.Sets {
			for _, name := range []string{"tun0", "null", "", "net/tun0"} {
				a := Attr{}
				rs.Apply(Entry{Path: name}, &a)
			}
		}
	})
}
